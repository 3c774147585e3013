"""lora-tune's LoraConfig <-> PEFT's ``peft.LoraConfig``: :func:`to_peft_config` and
:func:`from_peft_config` (also reachable as ``LoraConfig.to_peft`` / ``LoraConfig.from_peft``,
see :mod:`lora_tune.lora`).

``to_peft`` resolves the targets on the model with lora-tune's own resolver (a dry run of
``inject`` on a weightless copy, so every check of ``inject`` applies) and writes the result as
PEFT matches it: exact module names, per-module ranks and alphas anchored to one module each.
The fields are built by :func:`lora_tune.lora.peft.adapter_format.peft_meta`, the code that writes
PEFT adapter directories. ``from_peft`` translates PEFT's fields with PEFT's matching rules and
refuses every PEFT option lora-tune does not have, naming the PEFT field.

peft is imported only by ``to_peft_config`` (to build the ``peft.LoraConfig``).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from torch import nn

from lora_tune.errors import AdapterFormatError, ConfigError
from lora_tune.lora.adapter_sites import CONFIG_FILE, Site, _meta_copy, adapted_sites
from lora_tune.lora.config import LoraConfig
from lora_tune.lora.inject import inject, lora_layers
from lora_tune.lora.peft.adapter_format import (
    INITS_TO_PEFT,
    peft_meta,
    unrepresentable_sites,
    unsupported_peft_options,
)

# PEFT defaults of the fields from_peft reads (used where a dict leaves one out)
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
                 "init_lora_weights": True, "use_dora": False}
# the heads PEFT adds to modules_to_save for these task types (PeftModelFor... classes)
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}
# LoraConfig field -> the PEFT field it is read from (for error messages)
_PEFT_NAMES = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
               "exclude": "exclude_modules", "rslora": "use_rslora", "init": "init_lora_weights"}
_PLAIN_NAME = re.compile(r"[\w-]+(?:\.[\w-]+)*")


# -- lora-tune -> PEFT ---------------------------------------------------------------------------
def planned_sites(model: nn.Module, config: LoraConfig) -> list[Site]:
    """The modules ``inject(model, config)`` would adapt, with their rank, alpha and parts: found by
    injecting into a copy of the model whose tensors live on the meta device (no memory, and
    the model is not changed). Raises what ``inject`` raises."""
    ghost = _meta_copy(model)
    inject(ghost, LoraConfig.from_dict({**config.to_dict(), "quant_bits": None}))
    return adapted_sites(ghost)


def to_peft_config(config: LoraConfig, model: nn.Module) -> Any:
    """The ``peft.LoraConfig`` that adapts ``model`` as this config does.

    The targets are resolved on ``model`` by lora-tune's resolver and written as the exact
    module names (a list, or one regex where a name list would also match other modules);
    ranks and alphas that differ from ``rank`` / ``alpha`` go into ``rank_pattern`` /
    ``alpha_pattern`` anchored to one module each. ``dropout``, ``rslora``, ``bias``, ``init``
    (kaiming -> True, gaussian -> "gaussian", pissa -> "pissa") and ``modules_to_save`` map to
    their PEFT fields. Names are relative to ``model``: give the same model (or the same
    architecture) to ``peft.get_peft_model``. ``task_type`` is left None; note that PEFT's
    SEQ_CLS / TOKEN_CLS task types add ``classifier`` / ``score`` to ``modules_to_save``.
    ``use_dora`` maps to PEFT's ``use_dora`` (the same function: see :mod:`lora_tune.lora.dora`).
    Expert weight stacks go into ``target_parameters`` by their full parameter names (the same
    E pairs per stack). With ``layers`` set, the targets are written as their names inside a
    block plus ``layers_to_transform`` / ``layers_pattern`` where PEFT's rule then matches
    exactly the same modules (else as exact names; see :mod:`lora_tune.lora.peft.matching`).

    A fused qkv layer adapted on all of q, k, v (GPT-2's ``c_attn``) becomes PEFT's one pair of
    rank ``r`` over the whole layer, its usual recipe; lora-tune trains one pair per part
    there (A repeated per part reproduces PEFT's pair). To carry weights trained with
    lora-tune into PEFT, use ``save_adapter(model, path, format="peft")``, which writes such
    a layer as one block-diagonal pair of rank 3r.

    ``quant_bits`` does not block: PEFT quantizes at model load, not in its LoraConfig (pass
    ``transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
    bnb_4bit_use_double_quant=double_quant)``, or ``load_in_8bit=True``, to
    ``from_pretrained``, then ``peft.prepare_model_for_kbit_training``). Call ``to_peft`` on the
    unquantized model or one of the same architecture.

    Raises ConfigError, naming the field, for what PEFT's LoraConfig cannot express:
    ``method="merged"``, nn.MultiheadAttention, fused qkv part selectors (``c_attn[q,v]``,
    ``enable_lora``), grouped / dilated / non-zero-padded convs, ``init="pissa"`` on layers
    other than Linear / Conv1D, ``modules_to_save`` names PEFT would match more widely,
    ``dropout`` with expert stacks (PEFT's target_parameters refuses it), and a model that
    already carries LoRA layers; and whatever ``inject`` would raise.
    """
    import peft  # noqa: PLC0415 - optional dependency, loaded on use

    if config.method != "parallel":
        raise ConfigError("method", config.method, "'parallel' for PEFT",
                          "PEFT always computes the LoRA branch beside the frozen layer; train with method "
                          "'parallel' (the same function), and merge after training with PeftModel.merge_and_unload()")
    _refuse_adapted(model)
    sites = planned_sites(model, config)
    layer_problems = unrepresentable_sites(sites, "kaiming")
    if layer_problems:
        raise ConfigError("targets", [s.selector_name for s in sites],
                          "layers PEFT computes as lora-tune does (Linear, GPT-2 Conv1D, Embedding, plain Conv, "
                          "fused qkv layers with all of q, k, v)",
                          "; ".join(layer_problems) + ". Exclude these layers, or train with lora-tune")
    init_problems = unrepresentable_sites(sites, config.init)
    if init_problems:
        raise ConfigError("init", config.init, "'kaiming' or 'gaussian' for these layers", "; ".join(init_problems))
    experts = [s.name for s in sites if s.kind == "experts"]
    if experts and config.dropout:
        raise ConfigError("dropout", config.dropout, "0 when expert stacks are targeted",
                          f"PEFT's target_parameters (here {experts[0]!r}, ...) refuses lora_dropout; lora-tune "
                          "drops entries of A there, which PEFT has no option for")
    meta = peft_meta(model, sites, config, None, fused_rank="shared", inference_mode=False)
    _check_modules_to_save(model, [s.name for s in sites], meta["modules_to_save"] or [])
    return peft.LoraConfig(**{k: v for k, v in meta.items() if k != "peft_type"})


def _refuse_adapted(model: nn.Module) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: PLC0415

    lora = [n for n, _ in lora_layers(model)]
    theirs = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if lora or theirs:
        raise ConfigError("model", type(model).__name__, "the base model, without LoRA layers",
                          f"it already carries {'lora-tune' if lora else 'PEFT'} LoRA layers "
                          f"({(lora or theirs)[0]!r}, ...); PEFT wraps the base layers itself, so pass the model "
                          "before lora_tune.inject / peft.get_peft_model")


def _check_modules_to_save(model: nn.Module, targets: list[str], saved: list[str]) -> None:
    """PEFT makes every module whose name *ends with* a modules_to_save entry trainable, and skips
    targets whose name contains one as a dotted component; refuse names for which either rule
    would reach other modules than lora-tune's."""
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    reached = [n for n in names if any(n.endswith(m) for m in saved)]
    extra = sorted({n for n in reached if not any(n == s or n.startswith(s + ".") for s in saved)})
    skipped = [t for t in targets if any(re.match(rf"(^|.*\.){m}($|\..*)", t) for m in saved)]
    if extra or skipped:
        why = (f"PEFT would also make {extra[:4]} trainable (it matches modules_to_save by plain suffix)" if extra
               else f"PEFT would leave the targets {skipped[:4]} un-adapted (it skips targets inside a module to save)")
        raise ConfigError("modules_to_save", saved, "modules whose names PEFT matches to these modules only", why)


# -- PEFT -> lora-tune ---------------------------------------------------------------------------
def from_peft_config(source: Any) -> LoraConfig:
    """A LoraConfig from a ``peft.LoraConfig``, a dict of its fields, or a PEFT adapter
    directory (its ``adapter_config.json``; the weights are not read -- ``load_adapter``
    loads them).

    ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``bias``, ``init_lora_weights``
    (True, "gaussian", "pissa"), ``target_modules``, ``exclude_modules``, ``modules_to_save``,
    ``rank_pattern``, ``alpha_pattern``, ``use_dora``, ``target_parameters`` (expert stacks),
    ``layers_to_transform`` and ``layers_pattern`` (``layers`` as block indices,
    ``layers_pattern``) are translated with PEFT's matching rules (a name
    list: the module or a dotted suffix; a string: a fullmatched regex; ``"all-linear"``:
    lora-tune's preset of that name; pattern keys: ``(.*\\.)?KEY$``; modules_to_save: any
    name ending with the entry, plus the heads PEFT adds for SEQ_CLS / TOKEN_CLS /
    QUESTION_ANS). A field a dict leaves out takes PEFT's default (``lora_alpha`` 8).
    Metadata (``task_type``, ``base_model_name_or_path``, ``inference_mode``, ...) and
    ``fan_in_fan_out`` (lora-tune reads the layout from the layer) are not needed.

    Raises ConfigError naming the PEFT field for every PEFT option lora-tune lacks:
    ``lora_bias``, ``megatron_config``, ``trainable_token_indices``, ``layer_replication``, LoftQ / EVA /
    CorDA / ... configs, ``init_lora_weights`` other than True / "gaussian" / "pissa", and
    a missing ``target_modules`` (and ``target_parameters``); ``target_parameters`` named without
    their block index together with ``layers_to_transform`` (PEFT adapts those in every block).

    Differences to know: lora-tune's ``all-linear`` also adapts expert stacks and never a
    router (PEFT's adapts Linear routers such as Qwen2-MoE's ``shared_expert_gate``);
    ``layers`` applies to every target, where PEFT ignores ``layers_to_transform`` for exact
    names; lora-tune adapts a fused qkv layer (GPT-2's ``c_attn``) with one pair per q/k/v
    part where PEFT uses one pair for the layer (a superset: PEFT's pair loads into it, see
    ``load_adapter``); each target pattern must match something, where PEFT only needs one of
    them to.
    """
    meta = _peft_fields(source)
    peft_type = meta.get("peft_type")
    if peft_type is not None and str(getattr(peft_type, "value", peft_type)) != "LORA":
        raise ConfigError("peft_type", peft_type, "'LORA'", "only PEFT LoRA configs translate to a LoraConfig")
    unsupported = unsupported_peft_options(meta)
    if unsupported:
        field = unsupported[0]
        others = f" (also set: {', '.join(unsupported[1:])})" if len(unsupported) > 1 else ""
        raise ConfigError(field, meta[field], "unset (None / False / empty), PEFT's default",
                          f"lora-tune has no equivalent of PEFT's {field}{others}")
    get: Callable[[str], Any] = {**PEFT_DEFAULTS, **{k: v for k, v in meta.items() if v is not None}}.get
    task = str(getattr(meta.get("task_type"), "value", meta.get("task_type")))
    saved = _names(meta.get("modules_to_save"), "modules_to_save")
    saved += [h for h in TASK_HEADS.get(task, ()) if h not in saved]
    layers, layers_pattern = _layers(meta)
    try:
        return LoraConfig(
            rank=get("r"), alpha=get("lora_alpha"), dropout=get("lora_dropout"),
            targets=_targets(meta.get("target_modules"), meta.get("target_parameters")),
            layers=layers, layers_pattern=layers_pattern,
            exclude=_patterns(meta.get("exclude_modules"), "exclude_modules"),
            rslora=get("use_rslora"), init=_init(get("init_lora_weights")), bias=get("bias"),
            rank_pattern={_pattern_key(k, "rank_pattern"): v for k, v in (meta.get("rank_pattern") or {}).items()},
            alpha_pattern={_pattern_key(k, "alpha_pattern"): v for k, v in (meta.get("alpha_pattern") or {}).items()},
            # PEFT makes every module whose name ends with an entry trainable
            modules_to_save=["re:.*" + re.escape(m) for m in saved],
            use_dora=get("use_dora"),
        )
    except ConfigError as exc:
        if exc.field.split("[")[0] not in _PEFT_NAMES:
            raise
        head = exc.field.split("[")[0]
        raise ConfigError(_PEFT_NAMES[head] + exc.field[len(head):], exc.value, exc.allowed) from None


def _peft_fields(source: Any) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        file = path / CONFIG_FILE if path.is_dir() else path
        if not file.is_file():
            raise AdapterFormatError(f"{path}: not a PEFT adapter directory (expected {CONFIG_FILE} inside it)")
        try:
            meta = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AdapterFormatError(f"{file}: not readable JSON ({exc})") from None
        if not isinstance(meta, dict) or "peft_type" not in meta:
            hint = " (a lora-tune adapter: read it with lora_tune.load_adapter)" if isinstance(meta, dict) and \
                meta.get("format") == "lora-tune" else ""
            raise AdapterFormatError(f"{file}: not a PEFT adapter config (no \"peft_type\"){hint}")
        return meta
    if callable(getattr(source, "to_dict", None)) and hasattr(source, "peft_type"):
        return dict(source.to_dict())
    raise ConfigError("source", type(source).__name__,
                      "a peft.LoraConfig, a dict of its fields, or a PEFT adapter directory")


def _name_pattern(name: str) -> str:
    """A lora-tune pattern matching what PEFT matches for a name in a list: the module itself or
    any module whose name ends with ``.name``."""
    return name if _PLAIN_NAME.fullmatch(name) else r"re:(?:.*\.)?" + re.escape(name)


def _names(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(field, value, "a list of module names")
    return sorted(value) if isinstance(value, (set, frozenset)) else list(value)


def _regex(text: str, field: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise ConfigError(field, text, "a valid regular expression", str(exc)) from None
    return "re:" + text


def _layers(meta: dict[str, Any]) -> tuple[list[int] | None, list[str] | None]:
    """``layers_to_transform`` / ``layers_pattern`` -> ``layers`` / ``layers_pattern``. PEFT does not
    apply them to ``target_parameters``, so an expert stack named without its block index would be
    adapted in every block there and only in the chosen ones here: refused."""
    value = meta.get("layers_to_transform")
    if value is None or value == []:
        return None, None
    indices = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(indices, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ConfigError("layers_to_transform", value, "a block index or a list of block indices")
    unindexed = [t for t in meta.get("target_parameters") or [] if not re.search(r"(^|\.)\d+\.", t)]
    if unindexed:
        raise ConfigError("target_parameters", unindexed, "full parameter names (with the block index) when "
                          "layers_to_transform is set",
                          "PEFT adapts target_parameters in every block whatever layers_to_transform says, while "
                          "lora-tune's `layers` applies to every target")
    pattern = meta.get("layers_pattern")
    patterns = None if not pattern else ([pattern] if isinstance(pattern, str) else list(pattern))
    return sorted(set(indices)), patterns


def _targets(value: Any, parameters: Any = None) -> str | list[str]:
    """``target_modules`` (and ``target_parameters``: expert stacks, matched by full name or dotted
    suffix as PEFT does) -> lora-tune targets."""
    stacks = [_name_pattern(n) for n in _names(parameters, "target_parameters")]
    if stacks and (value is None or (not isinstance(value, str) and not value)):
        return stacks
    if stacks:
        if isinstance(value, str) and value.lower() == "all-linear":
            return "all-linear"  # lora-tune's all-linear includes the expert stacks
        if isinstance(value, str):
            return [_regex(value, "target_modules"), *stacks]
        return cast(list[str], _targets(value)) + stacks  # a list of names gives a list
    if value is None or (not isinstance(value, str) and not value):
        raise ConfigError("target_modules", value, "module names, or a regex PEFT fullmatches",
                          "PEFT fills in defaults per model type (e.g. q_proj, v_proj for Llama) that lora-tune does "
                          "not guess: name the modules, or use lora-tune's targets='attention-qv'")
    if isinstance(value, str):
        # PEFT's all-linear and lora-tune's agree on decoder LMs (every Linear/Conv1D but the output head)
        return "all-linear" if value.lower() == "all-linear" else [_regex(value, "target_modules")]
    return [_name_pattern(n) for n in _names(value, "target_modules")]


def _patterns(value: Any, field: str) -> list[str]:
    if isinstance(value, str):
        return [_regex(value, field)]
    return [_name_pattern(n) for n in _names(value, field)]


def _pattern_key(key: str, field: str) -> str:
    """A rank_pattern / alpha_pattern key as PEFT matches it (``(.*\\.)?KEY$``) -> a lora-tune pattern;
    ``^name`` with ``name`` escaped (what to_peft writes) stays one exact name."""
    if not isinstance(key, str) or not key:
        raise ConfigError(field, key, "regex keys")
    literal = re.sub(r"\\(.)", r"\1", key[1:])
    if key.startswith("^") and re.escape(literal) == key[1:]:
        return "re:" + key[1:]
    return _regex(rf"(?:.*\.)?(?:{key})", f"{field}[{key!r}]")


def _init(value: Any) -> str:
    for ours, theirs in INITS_TO_PEFT.items():
        if value is theirs or (isinstance(theirs, str) and value == theirs):
            return ours
    raise ConfigError("init_lora_weights", value, "True (kaiming-uniform A, B = 0), 'gaussian' or 'pissa'",
                      "False starts B random (the adapted model does not start at the base model); OLoRA, LoftQ, "
                      "EVA, CorDA, fast-SVD PiSSA and the other PEFT inits have no lora-tune equivalent")
