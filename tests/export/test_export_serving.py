"""`lora-tune export` for serving: --merged (the metric reproduced by from_pretrained), --gguf (read
back with gguf.GGUFReader: names, shapes, alpha, and alpha/r * B @ A equal to the trained delta for
plain LoRA and rsLoRA), PiSSA adapters converted to plain LoRA over the unmodified base,
base_model_name_or_path never absolute, the serve command and the engine's warnings, refusals."""
from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner

from lora_tune.cli.main import cli

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "studies" / "data" / "sft"
# name -> search space (single values: one trial of exactly this config)
CONFIGS = {
    "plain": {"rank": 4, "alpha": 8, "targets": "all-linear"},
    "rs": {"rank": 4, "alpha": 8, "targets": "attention", "rslora": True},
    "pissa": {"rank": 4, "alpha": 4, "targets": "all-linear", "init": "pissa"},
    "q8": {"rank": 4, "alpha": 8, "targets": "attention-qv", "quant_bits": 8},
    "gpt": {"rank": 4, "alpha": 8, "targets": "all-linear"},
}


def _study_file(folder: Path, name: str, space: dict, model: str) -> Path:
    data = {
        "study": {"name": name, "storage": f"sqlite:///{folder / 'serve.db'}", "direction": "minimize",
                  "metric": "eval_loss", "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"},
                  "n_trials": 1, "baseline": False},
        "task": {"type": "sft", "model": model, "train_file": str(SFT / "train.jsonl"),
                 "eval_file": str(SFT / "eval.jsonl"), "format": "messages", "max_length": 128,
                 "max_train_examples": 16, "max_eval_examples": 8},
        "search_space": {**space, "learning_rate": 0.02},
        "train": {"epochs": 1, "batch_size": 8, "evals_per_epoch": 1, "device": "cpu", "threads": 1,
                  "isolation": "none"},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One study per config in one storage; the model given as a path relative to the study folder
    (the working directory of every test here)."""
    from transformers import AutoTokenizer

    from lora_tune.models.tiny_lm import save_tiny_model

    folder = tmp_path_factory.mktemp("serve")
    tokenizer = AutoTokenizer.from_pretrained(str(SFT / "tokenizer"))
    save_tiny_model("llama", folder / "llama", tokenizer=tokenizer, hidden_size=32, intermediate_size=64,
                    num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    save_tiny_model("gpt2", folder / "gpt2", tokenizer=tokenizer, n_embd=32, n_inner=64)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("LORA_TUNE_CACHE", str(folder / "cache"))
        mp.setenv("LORA_TUNE_ARTIFACTS", str(folder / "lora_tune_artifacts"))
        mp.delenv("LORA_TUNE_STORAGE", raising=False)
        for name, space in CONFIGS.items():
            path = _study_file(folder, name, space, "./gpt2" if name == "gpt" else "./llama")
            result = CliRunner().invoke(cli, ["run", str(path)], catch_exceptions=False)
            assert result.exit_code == 0, result.output
        yield folder, f"sqlite:///{folder / 'serve.db'}"
    torch.set_num_threads(before)


@pytest.fixture
def here(served, monkeypatch):
    folder, url = served
    monkeypatch.chdir(folder)
    monkeypatch.setenv("LORA_TUNE_CACHE", str(folder / "cache"))
    monkeypatch.setenv("LORA_TUNE_ARTIFACTS", str(folder / "lora_tune_artifacts"))
    return folder, url


def _export(url: str, name: str, *args: str):
    return CliRunner().invoke(cli, ["export", name, "--storage", url, *args])


def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def _task(url: str, name: str):
    from lora_tune.export_model import trial_task

    return trial_task(_study(url, name))[0]


def _permuted(rows: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute of the rows of a q/k weight."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32  # the converter keeps LoRA tensors in F32
        assert list(t.shape) == list(reversed(t.data.shape))  # ggml's ne: the numpy shape reversed
        tensors[t.name] = torch.from_numpy(t.data.copy())
    return fields, tensors


def _trained_deltas(url: str, name: str, adapter: Path) -> dict[str, torch.Tensor]:
    """scaling * B @ A of every adapted module of the trial, as lora-tune computes it."""
    from lora_tune.export_model import rebuilt_trial
    from lora_tune.lora.inject import lora_layers

    with rebuilt_trial(_task(url, name), adapter / "lora-tune") as rebuilt:
        return {n: w.delta_weight().detach().clone() for n, w in lora_layers(rebuilt.model)}


# -- merged ---------------------------------------------------------------------------------------

def test_merged_reproduces_the_metric_and_is_replaced_by_a_later_export(here, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, url = here
    best = _study(url, "plain").best_trial
    merged = tmp_path / "merged"
    result = _export(url, "plain", "-o", str(tmp_path / "best.yaml"), "--merged", str(merged))
    assert result.exit_code == 0, result.output
    assert f"wrote the merged model to {merged} (float32; load it with transformers.AutoModelForCausalLM" \
        in result.output
    assert "serve the merged model: vllm serve" in result.output
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert not list(merged.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    assert not any("lora" in n for n, _ in model.named_parameters())
    task = _task(url, "plain")
    assert task.evaluate(model, 8)["eval_loss"] == pytest.approx(best.value, rel=1e-6)
    assert AutoTokenizer.from_pretrained(str(merged)).chat_template == task.tokenizer.chat_template
    content = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert content["merged"] == {"path": str(merged), "auto_class": "AutoModelForCausalLM", "dtype": "float32"}

    again = _export(url, "plain", "-o", str(tmp_path / "best.yaml"), "--merged", str(merged))
    assert again.exit_code == 0 and "overwrote the merged model in" in again.output


def test_merged_quantized_base_is_dequantized(here, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, url = here
    best = _study(url, "q8").best_trial
    assert best.user_attrs["lora_config"]["quant_bits"] == 8
    merged = tmp_path / "merged"
    result = _export(url, "q8", "-o", str(tmp_path / "best.yaml"), "--merged", str(merged))
    assert result.exit_code == 0, result.output
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1 and all(m.weight.dtype == torch.float32 for m in linears)
    # the trial computed with the 8-bit weights dequantized (+ its delta): so does the merged model
    assert _task(url, "q8").evaluate(model, 8)["eval_loss"] == pytest.approx(best.value, rel=1e-5)


def test_merged_refusals_write_nothing(here, tmp_path):
    folder, url = here
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    result = _export(url, "plain", "-o", str(tmp_path / "b.yaml"), "--merged", str(busy))
    assert result.exit_code == 2 and f"--merged: got '{busy}'" in result.stderr
    assert "It holds other files: keep.txt" in result.stderr
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "b.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # nothing staged left behind


def test_merged_needs_a_hugging_face_model(tmp_path, monkeypatch):
    study_yaml = tmp_path / "toy.yaml"
    url = f"sqlite:///{tmp_path / 'toy.db'}"
    study_yaml.write_text(yaml.safe_dump({
        "study": {"name": "toy", "storage": url, "direction": "maximize", "metric": "accuracy",
                  "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"}, "n_trials": 1,
                  "baseline": False},
        "task": {"type": "python", "factory": "tests.study.toy_task:make_task"},
        "search_space": {"rank": 2, "alpha": 4, "targets": "all-linear", "learning_rate": 0.02},
        "train": {"epochs": 1, "batch_size": 64, "evals_per_epoch": 1, "device": "cpu", "isolation": "none"},
    }))
    monkeypatch.setenv("LORA_TUNE_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.delenv("LORA_TUNE_ALLOW_CODE", raising=False)
    assert CliRunner().invoke(cli, ["run", str(study_yaml)], catch_exceptions=False).exit_code == 0
    out = ["-o", str(tmp_path / "b.yaml")]
    refused = _export(url, "toy", *out, "--merged", str(tmp_path / "m"))
    assert refused.exit_code == 2 and "allow" in refused.stderr  # its code is imported only as allowed
    for option, target in (("--merged", tmp_path / "m"), ("--gguf", tmp_path / "a.gguf")):
        result = _export(url, "toy", *out, option, str(target), "--allow-code", "tests.study.*")
        assert result.exit_code == 2, result.output
        assert f"{option} needs a Hugging Face model; task 'toy' builds a ToyModel" in result.stderr
        assert not target.exists() and not (tmp_path / "b.yaml").exists()



def test_merged_encoder_loads_with_its_auto_class(tmp_path, monkeypatch):
    """A text-classification trial (a tiny BERT, its head in modules_to_save) merged: loaded by
    AutoModelForSequenceClassification, the trial's accuracy reproduced."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel, BertTokenizer

    from tests.tasks.conftest import VOCAB, sentiment_rows, write_table

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    BertTokenizer.from_pretrained(str(bert)).save_pretrained(str(bert))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(str(bert))
    url = f"sqlite:///{tmp_path / 'tc.db'}"
    (tmp_path / "tc.yaml").write_text(yaml.safe_dump({
        "study": {"name": "tc", "storage": url, "direction": "maximize", "metric": "accuracy",
                  "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"}, "n_trials": 1,
                  "baseline": False},
        "task": {"type": "text-classification", "model": str(bert), "text_column": "sentence",
                 "label_column": "sentiment",
                 "train_file": str(write_table(tmp_path / "train.csv", sentiment_rows(96, 0))),
                 "eval_file": str(write_table(tmp_path / "eval.csv", sentiment_rows(40, 1)))},
        "search_space": {"rank": 4, "alpha": 8, "targets": "attention-qv", "learning_rate": 0.03},
        "train": {"epochs": 6, "batch_size": 16, "evals_per_epoch": 1, "device": "cpu", "isolation": "none"},
    }))
    monkeypatch.setenv("LORA_TUNE_ARTIFACTS", str(tmp_path / "artifacts"))
    assert CliRunner().invoke(cli, ["run", str(tmp_path / "tc.yaml")], catch_exceptions=False).exit_code == 0
    best = _study(url, "tc").best_trial
    merged = tmp_path / "merged"
    result = _export(url, "tc", "-o", str(tmp_path / "best.yaml"), "--merged", str(merged))
    assert result.exit_code == 0, result.output
    assert "load it with transformers.AutoModelForSequenceClassification.from_pretrained" in result.output
    assert "warning: vllm: modules_to_save: [classifier]" in result.stderr  # the head trained in full
    model = AutoModelForSequenceClassification.from_pretrained(str(merged))
    assert _task(url, "tc").evaluate(model, 8)["accuracy"] == pytest.approx(best.value, abs=1e-9)
    tokenizer = AutoTokenizer.from_pretrained(str(merged))  # the tokenizer beside it
    assert tokenizer("good movie")["input_ids"] == BertTokenizer.from_pretrained(str(bert))("good movie")["input_ids"]

