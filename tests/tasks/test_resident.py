"""The resident base: a task's base is built once per variant and lent to trial after trial; a
later trial on it gives exactly the result of the same config and seed on a freshly built base."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from lora_tune.models.tiny_lm import save_tiny_model
from lora_tune.study.trial.trial_process import Hooks, TrialPlan, run_in_process
from lora_tune.tasks import build_task
from lora_tune.tasks.resident import BaseVariant
from lora_tune.train import TrainConfig
from tests.tasks.conftest import write_table
from tests.tasks.test_sft import CONVERSATIONS, LLAMA

TRAIN = TrainConfig(epochs=1, batch_size=2, max_steps=3, learning_rate=1e-2, device="cpu", evals_per_epoch=1,
                    seed=7)


@pytest.fixture
def sft_dir_spec(tmp_path, chat_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("LORA_TUNE_CACHE", str(tmp_path / "cache"))
    save_tiny_model("llama", tmp_path / "llama", tokenizer=AutoTokenizer.from_pretrained(str(chat_tokenizer_dir)))
    data = write_table(tmp_path / "train.jsonl", CONVERSATIONS)
    return {"type": "sft", "model": str(tmp_path / "llama"), "train_file": str(data), "eval_file": str(data),
            "max_length": 96}


def _trial(task, lora: dict, train: TrainConfig = TRAIN):
    """One trial's body as the driver runs it in process: lease, inject, train, evaluate, give back.
    Returns (base_load, final metrics, the trained LoRA tensors)."""
    loads: list[str] = []

    def built(report, base_load):
        loads.append(base_load)
        return True

    outcome = run_in_process(task, TrialPlan(task_spec={}, lora=lora, train=train), Hooks(built, lambda *a: False))
    try:
        factors = {n: p.detach().clone() for n, p in outcome.model.named_parameters() if "lora_" in n}
        return loads[0], outcome.result.final_metrics, factors
    finally:
        outcome.close()


def _same(a, b):
    assert a[1] == b[1]  # metrics, bit for bit
    assert a[2].keys() == b[2].keys() and a[2]
    for name in a[2]:
        assert torch.equal(a[2][name], b[2][name]), name


@pytest.mark.parametrize("quant_bits", [None, 4])
def test_a_later_trial_on_the_resident_base_equals_a_trial_on_a_fresh_base(sft_dir_spec, quant_bits):
    lora = {"rank": 4, "alpha": 8, "targets": "all-linear", "quant_bits": quant_bits}
    task = build_task(dict(sft_dir_spec))
    first = _trial(task, lora)
    resident = task.resident.model
    second = _trial(task, lora)
    assert (first[0], second[0]) == ("built", "resident") and task.resident.model is resident
    fresh = _trial(build_task(dict(sft_dir_spec)), lora)  # a new task: its base is built anew (or read from cache)
    assert fresh[0] == ("cache" if quant_bits else "built")
    _same(first, second)
    _same(first, fresh)


def test_pissa_bias_and_modules_to_save_leave_the_resident_base_as_it_was(sft_dir_spec):
    task = build_task(dict(sft_dir_spec))
    plain = {"rank": 4, "alpha": 8, "targets": "attention"}
    before = _trial(task, plain)
    base = {k: v.clone() for k, v in task.resident.model.state_dict().items()}
    for lora in ({"rank": 4, "alpha": 8, "targets": "mlp", "init": "pissa"},
                 {"rank": 4, "alpha": 8, "targets": "attention", "bias": "all"},
                 {"rank": 2, "alpha": 4, "targets": "attention", "use_dora": True}):
        _trial(task, lora)
        after = task.resident.model.state_dict()
        assert after.keys() == base.keys()
        assert all(torch.equal(after[k], base[k]) for k in base), lora
    _same(before, _trial(task, plain))


def test_the_task_holds_only_the_structure_until_a_trial_leases_the_base(sft_dir_spec):
    task = build_task(dict(sft_dir_spec))
    assert task.resident.model is None
    assert all(p.is_meta for p in task.structure().parameters())
    assert task.describe()["model"] == sft_dir_spec["model"]


def test_a_base_of_another_variant_replaces_the_resident_one(sft_dir_spec):
    task = build_task(dict(sft_dir_spec))
    lora = {"rank": 4, "alpha": 8, "targets": "attention"}
    assert _trial(task, {**lora, "quant_bits": 4})[0] == "built"
    quantized = task.resident.model
    assert _trial(task, lora)[0] == "built" and task.resident.model is not quantized
    assert _trial(task, {**lora, "quant_bits": 4})[0] == "cache"  # the disk cache of quantized bases
    assert _trial(task, {**lora, "quant_bits": 4})[0] == "resident"


def test_a_base_given_back_dirty_is_not_lent_again(sft_dir_spec):
    task = build_task(dict(sft_dir_spec))
    config = type("Config", (), {"quant_bits": None})()
    model, how = task.lease_model(config)
    assert how == "built"
    task.give_back_model(model, clean=False)
    assert task.resident.model is None
    again, how = task.lease_model(config)
    assert how == "built" and again is not model
    task.give_back_model(again)
    with pytest.raises(RuntimeError, match="lent"):
        task.resident.lease(BaseVariant())
        task.resident.lease(BaseVariant())


def test_a_base_given_back_with_adapters_no_inject_recorded_is_dropped(sft_dir_spec):
    from lora_tune import LoraConfig, inject
    from lora_tune.lora.attachment import forget

    task = build_task(dict(sft_dir_spec))
    config = type("Config", (), {"quant_bits": None})()
    model, _ = task.lease_model(config)
    inject(model, LoraConfig(rank=2, alpha=4, targets="attention-qv"))
    forget(model)  # detach cannot undo it: the base would go back with LoRA layers on it
    with pytest.raises(RuntimeError, match="left on the resident base"):
        task.give_back_model(model)
    assert task.resident.model is None
    assert task.lease_model(config)[1] == "built"


def test_a_model_built_from_a_config_is_resident_too(tmp_path, chat_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("LORA_TUNE_CACHE", str(tmp_path / "cache"))
    data = write_table(tmp_path / "train.jsonl", CONVERSATIONS)
    spec = {"type": "sft", "model": {"config": dict(LLAMA)}, "tokenizer": str(chat_tokenizer_dir),
            "train_file": str(data), "eval_file": str(data), "max_length": 96}
    task = build_task(spec)
    lora = {"rank": 4, "alpha": 8, "targets": "attention", "quant_bits": 8}  # quantized at inject
    first, second = _trial(task, lora), _trial(task, lora)
    assert (first[0], second[0]) == ("built", "resident")
    _same(first, second)
    _same(first, _trial(build_task(spec), lora))


def test_quant_bits_on_a_model_with_quantized_weights_is_exit_2_at_validate(sft_dir_spec, tmp_path):
    import json

    import yaml
    from click.testing import CliRunner

    from lora_tune.cli.main import cli

    config_file = tmp_path / "llama" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    config_file.write_text(json.dumps(config))
    study = {"study": {"name": "q", "n_trials": 1, "storage": f"sqlite:///{tmp_path / 'q.db'}"},
             "task": sft_dir_spec, "search_space": {"quant_bits": {"choices": [4, 16]}},
             "train": {"device": "cpu", "epochs": 1}}
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(study))
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "q.yaml")])
    assert result.exit_code == 2, result.output
    assert "already quantized" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "q.db").exists()


def test_a_checkpoint_that_does_not_fit_its_config_is_exit_2_at_validate(sft_dir_spec, tmp_path):
    import yaml
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from lora_tune.cli.main import cli

    weights = tmp_path / "llama" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("mlp.up_proj.weight"))
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    study = {"study": {"name": "bad", "n_trials": 1, "storage": f"sqlite:///{tmp_path / 'bad.db'}"},
             "task": sft_dir_spec, "train": {"device": "cpu", "epochs": 1}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(study))
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2, result.output
    assert name in result.output and "wrong shape" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "bad.db").exists()
