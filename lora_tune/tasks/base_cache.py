"""A disk cache of prepared base models: the quantized (or cast) weights of a base, read back
without reading the checkpoint or quantizing again (``tasks/base_loader.py`` uses it).

An entry lives in ``<cache dir>/bases/<key>/`` (the cache dir: the caller's, normally
:func:`lora_tune.tasks.base.cache_dir`, ``$LORA_TUNE_CACHE`` first; not imported here, as
``tasks/base.py`` imports the resident base, which imports the loader). ``key`` is the sha256
of everything the prepared weights depend on: each weight file's name, size and mtime,
config.json's text, the model class, dtype, quantization settings, the names never quantized, the
device type, the versions of torch, transformers, bitsandbytes and safetensors, and
:data:`FORMAT`. An entry holds:

* ``weights.safetensors``: every dense tensor of the model under ``dense/<name>`` (a tensor shared
  by several names, e.g. tied embeddings, once), and each quantized weight's packed data and
  quantization state (``QuantizedWeight.packed_state``) under ``quantized/<module>/<field>``;
  written one tensor at a time (never a second copy of the model in memory);
* ``manifest.json``, written last (a temporary file renamed into place): the key, the weight
  file's size, the dense names and their aliases, and each quantized module's facts.

The entry is built in a temporary folder beside it and renamed into place whole, so a reader sees
a complete entry or none. A reader checks the manifest, the file's size and header and every
tensor's shape against the model; anything wrong makes the entry corrupt (:class:`CorruptEntry`),
and the loader rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from lora_tune.safe_files import place_dir, stage_dir, write_atomic

FORMAT = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
DENSE, QUANTIZED = "dense/", "quantized/"

# torch dtype <-> safetensors' dtype names
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code


class CorruptEntry(Exception):
    """A cache entry that cannot be used (truncated, bad manifest, not matching the model)."""


def entry_dir(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / "bases" / key


def versions() -> dict[str, str | None]:
    """The versions of the libraries whose code shapes the prepared weights."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"torch": torch.__version__}
    for package in ("transformers", "bitsandbytes", "safetensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def cache_key(weight_files: Sequence[Path], config_text: str, facts: Mapping[str, Any]) -> str:
    """sha256 (hex) of the weight files' names, sizes and mtimes, the config's text, ``facts`` (how
    the base is prepared: class, dtype, quantization, skipped names, device type), the library
    versions and :data:`FORMAT`. OSError when a weight file cannot be read."""
    files = []
    for path in weight_files:
        st = os.stat(path)
        files.append([path.name, st.st_size, st.st_mtime_ns])
    material = {"format": FORMAT, "files": files, "config": config_text, "facts": dict(facts), "versions": versions()}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode("utf-8")).hexdigest()


# -- placing tensors into a model built on the meta device ------------------------------------