# -- GGUF ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["plain", "rs"])
def test_gguf_read_back_gives_the_trained_scale(here, tmp_path, name):
    folder, url = here
    best = _study(url, name).best_trial
    lora = best.user_attrs["lora_config"]
    rank, alpha, rslora = lora["rank"], float(lora["alpha"]), bool(lora["rslora"])
    adapter, path = tmp_path / "adapter", tmp_path / "a.gguf"
    result = _export(url, name, "-o", str(tmp_path / "best.yaml"), "--adapter", str(adapter), "--gguf", str(path),
                     "--engine", "llama.cpp")
    assert result.exit_code == 0, result.output
    fields, tensors = _read_gguf(path)
    written = alpha * rank ** 0.5 if rslora else alpha  # llama.cpp scales alpha / r
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == pytest.approx(written)
    assert f"serve with llama.cpp: llama-server -m llama.gguf --lora {path}" in result.output

    config = json.loads((folder / "llama" / "config.json").read_text())
    deltas = _trained_deltas(url, name, adapter)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    expected = {names.get_name(m + ".weight", try_suffixes=(".weight",)): m for m in deltas}
    assert "blk.1.attn_q.weight" in expected and (name == "rs") == ("blk.0.ffn_up.weight" not in expected)
    assert set(tensors) == {f"{g}.lora_{ab}" for g in expected for ab in "ab"}
    for gname, module in expected.items():
        a, b = tensors[gname + ".lora_a"], tensors[gname + ".lora_b"]
        out_features, in_features = deltas[module].shape
        assert a.shape == (rank, in_features) and b.shape == (out_features, rank)
        delta = deltas[module]
        if module.endswith("q_proj"):
            delta = _permuted(delta, config["num_attention_heads"], config["num_attention_heads"])
        elif module.endswith("k_proj"):
            delta = _permuted(delta, config["num_attention_heads"], config["num_key_value_heads"])
        torch.testing.assert_close(written / rank * (b @ a), delta, rtol=1e-5, atol=1e-7)


