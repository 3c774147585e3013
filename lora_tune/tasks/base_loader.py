"""Load a base model once, straight into its final form: quantized Linears or dtype-cast weights,
read tensor by tensor from its safetensors files (the resident base of a study calls this once per
base variant instead of every trial loading, copying and quantizing the whole model).

:func:`load_base` builds the model's structure from config.json with its parameters on the meta
device (accelerate's ``init_empty_weights``; buffers such as rotary frequencies are real), then reads
the checkpoint one tensor at a time through ``safetensors.safe_open`` (each tensor read into memory
of its own with the ``pread`` backend: a memory-mapped file would keep every page read resident until
it is closed, i.e. the whole checkpoint in the peak RSS): the weight of each Linear it quantizes
goes to the device, is packed into a ``QuantizedWeight`` and the Linear becomes a
``QuantizedLinear``; every other tensor is assigned in the model's dtype as a frozen
parameter or buffer. The model is never held in full precision: the peak is the loaded model plus
one tensor. Which Linears are quantized follows transformers' bitsandbytes loading: all but the
output head (``get_output_embeddings``), weights tied to other modules, the module of the last
parameter, ``_keep_in_fp32_modules``, and the modules named by ``skip`` (the task's
``modules_to_save``) or inside them.

Checkpoint names are mapped to the model's names as transformers maps them for the usual cases (the
same class; a base-model checkpoint without the ``model.`` prefix loaded into a ``*ForCausalLM``;
transformers' legacy renamings); a checkpoint that needs transformers' tensor conversions (e.g. the
per-expert weights transformers 5 fuses for Mixtral) is refused, as are missing, unexpected and
mis-shaped tensors. The trust rules are ``tasks/hf.py``'s: never the model's own code, never a
pickle. Every refusal is a ``ConfigError`` of ``task.model`` (``quant_bits`` for quantizing weights
that are already quantized), raised before anything is returned or cached.

With ``cache_dir`` the prepared weights are kept on disk (``tasks/base_cache.py``) and the next load
of the same variant reads them back without reading the checkpoint or quantizing; a cache that
cannot be read or written costs a warning (:class:`BaseCacheWarning`), never the load.
"""
from __future__ import annotations

import contextlib
import json
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from lora_tune.errors import ConfigError, short
from lora_tune.train.train_config import torch_threads
import lora_tune.tasks.base_cache as base_cache  # not `from lora_tune.tasks`: no import of the package

FIELD = "task.model"
BUILT, CACHE = "built", "cache"  # LoadedBase.how (record.BaseLoad's values)
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
_SHOWN = 8  # names listed in an error message


class BaseCacheWarning(UserWarning):
    """The base cache could not be read (the base was rebuilt) or written (the base is still loaded)."""


@dataclass(frozen=True)
class QuantSpec:
    """How a base's Linears are quantized: ``bits`` 4 (``quant_type`` nf4/fp4, ``double_quant``) or 8."""

    bits: int
    quant_type: str = "nf4"
    double_quant: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError("quant_bits", self.bits, "4 or 8 (or no quantization)")
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError("quant_type", self.quant_type, "nf4 or fp4")

    def facts(self) -> dict[str, Any]:
        """The settings that shape the packed weights (8 bit has neither type nor double quantization)."""
        if self.bits == 8:
            return {"bits": 8}
        return {"bits": 4, "quant_type": self.quant_type, "double_quant": bool(self.double_quant)}


@dataclass
class LoadedBase:
    """A loaded base: ``model`` (eval mode, every parameter frozen) and how it was obtained."""

    model: nn.Module
    how: str  # BUILT: read from the checkpoint (and quantized); CACHE: read from the base cache
    seconds: float  # wall time of load_base
    bytes: int  # memory its weights take: packed quantized weights and their scales, dense tensors
    dtype: torch.dtype  # the dtype of its floating weights (the one asked for, or the checkpoint's)
    quant: QuantSpec | None
    quantized: tuple[str, ...]  # the modules that are QuantizedLinear
    cache_entry: Path | None = None  # the cache entry read or written (None: no cache, or not written)
    warnings: tuple[str, ...] = ()  # what went wrong with the cache


