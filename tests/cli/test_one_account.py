"""One study, one account: `lora-tune run`, `study show`, `study list` and the HTML report's
summary print the same trial counts and the same compute (lora_tune.study.trial.record.account) for a
study with nested ranks (whose results copy their parent's train_steps), a pruned trial and
confirmation runs."""
from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner

from lora_tune.cli.main import cli
from lora_tune.report.data import summary_data
from lora_tune.report.draw import draw_summary
from lora_tune.study.trial import record
from lora_tune.study.run.runner import create_study, optimize
from lora_tune.study.schema.spec import resolve_objective, validate_spec
from tests.study.toy_task import ToyTask

ROOT = Path(__file__).resolve().parents[2]
STUDY = {
    "study": {"name": "agree", "n_trials": 3, "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "median"},
              "baseline": True, "confirm": {"top": 2, "seeds": 1}},
    "task": {"type": "python", "factory": "tests.study.toy_task:make_task"},
    "search_space": {"rank": {"nested": [2, 4, 8]}, "alpha": {"ratio": [1, 2]}, "targets": "all-linear",
                     "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
    # 192 examples in batches of 64: 3 steps, evaluations after steps 2 and 3
    "train": {"epochs": 1, "batch_size": 64, "evals_per_epoch": 2, "device": "cpu", "threads": 1},
}
HEAD = r"agree: (\d+)/(\d+) trials finished \((\d+) complete, (\d+) pruned, (\d+) failed\)"


class PruneTrialOne(optuna.pruners.BasePruner):
    """Prunes trial 1 (the first sampled one, after the baseline) at its first evaluation."""

    def prune(self, study, trial):
        return trial.number == 1


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _printed(output: str) -> tuple[tuple[int, ...], str]:
    """The counts line and the compute line of `run` / `study show`."""
    (counts,) = re.findall(HEAD, output)
    (compute,) = re.findall(r"^compute: (.*)$", output, flags=re.M)
    return tuple(map(int, counts)), compute


def test_run_show_list_and_the_report_print_one_account(tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_TUNE_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    url = f"sqlite:///{tmp_path / 'agree.db'}"
    path = tmp_path / "agree.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    task = ToyTask()
    spec = validate_spec(STUDY)
    study = create_study(spec, url, task=task)
    study.pruner = PruneTrialOne()
    optimize(study, resolve_objective(spec, task), task=task)  # the budget: the baseline and two nested trials
    run = _invoke("run", str(path), "--storage", url)  # the budget is used: it confirms the top 2 and sums up
    assert "confirmation: 2 run(s) of the top 2 config(s)" in run
    show = _invoke("study", "show", "agree", "--storage", url)
    listed = _invoke("study", "list", "--storage", url)
    study = optuna.load_study(study_name="agree", storage=url)
    report = summary_data(study)

    trials = study.get_trials()
    kinds = [record.kind_of(t) for t in trials]
    assert kinds.count(record.Kind.NESTED) == 4 and kinds.count(record.Kind.CONFIRMATION) == 2
    assert all(t.user_attrs[record.TRAIN_STEPS]
               == trials[t.user_attrs[record.NESTED_PARENT]].user_attrs[record.TRAIN_STEPS]
               for t in trials if record.kind_of(t) == record.Kind.NESTED)  # they copy their parent's steps
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    assert states["PRUNED"] == 3  # trial 1 and its two smaller ranks
    confirm_trained = sum(1 for t in trials if record.kind_of(t) == record.Kind.CONFIRMATION
                          and not t.user_attrs.get(record.CONFIRM_SHARED))
    # the baseline and the complete nested trial trained fully, the pruned one 2 of 3 steps, and each
    # confirmation run that trained; the nested results trained nothing of their own
    used = 1 + 2 / 3 + 1 + confirm_trained
    account = record.account(trials)
    assert account.used == pytest.approx(used) and account.results == len(trials) == 9
    assert report["pruning"]["trials_counted"] == 3 + confirm_trained  # not the nested results' copied steps
    assert report["pruning"]["steps_run"] == 3 + 2 + 3 + 3 * confirm_trained

    counts = (3, 3, states["COMPLETE"], states["PRUNED"], states["FAIL"])
    line = account.compute_line()
    assert f"{used:.1f} full-trial equivalents for 9 results" in line
    assert _printed(run) == _printed(show) == (counts, line)
    (row,) = [r for r in listed.splitlines() if "│ agree" in r or r.startswith("agree")]
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[2:7] == ["3/3", *map(str, counts[2:]), f"{used:.1f}"]
    assert (report["done"], report["budget"]) == (3, 3) and report["compute"]["line"] == line
    assert tuple(report["counts"][s] for s in ("COMPLETE", "PRUNED", "FAIL")) == counts[2:]
    html = draw_summary(report, "summary")
    assert "3/3 finished" in html and line in html
