"""`export_trials`: the trials table as CSV / Parquet."""
from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest

from lora_tune.errors import ConfigError
from lora_tune.export import export_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def mixed():
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(
        value=1.0, user_attrs={"odd": 3, "mix": 1.5, "metric_values": {"accuracy": 0.5}},
        system_attrs={"sampler:internal": 1}))
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, user_attrs={"odd": "n/a", "mix": 2, "traceback": "Traceback\n  line"}))
    return study


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_mixed_values_bulky_attrs_and_no_system_attrs(mixed, tmp_path, suffix):
    out = export_trials(mixed, tmp_path / f"t{suffix}")
    df = pd.read_csv(out, keep_default_na=False, dtype={"odd": str}) if suffix == ".csv" else pd.read_parquet(out)
    assert list(df["odd"]) == ["3", "n/a"]
    assert list(df["mix"]) == [1.5, 2.0]
    assert json.loads(df["metric_values"][0]) == {"accuracy": 0.5}
    assert df["traceback"][1] == "Traceback\n  line"
    assert list(df["state"]) == ["COMPLETE", "FAIL"]
    assert not any("sampler" in c or "system" in c for c in df.columns)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


def test_output_must_be_csv_or_parquet(mixed, tmp_path):
    with pytest.raises(ConfigError, match="ending in .csv or .parquet"):
        export_trials(mixed, tmp_path / "t.json")
