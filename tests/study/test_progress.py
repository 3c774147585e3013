"""The end-of-study summary counts a failed-and-retried trial once, as the budget does."""
from __future__ import annotations

import io

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from lora_tune.study.storage.budget import budget_done
from lora_tune.study.run.progress import render_outcome, study_outcome
from tests.study.conftest import make_spec


def test_retried_trial_counts_once_in_summary_and_budget():
    study = optuna.create_study(direction="maximize")
    dist = {"x": FloatDistribution(0, 1)}
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, params={"x": 0.1}, distributions=dist))
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.2}, distributions=dist))
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.7, params={"x": 0.2}, distributions=dist,
                                 system_attrs={"failed_trial": 1}))
    outcome = study_outcome(study, make_spec(study={"n_trials": 2, "metric": "accuracy", "direction": "maximize"}))
    assert outcome.finished == 2 == budget_done(study.get_trials())
    out = io.StringIO()
    render_outcome(outcome, Console(file=out, width=200))
    assert "2/2 trials finished (2 complete, 0 pruned, 1 failed, of which 1 ran again)" in out.getvalue()
