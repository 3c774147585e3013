"""`study.lr_probe` from the command line: `validate` says what it will run (and runs nothing), bad
settings are exit 2 naming the key, and `run`, `study show`, `study list` and the report's summary
count the probe in the same compute."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner

from lora_tune.cli.main import cli
from lora_tune.report.data import summary_data
from lora_tune.study.trial import record

STUDY = {
    "study": {"name": "probed", "n_trials": 2, "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"},
              "baseline": False, "lr_probe": {"steps": 12, "data_share": 0.5, "range": [0.25, 4]}},
    "task": {"type": "python", "factory": "tests.study.toy_task:make_task"},
    "search_space": {"rank": {"choices": [2, 4]}, "targets": "all-linear",
                     "learning_rate": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True}},
    # 192 examples in batches of 64: 3 steps a trial
    "train": {"epochs": 1, "batch_size": 64, "evals_per_epoch": 1, "device": "cpu", "threads": 1},
}


def _write(folder: Path, study: dict) -> Path:
    path = folder / "probed.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _compute(output: str) -> str:
    (line,) = re.findall(r"^compute: (.*)$", output, flags=re.M)
    return line


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_run_show_list_and_the_report_count_the_probe_in_one_account(cli_dir):
    url = f"sqlite:///{cli_dir / 'probed.db'}"
    path = _write(cli_dir, STUDY)
    code, run = _invoke("run", str(path), "--storage", url)
    assert code == 0, run
    code, show = _invoke("study", "show", "probed", "--storage", url)
    assert code == 0, show
    code, listed = _invoke("study", "list", "--storage", url)
    study = optuna.load_study(study_name="probed", storage=url)
    probe = study.user_attrs[record.LR_PROBE]
    assert probe["steps"] <= 12 and probe["compute"] == pytest.approx(probe["steps"] / 3)
    account = record.study_account(study)
    assert account.probe == probe["compute"] and account.used == pytest.approx(2 + probe["compute"])
    assert account.saved == pytest.approx(0.0, abs=1e-9)  # the probe is no result: nothing saved, nothing lost
    line = account.compute_line()
    assert f"{account.probe:.1f} of it on the learning-rate probe" in line
    assert _compute(run) == _compute(show) == line
    (probe_line,) = {m for m in re.findall(r"^lr probe: .*$", show, flags=re.M)}
    assert probe_line in run and f"learning_rate searched in [{probe['range'][0]:.3g}" in probe_line
    assert run.count(probe_line) == 2  # when it ran, and in the summary
    (row,) = [r for r in listed.splitlines() if "│ probed" in r]
    assert f"{account.used:.1f}" in [c.strip() for c in row.strip("│ ").split("│")]
    assert summary_data(study)["compute"]["line"] == line


def test_validate_says_what_the_probe_will_do_and_runs_nothing(cli_dir):
    code, out = _invoke("validate", str(_write(cli_dir, STUDY)))
    assert code == 0, out
    assert ("lr_probe: on, runs before the first trial (12 steps at rates 1e-05 to 1 on 50% of the training "
            "data); the learning_rate range placed at [0.25, 4] x its rate") in out
    off = copy.deepcopy(STUDY)
    off["study"]["lr_probe"] = False
    code, out = _invoke("validate", str(_write(cli_dir, off)))
    assert code == 0 and "lr_probe: off" in out


@pytest.mark.parametrize("setting, key, allowed", [
    ({"steps": 0}, "study.lr_probe.steps", "a whole number of optimizer steps ≥ 1"),
    ({"steps": -5}, "study.lr_probe.steps", "a whole number of optimizer steps ≥ 1"),
    ({"data_share": 0}, "study.lr_probe.data_share", "a share of the training data in (0, 1]"),
    ({"data_share": 1.5}, "study.lr_probe.data_share", "a share of the training data in (0, 1]"),
    ({"range": [4, 0.25]}, "study.lr_probe.range", "0 < low < high"),
    ({"stepz": 3}, "study.lr_probe.stepz", "steps, data_share, range"),
    ("sometimes", "study.lr_probe", "true, false or a mapping"),
])
def test_bad_probe_settings_are_exit_2_naming_the_key_and_what_is_allowed(cli_dir, setting, key, allowed):
    bad = copy.deepcopy(STUDY)
    bad["study"]["lr_probe"] = setting
    path = _write(cli_dir, bad)
    for command in (["validate", str(path)], ["run", str(path), "--storage", f"sqlite:///{cli_dir / 'x.db'}"]):
        code, out = _invoke(*command)
        assert code == 2 and key in out and allowed in out, out
    assert not (cli_dir / "x.db").exists()


def test_a_range_without_a_learning_rate_range_to_place_is_exit_2(cli_dir):
    bad = copy.deepcopy(STUDY)
    bad["search_space"]["learning_rate"] = {"choices": [1e-3, 1e-2]}
    code, out = _invoke("validate", str(_write(cli_dir, bad)))
    assert code == 2 and "study.lr_probe.range" in out and "not a range" in out
