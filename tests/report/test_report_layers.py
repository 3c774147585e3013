"""The "metric by layer range" panel: typed records from a real Optuna study, and its drawing."""
from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from lora_tune.errors import ConfigError
from lora_tune.report import PANELS, load_definition, render_panel
from lora_tune.report.layer_ranges import LayerPoint, LayerRange, layers_data, layers_of

optuna.logging.set_verbosity(optuna.logging.WARNING)
LABELS = ["all", "last:4", "last:8", "first:2", "0|1"]
DIST = {"layers": CategoricalDistribution(LABELS), "targets": CategoricalDistribution(["attention", "all-linear"])}


def _add(study, value, layers=None, *, targets="attention", state=TrialState.COMPLETE, config_layers="unset",
         baseline=False):
    params = {"targets": targets} | ({"layers": layers} if layers is not None else {})
    attrs = {"target_preset": targets, "is_baseline": baseline}
    if config_layers != "unset":
        attrs["lora_config"] = {"targets": targets, "layers": config_layers}
    study.add_trial(optuna.trial.create_trial(
        state=state, value=value if state == TrialState.COMPLETE else None, params=params,
        distributions={k: DIST[k] for k in params}, user_attrs=attrs))


@pytest.fixture
def study():
    s = optuna.create_study(direction="maximize")
    _add(s, 0.70, "all", baseline=True)          # 0
    _add(s, 0.80, "last:4")                      # 1
    _add(s, 0.60, "last:4", targets="all-linear")  # 2
    _add(s, 0.75, "last:8")                      # 3
    _add(s, 0.50, "0|1")                         # 4
    _add(s, 0.90, "first:2", state=TrialState.PRUNED)  # 5: not complete, left out
    _add(s, 0.65, config_layers={"last": 4})     # 6: no param, the recorded config says last:4
    _add(s, 0.55)                                # 7: nothing recorded: every block
    return s


def test_groups_values_best_mean_and_order(study):
    d = layers_data(study)
    assert d.metric == "value" and d.maximize
    assert [r.label for r in d.ranges] == ["all", "last:8", "last:4", "0|1"]
    by = {r.label: r for r in d.ranges}
    assert [p.number for p in by["last:4"].points] == [1, 2, 6]
    assert by["last:4"].best == 0.80 and by["last:4"].mean == pytest.approx((0.80 + 0.60 + 0.65) / 3)
    assert by["last:4"].points[1] == LayerPoint(2, 0.60, "all-linear", False)
    assert by["all"] == LayerRange("all", [LayerPoint(0, 0.70, "attention", True),
                                           LayerPoint(7, 0.55, "attention", False)],
                                   0.70, pytest.approx(0.625))
    assert by["all"].n == 2 and "first:2" not in by


def test_a_minimised_metric_takes_the_smallest_as_best():
    s = optuna.create_study(direction="minimize")
    _add(s, 2.0, "last:4")
    _add(s, 1.0, "last:4")
    assert layers_data(s).ranges[0].best == 1.0


def test_objective_must_exist(study):
    with pytest.raises(ConfigError, match="objective: got 3; allowed: an index from 0 to 0"):
        layers_data(study, objective=3)


def test_layers_of_reads_params_then_the_config(study):
    trials = study.get_trials()
    assert [layers_of(t) for t in trials] == ["all", "last:4", "last:4", "last:8", "0|1", "first:2", "last:4", "all"]


def test_registered_drawn_and_listed_in_both_dashboards(study):
    panel = PANELS["layers"]
    assert panel.lora_specific and panel.options == ["objective"]
    fig = render_panel(study, panel.name, "Metric by layer range", {})
    assert [t.name for t in fig.data] == ["all (n=2)", "last:8 (n=1)", "last:4 (n=3)", "0|1 (n=1)"]
    assert list(fig.data[2].y) == [0.80, 0.60, 0.65]
    empty = render_panel(optuna.create_study(), "layers", "t", {})
    assert not empty.data and "no complete trials" in empty.layout.annotations[0].text
    for kind in ("single-objective", "multi-objective"):
        names = [p.panel for p in load_definition(kind).panels]
        assert names.index("layers") == names.index("presets") + 1
