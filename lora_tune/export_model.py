"""What ``lora-tune export`` makes of a trial for serving, beside best.yaml and the adapter:

* the trial's adapted model, rebuilt as the trial built it: its task (the stored spec's ``task``,
  its code imported only as the operator allowed) leases the base variant the trial trained on
  (4/8-bit included) and the stored adapter (lora-tune format) is loaded into it;
* ``--merged``: that model with the adapter merged into the base (``merge_and_unload``: dense
  ``W0 + delta``, dequantized over a quantized base; every other Linear of a base loaded in 4/8
  bits dequantized too), in the base's dtype, saved with ``save_pretrained`` beside the task's
  tokenizer;
* PiSSA: an adapter trained over PiSSA's residual base, converted to plain LoRA of rank 2r over
  the unmodified base as PEFT converts one (``s·(B A - B0 A0) = s·[B, -B0] [A; A0]``, alphas
  scaled so that each module keeps its scale); the initial factors ``A0``, ``B0`` are recomputed
  by lora-tune's own PiSSA init (deterministic: an SVD of the same base weights);
* ``base_model_name_or_path`` of a PEFT adapter: the model's name, or a path relative to the
  folder of the adapter_config.json that records it, never an absolute path of this machine.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_tune.errors import AdapterFormatError, ConfigError
from lora_tune.lora.config import LoraConfig
from lora_tune.safe_files import output_dir

MERGED_MARKER = "lora_tune_merged.json"  # what tells a merged model folder written by export
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_MERGED_ALLOWED = "a new or empty directory, or a merged model folder written by `lora-tune export`"
# transformers' auto classes, most specific first, and the mapping that lists their model classes
_AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


# -- the trial's task and model --------------------------------------------------------------

def trial_task(study: Any, allow_code: Sequence[str] = (), study_file: str | os.PathLike | None = None
               ) -> tuple[Any, dict[str, Any]]:
    """The study's task built from its stored spec (its code imported only as allowed), and the
    ``task`` section it was built from (its relative paths resolved)."""
    from lora_tune.study.run.runner import operator_allowance
    from lora_tune.study.schema.spec import spec_from_stored
    from lora_tune.tasks import build_task

    raw = study.user_attrs.get("spec")
    if not isinstance(raw, dict) or not isinstance(raw.get("task"), dict):
        raise ConfigError("study", study.study_name, "a study created by lora-tune (its study file is stored in it)",
                          "Without its task, the trial's model cannot be rebuilt.")
    spec = spec_from_stored(raw)
    operator_allowance(spec, study.study_name, allow_code, study_file).check(
        spec.task, f"the stored study {study.study_name!r}")
    # as a worker builds it (study/run/runner.load_study): relative paths read against the study's
    # folder where the spec records one, a --study-file's folder trusted for its `file.py` names
    trust = getattr(spec, "trust_code_dir", None)
    if study_file is not None and trust is not None:
        trust(Path(study_file).absolute().parent)
    resolved = getattr(spec, "resolved_task", None)
    task_section = dict(resolved() if resolved is not None else spec.task)
    return build_task(task_section), task_section


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (save_pretrained / from_pretrained)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def require_hf_model(task: Any, option: str) -> nn.Module:
    """The task's model structure, which ``option`` needs to be a Hugging Face model."""
    from lora_tune.tasks.base import structure_of

    structure = structure_of(task)
    if not is_hf_model(structure):
        raise ConfigError(option, type(structure).__name__, "a task whose model is a Hugging Face model "
                          "(transformers PreTrainedModel: sft, causal-lm, text-classification, or a factory's)",
                          f"{option} needs a Hugging Face model; task {getattr(task, 'name', '?')!r} builds a "
                          f"{type(structure).__name__}")
    return structure


@dataclass
class Rebuilt:
    """The trial's adapted model, the adapter's config, and (PiSSA) the initial LoRA factors
    (``<module>.lora_A`` / ``.lora_B`` -> tensor) its training started from."""

    model: nn.Module
    config: LoraConfig
    initial: dict[str, torch.Tensor] | None


