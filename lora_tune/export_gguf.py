"""``lora-tune export --gguf FILE``: a trial's adapter as a GGUF LoRA adapter for llama.cpp, written
with the ``gguf`` package the way llama.cpp's ``convert_lora_to_gguf.py`` writes one from the
PEFT folder:

* metadata ``general.architecture`` (the base's llama.cpp architecture), ``general.type`` ``adapter``,
  ``adapter.type`` ``lora``, ``adapter.lora.alpha``;
* per adapted weight ``<gguf name>.weight.lora_a`` (the PEFT ``lora_A``, r x in) and ``.lora_b``
  (``lora_B``, out x r), float32 (the converter keeps every tensor whose name does not end in
  ``.weight`` in F32); names mapped by the gguf package's :func:`gguf.get_tensor_name_map` for the
  architecture (``model.layers.N.self_attn.q_proj`` -> ``blk.N.attn_q``); for the architectures whose
  converter permutes the q/k rows for llama.cpp's rope (LLaMA, Mistral) lora_b's rows are permuted
  the same way; an embedding's lora_a is written transposed (vocab x r), as the converter does;
* llama.cpp scales each pair by ``alpha / r`` (``r``: that pair's rank; ``src/llama-adapter.cpp``)
  and keeps one alpha per file, while the converter writes PEFT's ``lora_alpha`` as is. Here alpha
  is written so that ``alpha / r`` is the trained scale: α for plain LoRA, α·√r for rsLoRA (whose
  scale is α/√r); a module whose rank or alpha differs (rank_pattern / alpha_pattern) has its
  scale folded into its lora_b.

What the converter refuses is refused with its reason: DoRA (``lora_magnitude_vector``), layers
trained in full (``modules_to_save``), trained biases, an adapter on an output head llama.cpp does
not keep, and architectures outside :data:`ARCHITECTURES`.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_tune.errors import AdapterFormatError, ConfigError

# HF model_type -> (gguf MODEL_ARCH member, whether llama.cpp's converter permutes the q/k rows):
# llama.cpp conversion/llama.py (LlamaModel, undo_permute = True, also MistralForCausalLM),
# conversion/qwen.py (Qwen2Model, Qwen3Model), conversion/gemma.py (GemmaModel, Gemma2Model; lm_head
# dropped), conversion/phi.py (Phi3MiniModel: fused qkv_proj and gate_up_proj kept whole)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
    "qwen3": ("QWEN3", False),
    "gemma": ("GEMMA", False),
    "gemma2": ("GEMMA2", False),
    "phi3": ("PHI3", False),
}
_HEAD_DROPPED = ("gemma", "gemma2")  # their converters skip lm_head.weight (tied to the embeddings)
_PEFT_PREFIX = "base_model.model."
# a PEFT LoRA factor: module, A/B (Linear, Conv1D) or A/B (embedding)
_PAIR_KEY = re.compile(re.escape(_PEFT_PREFIX) + r"(.+)\.(?:lora_([AB])\.weight|lora_embedding_([AB]))")


@dataclass
class GGUFPair:
    """One adapted weight as written: its GGUF base name (``blk.0.attn_q.weight``), lora_a, lora_b."""

    name: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ConfigError("--gguf", None, "the gguf package (pip install 'lora-tune[serve]')") from None
    return gguf


def architecture(hf_config: Any) -> tuple[Any, bool]:
    """(gguf MODEL_ARCH, permute q/k) of a base model's config; ConfigError naming ``--gguf`` for
    one llama.cpp's adapter conversion is not written for here."""
    gguf = _gguf()
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ConfigError("--gguf", model_type, "a base of the llama family that gguf maps: "
                          + ", ".join(ARCHITECTURES),
                          "llama.cpp's tensor names for this architecture are not known to lora-tune; serve the "
                          "PEFT adapter (--adapter) or the merged model (--merged) instead")
    arch, permute = ARCHITECTURES[model_type]
    return getattr(gguf.MODEL_ARCH, arch), permute