def test_gguf_refuses_an_architecture_gguf_cannot_map(here, tmp_path):
    folder, url = here
    target = tmp_path / "a.gguf"
    result = _export(url, "gpt", "-o", str(tmp_path / "b.yaml"), "--gguf", str(target))
    assert result.exit_code == 2, result.output
    assert "--gguf: got 'gpt2'; allowed: a base of the llama family that gguf maps: llama, mistral" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_gguf_refuses_dora_and_modules_to_save(tmp_path):
    """What llama.cpp's converter refuses (exit 1 there) is refused with its reason."""
    import lora_tune
    from lora_tune.errors import AdapterFormatError
    from lora_tune.export_gguf import gguf_pairs, peft_scales
    from lora_tune.models.tiny_lm import causal_lm_from_config, tiny_config

    config = tiny_config("llama", hidden_size=32, intermediate_size=64, vocab_size=64)
    for extra, why in (({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                       ({"bias": "all", "targets": "attention-qv"}, "bias")):
        model = causal_lm_from_config(config)
        if why == "bias":  # llama has no biases: give q_proj one, as Qwen2 has
            model.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(32))
        lora_tune.inject(model, lora_tune.LoraConfig(**{"rank": 2, "alpha": 4, "targets": "all-linear", **extra}))
        peft_dir = lora_tune.save_adapter(model, tmp_path / why, format="peft")
        with pytest.raises(AdapterFormatError, match=why):
            gguf_pairs(peft_dir, peft_scales(peft_dir), model.config, 4.0)


# -- PiSSA -------------------------------------------------------------------------------------------

def test_pissa_adapter_is_converted_to_plain_lora_over_the_unmodified_base(here, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    import lora_tune

    folder, url = here
    best = _study(url, "pissa").best_trial
    adapter, merged, path = tmp_path / "adapter", tmp_path / "merged", tmp_path / "a.gguf"
    result = _export(url, "pissa", "-o", str(tmp_path / "best.yaml"), "--adapter", str(adapter),
                     "--merged", str(merged), "--gguf", str(path))
    assert result.exit_code == 0, result.output
    assert "PiSSA adapter converted to plain LoRA of rank 2r" in result.output
    assert "warning" not in result.output  # served as plain LoRA: nothing vLLM cannot load
    assert "--max-lora-rank 8" in result.output  # rank 2r
    meta = json.loads((adapter / "peft" / "adapter_config.json").read_text())
    assert meta["r"] == 8 and meta["init_lora_weights"] is True and meta["lora_alpha"] == pytest.approx(8.0)
    native = json.loads((adapter / "lora-tune" / "adapter_config.json").read_text())
    assert native["lora_config"]["init"] == "pissa"  # kept as trained
    assert json.loads((adapter / "manifest.json").read_text())["converted"]["peft"].startswith("PiSSA")

    # the trained PiSSA model (lora-tune over its residual base) and the converted adapter over the
    # unmodified base compute the same function
    trained = AutoModelForCausalLM.from_pretrained(str(folder / "llama"))
    lora_tune.load_adapter(trained, adapter / "lora-tune")
    served = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(folder / "llama")),
                                            str(adapter / "peft"))
    ids = torch.randint(0, trained.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    trained.eval()
    served.eval()
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    assert _task(url, "pissa").evaluate(served, 8)["eval_loss"] == pytest.approx(best.value, rel=1e-5)

    # the GGUF adapter over the original weights gives the merged weights
    fields, tensors = _read_gguf(path)
    base = AutoModelForCausalLM.from_pretrained(str(folder / "llama")).state_dict()
    done = AutoModelForCausalLM.from_pretrained(str(merged)).state_dict()
    a, b = tensors["blk.0.attn_v.weight.lora_a"], tensors["blk.0.attn_v.weight.lora_b"]
    assert a.shape[0] == 8
    key = "model.layers.0.self_attn.v_proj.weight"
    torch.testing.assert_close(fields["adapter.lora.alpha"] / 8 * (b @ a), done[key] - base[key],
                               rtol=1e-4, atol=1e-5)


# -- base_model_name_or_path, serve command ----------------------------------------------------

def test_base_model_name_or_path_is_never_absolute(here, tmp_path):
    from lora_tune.export_model import base_model_reference

    folder, url = here
    adapter = tmp_path / "adapter"
    result = _export(url, "plain", "-o", str(tmp_path / "best.yaml"), "--adapter", str(adapter))
    assert result.exit_code == 0, result.output
    written = json.loads((adapter / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert written == "./llama"  # as the study file gives it (relative to the study)
    assert not os.path.isabs(written)

    model_dir = str(folder / "llama")
    relative = base_model_reference({"model": model_dir}, adapter / "peft")
    assert not os.path.isabs(relative) and (adapter / "peft" / relative).resolve() == Path(model_dir).resolve()
    assert base_model_reference({"model": model_dir}, None) == "llama"
    assert base_model_reference({"model": "meta-llama/Llama-3.2-1B"}, adapter) == "meta-llama/Llama-3.2-1B"
    assert base_model_reference({"model": {"config": {"model_type": "llama"}}}, adapter) is None


def test_serve_command_and_warnings_follow_the_engine(here, tmp_path):
    folder, url = here
    adapter = tmp_path / "adapter"
    result = _export(url, "rs", "-o", str(tmp_path / "best.yaml"), "--adapter", str(adapter))
    assert result.exit_code == 0, result.output
    assert (f"serve with vllm: vllm serve ./llama --enable-lora --max-lora-rank 8 --lora-modules rs={adapter}/peft"
            in result.output)
    assert "warning" not in result.stderr  # vLLM scales rsLoRA right
    sglang = _export(url, "rs", "-o", str(tmp_path / "best.yaml"), "--engine", "sglang")
    assert sglang.exit_code == 0, sglang.output
    assert "warning: sglang: rslora: true: SGLang scales α/r" in sglang.stderr
    assert "warning: sglang: sglang loads the PEFT adapter: add --adapter DIR" in sglang.stderr
    assert "serve with sglang: python -m sglang.launch_server --model-path ./llama --enable-lora" in sglang.output
    content = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert content["serve"]["engine"] == "sglang" and content["serve"]["warnings"]

    study = _study(url, "rs")
    spec = study.user_attrs["spec"]
    try:  # the study's own serving target is the default engine
        study.set_user_attr("spec", {**spec, "study": {**spec["study"], "serve": {"engine": "llama.cpp"}}})
        default = _export(url, "rs", "-o", str(tmp_path / "best.yaml"))
        assert default.exit_code == 0, default.output
        assert "serve with llama.cpp: llama-server -m llama.gguf --lora ADAPTER.gguf" in default.output
        assert "llama.cpp loads GGUF adapters: add --gguf FILE" in default.stderr
    finally:
        study.set_user_attr("spec", spec)