@contextlib.contextmanager
def rebuilt_trial(task: Any, native_dir: str | os.PathLike) -> Iterator[Rebuilt]:
    """The trial's adapted model: the base variant it trained on, leased from ``task``, with the
    lora-tune adapter in ``native_dir`` loaded into it (PiSSA's residual recomputed by its init).
    The base is dropped afterwards (the caller may merge it)."""
    from lora_tune.lora.adapter_sites import LoadPlan, inject_exact, lora_state_dict
    from lora_tune.lora.native_format import native_plan
    from lora_tune.lora.state import read_adapter
    from lora_tune.tasks.base import give_back_base, lease_base

    fmt, meta, tensors = read_adapter(native_dir)
    if fmt != "lora-tune":
        raise AdapterFormatError(f"{native_dir}: expected the trial's adapter in lora-tune format")
    saved = LoraConfig.from_dict(meta["lora_config"])
    model, _ = lease_base(task, saved, "cpu")
    try:
        plan = native_plan(model, meta, tensors, str(native_dir))
        initial = None
        if plan.config is not None:  # inject first (PiSSA: its init), then copy the trained weights
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                inject_exact(model, plan.config, plan.plain_fused)
            model._lora_tune_config = plan.record or plan.config  # type: ignore[assignment]
            if plan.config.init == "pissa":
                initial = {k: t.detach().clone() for k, t in lora_state_dict(model).items()
                           if k.endswith((".lora_A", ".lora_B"))}
            plan = LoadPlan(plan.tensors)
        plan.apply(model)
        model.eval()
        yield Rebuilt(model, saved, initial)
    finally:
        give_back_base(task, model, clean=False)  # merged or not, this base is not lent again


# -- merged ---------------------------------------------------------------------------------------

def merged_model(model: nn.Module) -> nn.Module:
    """``merge_and_unload`` and every remaining 4/8-bit Linear dequantized: plain torch layers only."""
    from lora_tune.lora.inject import merge_and_unload
    from lora_tune.lora.quant import QuantizedLinear, QuantizedWeight

    model = merge_and_unload(model)
    dense: dict[int, nn.Linear] = {}  # one per quantized module, whatever its names (aliases)
    with torch.no_grad():
        for name, module in list(model.named_modules(remove_duplicate=False)):
            if isinstance(module, QuantizedLinear):
                if id(module) not in dense:
                    dense[id(module)] = _dense_linear(module)
                _set_module(model, name, dense[id(module)])
    left = [n for n, m in model.named_modules() if isinstance(m, QuantizedWeight)]
    if left:
        raise AdapterFormatError(f"the merged model still holds quantized weights it cannot dequantize: {left[:5]}")
    return model


def _dense_linear(module: Any) -> nn.Linear:
    """A QuantizedLinear as an nn.Linear holding its dequantized weight (and its bias)."""
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.qweight.dequantize(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return linear


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def auto_class_name(model: nn.Module) -> str:
    """The transformers auto class that loads ``model``'s class (``AutoModel`` when none is more specific)."""
    from transformers.models.auto import modeling_auto

    cls = type(model).__name__
    for auto, mapping in _AUTO_CLASSES:
        names = getattr(modeling_auto, mapping, {})
        if any(cls == v or (isinstance(v, (tuple, list)) and cls in v) for v in names.values()):
            return auto
    return "AutoModel"


def task_tokenizer(task: Any, task_spec: Mapping[str, Any]) -> Any:
    """The task's Hugging Face tokenizer (with the chat template its task renders with), or None
    (a byte-level or no tokenizer)."""
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        ref = task_spec.get("tokenizer")
        if ref is None and isinstance(task_spec.get("model"), str):
            ref = task_spec["model"]
        if not isinstance(ref, str) or ref == "bytes":
            return None
        from transformers import AutoTokenizer

        from lora_tune.tasks.hf import TOKENIZER_LOAD, quiet_transformers, resolve_model_ref

        local = Path(ref).expanduser()
        with quiet_transformers():
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else resolve_model_ref(ref),
                                                          **TOKENIZER_LOAD)
            except (OSError, ValueError, LookupError):
                return None
    template = getattr(getattr(task, "renderer", None), "template", None)
    if template and getattr(tokenizer, "chat_template", None) != template:
        tokenizer.chat_template = template
    return tokenizer