@dataclass
class _Checkpoint:
    directory: Path
    config: Any  # transformers' PretrainedConfig
    config_text: str
    files: list[Path]  # the safetensors files to read, in order
    index: dict[str, str]  # tensor name -> file name, from model.safetensors.index.json (else empty)


# -- public API -------------------------------------------------------------------------------

def empty_model(model_dir: str | Path, auto_class: str | type = "AutoModelForCausalLM",
                dtype: torch.dtype | None = None) -> nn.Module:
    """The model's structure only: its parameters on the meta device (no weights read), for checks
    that need module names and shapes (targets, coverage), with its generation config. Same checks of
    the directory as load_base, the checkpoint's tensor names and shapes included (read from the
    file headers): a checkpoint that does not fit its config.json is refused here, before any trial."""
    ckpt = _checkpoint(model_dir, None)
    model = _structure(ckpt, auto_class, _resolve_dtype(ckpt, dtype))
    _plan(model, ckpt)
    _read_generation_config(model, ckpt)
    return model


def load_base(model_dir: str | Path, *, auto_class: str | type = "AutoModelForCausalLM",
              dtype: torch.dtype | None = None, quant: QuantSpec | None = None, skip: Sequence[str] = (),
              device: str | torch.device = "cpu", threads: int | None = None,
              cache_dir: str | Path | None = None) -> LoadedBase:
    """Load the model in ``model_dir`` (a model directory, or a hub id in the local Hugging Face
    cache) with ``auto_class``, its floating weights in ``dtype`` (None: the checkpoint's, as
    ``from_pretrained(dtype="auto")``), its Linears quantized per ``quant`` on ``device`` (torch
    using ``threads`` threads meanwhile), never quantizing the modules ``skip`` names (patterns as
    in ``modules_to_save``). With ``cache_dir`` (lora-tune's cache folder,
    ``tasks.base.cache_dir()``; entries go under ``bases/``) a prepared copy is read from or
    written to the cache. ConfigError for a directory that cannot be loaded safely or does not fit
    its config."""
    start = time.perf_counter()
    ckpt = _checkpoint(model_dir, quant)
    dtype = _resolve_dtype(ckpt, dtype)
    device = torch.device(device)
    skip = sorted(set(skip))
    problems: list[str] = []
    facts = {"auto_class": _class_name(auto_class), "dtype": str(dtype), "quant": quant and quant.facts(),
             "skip": skip, "device": device.type}
    with torch_threads(threads):
        entry, corrupt = None, False
        if cache_dir is not None:
            try:
                entry = base_cache.entry_dir(cache_dir, base_cache.cache_key(ckpt.files, ckpt.config_text, facts))
            except OSError as exc:
                problems.append(_warn(f"base cache not used: {exc}"))
            if entry is not None and entry.is_dir():
                model = _structure(ckpt, auto_class, dtype)
                try:
                    manifest = base_cache.read_entry(entry, model, device)
                    _finish(model, ckpt, device)
                except (base_cache.CorruptEntry, ConfigError) as exc:  # ConfigError: it left a tensor out
                    corrupt = True
                    problems.append(_warn(f"base cache entry {entry} is corrupt, rebuilding it: {exc}"))
                else:
                    return LoadedBase(model, CACHE, time.perf_counter() - start, _weight_bytes(model), dtype, quant,
                                      tuple(manifest["quantized"]), entry, tuple(problems))
        model = _structure(ckpt, auto_class, dtype)
        quantized = _fill(model, ckpt, quant, skip, device)
        _finish(model, ckpt, device)
        if entry is not None:
            try:  # False: another process placed the same entry meanwhile, which is as good
                base_cache.write_entry(entry, model, quantized, facts, replace=corrupt)
            except (OSError, TypeError) as exc:
                problems.append(_warn(f"base cache entry not written ({type(exc).__name__}: {exc}); "
                                      "the base is loaded without it"))
                entry = None
    return LoadedBase(model, BUILT, time.perf_counter() - start, _weight_bytes(model), dtype, quant,
                      tuple(quantized), entry, tuple(problems))