def _permute_rows(b: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute applied to lora_b's rows (what it does to the
    LoRA tensor of a q/k projection: its B carries the output rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return b.reshape(n_head, 2, b.shape[0] // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def gguf_pairs(peft_dir: str | os.PathLike, scales: Mapping[str, float], hf_config: Any,
               alpha: float) -> list[GGUFPair]:
    """The GGUF tensors of the PEFT adapter in ``peft_dir``: each module's trained scale (``scales``,
    by module name) reproduced as ``alpha / r``; AdapterFormatError naming what llama.cpp cannot load."""
    from safetensors.torch import load_file

    folder = Path(peft_dir)
    gguf = _gguf()
    arch, permute = architecture(hf_config)
    meta = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    n_blocks = int(getattr(hf_config, "num_hidden_layers", 0) or 0)
    names = gguf.get_tensor_name_map(arch, n_blocks)
    if meta.get("use_dora"):
        raise AdapterFormatError("a DoRA adapter (use_dora) cannot be written as GGUF: llama.cpp applies "
                                 "lora_a/lora_b only, and convert_lora_to_gguf.py refuses lora_magnitude_vector")
    pairs: dict[str, dict[str, Any]] = {}
    other = []
    for key, t in tensors.items():
        m = _PAIR_KEY.fullmatch(key)
        if m is None:
            other.append(key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key)
            continue
        entry = pairs.setdefault(m[1], {"embedding": m[3] is not None})
        entry[m[2] or m[3]] = t
    if other:
        raise AdapterFormatError(
            "the adapter holds weights other than LoRA pairs, which llama.cpp does not load and "
            f"convert_lora_to_gguf.py refuses ('Unexpected name'): {other[:5]}"
            + (" (modules_to_save: layers trained in full)" if meta.get("modules_to_save") else "")
            + (f" (bias: {meta.get('bias')})" if meta.get("bias") not in (None, "none") else ""))
    n_head = getattr(hf_config, "num_attention_heads", None)
    n_head_kv = getattr(hf_config, "num_key_value_heads", None)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False)) or hf_config.model_type in _HEAD_DROPPED
    out, unmapped = [], []
    for module, entry in pairs.items():
        if module not in scales:
            raise AdapterFormatError(f"the adapter's module {module!r} is not among the trial's adapted modules")
        found = names.get_type_and_name(module + ".weight", try_suffixes=(".weight",))
        if found is None:
            unmapped.append(module)
            continue
        kind, name = found
        if kind == gguf.MODEL_TENSOR.OUTPUT and tied:
            raise AdapterFormatError(f"{module!r}: llama.cpp's {hf_config.model_type} model has no output head of its "
                                     "own (tied to the embeddings), so an adapter on it cannot be applied "
                                     "('lm_head is present in adapter, but is ignored in base model')")
        A, B = entry["A"].float(), entry["B"].float()
        if A.dim() != 2 or B.dim() != 2:
            raise AdapterFormatError(f"{module!r}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}: llama.cpp "
                                     "applies 2-D LoRA matrices only")
        rank = B.shape[1]
        factor = scales[module] * rank / alpha  # llama.cpp multiplies by alpha / rank
        if not math.isclose(factor, 1.0, rel_tol=1e-9):
            B = B * factor
        if permute and n_head and module.endswith("q_proj"):
            B = _permute_rows(B, n_head, n_head)
        elif permute and n_head and module.endswith("k_proj"):
            B = _permute_rows(B, n_head, n_head_kv)
        if entry["embedding"]:  # PEFT's lora_embedding_A is r x vocab; llama.cpp gathers rows of lora_a
            A = A.t()
        out.append(GGUFPair(name, A.contiguous(), B.contiguous()))
    if unmapped:
        raise AdapterFormatError(f"llama.cpp's {hf_config.model_type} architecture has no tensor for the adapted "
                                 f"modules {unmapped[:5]} (gguf's tensor name map)")
    return out


def served_alpha(lora_config: Mapping[str, Any], rank_factor: int = 1) -> float:
    """The ``adapter.lora.alpha`` whose ``alpha / r`` is the config's scale at its rank (times
    ``rank_factor``: 2 after PiSSA's conversion): α, or α·√r for rsLoRA."""
    from lora_tune.lora.config import scale_for

    rank = int(lora_config["rank"])
    return scale_for(rank, float(lora_config["alpha"]), bool(lora_config.get("rslora"))) * rank * rank_factor


def write_gguf(path: str | os.PathLike, pairs: list[GGUFPair], hf_config: Any, alpha: float, name: str) -> None:
    """Write the GGUF LoRA adapter file ``path``."""
    gguf = _gguf()
    arch, _ = architecture(hf_config)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(name)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for pair in pairs:
            writer.add_tensor(pair.name + ".lora_a", pair.lora_a.numpy())
            writer.add_tensor(pair.name + ".lora_b", pair.lora_b.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _pattern_value(patterns: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def peft_scales(peft_dir: str | os.PathLike) -> dict[str, float]:
    """Each adapted module's scale as PEFT computes it from the adapter's config (``lora_alpha / r``,
    rsLoRA ``/ √r``, rank_pattern / alpha_pattern per module)."""
    from lora_tune.lora.config import scale_for

    from safetensors import safe_open

    folder = Path(peft_dir)
    meta = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
        keys = fh.keys()  # a safetensors handle, not a dict: it is not iterable
    modules = {m[1] for key in keys if (m := _PAIR_KEY.fullmatch(key))}
    rslora = bool(meta.get("use_rslora"))
    return {m: scale_for(int(_pattern_value(meta.get("rank_pattern"), m, meta["r"])),
                         float(_pattern_value(meta.get("alpha_pattern"), m, meta["lora_alpha"])), rslora)
            for m in modules}