def save_merged(model: nn.Module, tokenizer: Any, folder: Path, marker: Mapping[str, Any]) -> None:
    """``save_pretrained`` (safetensors) of the merged model and its tokenizer into ``folder``, and
    the marker file that lets a later export replace it."""
    from lora_tune.tasks.hf import quiet_transformers

    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", None) is False:
        config.use_cache = True  # the tasks turn it off for training; generation wants it
    for p in model.parameters():
        p.requires_grad_(False)
    kwargs = ({"safe_serialization": True}
              if "safe_serialization" in inspect.signature(model.save_pretrained).parameters else {})
    with quiet_transformers():
        model.save_pretrained(str(folder), **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
    (folder / MERGED_MARKER).write_text(json.dumps(dict(marker), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_merged_dest(dest: str | os.PathLike) -> bool:
    """Refuse a ``--merged`` path that cannot take the model; whether it holds a merged model an
    earlier export wrote (replaced)."""

    def merged_before(path: Path, entries: list[Path]) -> bool:
        marker = path / MERGED_MARKER
        return marker.is_file() and not marker.is_symlink()

    return output_dir(dest, "--merged", _MERGED_ALLOWED, merged_before, parent_must_exist=True)


# -- PiSSA -> plain LoRA ------------------------------------------------------------------------------

def pissa_to_plain(peft_dir: str | os.PathLike, initial: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Rewrite the PEFT adapter in ``peft_dir``, trained over PiSSA's residual base from the factors
    ``initial``, as plain LoRA over the unmodified base (PEFT's conversion: rank 2r, ``[A; A0]``
    and ``[B, -B0]``, every alpha times 2, rsLoRA √2, so each module keeps its scale). Returns
    the new adapter_config.json content."""
    from safetensors.torch import load_file, save_file

    folder = Path(peft_dir)
    meta = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    if meta.get("init_lora_weights") != "pissa":
        raise AdapterFormatError(f"{folder}: not a PiSSA adapter (init_lora_weights {meta.get('init_lora_weights')!r})")
    if meta.get("use_dora"):
        raise AdapterFormatError("a PiSSA adapter with DoRA cannot be converted to plain LoRA: the magnitude "
                                 "rescales the residual base it was trained over")
    tensors = load_file(str(folder / PEFT_WEIGHTS))
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if m is None:
            out[key] = t
            continue
        start = initial.get(f"{m[1]}.lora_{m[2]}")
        if start is None or tuple(start.shape) != tuple(t.shape):
            raise AdapterFormatError(f"{folder}: {key}: the recomputed PiSSA factor "
                                     + ("is missing" if start is None else f"has shape {tuple(start.shape)}")
                                     + f" (the trained one: {tuple(t.shape)}); the base is not the one it trained on")
        start = start.to(t.dtype)
        out[key] = torch.cat([t, start], 0) if m[2] == "A" else torch.cat([t, -start], 1)
    factor = math.sqrt(2.0) if meta.get("use_rslora") else 2.0
    meta.update(
        r=2 * int(meta["r"]), lora_alpha=float(meta["lora_alpha"]) * factor,
        rank_pattern={k: 2 * int(v) for k, v in (meta.get("rank_pattern") or {}).items()},
        alpha_pattern={k: float(v) * factor for k, v in (meta.get("alpha_pattern") or {}).items()},
        init_lora_weights=True,
    )
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    (folder / PEFT_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


def served_config(lora_config: Mapping[str, Any], pissa_converted: bool) -> dict[str, Any]:
    """The LoRA config of what is served: after PiSSA's conversion, kaiming-initialised plain LoRA
    of twice the ranks."""
    served = dict(lora_config)
    if pissa_converted:
        served.update(init="kaiming", rank=2 * int(served["rank"]),
                      rank_pattern={k: 2 * int(v) for k, v in (served.get("rank_pattern") or {}).items()})
    return served


# -- the base model's name -------------------------------------------------------------------------

def base_model_reference(task_spec: Mapping[str, Any], relative_to: str | os.PathLike | None) -> str | None:
    """``base_model_name_or_path`` for an adapter of the task's model: a hub id or alias as given;
    a relative path as the study file gives it; an absolute path made relative to ``relative_to``
    (the folder of the adapter_config.json), else its folder name; None for a model built from a
    config (it has no name)."""
    model = task_spec.get("model")
    if not isinstance(model, str) or not model.strip():
        return None
    path = Path(model).expanduser()
    if not (path.is_absolute() or model.startswith((".", "~")) or path.exists()):
        return model  # a hub id or an alias
    if not path.is_absolute():
        return model
    if relative_to is None:
        return path.name
    try:
        return os.path.relpath(path, Path(relative_to).resolve())
    except ValueError:  # another drive (Windows)
        return path.name


def set_base_model(peft_dir: str | os.PathLike, reference: str | None) -> None:
    """Write ``reference`` as ``base_model_name_or_path`` of the PEFT adapter in ``peft_dir``."""
    cfg = Path(peft_dir) / PEFT_CONFIG
    meta = json.loads(cfg.read_text(encoding="utf-8"))
    meta["base_model_name_or_path"] = reference
    cfg.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
