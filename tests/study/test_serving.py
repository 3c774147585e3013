"""``study.serve``: each engine's rules (lora_tune/serving.py) remove exactly the choices they should,
a study for vLLM never samples what vLLM cannot serve, validate lists what was removed, and bad
input is exit 2 naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState

from lora_tune import LoraConfig, SearchSpace, StudySpecError
from lora_tune import serving
from lora_tune.cli.main import cli
from lora_tune.lora.config import BIASES, INITS
from lora_tune.study.run.runner import create_study, load_study, optimize, prepare_spec
from lora_tune.study.schema.serve_space import restrict, restriction_of
from lora_tune.study.storage.opening import dispose_storage
from tests.study.conftest import make_spec
from tests.study.toy_task import ToyTask

ROOT = Path(__file__).resolve().parents[2]
FACTORY = "tests.study.test_serving:servable_task"


def servable_task(**options) -> ToyTask:
    """The toy task without modules_to_save (its head is trained fully otherwise)."""
    task = ToyTask(**options)
    task.modules_to_save = []
    return task


# -- each rule removes exactly what it should ---------------------------------------------------

PRESETS = ["attention-qv", "attention", "mlp", "experts", "all-linear", "embeddings", "conv", ["fc1", "fc2"]]
DOMAINS = {"use_dora": [False, True], "rslora": [False, True], "bias": list(BIASES), "init": list(INITS),
           "targets": PRESETS, "rank": [1, 4, 8, 16, 32, 64, 512, 1024]}
LIMITS = {"vllm": 16, "sglang": 16, "llama.cpp": None, "any": None}
# written out from the engines' code (the sources in lora_tune/serving.py), not from the module's table
REMOVED = {
    "vllm": {"use_dora": [True], "bias": ["all", "lora_only"], "init": ["pissa"], "rslora": [],
             "targets": ["conv"], "rank": [32, 64, 512, 1024]},
    "sglang": {"use_dora": [True], "bias": ["all", "lora_only"], "init": ["pissa"], "rslora": [True],
               "targets": ["embeddings", "conv"], "rank": [32, 64, 512, 1024]},
    "llama.cpp": {"use_dora": [True], "bias": ["all", "lora_only"], "init": ["pissa"], "rslora": [],
                  "targets": ["conv"], "rank": []},
    "any": {key: [] for key in DOMAINS},
}


@pytest.mark.parametrize("engine", serving.ENGINES)
@pytest.mark.parametrize("key", sorted(DOMAINS))
def test_each_engine_rule_removes_exactly_its_choices(engine, key):
    domain = DOMAINS[key]
    out = restrict({key: {"choices": domain}}, engine, LIMITS[engine])
    kept = out.space[key]["choices"]
    removed = [c for c in domain if c not in kept]
    assert removed == REMOVED[engine][key]
    assert out.problems == []
    assert len(out.removed) == len(removed)
    for choice, line in zip(removed, out.removed):
        assert line.startswith(f"{key}: {serving.value_text(choice)} removed: ")
        assert "(" in line and ")" in line  # the source it was read from


@pytest.mark.parametrize("engine", serving.ENGINES)
def test_keys_no_engine_restricts_are_left_alone(engine):
    space = {"quant_bits": {"choices": [None, 8, 4]}, "quant_type": {"choices": ["nf4", "fp4"]},
             "layers": {"choices": ["all", {"last": 1}]}, "dropout": {"type": "float", "low": 0.0, "high": 0.1},
             "method": {"choices": ["parallel", "merged"]}, "alpha": {"ratio": [1, 2]},
             "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    out = restrict(space, engine, LIMITS[engine])
    assert (out.space, out.removed, out.problems) == (space, [], [])


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_rank_ranges_are_clipped_and_nested_ranks_cut(engine):
    out = restrict({"rank": {"type": "int", "low": 4, "high": 64, "step": 8}}, engine, 32)
    assert out.space["rank"] == {"type": "int", "low": 4, "high": 28, "step": 8}
    assert out.removed == [out.removed[0]] and out.removed[0].startswith("rank: range [4, 64] clipped to [4, 28]: ")
    log = restrict({"rank": {"type": "int", "low": 2, "high": 128, "log": True}}, engine, 16)
    assert log.space["rank"] == {"type": "int", "low": 2, "high": 16, "log": True}
    nested = restrict({"rank": {"nested": [4, 8, 16, 32], "nested_dropout": False}}, engine, 16)
    assert nested.space["rank"] == {"nested": [4, 8, 16], "nested_dropout": False}
    assert restrict({"rank": {"nested": [8, 32]}}, engine, 16).space["rank"] == 8
    assert restrict({"rank": 16}, engine, 16).space["rank"] == 16


def test_unservable_names_each_setting_of_a_whole_config():
    plain = LoraConfig(rank=16).to_dict()
    assert all(serving.unservable(plain, e, 16) == [] for e in serving.ENGINES)
    bad = LoraConfig(rank=32, use_dora=True, bias="all", init="pissa", rslora=True, modules_to_save=["head"],
                     rank_pattern={"fc1": 64}).to_dict()
    lines = serving.unservable(bad, "vllm", 16)
    assert [line.split(":", 1)[0] for line in lines] == [
        "rank", "rank_pattern['fc1']", "use_dora", "bias", "init", "modules_to_save"]
    assert lines[2].startswith("use_dora: true: vLLM does not serve DoRA adapters (vllm/lora/peft_helper.py")
    assert serving.unservable(bad, "any", None) == []
    assert [line.split(":")[0] for line in serving.unservable(bad, "sglang", None)] == [
        "use_dora", "bias", "init", "rslora", "modules_to_save"]  # no rank limit unless one is given
    assert serving.unservable({"rank": 600}, "vllm", None)  # vLLM's largest max_lora_rank is 512
    assert serving.unservable({"rank": 8}, "vllm", 24)[0].startswith("max_lora_rank: 24: got 24; allowed for vLLM")
    with pytest.raises(ValueError, match="allowed: vllm, sglang, llama.cpp, any"):
        serving.unservable({}, "tgi", None)


def test_serve_commands():
    vllm = serving.serve_command("vllm", "out/best adapter", "Qwen/Qwen2-0.5B", 24, "best")
    assert vllm == ("vllm serve Qwen/Qwen2-0.5B --enable-lora --max-lora-rank 32 "
                    "--lora-modules 'best=out/best adapter'")
    assert "--max-lora-rank 8 " in serving.serve_command("vllm", "a", "m", 4, "n")
    assert serving.serve_command("sglang", "a", "m", 4, "n") == (
        "python -m sglang.launch_server --model-path m --enable-lora --lora-paths n=a --max-lora-rank 4")
    assert serving.serve_command("llama.cpp", "a.gguf", "base.gguf", 4, "n") == (
        "llama-server -m base.gguf --lora a.gguf")
    assert serving.serve_command("llama.cpp", "a.gguf", "models/llama", 4, "n").startswith(
        "llama-server -m llama.gguf --lora a.gguf  # llama.gguf: models/llama converted")
    assert serving.serve_command("any", "a", "m", 4, "n") == serving.serve_command("vllm", "a", "m", 4, "n")


def test_the_readme_shows_the_modules_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert serving.markdown_table() in readme


# -- the study --------------------------------------------------------------------------------

SPACE = {
    "rank": {"choices": [4, 8, 16, 32, 64]},
    "alpha": {"ratio": [1, 2]},
    "targets": {"choices": ["attention-qv", "all-linear"]},
    "use_dora": {"choices": [False, True]},
    "bias": {"choices": ["none", "lora_only", "all"]},
    "init": {"choices": ["kaiming", "gaussian", "pissa"]},
    "rslora": {"choices": [False, True]},
    "learning_rate": 1e-2,
}


def test_a_vllm_study_never_samples_what_vllm_cannot_serve(tmp_path):
    spec = make_spec(study={"n_trials": 12, "serve": {"engine": "vllm", "max_lora_rank": 16},
                            "warm_start": "defaults"},
                     task={"type": "python", "factory": FACTORY}, search_space=SPACE)
    task = servable_task()
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    created = create_study(spec, url, task=task)
    stored = created.user_attrs["spec"]
    assert stored["study"]["serve"] == {"engine": "vllm", "max_lora_rank": 16}
    assert stored["search_space"]["rank"] == {"choices": [4, 8, 16]}
    assert stored["search_space"]["use_dora"] == {"choices": [False]}
    assert any(line.startswith("use_dora: true removed: vLLM") for line in created.user_attrs["serve_removed"])
    dispose_storage(created._storage)
    study, loaded = load_study("toy", url, allow_code=[FACTORY])  # a worker: the stored spec only
    optimize(study, loaded, task=task)
    trials = study.get_trials()
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) >= 12
    assert any(t.user_attrs.get("warm_start") for t in trials) and any(t.user_attrs.get("is_baseline") for t in trials)
    for t in trials:
        config = t.user_attrs["lora_config"]
        assert config["rank"] <= 16 and config["use_dora"] is False and config["bias"] == "none"
        assert config["init"] != "pissa" and config["modules_to_save"] == []
        assert serving.unservable(config, "vllm", 16) == []
    assert {t.params["rslora"] for t in trials} == {False, True}  # what vLLM serves is still searched
    dispose_storage(study._storage)


def test_the_baseline_and_warm_starts_come_from_the_restricted_space():
    spec = make_spec(study={"serve": {"engine": "sglang", "max_lora_rank": 16}},
                     task={"type": "python", "factory": FACTORY},
                     search_space={**SPACE, "rank": {"type": "int", "low": 4, "high": 64}})
    resolved, _, baseline = prepare_spec(spec, servable_task())
    space = SearchSpace.from_spec(resolved.search_space)
    assert (space["rank"].low, space["rank"].high) == (4, 16)
    assert not space["use_dora"].sampled and not space["rslora"].sampled
    assert baseline == {"rank": 8, "alpha_ratio": 2.0, "targets": "attention-qv", "init": "kaiming"}
    from lora_tune.study.run.warm_start import prior, project

    projected = [project(space, c) for c in prior("decoder")]
    assert [p and p["rank"] for p in projected] == [16, None, 16]  # rank 32 clamped into the clipped range
    pissa = project(space, {"rank": 8, "alpha": 16.0, "init": "pissa"})
    assert pissa is None  # the space has no pissa: the config is dropped, not changed


def test_a_whole_study_file_gives_its_served_space(tmp_path):
    data = {"study": {"name": "x", "serve": {"engine": "vllm", "max_lora_rank": 8}},
            "search_space": {"rank": {"choices": [4, 8, 16]}, "use_dora": {"choices": [False, True]}}}
    space = SearchSpace.from_dict(data)
    assert space.values_of("rank") == [4, 8] and space.values_of("use_dora") == [False]
    bad = dict(data, study={"name": "x", "serve": {"engine": "vllm", "max_lora_rank": 24}})
    with pytest.raises(StudySpecError, match="study.serve.max_lora_rank"):
        SearchSpace.from_dict(bad)


def test_the_task_modules_to_save_is_refused_naming_it(toy_task):
    spec = make_spec(study={"serve": {"engine": "llama.cpp"}}, search_space={"rank": 4})
    with pytest.raises(StudySpecError) as exc:
        prepare_spec(spec, toy_task)  # the toy task trains its head fully
    assert [p for p, _ in exc.value.errors] == ["task.modules_to_save"]
    assert "llama.cpp does not load modules_to_save" in exc.value.errors[0][1]
    assert restriction_of(make_spec(search_space={"rank": 4})).removed == []  # engine any: as before


# -- the command line ------------------------------------------------------------------------------

def _validate(cli_dir: Path, serve: dict, space: dict, factory: str = FACTORY):
    data = {"study": {"name": "served", "n_trials": 3, "serve": serve},
            "task": {"type": "python", "factory": factory}, "search_space": space,
            "train": {"epochs": 1, "batch_size": 64, "device": "cpu", "threads": 1}}
    path = cli_dir / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return CliRunner().invoke(cli, ["validate", str(path)], catch_exceptions=False)


def test_validate_lists_every_removed_choice(cli_dir):
    result = _validate(cli_dir, {"engine": "vllm", "max_lora_rank": 16}, {**SPACE, "learning_rate": 0.01})
    assert result.exit_code == 0, result.output
    assert "serve: vLLM, max_lora_rank 16; removed from the search space:" in result.output
    for line in ("rank: 32 removed: vLLM serves ranks up to max_lora_rank 16", "rank: 64 removed:",
                 "use_dora: true removed: vLLM does not serve DoRA adapters",
                 "bias: lora_only removed: vLLM does not serve trained biases", "bias: all removed:",
                 "init: pissa removed: vLLM loads a PiSSA adapter over the unmodified base"):
        assert line in result.output
    assert "rslora: true removed" not in result.output
    quiet = _validate(cli_dir, {"engine": "any"}, {"rank": 8})
    assert quiet.exit_code == 0 and "serve:" not in quiet.output


@pytest.mark.parametrize("serve, space, fragments", [
    ({"engine": "tgi"}, {"rank": 8},
     ["study.serve.engine: got 'tgi'; allowed: 'vllm', 'sglang', 'llama.cpp' or 'any'"]),
    ({"engine": "vllm", "max_lora_rank": 24}, {"rank": 8},
     ["study.serve.max_lora_rank: got 24; allowed for vLLM: 1, 8, 16, 32, 64, 128, 256, 320, 512"]),
    ({"engine": "vllm", "max_lora_rank": 16}, {"rank": {"choices": [32, 64]}},
     ["search_space.rank.choices: study.serve.engine vllm removes every choice ([32, 64])",
      "allowed: a rank ≤ 16"]),
    ({"engine": "sglang"}, {"rank": 8, "use_dora": True, "targets": {"choices": ["embeddings", "conv"]}},
     ["2 error(s)", "search_space.use_dora: got true: SGLang does not serve DoRA adapters",
      "allowed with study.serve.engine sglang: false",
      "search_space.targets.choices: study.serve.engine sglang removes every choice ([embeddings, conv])"]),
    ({"engine": "vllm"}, {"rank": {"type": "int", "low": 128, "high": 256}},
     ["search_space.rank.low: got 128: vLLM serves ranks up to max_lora_rank 64"]),
])
def test_bad_serving_input_is_exit_2_naming_the_key(cli_dir, serve, space, fragments):
    result = _validate(cli_dir, serve, space)
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output


def test_modules_to_save_of_the_task_is_exit_2_at_validate(cli_dir):
    result = _validate(cli_dir, {"engine": "vllm"}, {"rank": 8}, factory="tests.study.toy_task:make_task")
    assert result.exit_code == 2, result.output
    assert "task.modules_to_save: modules_to_save: [head]: vLLM does not load modules_to_save" in result.output


def test_run_prints_the_removed_choices_once(cli_dir):
    data = {"study": {"name": "served-run", "n_trials": 2, "serve": {"engine": "vllm", "max_lora_rank": 16},
                      "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"}},
            "task": {"type": "python", "factory": FACTORY},
            "search_space": {"rank": {"choices": [8, 32]}, "use_dora": {"choices": [False, True]}},
            "train": {"epochs": 1, "batch_size": 64, "device": "cpu", "threads": 1}}
    path = cli_dir / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli, ["run", str(path), "--storage", f"sqlite:///{cli_dir / 'run.db'}"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.count("use_dora: true removed: vLLM does not serve DoRA adapters") == 1
    assert result.output.count("rank: 32 removed:") == 1
