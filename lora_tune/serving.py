"""What each serving engine loads: one table of rules, with the source each rule was read from.

``study.serve: {engine, max_lora_rank}`` restricts a search to adapters the engine serves
(:mod:`lora_tune.study.schema.serve_space`); ``lora-tune export`` checks what it writes with
:func:`unservable` and prints :func:`serve_command`. Engines: ``vllm``, ``sglang``, ``llama.cpp``
and ``any`` (no restriction). The rules were read from the engines' code (paths below, relative
to each project's repository); where a release differs (a flag added or removed later) the table
keeps to the stricter reading, so that what it lets through loads.

Imports only the stdlib and :mod:`lora_tune.settings`.
"""
from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from lora_tune.settings import show

ENGINES = ("vllm", "sglang", "llama.cpp", "any")
# vllm/config/lora.py: LoRAConfig.max_lora_rank is a MaxLoRARanks literal (vLLM's default 16)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class EngineRules:
    """One engine's rules. ``max_lora_rank``: the values its ``max_lora_rank`` may take (None: any
    integer ≥ 1); ``default_max_lora_rank``: ``study.serve``'s default (None: no limit);
    ``refused_targets``: target presets it has no LoRA layer for; ``sources``: rule -> where it
    was read; ``notes``: rule -> what the table adds to a yes."""

    engine: str
    title: str
    max_lora_rank: tuple[int, ...] | None
    default_max_lora_rank: int | None
    dora: bool
    bias: bool
    modules_to_save: bool
    pissa: bool
    rslora: bool
    refused_targets: tuple[str, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict)
    notes: Mapping[str, str] = field(default_factory=dict)


_PISSA = ("loads a PiSSA adapter over the unmodified base, but PiSSA trained it over a base whose top-r "
          "singular components it moved into the adapter (peft/tuners/lora/layer.py pissa_init); "
          "`lora-tune export` converts one to plain LoRA of rank 2r, a search for serving keeps to "
          "kaiming or gaussian")

TABLE: dict[str, EngineRules] = {
    "vllm": EngineRules(
        "vllm", "vLLM", VLLM_MAX_LORA_RANKS, 64,
        dora=False, bias=False, modules_to_save=False, pissa=False, rslora=True,
        refused_targets=("conv",),
        sources={
            "max_lora_rank": "vllm/config/lora.py LoRAConfig.max_lora_rank; "
                             "vllm/lora/peft_helper.py PEFTHelper.validate_legal",
            "dora": "vllm/lora/peft_helper.py PEFTHelper._validate_features ('vLLM does not yet support DoRA')",
            "bias": "vllm/lora/peft_helper.py PEFTHelper.validate_legal ('Adapter bias cannot be used "
                    "without bias_enabled'; the flag that set it is gone from recent releases)",
            "modules_to_save": "vllm/lora/peft_helper.py PEFTHelper._validate_features "
                               "('vLLM only supports modules_to_save being None')",
            "pissa": "vllm/lora/models.py LoRAModel.from_local_checkpoint loads lora_A/lora_B over the "
                     "unmodified base",
            "rslora": "vllm/lora/peft_helper.py PEFTHelper.__post_init__ (scale α/√r with use_rslora)",
            "quant_bits": "vllm/lora/layers: LoRA over quantized and unquantized linear layers",
            "targets": "vllm/lora/utils.py get_supported_lora_modules (linear, fused-MoE and embedding "
                       "layers; no convolution)",
        },
        notes={"max_lora_rank": "vLLM's own default is 16: the serve command passes --max-lora-rank"},
    ),
    "sglang": EngineRules(
        "sglang", "SGLang", None, 64,
        dora=False, bias=False, modules_to_save=False, pissa=False, rslora=False,
        refused_targets=("conv", "embeddings"),
        sources={
            "max_lora_rank": "python/sglang/srt/server_args.py --max-lora-rank (any integer; inferred "
                             "from --lora-paths when not given)",
            "dora": "python/sglang/srt/lora/lora.py LoRAAdapter.initialize_weights: lora_A/lora_B only, "
                    "no magnitude vector",
            "bias": "python/sglang/srt/lora/layers.py: the LoRA layers add B·A·x only, no bias",
            "modules_to_save": "python/sglang/srt/lora/lora.py LoRAAdapter: per-layer lora_A/lora_B weights "
                               "only; a saved module's weights are not loaded",
            "pissa": "python/sglang/srt/lora/lora.py loads lora_A/lora_B over the unmodified base",
            "rslora": "python/sglang/srt/lora/lora.py LoRAAdapter.scaling = lora_alpha / r "
                      "(use_rslora is not read)",
            "quant_bits": "python/sglang/srt/lora/layers.py: LoRA over the base's linear layers, "
                          "quantized or not",
            "targets": "python/sglang/srt/lora/lora_config.py LoRAConfig (embed_tokens / lm_head: "
                       "'Not supported yet'); python/sglang/srt/lora/layers.py get_lora_layer (linear "
                       "layers only)",
        },
    ),
    "llama.cpp": EngineRules(
        "llama.cpp", "llama.cpp", None, None,
        dora=False, bias=False, modules_to_save=False, pissa=False, rslora=True,
        refused_targets=("conv",),
        sources={
            "max_lora_rank": "src/llama-adapter.cpp (the rank is read from each lora_a tensor; no limit)",
            "dora": "convert_lora_to_gguf.py: lora_magnitude_vector is an 'Unexpected name ... Not a "
                    "lora_A or lora_B tensor' (exit 1)",
            "bias": "convert_lora_to_gguf.py: a bias tensor is an 'Unexpected name' (exit 1); "
                    "src/llama-adapter.cpp loads .lora_a / .lora_b tensors only",
            "modules_to_save": "convert_lora_to_gguf.py: a saved module's weight is an 'Unexpected name' "
                               "(exit 1)",
            "pissa": "convert_lora_to_gguf.py converts lora_A/lora_B as they are (no PiSSA handling): "
                     "silently wrong over the unmodified base",
            "rslora": "src/llama-adapter.cpp scales α/r and convert_lora_to_gguf.py writes lora_alpha as "
                      "is; `lora-tune export --gguf` writes α·√r",
            "quant_bits": "src/llama-adapter.cpp applies the adapter over any GGUF base",
            "targets": "src/llama-adapter.cpp applies 2-D lora_a/lora_b matrices (no convolution)",
        },
        notes={"rslora": "through `lora-tune export --gguf`"},
    ),
    "any": EngineRules("any", "any engine", None, None, dora=True, bias=True, modules_to_save=True,
                       pissa=True, rslora=True),
}


