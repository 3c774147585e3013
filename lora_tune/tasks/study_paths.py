"""Relative paths of a task section, read against the study file's folder.

``train_file: data/train.jsonl`` in ``~/proj/study.yaml`` is ``~/proj/data/train.jsonl`` from
whatever directory lora-tune runs in. The study stores its task section as written and the
folder beside it (the spec's ``study_dir``); a process resolves the paths when it builds the task
(:func:`resolve_task_paths`), so a worker on a machine where that folder does not exist reads them
from its own directory as before.

What is a path: the values of :data:`PATH_KEYS` (a list of them too), and the file of every
``file.py:function`` name of the section (:mod:`lora_tune.tasks.allow_code`'s shape: anywhere but
in ``args``). Not paths: a model alias (``minilm``), an inline chat template, ``{config: ...}``,
``module:function`` names (imported from ``sys.path`` and the current directory) and everything in
``task.args`` (the factory's own values: lora-tune cannot tell a path from any other string).

Code is read only from a folder this process trusts (``code_dirs``): the folder of a study file
it read itself, never the folder a stored study names (whoever can write the storage could
otherwise point an allowed ``my_train.py:*`` at another file).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

from lora_tune.tasks.allow_code import DATA_KEYS, is_code_ref
from lora_tune.tasks.hf import MODEL_ALIASES

# task keys whose (string) values name a file or directory
PATH_KEYS = ("model", "tokenizer", "train_file", "eval_file", "chat_template")


@dataclass
class ResolvedPaths:
    """A task section with its relative paths resolved, and ``fallbacks``: ``(key, message)`` for
    each relative path found only in the current directory (read from there, as before the
    study file's folder counted)."""

    task: dict[str, Any]
    fallbacks: list[tuple[str, str]] = field(default_factory=list)


def resolve_task_paths(task: Mapping[str, Any], data_dirs: Sequence[str | os.PathLike],
                       code_dirs: Sequence[str | os.PathLike] = ()) -> ResolvedPaths:
    """``task`` with every relative path that exists under the first of ``data_dirs`` holding it
    (``code_dirs`` for ``file.py:function`` names) made absolute; one found in none but in the
    current directory kept as written (a fallback); one found nowhere resolved against the first
    folder, so that its error names where it was looked for. Absolute and ``~`` paths, and every
    value when no folder is given, are kept as written."""
    out = ResolvedPaths(dict(task))
    data = [Path(d) for d in data_dirs if d]
    code = [Path(d) for d in code_dirs if d]
    for key in PATH_KEYS:
        value = task.get(key)
        if isinstance(value, list):
            out.task[key] = [_resolve(v, data, f"task.{key}[{i}]", _kind(key, v), out)
                             for i, v in enumerate(value)]
        elif value is not None:
            out.task[key] = _resolve(value, data, f"task.{key}", _kind(key, value), out)
    for key, value in out.task.items():
        if key not in DATA_KEYS and key not in PATH_KEYS:
            out.task[key] = _code(value, code, f"task.{key}", out)
    return out


def _kind(key: str, value: Any) -> str | None:
    """``file`` (always a path), ``maybe`` (a path when one exists: a model or tokenizer may be a
    hub id), or None (not a path here)."""
    if not isinstance(value, str) or not value.strip():
        return None
    if key == "chat_template":
        return None if "{{" in value or "{%" in value else "file"  # an inline template (sft_spec)
    if key in ("model", "tokenizer"):
        return None if value.lower() in MODEL_ALIASES else "maybe"
    return "file"


def _resolve(value: Any, dirs: list[Path], where: str, kind: str | None, out: ResolvedPaths) -> Any:
    if kind is None or not dirs:
        return value
    path = Path(value)
    if path.is_absolute() or value.startswith("~"):
        return value
    for folder in dirs:
        candidate = folder / path
        if candidate.exists():
            return os.path.normpath(candidate)
    if path.exists():  # the current directory: how lora-tune read it before
        out.fallbacks.append((where, (
            f"{value!r} is not in the study file's folder {str(dirs[0])!r} but in the current directory "
            f"{os.getcwd()!r}: read from there for now. Relative paths of a study file are read against its "
            f"folder: write {os.path.relpath(path.resolve(), dirs[0])!r} (or an absolute path); a later "
            "lora-tune version will no longer look in the current directory")))
        return value
    if kind == "maybe" and not value.startswith(".") and value.count("/") <= 1:
        return value  # a hub id ("org/name") or a name: as written
    return os.path.normpath(dirs[0] / path)


def _code(value: Any, dirs: list[Path], where: str, out: ResolvedPaths) -> Any:
    if is_code_ref(value):
        target, _, func = value.rpartition(":")
        if target.endswith(".py"):
            return f"{_resolve(target, dirs, where, 'file', out)}:{func}"
        return value
    if isinstance(value, Mapping):
        return {k: _code(v, dirs, f"{where}.{k}", out) for k, v in value.items()}
    if isinstance(value, list):
        return [_code(v, dirs, f"{where}[{i}]", out) for i, v in enumerate(value)]
    return value


__all__ = ["PATH_KEYS", "ResolvedPaths", "resolve_task_paths"]
