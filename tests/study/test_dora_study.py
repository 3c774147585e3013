"""DoRA as a search dimension: ``use_dora: {choices: [false, true]}`` in a study file becomes a
trial parameter, reaches the trial's LoraConfig (and so the trained model), and the cost panels
of the report tell the DoRA trials apart."""
from __future__ import annotations

import pytest
from optuna.trial import FixedTrial, TrialState

from lora_tune import LoraConfig, SearchSpace, StudySpecError
from lora_tune.report import data
from lora_tune.study.run.runner import create_study, load_study, optimize
from lora_tune.study.storage.opening import dispose_storage
from tests.study.conftest import make_spec


def test_use_dora_is_a_searchable_key():
    space = SearchSpace.from_dict({"rank": 4, "use_dora": {"choices": [False, True]}})
    assert [p.name for p in space.sampled] == ["use_dora"]
    assert space.suggest(FixedTrial({"use_dora": True})) == LoraConfig(rank=4, use_dora=True)
    assert space.suggest(FixedTrial({"use_dora": False})).use_dora is False
    assert SearchSpace.from_dict({"use_dora": True}).suggest(FixedTrial({})).use_dora is True


@pytest.mark.parametrize("value, message", [
    ({"choices": [False, "yes"]}, "search_space.use_dora"),
    ({"type": "int", "low": 0, "high": 1}, "search_space.use_dora"),
    (1, "search_space.use_dora"),
])
def test_bad_use_dora_values_are_refused_naming_the_key(value, message):
    with pytest.raises(StudySpecError, match=message):
        SearchSpace.from_dict({"use_dora": value})


def test_a_study_searching_use_dora_trains_both_and_the_cost_panels_split_them(tmp_path, toy_task):
    url = f"sqlite:///{tmp_path / 'dora.db'}"
    space = {"rank": 4, "alpha": 8.0, "targets": "all-linear", "use_dora": {"choices": [False, True]},
             "learning_rate": 1e-2}
    spec = make_spec(study={"n_trials": 4, "sampler": {"type": "grid"}}, search_space=space)
    create_study(spec, url, task=toy_task)
    study, loaded = load_study("toy", url, allow_code=["tests.study.toy_task:*"])
    optimize(study, loaded, task=toy_task)
    trials = [t for t in study.get_trials() if t.state == TrialState.COMPLETE and "use_dora" in t.params]
    assert {t.params["use_dora"] for t in trials} == {False, True}
    for t in trials:  # the config the trial trained with, as recorded
        assert t.user_attrs["lora_config"]["use_dora"] is t.params["use_dora"]
        assert t.user_attrs["train_seconds"] > 0 and "peak_memory_bytes" in t.user_attrs
    # DoRA adds one magnitude per output row of every adapted layer to the trainable parameters
    by_dora = {t.params["use_dora"]: t.user_attrs["trainable_params"] for t in trials}
    assert by_dora[True] > by_dora[False]
    for x in ("train_seconds", "peak_memory_bytes", "trainable_params"):
        d = data.cost_data(study, x=x)
        assert d["dora_varies"] is True
        assert d["series"] == ["none, DoRA", "none, LoRA"]
        dora = {p["number"]: p["use_dora"] for p in d["points"]}
        assert all(dora[t.number] is t.params["use_dora"] for t in trials)
        assert all(p["series"] == ("none, DoRA" if p["use_dora"] else "none, LoRA") for p in d["points"])
    dispose_storage(study._storage)