def rules(engine: str) -> EngineRules:
    """The rules of ``engine`` (one of :data:`ENGINES`); ValueError naming the engines otherwise."""
    if engine not in TABLE:
        raise ValueError(f"unknown serving engine {engine!r}; allowed: {', '.join(ENGINES)}")
    return TABLE[engine]


def max_rank_problem(engine: str, max_lora_rank: Any) -> str | None:
    """None when ``max_lora_rank`` is a value ``engine`` accepts, else the message (what is allowed)."""
    r = rules(engine)
    if isinstance(max_lora_rank, bool) or not isinstance(max_lora_rank, int) or max_lora_rank < 1:
        return f"got {show(max_lora_rank)}; allowed: an integer ≥ 1"
    if r.max_lora_rank is not None and max_lora_rank not in r.max_lora_rank:
        return (f"got {max_lora_rank}; allowed for {r.title}: {', '.join(map(str, r.max_lora_rank))} "
                f"({r.sources['max_lora_rank']})")
    return None


def rank_limit(engine: str, max_lora_rank: int | None) -> int | None:
    """The largest rank ``engine`` serves: ``max_lora_rank`` when given, else its largest allowed
    value (vLLM's 512: the serve command passes the flag), else None (no limit)."""
    if max_lora_rank is not None:
        return max_lora_rank
    values = rules(engine).max_lora_rank
    return max(values) if values else None


def reasons(config: Mapping[str, Any], engine: str, max_lora_rank: int | None) -> list[tuple[str, Any, str]]:
    """``(key, value, why)`` for each setting of ``config`` (a ``LoraConfig.to_dict()``, or part of
    one) that ``engine`` cannot serve with ``max_lora_rank`` (None: :func:`rank_limit`'s)."""
    r = rules(engine)
    out: list[tuple[str, Any, str]] = []
    limit = rank_limit(engine, max_lora_rank)
    if max_lora_rank is not None and (problem := max_rank_problem(engine, max_lora_rank)):
        out.append(("max_lora_rank", max_lora_rank, problem))
    ranks = [("rank", config.get("rank"))]
    ranks += [(f"rank_pattern[{k!r}]", v) for k, v in (config.get("rank_pattern") or {}).items()]
    for key, rank in ranks:
        if limit is not None and isinstance(rank, int) and rank > limit:
            out.append((key, rank, f"{r.title} serves ranks up to max_lora_rank {limit} "
                                   f"({r.sources['max_lora_rank']})"))
    if config.get("use_dora") and not r.dora:
        out.append(("use_dora", True, f"{r.title} does not serve DoRA adapters ({r.sources['dora']})"))
    bias = config.get("bias")
    if bias not in (None, "none") and not r.bias:
        out.append(("bias", bias, f"{r.title} does not serve trained biases ({r.sources['bias']})"))
    if config.get("init") == "pissa" and not r.pissa:
        out.append(("init", "pissa", f"{r.title} {_PISSA} ({r.sources['pissa']})"))
    if config.get("rslora") and not r.rslora:
        out.append(("rslora", True, f"{r.title} scales α/r, not rsLoRA's α/√r ({r.sources['rslora']})"))
    targets = config.get("targets")
    if isinstance(targets, str) and targets in r.refused_targets:
        out.append(("targets", targets, f"{r.title} has no LoRA layer for the {targets} preset's layers "
                                        f"({r.sources['targets']})"))
    saved = config.get("modules_to_save")
    if saved and not r.modules_to_save:
        out.append(("modules_to_save", list(saved), f"{r.title} does not load modules_to_save (layers "
                                                    f"trained fully) ({r.sources['modules_to_save']})"))
    return out


