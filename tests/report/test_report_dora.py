"""The cost panels (metric vs. trainable parameters, peak memory, train time) tell DoRA trials
apart when a study has both: data first (what tests should assert on), then the drawing."""
from __future__ import annotations

import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution

from lora_tune.report import data, draw

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(trials: list[tuple[float, int, bool | None, dict]]) -> optuna.Study:
    """(value, quant_bits param, use_dora param or None (then only in lora_config), user attrs)."""
    study = optuna.create_study(direction="maximize")
    for value, bits, dora, attrs in trials:
        params = {"rank": 8, "quant_bits": bits}
        dists = {"rank": IntDistribution(2, 16), "quant_bits": CategoricalDistribution([0, 8, 4])}
        config = {"rank": 8, "quant_bits": bits or None}
        if dora is None:
            config["use_dora"] = attrs.pop("config_dora", False)
        else:
            params["use_dora"], dists["use_dora"] = dora, CategoricalDistribution([False, True])
        study.add_trial(optuna.trial.create_trial(
            value=value, params=params, distributions=dists,
            user_attrs={"target_preset": "attention", "is_baseline": False, "lora_config": config, **attrs}))
    return study


def test_searched_use_dora_splits_each_quant_bits_group():
    study = _study([
        (0.70, 0, False, {"train_seconds": 10.0}),
        (0.74, 0, True, {"train_seconds": 13.0}),
        (0.72, 4, True, {"train_seconds": 16.0}),
        (0.69, 4, False, {"train_seconds": 12.0}),
        (0.75, 8, True, {"train_seconds": 14.0}),
    ])
    d = data.cost_data(study, x="train_seconds")
    assert d["dora_varies"] is True
    assert d["series"] == ["none, DoRA", "none, LoRA", "4, DoRA", "4, LoRA", "8, DoRA"]
    assert [p["series"] for p in d["points"]] == ["none, LoRA", "none, DoRA", "4, DoRA", "4, LoRA", "8, DoRA"]
    assert [p["use_dora"] for p in d["points"]] == [False, True, True, False, True]
    assert d["front_numbers"] == [0, 1, 4]  # cheapest first, then each better metric
    fig = draw.draw_cost(d, "Metric vs. train time")
    traces = [t for t in fig.data if t.mode == "markers"]
    assert [t.name for t in traces] == d["series"]
    symbols = {t.name: set(t.marker.symbol) for t in traces}
    assert symbols["none, DoRA"] == {"diamond"} and symbols["none, LoRA"] == {"circle"}
    assert fig.layout.legend.title.text == "quant bits, LoRA / DoRA"


def test_dora_read_from_the_config_when_it_is_not_a_parameter():
    study = _study([(0.7, 0, None, {"peak_memory_bytes": 5, "config_dora": True}),
                    (0.8, 0, None, {"peak_memory_bytes": 9, "config_dora": False})])
    d = data.cost_data(study, x="peak_memory_bytes")
    assert [p["use_dora"] for p in d["points"]] == [True, False]
    assert d["series"] == ["none, DoRA", "none, LoRA"]


def test_a_study_without_dora_keeps_the_quant_bits_series():
    study = _study([(0.7, 0, None, {"trainable_params": 10}), (0.8, 4, None, {"trainable_params": 20})])
    d = data.cost_data(study)
    assert d["dora_varies"] is False and d["series"] == d["quant_bits"] == ["none", "4"]
    assert [p["series"] for p in d["points"]] == ["none", "4"]
    assert draw.draw_cost(d, "t").layout.legend.title.text == "quant bits"
