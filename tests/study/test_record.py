"""The trial record (lora_tune.study.trial.record): stored names, kinds, fidelity, the compute account,
and the one rule for which way a metric goes."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FixedTrial, TrialState, create_trial

from lora_tune.study.trial import record
from lora_tune.study.schema.spec import default_direction
from lora_tune.tasks.base import metric_direction
from lora_tune.train import TrainResult
from lora_tune.train.callbacks import CallbackSummary

ROOT = Path(__file__).resolve().parents[2]
DIST = {"x": FloatDistribution(0, 1)}


def _trial(state=TrialState.COMPLETE, value=0.5, system_attrs=None, **attrs):
    return create_trial(state=state, value=value if state == TrialState.COMPLETE else None, params={"x": 0.5},
                        distributions=DIST, user_attrs=attrs, system_attrs=system_attrs)


def test_every_documented_key_is_named_in_the_record_and_every_name_is_documented():
    doc = (ROOT / "docs/architecture.md").read_text()
    section = doc[doc.index("## Trial record"):]
    section = section[:section.index("Study user attributes")]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    documented = {key for row in rows for key in re.findall(r"`([a-z_]+)`", row)}
    names = {v for k, v in vars(record).items() if k.isupper() and isinstance(v, str)}
    assert documented == names - set(record.STUDY_ATTRS)
    study_attrs = doc[doc.index("Study user attributes"):]
    assert all(f"`{name}`" in study_attrs for name in record.STUDY_ATTRS)
    # base_load's values: every one documented in its row, none other
    (base_load,) = [line for line in section.splitlines() if line.startswith("| `base_load`")]
    meaning = base_load.split("|")[3]
    assert set(re.findall(r"`([a-z_]+)`", meaning)) == {b.value for b in record.BaseLoad}
    # the stored names themselves: studies written before must still read
    assert (record.IS_BASELINE, record.NESTED_PARENT, record.CONFIRM_OF, record.CONFIRM_SHARED, record.FIDELITY) == (
        "is_baseline", "nested_parent", "confirm_of", "confirm_shared", "fidelity")


def test_kind_and_baseline():
    baseline_failed = _trial(TrialState.FAIL, is_baseline=True)
    baseline_retried = _trial(is_baseline=True)
    nested = _trial(is_baseline=False, nested_parent=0)
    confirmation = _trial(is_baseline=False, confirm_of=3, seed=1000)
    assert [record.kind_of(t) for t in (baseline_failed, _trial(), nested, confirmation)] == [
        record.Kind.BASELINE, record.Kind.BUDGET, record.Kind.NESTED, record.Kind.CONFIRMATION]
    # the complete baseline when there is one (the report, the CLI and the runner agree)
    assert record.find_baseline([nested, baseline_failed, baseline_retried]) is baseline_retried
    assert record.find_baseline([nested, baseline_failed]) is baseline_failed
    assert record.find_baseline([nested, confirmation]) is None


def test_fidelity_reads_records_written_before_it_existed():
    old = _trial(train_steps=30, planned_steps=40)  # no fidelity attribute
    assert record.fidelity_of(old) == record.Fidelity(1.0, 30, 40)
    nested = _trial(train_steps=40, planned_steps=40, nested_parent=0,
                    fidelity={"data_fraction": 0.5, "steps": 40, "planned_steps": 40, "rank": 4, "trained_rank": 8})
    assert record.fidelity_of(nested) == record.Fidelity(0.5, 40, 40, 4, 8)
    assert record.fidelity_of(nested).to_attr() == nested.user_attrs["fidelity"]
    assert record.fidelity_of(_trial(fidelity={"data_fraction": "nan"})).data_fraction == 1.0


def test_the_account_counts_training_once():
    run = {"planned_steps": 40, "train_seconds": 4.0}
    trials = [
        _trial(is_baseline=True, train_steps=40, **run),
        _trial(TrialState.PRUNED, train_steps=10, fidelity={"data_fraction": 0.5}, **run),  # 1/4 of half the data
        # its nested results copy the parent's steps but trained nothing of their own
        _trial(TrialState.PRUNED, train_steps=10, nested_parent=1, planned_steps=40),
        _trial(train_steps=40, **run),
        _trial(train_steps=40, nested_parent=3, planned_steps=40),
        _trial(TrialState.FAIL, train_steps=4, **run),  # failed: its skipped steps are not pruning's
        _trial(train_steps=40, confirm_of=3, seed=1000, **run),
        _trial(train_steps=40, confirm_of=4, seed=1000, confirm_shared=True, planned_steps=40),
        _trial(TrialState.COMPLETE, system_attrs={"failed_trial": 5}, train_steps=40, **run),  # 5 ran again
        _trial(TrialState.RUNNING),
    ]
    a = record.account(trials)
    assert a.results == 9 and a.done == 4 and a.requeued == 1  # budget slots: 0, 1, 3 and 5 (retried as 8)
    assert a.states == {"COMPLETE": 6, "PRUNED": 2, "FAIL": 1, "RUNNING": 1}
    assert a.used == pytest.approx(1 + 0.25 * 0.5 + 1 + 0.1 + 1 + 1)
    assert a.confirm == pytest.approx(1.0)
    assert (a.counted, a.pruned, a.steps_run, a.steps_saved) == (6, 1, 40 + 10 + 40 + 4 + 40 + 40, 30)
    assert a.seconds_saved == pytest.approx(4.0 / 10 * 30)
    assert a.saved == pytest.approx(1 - a.used / 9)
    assert a.compute_line() == (f"{a.used:.1f} full-trial equivalents for 9 results ({a.saved:.0%} saved by pruning, "
                                "nesting and data fractions; 1.0 of it on confirmation runs)")
    assert (record.budget_used(trials), record.budget_done(trials)) == (5, 4)  # the running trial uses one


def test_the_account_means_setup_and_training_seconds_of_trials_that_recorded_both():
    trials = [
        _trial(train_steps=3, planned_steps=3, train_seconds=2.0, setup_seconds=1.0),
        _trial(TrialState.PRUNED, train_steps=1, planned_steps=3, train_seconds=1.0, setup_seconds=3.0),
        _trial(train_steps=3, planned_steps=3, train_seconds=2.0, setup_seconds=1.0, nested_parent=0),  # copied
        _trial(train_steps=3, planned_steps=3, train_seconds=5.0),  # recorded before setup was measured
        _trial(TrialState.FAIL, setup_seconds=9.0),  # no training recorded
        _trial(TrialState.RUNNING, train_seconds=1.0, setup_seconds=1.0),  # not finished
    ]
    a = record.account(trials)
    assert (a.timed, a.setup_seconds, a.train_seconds) == (2, 4.0, 3.0)
    assert (a.mean_setup_seconds, a.mean_train_seconds) == (2.0, 1.5)
    assert a.time_line() == "setup 2.00 s, training 1.50 s per trial (mean of 2 trials)"
    assert record.account(trials[3:]).time_line() is None  # nothing to show for an older study
    assert record.timings_of(trials[0]).setup_seconds == 1.0 and record.timings_of(trials[3]).setup_seconds is None
    assert record.SETUP_SECONDS in record.RUN_ONLY and record.BASE_LOAD not in record.RUN_ONLY


def test_a_callback_summary_is_recorded_as_a_train_result():
    fields = {"steps": 6, "planned_steps": 8, "seconds": 2.0, "examples": 48, "throughput": 30.0,
              "peak_memory_bytes": 1024, "final_metrics": {"eval_loss": 0.5, "acc": float("nan")},
              "compute_seconds": 1.6, "tokens": 480, "tokens_per_second": 300.0, "peak_memory_total_bytes": 4096}
    summary = CallbackSummary(**fields, trainable_params=99)
    attrs = record.run_attrs(summary)
    assert attrs == record.run_attrs(TrainResult(**fields))
    assert attrs == {"peak_memory_bytes": 1024, "peak_memory_total_bytes": 4096, "train_seconds": 2.0,
                     "throughput": 30.0, "tokens_per_second": 300.0, "train_tokens": 480, "train_steps": 6,
                     "planned_steps": 8, "metric_values": {"eval_loss": 0.5, "acc": "nan"}}
    # the summary's names from before it was a TrainResult still read
    assert (summary.train_steps, summary.train_seconds, summary.train_tokens,
            summary.train_examples) == (6, 2.0, 480, 48)
    assert summary.metric_values is summary.final_metrics and summary.to_dict()["steps"] == 6


@pytest.mark.parametrize("metric, direction", [
    ("eval_loss", "minimize"), ("train_loss", "minimize"), ("perplexity", "minimize"), ("eval_perplexity", "minimize"),
    ("error", "minimize"), ("eval_mse", "minimize"), ("WER", "minimize"), ("cer", "minimize"),
    ("trainable_params", "minimize"), ("accuracy", "maximize"), ("macro_f1", "maximize"), ("eval_bleu", "maximize"),
])
def test_one_rule_for_which_way_a_metric_goes(toy_task, metric, direction):
    import torch

    from lora_tune.tasks.python_factory import DictTask

    assert metric_direction(metric) == direction
    assert default_direction(metric, toy_task) == direction  # a metric other than the task's default
    data = (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    factory = DictTask({"model": torch.nn.Linear(2, 2), "train": data, "eval": data, "metrics": [metric],
                        "evaluate": lambda model, batch_size: {metric: 0.0}})
    assert factory.default_direction == direction
    assert default_direction(metric, factory) == direction  # the factory's default metric


def test_a_confirmation_run_of_the_baseline_is_a_confirmation_run():
    trial = FixedTrial({"x": 0.5})  # as confirm.py trains it: the baseline's flag, and confirm_of
    trial.set_user_attr(record.IS_BASELINE, True)
    trial.set_user_attr(record.CONFIRM_OF, 2)
    assert record.kind_of(trial) == record.Kind.CONFIRMATION and not record.in_budget(trial)