def quantized_names(model: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """The Linear modules of ``model`` a quantized load turns into QuantizedLinear (see the module
    docstring): every ``nn.Linear`` but the output head, tied weights, the last parameter's module,
    ``_keep_in_fp32_modules`` and the modules ``skip`` names or their children."""
    from lora_tune.lora.targets import parse_pattern

    patterns = [parse_pattern(p, "modules_to_save") for p in skip]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ()
    tied_names = set(tied) | set(tied.values()) if isinstance(tied, dict) else set(tied)
    never = {name.rpartition(".")[0] for name in tied_names}
    params = list(model.named_parameters())
    if params:
        never.add(params[-1][0].rpartition(".")[0])
    keep_fp32 = _keep_fp32_patterns(model, torch.float16)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head or name in never:
            continue
        parts = name.split(".")
        ancestors = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(p.matches(a) for a in ancestors for p in patterns) or any(k(name) for k in keep_fp32):
            continue
        found.append(name)
    return found


# -- the directory ------------------------------------------------------------------------------

def _error(directory: Path | str, allowed: str, hint: str) -> ConfigError:
    return ConfigError(FIELD, str(directory), allowed, hint)


def _directory(model_dir: str | Path) -> Path:
    from lora_tune.tasks.hf import _in_hf_cache, resolve_model_ref

    path = Path(model_dir).expanduser()
    if path.is_dir():
        return path
    try:
        ref = resolve_model_ref(str(model_dir))
    except LookupError as exc:
        raise _error(model_dir, "a model directory or a hub id in the local Hugging Face cache", str(exc)) from None
    found = Path(ref) if Path(ref).is_dir() else _in_hf_cache(ref)
    if found is None:  # pragma: no cover - resolve_model_ref found it
        raise _error(model_dir, "a model directory", "not found")
    return found


def _checkpoint(model_dir: str | Path, quant: QuantSpec | None) -> _Checkpoint:
    from lora_tune.tasks.hf import CONFIG_LOAD, _require_loadable, quiet_transformers

    directory = _directory(model_dir)
    config_path = directory / "config.json"
    try:
        config_text = config_path.read_text(encoding="utf-8")
        raw = json.loads(config_text)
    except (OSError, ValueError) as exc:
        raise _error(directory, "a Hugging Face model directory with a readable config.json", str(exc)) from None
    try:
        _require_loadable(directory)  # never the model's own code, never a pickle
    except LookupError as exc:
        raise _error(directory, "a model directory lora-tune can load safely", str(exc)) from None
    quantization = raw.get("quantization_config") if isinstance(raw, dict) else None
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        if quant is not None:
            raise ConfigError("quant_bits", quant.bits, "no quantization (leave quant_bits out) for this model",
                              f"{config_path} has a quantization_config (quant_method {method!r}): its weights are "
                              "already quantized")
        raise _error(directory, "a checkpoint of full-precision weights",
                     f"{config_path} has a quantization_config (quant_method {method!r}): its weights are already "
                     "quantized, which the base loader does not read; give the full-precision checkpoint")
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(directory), **CONFIG_LOAD)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _error(directory, "a config.json transformers can read", f"{type(exc).__name__}: {exc}") from None
    files, index = _weight_files(directory)
    return _Checkpoint(directory, config, config_text, files, index)


