"""tasks/base_loader.py and tasks/base_cache.py: a base built from config.json and read tensor by
tensor (quantized as it comes) equals transformers' from_pretrained model (quantized the same way),
the disk cache gives it back bit for bit, and bad directories are ConfigErrors naming what is wrong."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_tune.errors import ConfigError
from lora_tune.lora.quant import QuantizedLinear, QuantizedWeight
from lora_tune.models.tiny_lm import causal_lm_from_config, tiny_config
from lora_tune.tasks import base_cache, base_loader
from lora_tune.tasks.base_loader import BaseCacheWarning, QuantSpec, empty_model, load_base

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("bitsandbytes")

VOCAB = 96
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 95], [4, 4, 8, 15, 16, 23, 42]])
QUANTS = {"nf4": QuantSpec(4, "nf4", True), "fp4": QuantSpec(4, "fp4", False), "int8": QuantSpec(8)}


def _save(path: Path, model_type: str, shard: bool = False, seed: int = 0, **config) -> Path:
    config = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **config}
    model = causal_lm_from_config(tiny_config(model_type, **config), seed=seed)
    model.save_pretrained(str(path), safe_serialization=True, **({"max_shard_size": "50KB"} if shard else {}))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "llama": _save(root / "llama", "llama"),
        "llama-sharded": _save(root / "llama-sharded", "llama", shard=True),
        "qwen2-tied": _save(root / "qwen2-tied", "qwen2", shard=True, tie_word_embeddings=True),
        "phi3": _save(root / "phi3", "phi3"),
        "gemma2": _save(root / "gemma2", "gemma2"),
    }


def _reference(path: Path, dtype="auto") -> nn.Module:
    from lora_tune.tasks.hf import MODEL_LOAD

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **MODEL_LOAD).eval()


def _quantized_like(model: nn.Module, names, quant: QuantSpec) -> nn.Module:
    """``model`` with the Linears ``names`` quantized by QuantizedWeight (what a per-trial QLoRA did)."""
    for name in names:
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        setattr(model.get_submodule(parent), child,
                QuantizedLinear.from_linear(linear, quant.bits, quant.quant_type, quant.double_quant))
    return model


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- equal to transformers' model ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "llama-sharded", "qwen2-tied", "phi3", "gemma2"])
def test_unquantized_base_equals_from_pretrained(dirs, name):
    loaded = load_base(dirs[name])
    reference = _reference(dirs[name])
    assert loaded.how == base_loader.BUILT and loaded.quantized == () and loaded.quant is None
    assert type(loaded.model) is type(reference)
    assert loaded.dtype == torch.float32
    assert torch.equal(_logits(loaded.model), _logits(reference))
    state, ref_state = loaded.model.state_dict(), reference.state_dict()
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.generation_config.to_dict() == reference.generation_config.to_dict()
    assert loaded.model.config.to_dict() == reference.config.to_dict()
    assert loaded.bytes == sum(p.numel() * p.element_size() for p in reference.parameters()) + sum(
        b.numel() * b.element_size() for b in reference.buffers())


def test_a_dtype_is_applied_like_from_pretrained(dirs):
    loaded = load_base(dirs["qwen2-tied"], dtype=torch.bfloat16)
    reference = _reference(dirs["qwen2-tied"], dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert {n: b.dtype for n, b in loaded.model.named_buffers()} == {n: b.dtype for n, b in reference.named_buffers()}
    assert torch.equal(_logits(loaded.model), _logits(reference))


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("name", ["llama-sharded", "qwen2-tied", "phi3", "gemma2"])
def test_quantized_base_equals_quantizing_the_loaded_model(dirs, name, quant):
    spec = QUANTS[quant]
    loaded = load_base(dirs[name], quant=spec, threads=1)
    model = loaded.model
    linears = [n for n, m in _reference(dirs[name]).named_modules() if isinstance(m, nn.Linear)]
    assert sorted(loaded.quantized) == sorted(n for n in linears if n != "lm_head")
    for n in loaded.quantized:
        module = model.get_submodule(n)
        assert isinstance(module, QuantizedLinear) and module.qweight.bits == spec.bits
    assert type(model.lm_head) is nn.Linear
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    reference = _quantized_like(_reference(dirs[name]), loaded.quantized, spec)
    assert torch.equal(_logits(model), _logits(reference))
    plain = _logits(_reference(dirs[name]))
    relative = (_logits(model) - plain).norm() / plain.norm()  # random tiny weights quantize coarsely
    assert relative < (0.4 if spec.bits == 4 else 0.05), relative
    assert loaded.bytes < 0.5 * sum(p.numel() * p.element_size() for p in _reference(dirs[name]).parameters())


def test_fp4_without_double_quantization_and_bf16(dirs):
    spec = QUANTS["fp4"]
    loaded = load_base(dirs["llama"], quant=spec, dtype=torch.bfloat16)
    reference = _quantized_like(_reference(dirs["llama"], torch.bfloat16), loaded.quantized, spec)
    q = loaded.model.model.layers[0].self_attn.q_proj.qweight
    assert q.quant_type == "fp4" and q.dtype == torch.bfloat16 and not q._state.nested
    assert torch.equal(_logits(loaded.model), _logits(reference))


@pytest.mark.parametrize("biases_first", [True, False])
def test_biases_and_weights_in_any_order_across_shards(dirs, tmp_path, biases_first):
    """Qwen2's q/k/v biases in a shard read before their weights' shard (and the other way round)."""
    from safetensors.torch import load_file, save_file

    path = _copy(dirs["qwen2-tied"], tmp_path / "m")
    index = json.loads((path / base_loader.INDEX).read_text(encoding="utf-8"))
    tensors = {}
    for shard in set(index["weight_map"].values()):
        tensors.update(load_file(str(path / shard)))
        (path / shard).unlink()
    biases = {k: v for k, v in tensors.items() if k.endswith(".bias")}
    assert biases
    first, second = ("a", "b") if biases_first else ("b", "a")  # files are read in name order
    layout = {f"{first}-biases.safetensors": biases,
              f"{second}-rest.safetensors": {k: v for k, v in tensors.items() if k not in biases}}
    for name, part in layout.items():
        save_file(part, str(path / name), metadata={"format": "pt"})
    index["weight_map"] = {k: name for name, part in layout.items() for k in part}
    (path / base_loader.INDEX).write_text(json.dumps(index), encoding="utf-8")
    loaded = load_base(path, quant=QUANTS["nf4"])
    assert loaded.model.model.layers[0].self_attn.q_proj.bias is not None
    reference = _quantized_like(_reference(dirs["qwen2-tied"]), loaded.quantized, QUANTS["nf4"])
    assert torch.equal(_logits(loaded.model), _logits(reference))


def test_no_dtype_in_the_config_takes_the_weights_dtype(tmp_path):
    model = causal_lm_from_config(tiny_config("llama", vocab_size=VOCAB, pad_token_id=0), seed=3).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    loaded = load_base(tmp_path)
    reference = _reference(tmp_path)
    assert loaded.dtype == torch.bfloat16 == next(reference.parameters()).dtype
    assert torch.equal(_logits(loaded.model), _logits(reference))


def test_tied_lm_head_stays_tied_and_unquantized(dirs):
    loaded = load_base(dirs["qwen2-tied"], quant=QUANTS["nf4"])
    model = loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head" not in loaded.quantized and type(model.lm_head) is nn.Linear


def test_skip_names_are_never_quantized(dirs):
    loaded = load_base(dirs["llama"], quant=QUANTS["int8"], skip=["layers.1.mlp", "q_proj"])
    model = loaded.model
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(model.model.layers[0].mlp.down_proj) is QuantizedLinear
    assert not any(".q_proj" in n or "layers.1.mlp" in n for n in loaded.quantized)
    reference = _quantized_like(_reference(dirs["llama"]), loaded.quantized, QUANTS["int8"])
    assert torch.equal(_logits(model), _logits(reference))


def test_a_base_model_checkpoint_loads_into_the_causal_lm(tmp_path):
    """A checkpoint of LlamaModel (no ``model.`` prefix) into LlamaForCausalLM with tied embeddings."""
    keys = tiny_config("llama", vocab_size=VOCAB, pad_token_id=0, tie_word_embeddings=True)
    config = transformers.AutoConfig.for_model(keys.pop("model_type"), **keys)
    torch.manual_seed(0)
    base = transformers.LlamaModel(config)
    base.save_pretrained(str(tmp_path))
    loaded = load_base(tmp_path, quant=QUANTS["nf4"])
    reference = _reference(tmp_path)
    assert type(loaded.model) is type(reference) is transformers.LlamaForCausalLM
    reference = _quantized_like(reference, loaded.quantized, QUANTS["nf4"])
    assert torch.equal(_logits(loaded.model), _logits(reference))


def test_the_loader_never_calls_from_pretrained(dirs, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained called")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(refuse))
    assert load_base(dirs["llama"], quant=QUANTS["nf4"]).quantized


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_no_file_pages_or_threads_are_left_behind(dirs, tmp_path, quant):
    before = torch.get_num_threads()
    loaded = [load_base(dirs["llama-sharded"], threads=1, quant=quant and QUANTS[quant], cache_dir=tmp_path)
              for _ in range(2)]  # built, then read from the cache
    assert [b.how for b in loaded] == [base_loader.BUILT, base_loader.CACHE]
    assert torch.get_num_threads() == before
    if os.path.exists("/proc/self/maps"):  # the tensors are copies, not the files' mapped pages
        with open("/proc/self/maps", encoding="utf-8") as fh:
            maps = fh.read()
        assert str(dirs["llama-sharded"]) not in maps and str(tmp_path) not in maps


def test_a_model_class_instead_of_an_auto_class(dirs):
    loaded = load_base(dirs["llama"], auto_class=transformers.LlamaForCausalLM, quant=QUANTS["int8"])
    assert type(loaded.model) is transformers.LlamaForCausalLM
    reference = _quantized_like(_reference(dirs["llama"]), loaded.quantized, QUANTS["int8"])
    assert torch.equal(_logits(loaded.model), _logits(reference))


def test_empty_model_reads_only_the_checkpoint_headers(dirs, monkeypatch):
    import safetensors

    real = safetensors.safe_open

    class HeadersOnly:
        def __init__(self, *args, **kwargs):
            self._handle = real(*args, **kwargs)

        def __enter__(self):
            self._fh = self._handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

        def keys(self):
            return self._fh.keys()

        def get_slice(self, name):
            return self._fh.get_slice(name)  # its shape only: get_shape() reads the header

        def get_tensor(self, name):
            raise AssertionError(f"tensor {name} was read")

    monkeypatch.setattr(safetensors, "safe_open", HeadersOnly)
    model = empty_model(dirs["phi3"])
    assert all(p.is_meta for p in model.parameters())
    reference = _reference(dirs["phi3"])
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    assert shapes == [(n, p.shape) for n, p in reference.named_parameters()]


# -- the cache ----------------------------------------------------------------------------------

@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8", None])
def test_cache_round_trip_is_bit_identical(dirs, tmp_path, quant):
    spec = QUANTS[quant] if quant else None
    first = load_base(dirs["qwen2-tied"], quant=spec, cache_dir=tmp_path)
    assert first.how == base_loader.BUILT and first.cache_entry is not None
    entry = first.cache_entry
    assert entry.parent == tmp_path / "bases"
    assert sorted(p.name for p in entry.iterdir()) == [base_cache.MANIFEST, base_cache.WEIGHTS]
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # no temporary folders left
    second = load_base(dirs["qwen2-tied"], quant=spec, cache_dir=tmp_path)
    assert second.how == base_loader.CACHE and second.cache_entry == entry and second.warnings == ()
    assert second.quantized == first.quantized and second.bytes == first.bytes
    assert torch.equal(_logits(first.model), _logits(second.model))
    assert second.model.lm_head.weight is second.model.model.embed_tokens.weight
    assert not second.model.training and not any(p.requires_grad for p in second.model.parameters())
    for name in first.quantized:
        a, b = first.model.get_submodule(name).qweight, second.model.get_submodule(name).qweight
        assert torch.equal(a.dequantize(), b.dequantize()) and a.storage_bytes() == b.storage_bytes()


def test_cache_key_follows_the_variant(dirs, tmp_path):
    a = load_base(dirs["llama"], quant=QUANTS["nf4"], cache_dir=tmp_path).cache_entry
    b = load_base(dirs["llama"], quant=QUANTS["int8"], cache_dir=tmp_path).cache_entry
    c = load_base(dirs["llama"], quant=QUANTS["nf4"], skip=["o_proj"], cache_dir=tmp_path).cache_entry
    d = load_base(dirs["llama"], quant=QUANTS["nf4"], cache_dir=tmp_path)
    assert len({a, b, c}) == 3 and d.cache_entry == a and d.how == base_loader.CACHE
    changed = _copy(dirs["llama"], tmp_path / "changed")
    first = load_base(changed, quant=QUANTS["nf4"], cache_dir=tmp_path)
    assert first.how == base_loader.CACHE  # the same files (name, size, mtime) and config
    _save(changed, "llama", seed=7)  # new weights: a new entry
    again = load_base(changed, quant=QUANTS["nf4"], cache_dir=tmp_path)
    assert again.how == base_loader.BUILT and again.cache_entry != a
    assert torch.equal(_logits(again.model), _logits(_quantized_like(_reference(changed), again.quantized,
                                                                     QUANTS["nf4"])))


@pytest.mark.parametrize("damage", ["truncated", "bad-json", "manifest-mismatch", "missing-weights"])
def test_a_corrupt_cache_entry_is_rebuilt_with_a_warning(dirs, tmp_path, damage):
    first = load_base(dirs["llama"], quant=QUANTS["nf4"], cache_dir=tmp_path)
    entry = first.cache_entry
    weights, manifest = entry / base_cache.WEIGHTS, entry / base_cache.MANIFEST
    if damage == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "bad-json":
        manifest.write_text("{not json", encoding="utf-8")
    elif damage == "manifest-mismatch":
        data = json.loads(manifest.read_text(encoding="utf-8"))
        data["dense"] = data["dense"][1:]
        manifest.write_text(json.dumps(data), encoding="utf-8")
    else:
        weights.unlink()
    with pytest.warns(BaseCacheWarning, match="corrupt"):
        rebuilt = load_base(dirs["llama"], quant=QUANTS["nf4"], cache_dir=tmp_path)
    assert rebuilt.how == base_loader.BUILT and rebuilt.warnings and "corrupt" in rebuilt.warnings[0]
    assert torch.equal(_logits(rebuilt.model), _logits(first.model))
    again = load_base(dirs["llama"], quant=QUANTS["nf4"], cache_dir=tmp_path)  # the entry was rewritten
    assert again.how == base_loader.CACHE and torch.equal(_logits(again.model), _logits(first.model))
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory modes")
def test_an_unwritable_cache_dir_warns_and_still_loads(dirs, tmp_path):
    cache = tmp_path / "cache"
    (cache / "bases").mkdir(parents=True)
    os.chmod(cache / "bases", 0o500)
    try:
        with pytest.warns(BaseCacheWarning, match="not written"):
            loaded = load_base(dirs["llama"], quant=QUANTS["int8"], cache_dir=cache)
        assert loaded.how == base_loader.BUILT and loaded.cache_entry is None and loaded.quantized
        assert list((cache / "bases").iterdir()) == []
    finally:
        os.chmod(cache / "bases", 0o700)


def test_a_cache_dir_refusing_new_folders_warns_and_still_loads(dirs, tmp_path, monkeypatch):
    """What a read-only cache folder does for any user (root included, which the test above skips)."""
    import errno

    def refuse(target):
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr(base_cache, "stage_dir", refuse)
    with pytest.warns(BaseCacheWarning, match="Permission denied"):
        loaded = load_base(dirs["llama"], quant=QUANTS["nf4"], cache_dir=tmp_path)
    assert loaded.how == base_loader.BUILT and loaded.cache_entry is None and loaded.quantized
    assert list((tmp_path / "bases").iterdir()) == []


def test_a_cache_dir_that_is_a_file_warns_and_still_loads(dirs, tmp_path):
    (tmp_path / "cache").write_text("not a folder", encoding="utf-8")
    with pytest.warns(BaseCacheWarning, match="not written"):
        loaded = load_base(dirs["llama"], quant=QUANTS["int8"], cache_dir=tmp_path / "cache")
    assert loaded.how == base_loader.BUILT and loaded.cache_entry is None and loaded.quantized


def test_a_full_disk_leaves_no_partial_entry(dirs, tmp_path, monkeypatch):
    import errno

    real = base_cache.write_safetensors

    def full(path, items, metadata=None):
        real(path, items[: len(items) // 2], metadata)  # something written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(base_cache, "write_safetensors", full)
    with pytest.warns(BaseCacheWarning, match="No space left"):
        loaded = load_base(dirs["llama"], quant=QUANTS["nf4"], cache_dir=tmp_path)
    assert loaded.how == base_loader.BUILT and loaded.cache_entry is None
    assert list((tmp_path / "bases").iterdir()) == []


@pytest.mark.parametrize("bits,double_quant", [(4, True), (4, False), (8, False)])
def test_from_packed_rebuilds_the_same_weight(bits, double_quant):
    torch.manual_seed(0)
    weight = torch.randn(48, 64, dtype=torch.bfloat16)
    fresh = QuantizedWeight(weight, bits, "nf4", double_quant)
    tensors, meta = fresh.packed_state()
    json.dumps(meta)
    rebuilt = QuantizedWeight.from_packed({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))
    assert vars(rebuilt).keys() == vars(fresh).keys()  # nothing __init__ sets is missing
    assert dict(rebuilt.named_buffers()).keys() == dict(fresh.named_buffers()).keys()
    assert (rebuilt.bits, rebuilt.quant_type, rebuilt.shape, rebuilt.dtype) == (fresh.bits, fresh.quant_type,
                                                                                fresh.shape, fresh.dtype)
    assert torch.equal(rebuilt.dequantize(), fresh.dequantize())
    assert rebuilt.storage_bytes() == fresh.storage_bytes()
    from lora_tune.errors import QuantizationError

    with pytest.raises(QuantizationError):
        QuantizedWeight.from_packed({**tensors, "data": tensors["data"][:3]}, meta)


# -- bad input ------------------------------------------------------------------------------------

def _rewrite(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _config_error(path: Path, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_base(path, **kwargs)
    return info.value


def test_a_tensor_of_the_wrong_shape_is_named(dirs, tmp_path):
    path = _copy(dirs["llama"], tmp_path / "m")
    _rewrite(path, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(3, 64)}))
    error = _config_error(path, quant=QUANTS["nf4"], cache_dir=tmp_path / "cache")
    assert error.field == "task.model"
    assert "model.layers.1.self_attn.k_proj.weight in model.safetensors" in str(error)
    assert "expected shape (32, 64), found (3, 64)" in str(error)
    assert not (tmp_path / "cache" / "bases").exists() or not any((tmp_path / "cache" / "bases").iterdir())


def test_a_missing_tensor_is_named(dirs, tmp_path):
    path = _copy(dirs["llama"], tmp_path / "m")
    _rewrite(path, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    error = _config_error(path)
    assert error.field == "task.model" and "missing tensors model.layers.0.mlp.up_proj.weight" in str(error)
    assert "model.safetensors" in str(error)


def test_a_missing_shard_tensor_names_its_shard(dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(dirs["llama-sharded"], tmp_path / "m")
    index = json.loads((path / base_loader.INDEX).read_text(encoding="utf-8"))["weight_map"]
    shard = index["model.norm.weight"]
    tensors = load_file(str(path / shard))
    tensors.pop("model.norm.weight")
    save_file(tensors, str(path / shard), metadata={"format": "pt"})
    error = _config_error(path)
    assert "missing tensors model.norm.weight" in str(error) and shard in str(error)


def test_an_extra_tensor_is_named(dirs, tmp_path):
    path = _copy(dirs["llama"], tmp_path / "m")
    _rewrite(path, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    error = _config_error(path)
    assert error.field == "task.model" and "unexpected tensors model.layers.0.extra.weight (model.safetensors)" in str(
        error)


def test_a_truncated_weight_file_is_a_config_error(dirs, tmp_path):
    path = _copy(dirs["llama"], tmp_path / "m")
    os.truncate(path / "model.safetensors", 100)
    error = _config_error(path)
    assert error.field == "task.model" and "model.safetensors" in str(error)


def test_quantizing_an_already_quantized_checkpoint_is_refused(dirs, tmp_path):
    path = _copy(dirs["llama"], tmp_path / "m")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    error = _config_error(path, quant=QUANTS["nf4"])
    assert error.field == "quant_bits" and "already quantized" in str(error)
    error = _config_error(path)
    assert error.field == "task.model" and "already quantized" in str(error)


def test_pickled_weights_and_custom_code_are_refused(dirs, tmp_path):
    path = _copy(dirs["llama"], tmp_path / "pickled")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not read")
    error = _config_error(path)
    assert error.field == "task.model" and "pytorch_model.bin" in str(error) and "pickle" in str(error)
    path = _copy(dirs["llama"], tmp_path / "custom")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config.update(model_type="my-own-llama", auto_map={"AutoModelForCausalLM": "modeling.MyModel"})
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    error = _config_error(path)
    assert error.field == "task.model" and "auto_map" in str(error)
    with pytest.raises(ConfigError, match="auto_map"):
        empty_model(path)


def test_a_directory_without_model_weights_is_refused(tmp_path, dirs):
    path = _copy(dirs["llama"], tmp_path / "m")
    (path / "model.safetensors").rename(path / "consolidated.safetensors")
    error = _config_error(path)
    assert "consolidated.safetensors" in str(error) and "model.safetensors" in str(error)
    with pytest.raises(ConfigError, match="not found"):
        load_base(tmp_path / "nowhere" / "model")
