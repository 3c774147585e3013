"""best.yaml: content, provenance, load_config, choosing the trial, bad input."""
from __future__ import annotations

from importlib import metadata

import optuna
import pytest
import yaml
from click.testing import CliRunner

import lora_tune
from lora_tune.cli.main import cli
from lora_tune.errors import ConfigError
from lora_tune.export import best_config_dict, choose_trial, export_best, load_config
from tests.report.lora_study_factory import SPEC, make_lora_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
SECRET_URL = "postgresql+psycopg://tuner:hunter2@db.example:5432/studies"


@pytest.fixture(scope="module")
def study():
    return make_lora_study()


def test_best_yaml_content(study, tmp_path):
    out = tmp_path / "best.yaml"
    content = export_best(study, out, storage_url=SECRET_URL)
    best = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    on_disk = yaml.safe_load(out.read_text())
    assert on_disk == content
    assert out.read_text().startswith("# Best LoRA config of study 'synthetic'")
    assert content["trial"]["number"] == best.number and content["metric"]["value"] == best.value
    assert content["metric"]["name"] == "accuracy" and content["metric"]["direction"] == "maximize"
    assert content["metric"]["all"] == best.user_attrs["metric_values"]
    modules = best.user_attrs["target_modules"]
    assert content["targets"] == {"preset": best.user_attrs["target_preset"],
                                  "given": best.user_attrs["lora_config"]["targets"], "modules": modules}
    assert content["lora"]["targets"] == ["re:" + m.replace(".", r"\.") for m in modules]
    assert content["lora"]["rank"] == best.params["rank"]
    # training settings: the study file's train section plus the trial's non-LoRA params
    assert content["train"] == {**SPEC["train"], "learning_rate": best.params["learning_rate"]}
    prov = content["provenance"]
    assert prov["storage"] == "postgresql+psycopg://tuner:***@db.example:5432/studies"
    assert "hunter2" not in out.read_text()
    assert prov["versions"] == {"lora_tune": lora_tune.__version__, "torch": metadata.version("torch"),
                                "optuna": optuna.__version__}
    assert (prov["study"], prov["trial"]) == ("synthetic", best.number)


def test_load_config_returns_the_trials_lora_config(study, tmp_path):
    out = tmp_path / "best.yaml"
    export_best(study, out, trial_number=2)
    cfg = load_config(out)
    trial = study.trials[2]
    assert isinstance(cfg, lora_tune.LoraConfig)
    alpha = trial.params["rank"] * trial.params["alpha_ratio"]
    assert (cfg.rank, cfg.alpha, cfg.dropout) == (trial.params["rank"], alpha, trial.params["dropout"])
    assert cfg.quant_bits == (trial.params["quant_bits"] or None)
    assert lora_tune.load_config is load_config  # the public name


def test_exact_targets_select_only_the_named_modules(tmp_path):
    """A plain "0" would also match "1.0"; the exported patterns must not."""
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=1.0, user_attrs={
        "lora_config": lora_tune.LoraConfig(rank=2, targets=["0"]).to_dict(), "target_modules": ["0"]}))
    export_best(study, tmp_path / "best.yaml")
    names = [n for n, _ in lora_tune.find_targets(model, load_config(tmp_path / "best.yaml"))]
    assert names == ["0"]
    assert sorted(n for n, _ in lora_tune.find_targets(model, lora_tune.LoraConfig(targets=["0"]))) == ["0", "1.0"]


@pytest.mark.parametrize("text, field", [
    ("rank: 8\n", "lora"),
    ("lora: {rank: 0}\n", "rank"),
    ("lora: {rank: 4, colour: red}\n", "colour"),
    ("lora: [unclosed\n", "path"),
])
def test_load_config_errors_name_the_field(tmp_path, text, field):
    path = tmp_path / "best.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.field == field


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="path: got '.*missing.yaml'"):
        load_config(tmp_path / "missing.yaml")


def test_choose_trial_errors(study):
    pruned = next(t.number for t in study.trials if t.state.name == "PRUNED")
    with pytest.raises(ConfigError, match=f"Trial #{pruned} is pruned"):
        choose_trial(study, pruned)
    with pytest.raises(ConfigError, match="--trial: got 999; allowed: a trial number of this study: 0, 1, 2"):
        choose_trial(study, 999)
    multi = make_lora_study(multi=True)
    with pytest.raises(ConfigError, match="Pareto-optimal trials: ") as err:
        choose_trial(multi)
    front = sorted(t.number for t in multi.best_trials)
    assert ", ".join(map(str, front)) in str(err.value)
    assert choose_trial(multi, front[0]).number == front[0]


def test_trial_without_lora_config_is_refused():
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=1.0))
    with pytest.raises(ConfigError, match="lora_config"):
        best_config_dict(study, study.trials[0])


def test_cli_export_trial_and_errors(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    make_lora_study(url, name="exp")
    runner = CliRunner()
    out = tmp_path / "best.yaml"
    result = runner.invoke(cli, ["export", "exp", "--storage", url, "--trial", "4", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert yaml.safe_load(out.read_text())["trial"]["number"] == 4
    assert yaml.safe_load(out.read_text())["provenance"]["storage"] == url
    result = runner.invoke(cli, ["export", "exp", "--storage", url, "--trial", "3", "-o", str(tmp_path / "x.yaml")])
    assert result.exit_code == 2 and "Trial #3 is pruned" in result.stderr
    assert not (tmp_path / "x.yaml").exists()
    # no adapter was saved for these synthetic trials: exit 2, nothing written
    result = runner.invoke(cli, ["export", "exp", "--storage", url, "-o", str(tmp_path / "y.yaml"),
                                 "--adapter", str(tmp_path / "adapter")])
    assert result.exit_code == 2 and "a trial with a saved adapter: none in this study" in result.stderr
    assert not (tmp_path / "y.yaml").exists() and not (tmp_path / "adapter").exists()