def _weight_files(directory: Path) -> tuple[list[Path], dict[str, str]]:
    index_path = directory / INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise _error(directory, f"a readable {INDEX}", f"{index_path}: {exc}") from None
        files = []
        for name in sorted(set(weight_map.values())):
            path = directory / name
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise _error(directory, f"an {INDEX} naming .safetensors files in its folder", f"it names {name!r}")
            if not path.is_file():
                raise _error(directory, "every shard its index names", f"{INDEX} names {name}, which is missing")
            files.append(path)
        return files, dict(weight_map)
    if (directory / SINGLE).is_file():
        return [directory / SINGLE], {}
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    hint = (f"found {', '.join(others[:_SHOWN])} but neither {SINGLE} nor {INDEX}" if others
            else f"it has neither {SINGLE} nor {INDEX}")
    raise _error(directory, f"a model directory with {SINGLE} or {INDEX} (sharded)", hint)


def _resolve_dtype(ckpt: _Checkpoint, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError("task.dtype", dtype, "a floating torch dtype (or none: the checkpoint's)")
        return dtype
    for attr in ("dtype", "torch_dtype"):  # from_pretrained(dtype="auto"): the config's, else the weights'
        value = getattr(ckpt.config, attr, None)
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            value = getattr(torch, value)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    from safetensors import safe_open

    names = {v: k for k, v in base_cache._ST_DTYPES.items()}
    with _reading(ckpt.files[0]), safe_open(str(ckpt.files[0]), framework="pt") as fh:
        keys = fh.keys()  # a safe_open handle is not iterable
        for key in keys:
            found = names.get(fh.get_slice(key).get_dtype())
            if found is not None and found.is_floating_point:
                return found
    return torch.get_default_dtype()


# -- the structure ------------------------------------------------------------------------------

def _class_name(auto_class: str | type) -> str:
    return auto_class if isinstance(auto_class, str) else f"{auto_class.__module__}.{auto_class.__qualname__}"


def _structure(ckpt: _Checkpoint, auto_class: str | type, dtype: torch.dtype) -> nn.Module:
    """The model built from its config with parameters on the meta device (buffers real), as
    from_pretrained builds it (default dtype ``dtype`` meanwhile)."""
    import transformers
    from accelerate import init_empty_weights
    from packaging.version import Version

    from lora_tune.tasks.hf import quiet_transformers

    cls = getattr(transformers, auto_class, None) if isinstance(auto_class, str) else auto_class
    if not isinstance(cls, type):
        raise ConfigError("auto_class", auto_class, "a transformers model class or auto class name")
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"  # renamed in 4.56
    try:
        with quiet_transformers(), init_empty_weights(include_buffers=False):
            if cls.__name__.startswith("Auto"):
                model = cls.from_config(ckpt.config, trust_remote_code=False, **{key: dtype})
            else:
                model = cls._from_config(ckpt.config, **{key: dtype})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _error(ckpt.directory, f"a model {_class_name(auto_class)} can build from its config",
                     f"{type(exc).__name__}: {exc}") from None
    return model


def _keep_fp32_patterns(model: nn.Module, dtype: torch.dtype) -> list[Callable[[str], bool]]:
    """transformers' rule: ``_keep_in_fp32_modules`` stay float32 in a float16 model,
    ``_keep_in_fp32_modules_strict`` in a float16 or bfloat16 one."""
    names: set[str] = set()
    if dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return [re.compile(rf"(^|\.){re.escape(n)}(\.|$)").search for n in sorted(names)]


def _key_mapper(model: nn.Module, expected: set[str]) -> Callable[[str], tuple[str | None, bool]]:
    """checkpoint key -> (the model's name or None, whether transformers would convert the tensor)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    renamings: list[Any] = []
    converters: list[Any] = []
    rename_source_key = None
    try:  # transformers 5: its renaming rules (legacy names, nested prefixes) and its conversions
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
    except ImportError:  # transformers 4: its key fixes and the prefix rule below
        pass
    meta_state = dict.fromkeys(expected, True)

    def fix(key: str) -> str:
        fixer = getattr(model, "_fix_state_dict_key_on_load", None)
        if fixer is not None:
            fixed = fixer(key)
            key = fixed[0] if isinstance(fixed, tuple) else fixed
        for pattern, replacement in (getattr(model, "_checkpoint_conversion_mapping", None) or {}).items():
            key, n = re.subn(pattern, replacement, key)
            if n:
                break
        return key

    def with_prefix(key: str) -> str | None:
        if key in expected:
            return key
        if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
            return key[len(prefix) + 1:]
        if prefix and f"{prefix}.{key}" in expected:
            return f"{prefix}.{key}"
        return None

    def mapper(key: str) -> tuple[str | None, bool]:
        if rename_source_key is not None:
            renamed, pattern = rename_source_key(key, renamings, converters, prefix or None, meta_state)
            if pattern is not None:
                return renamed, True
            return with_prefix(renamed) or with_prefix(key), False
        return with_prefix(fix(key)) or with_prefix(key), False

    return mapper


# -- reading the checkpoint ------------------------------------------------------------------------

@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A safetensors file that cannot be read is a ConfigError naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as exc:
        raise _error(path.parent, "readable safetensors files", f"{path.name}: {exc}") from None


def _shown(names: Sequence[str]) -> str:
    more = f" (and {len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _plan(model: nn.Module, ckpt: _Checkpoint) -> list[tuple[Path, list[tuple[str, str]]]]:
    """Which checkpoint tensor goes where, file by file, from the files' headers only; every
    unexpected, mis-shaped, missing or converted tensor is a ConfigError naming it."""
    from safetensors import safe_open

    model.tie_weights()  # on the meta model: so a tied weight missing from the checkpoint is not missing
    targets = base_cache.slots(model)
    mapper = _key_mapper(model, set(targets))
    plan = []
    found: dict[str, str] = {}
    unexpected, mismatched, converted, twice = [], [], [], []
    for path in ckpt.files:
        entries = []
        with _reading(path), safe_open(str(path), framework="pt") as fh:
            keys = fh.keys()  # a safe_open handle is not iterable
            for key in keys:
                name, convert = mapper(key)
                if convert:
                    converted.append(f"{key} ({path.name})")
                    continue
                if name is None:
                    unexpected.append(f"{key} ({path.name})")
                    continue
                shape = tuple(fh.get_slice(key).get_shape())
                if shape != tuple(targets[name].shape):
                    mismatched.append(f"{key} in {path.name}: expected shape {tuple(targets[name].shape)}, "
                                      f"found {shape}")
                if name in found:
                    twice.append(f"{name} ({found[name]} and {path.name})")
                found[name] = path.name
                entries.append((key, name))
        plan.append((path, entries))
    loaded = {id(targets[n]) for n in found}
    missing = [n for n, t in targets.items() if t.is_meta and id(t) not in loaded]
    where = ", ".join(p.name for p in ckpt.files)
    problems = []
    if missing:
        shards = sorted({ckpt.index[n] for n in missing if n in ckpt.index})
        said = f"; {INDEX} places them in {', '.join(shards)}" if shards else ""
        problems.append(f"missing tensors {_shown(missing)} (not in {where}{said})")
    if unexpected:
        problems.append(f"unexpected tensors {_shown(unexpected)}")
    if mismatched:
        problems.append(f"tensors of the wrong shape: {_shown(mismatched)}")
    if twice:
        problems.append(f"tensors stored twice: {_shown(twice)}")
    if converted:
        problems.append(f"tensors transformers converts on load (e.g. fusing per-expert weights), which the "
                        f"base loader does not do: {_shown(converted)}")
    if problems:
        raise _error(ckpt.directory, f"a checkpoint that fits {type(model).__name__} of its config.json",
                     "; ".join(problems))
    return plan


def _fill(model: nn.Module, ckpt: _Checkpoint, quant: QuantSpec | None, skip: Sequence[str],
          device: torch.device) -> list[str]:
    """Read every tensor into ``model`` (quantizing what ``quant`` asks for); returns the names
    of the modules that became QuantizedLinear."""
    from lora_tune.lora.quant import QuantizedLinear, QuantizedWeight

    plan = _plan(model, ckpt)
    to_quantize = set(quantized_names(model, skip)) if quant is not None else set()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    keep_fp32 = _keep_fp32_patterns(model, dtype)
    targets = base_cache.slots(model)
    done: list[str] = []
    for path, entries in plan:
        with _reading(path):
            handle, private = base_cache.open_safetensors(path)
        with _reading(path), handle as fh:
            for key, name in entries:
                target_dtype = torch.float32 if any(k(name) for k in keep_fp32) else targets[name].dtype
                tensor = fh.get_tensor(key)
                module_name, _, attr = name.rpartition(".")
                if attr == "weight" and module_name in to_quantize:
                    assert quant is not None
                    weight = tensor.to(device=device, dtype=target_dtype)
                    linear = model.get_submodule(module_name)
                    qweight = QuantizedWeight(weight, quant.bits, quant.quant_type, quant.double_quant)
                    del weight
                    base_cache.replace_module(model, module_name, QuantizedLinear(qweight, linear.bias))
                    done.append(module_name)
                else:
                    kept = base_cache.owned(tensor, device, target_dtype, private)
                    base_cache.set_tensor(model, name, kept)
                    if kept is tensor:
                        continue
                del tensor
                _release_freed_memory()
    return sorted(done)


_MALLOC_TRIM: list[Callable[[int], int] | None] = []


def _release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Each full-precision tensor read is freed once packed, but glibc keeps tensors of a few MB in its
    heap, where the small packed tensors allocated in between pin the freed space: without this a
    4-bit load of a 300M-parameter Llama ended with its peak RSS above that of from_pretrained plus
    quantization (the whole checkpoint's size freed but still resident). Done after each tensor
    freed: 0.3 s for the 127 of that model, no slower load measured; trimming only every 64 MiB
    freed left 120 MiB more in its peak, every 256 MiB 400 MiB more."""
    if not _MALLOC_TRIM:
        trim = None
        try:
            import ctypes
            import platform

            if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
                trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError, ValueError):  # pragma: no cover - no glibc
            trim = None
        _MALLOC_TRIM.append(trim)
    if _MALLOC_TRIM[0] is not None:
        _MALLOC_TRIM[0](0)