def open_safetensors(path: Path) -> tuple[Any, bool]:
    """``safe_open(path)`` reading each tensor into memory of its own (safetensors' ``pread``
    backend), and whether it does. A memory-mapped file (older safetensors) keeps every page read
    in the process's resident memory until it is closed: reading a whole checkpoint that way would
    count the checkpoint once more in the peak RSS."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu", backend="pread"), True
    except TypeError:  # pragma: no cover - safetensors without the backend argument
        return safe_open(str(path), framework="pt", device="cpu"), False


def owned(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None,
          private: bool = False) -> torch.Tensor:
    """``tensor`` on ``device`` in ``dtype`` (floating tensors only), never sharing memory with
    ``tensor`` unless it is ``private`` (else it may be a memory-mapped file's pages)."""
    if dtype is not None and not (tensor.is_floating_point() and dtype.is_floating_point):
        dtype = None
    out = tensor.to(device=device, dtype=dtype)
    same = out.device.type == tensor.device.type
    if not private and same and out.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
        out = out.clone()
    return out


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` at ``name`` (a parameter, frozen, or a buffer) of ``model``; a Parameter is
    put there as is (so two names can share it)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        is_param = isinstance(tensor, nn.Parameter)
        module._parameters[attr] = tensor if is_param else nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:  # pragma: no cover - callers look names up in the model first
        raise KeyError(name)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def slots(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``model`` by name (aliases included)."""
    found: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = module_name + "." if module_name else ""
        for attr, param in module._parameters.items():
            if param is not None:
                found.setdefault(prefix + attr, param)
        for attr, buf in module._buffers.items():
            if buf is not None and attr not in module._non_persistent_buffers_set:
                found.setdefault(prefix + attr, buf)
    return found


# -- writing ----------------------------------------------------------------------------------

def _header(items: Sequence[tuple[str, torch.Tensor]], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, tensor in items:
        if tensor.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, items: Sequence[tuple[str, torch.Tensor]],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write ``items`` as a safetensors file one tensor at a time (at most one tensor's bytes in
    memory besides the tensors themselves); returns the file's size. OSError as the disk gives it."""
    with open(path, "xb") as fh:
        fh.write(_header(items, metadata or {}))
        for _, tensor in items:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                fh.write(memoryview(flat.view(torch.uint8).numpy()))
            del flat
        fh.flush()
        os.fsync(fh.fileno())
        return fh.tell()


def write_entry(entry: Path, model: nn.Module, quantized: Iterable[str], facts: Mapping[str, Any],
                replace: bool = False) -> bool:
    """Store the prepared ``model`` (``quantized``: its QuantizedLinear modules) as the entry
    ``entry``; returns whether it was placed (False: another process placed it first). OSError
    (unwritable folder, full disk) after removing everything this call wrote."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = stage_dir(entry)
    try:
        items: list[tuple[str, torch.Tensor]] = []
        quantized_facts: dict[str, Any] = {}
        for module_name in quantized:
            tensors, meta = model.get_submodule(module_name).qweight.packed_state()
            items += [(f"{QUANTIZED}{module_name}/{field_name}", tensor) for field_name, tensor in tensors.items()]
            quantized_facts[module_name] = {**meta, "fields": sorted(tensors)}
        stored: dict[int, str] = {}
        aliases: dict[str, str] = {}
        dense = []
        for name, tensor in slots(model).items():
            first = stored.setdefault(id(tensor), name)
            if first != name:
                aliases[name] = first
                continue
            dense.append(name)
            items.append((DENSE + name, tensor))
        size = write_safetensors(staging / WEIGHTS, items, {"format": "pt"})
        manifest = {"format": FORMAT, "key": entry.name, "weights_bytes": size, "dense": dense, "aliases": aliases,
                    "quantized": quantized_facts, "facts": dict(facts)}
        write_atomic(staging / MANIFEST, json.dumps(manifest, indent=1, default=str))  # last
        try:
            place_dir(staging, entry, replace=replace)
        except OSError:
            if replace or not (entry / MANIFEST).is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process placed the same entry first
            return False
        return True
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# -- reading ----------------------------------------------------------------------------------

def read_manifest(entry: Path) -> dict[str, Any]:
    """The entry's manifest, checked against the folder; CorruptEntry when it does not hold."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptEntry(f"{entry / MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("key") != entry.name:
        raise CorruptEntry(f"{entry / MANIFEST}: not a format-{FORMAT} manifest of this entry")
    if not (isinstance(manifest.get("dense"), list) and isinstance(manifest.get("aliases"), dict)
            and isinstance(manifest.get("quantized"), dict)):
        raise CorruptEntry(f"{entry / MANIFEST}: incomplete")
    try:
        size = (entry / WEIGHTS).stat().st_size
    except OSError as exc:
        raise CorruptEntry(f"{entry / WEIGHTS}: {exc}") from None
    if size != manifest.get("weights_bytes"):
        raise CorruptEntry(f"{entry / WEIGHTS}: {size} bytes, the manifest says {manifest.get('weights_bytes')}")
    return manifest


def read_entry(entry: Path, model: nn.Module, device: torch.device) -> dict[str, Any]:
    """Fill ``model`` (built on the meta device from the same config) from ``entry``: its
    quantized Linears become QuantizedLinear (rebuilt from the packed state, not quantized again),
    every other tensor is assigned. Returns the manifest. CorruptEntry when the entry does not
    hold or does not fit ``model`` (which is then half-filled: build it again)."""
    from safetensors import SafetensorError

    from lora_tune.errors import QuantizationError
    from lora_tune.lora.quant import QuantizedLinear, QuantizedWeight

    manifest = read_manifest(entry)
    path = entry / WEIGHTS
    try:
        handle, private = open_safetensors(path)
        with handle as fh:
            expected = {DENSE + name for name in manifest["dense"]}
            expected |= {f"{QUANTIZED}{m}/{f}" for m, facts in manifest["quantized"].items() for f in facts["fields"]}
            if set(fh.keys()) != expected:
                raise CorruptEntry(f"{path}: its tensors are not those the manifest lists")
            for module_name, facts in manifest["quantized"].items():
                linear = model.get_submodule(module_name)
                if not isinstance(linear, nn.Linear) or list(linear.weight.shape) != list(facts["shape"]):
                    raise CorruptEntry(f"{path}: {module_name} is not a Linear of shape {facts['shape']} in the model")
                tensors = {f: owned(fh.get_tensor(f"{QUANTIZED}{module_name}/{f}"), device, private=private)
                           for f in facts["fields"]}
                qweight = QuantizedWeight.from_packed(tensors, facts, device=device)
                replace_module(model, module_name, QuantizedLinear(qweight, linear.bias))
            targets = slots(model)
            for name in manifest["dense"]:
                target = targets.get(name)
                tensor = fh.get_tensor(DENSE + name)
                if target is None or tuple(target.shape) != tuple(tensor.shape):
                    raise CorruptEntry(f"{path}: {name} {tuple(tensor.shape)} does not fit the model")
                set_tensor(model, name, owned(tensor, device, private=private))
                del tensor
            targets = slots(model)
            for alias, name in manifest["aliases"].items():
                if alias not in targets or name not in targets:
                    raise CorruptEntry(f"{path}: alias {alias} -> {name} does not fit the model")
                set_tensor(model, alias, targets[name])
    except CorruptEntry:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError,
            QuantizationError) as exc:
        raise CorruptEntry(f"{path}: {type(exc).__name__}: {exc}") from None
    return manifest