def unservable(config: Mapping[str, Any], engine: str, max_lora_rank: int | None) -> list[str]:
    """Why ``engine`` cannot serve an adapter of ``config`` (a ``LoraConfig.to_dict()``, or part of
    one: keys it lacks are not checked), one sentence per setting, naming it: ``use_dora: true:
    vLLM does not serve DoRA adapters (...)``; [] when it can. Pass the config of what is served (a
    PiSSA adapter converted at export: ``init: kaiming``, rank 2r). ``max_lora_rank`` None: the
    engine's own limit (vLLM 512, the others none)."""
    return [f"{key}: {value_text(value)}: {why}" for key, value, why in reasons(config, engine, max_lora_rank)]


def serve_command(engine: str, adapter_dir: str, base_model: str, rank: int, name: str) -> str:
    """The command that serves the adapter in ``adapter_dir`` (for llama.cpp: the GGUF adapter
    file) over ``base_model`` as ``name``; ``any`` gives vLLM's. vLLM's ``--max-lora-rank`` is the
    smallest allowed value ≥ ``rank``."""
    r = rules(engine)
    q = shlex.quote
    if r.engine == "llama.cpp":
        base = base_model if base_model.endswith(".gguf") else f"{PurePath(base_model).name or 'base'}.gguf"
        line = f"llama-server -m {q(base)} --lora {q(adapter_dir)}"
        if base != base_model:
            line += f"  # {base}: {base_model} converted with llama.cpp's convert_hf_to_gguf.py"
        return line
    if r.engine == "sglang":
        return (f"python -m sglang.launch_server --model-path {q(base_model)} --enable-lora "
                f"--lora-paths {q(f'{name}={adapter_dir}')} --max-lora-rank {int(rank)}")
    flag = next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), VLLM_MAX_LORA_RANKS[-1])
    return (f"vllm serve {q(base_model)} --enable-lora --max-lora-rank {flag} "
            f"--lora-modules {q(f'{name}={adapter_dir}')}")


def value_text(value: Any) -> str:
    """A value as the study file writes it (strings bare)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "[" + ", ".join(value_text(v) for v in value[:8]) + (", ..." if len(value) > 8 else "") + "]"
    return show(value)


# -- the table, as README.md shows it ----------------------------------------------------------

_ROWS = (
    ("max_lora_rank", "`max_lora_rank`"),
    ("dora", "`use_dora: true`"),
    ("bias", "`bias: lora_only` / `all`"),
    ("modules_to_save", "`modules_to_save` (the task's)"),
    ("pissa", "`init: pissa`"),
    ("rslora", "`rslora: true`"),
    ("quant_bits", "`quant_bits: 4` / `8`"),
    ("targets", "`targets` presets"),
)


def _cell(r: EngineRules, rule: str) -> str:
    if rule == "max_lora_rank":
        if r.max_lora_rank is not None:
            text = "one of " + ", ".join(map(str, r.max_lora_rank))
        else:
            text = "any integer ≥ 1"
        text += "; default " + (str(r.default_max_lora_rank) if r.default_max_lora_rank else "none (no limit)")
    elif rule == "quant_bits":
        text = "yes"
    elif rule == "targets":
        text = "all but " + ", ".join(r.refused_targets) if r.refused_targets else "all"
    else:
        text = "yes" if getattr(r, rule) else "no"
    if rule in r.notes:
        text += f" ({r.notes[rule]})"
    if rule in r.sources:
        text += f": {r.sources[rule]}"
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The rules as README.md's table (a test checks README.md has it verbatim)."""
    engines = [TABLE[e] for e in ENGINES]
    lines = ["| setting | " + " | ".join(r.title for r in engines) + " |",
             "|---|" + "---|" * len(engines)]
    lines += [f"| {label} | " + " | ".join(_cell(r, rule) for r in engines) + " |" for rule, label in _ROWS]
    return "\n".join(lines)