def _finish(model: nn.Module, ckpt: _Checkpoint, device: torch.device) -> None:
    """Tie, check that nothing is left on the meta device, move the buffers made at build time,
    freeze, eval, and read generation_config.json."""
    model.tie_weights()
    left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    left += [n for n, b in model.named_buffers(remove_duplicate=False) if b.is_meta]
    if left:
        raise _error(ckpt.directory, f"a checkpoint holding every weight of {type(model).__name__}",
                     f"missing tensors {_shown(left)} (not in {', '.join(p.name for p in ckpt.files)})")
    model.to(device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    _read_generation_config(model, ckpt)


def _read_generation_config(model: nn.Module, ckpt: _Checkpoint) -> None:
    generation = ckpt.directory / "generation_config.json"
    if getattr(model, "generation_config", None) is not None and generation.is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_dict(json.loads(generation.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise _error(ckpt.directory, "a readable generation_config.json", f"{type(exc).__name__}: {exc}") from None


def _weight_bytes(model: nn.Module) -> int:
    from lora_tune.lora.quant import QuantizedWeight

    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            total += module.storage_bytes()
            continue
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def _warn(message: str) -> str:
    warnings.warn(message, BaseCacheWarning, stacklevel=3)
    return message


def describe(loaded: LoadedBase) -> str:
    """One line about a loaded base, for logs."""
    quant = f"{loaded.quant.bits}-bit" if loaded.quant else str(loaded.dtype).removeprefix("torch.")
    return (f"base {type(loaded.model).__name__} {quant}, {len(loaded.quantized)} quantized Linears, "
            f"{loaded.bytes / 2**20:.1f} MiB, {loaded.how} in {loaded.seconds:.1f} s"
            + (f" ({short(list(loaded.warnings))})" if loaded.warnings else ""))
