"""Which names a process may import from a *stored* study (whoever can write the storage could
otherwise change what a worker imports): those its operator allowed locally, with
``--study-file``, ``--allow-code`` or ``$LORA_TUNE_ALLOW_CODE`` (README.md, "A worker imports
only the code its operator allowed"). Code is any string of the task section but ``args``
shaped ``TARGET:identifier``: derived from the shape, so a field added later stays covered.
"""
from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lora_tune.errors import ConfigError

ENV_ALLOW = "LORA_TUNE_ALLOW_CODE"
_REF = re.compile(r"\S+:[A-Za-z_][A-Za-z0-9_]*")
DATA_KEYS = ("args",)  # passed to the factory as values, never imported by lora-tune


def is_code_ref(value: object) -> bool:
    """Whether ``value`` is a ``module:function`` / ``file.py:function`` reference."""
    return isinstance(value, str) and _REF.fullmatch(value) is not None


def code_refs(task: Mapping, prefix: str = "task") -> list[tuple[str, str]]:
    """``(path, reference)`` of every importable name in a task section."""
    found: list[tuple[str, str]] = []

    def walk(value: object, path: str) -> None:
        if is_code_ref(value):
            found.append((path, value))  # type: ignore[arg-type]
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if path == prefix and key in DATA_KEYS:
                    continue
                walk(item, f"{path}.{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")

    walk(task, prefix)
    return found


def env_patterns(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The patterns of ``$LORA_TUNE_ALLOW_CODE`` (comma-separated)."""
    raw = (os.environ if environ is None else environ).get(ENV_ALLOW, "")
    return tuple(p.strip() for p in raw.split(",") if p.strip())


@dataclass(frozen=True)
class Allowance:
    """What this process's operator allowed: patterns, and references named by a local file."""

    patterns: tuple[str, ...] = ()
    trusted: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_operator(cls, patterns: Iterable[str] = (), trusted: Iterable[str] = (),
                      environ: Mapping[str, str] | None = None) -> Allowance:
        """``--allow-code`` patterns plus ``$LORA_TUNE_ALLOW_CODE``, and the trusted references."""
        given = tuple(p.strip() for p in patterns if p and p.strip())
        return cls(given + env_patterns(environ), frozenset(trusted))

    def allows(self, ref: str) -> bool:
        if ref in self.trusted:
            return True
        target = ref.rpartition(":")[0]
        return any(fnmatch.fnmatchcase(ref, p) or fnmatch.fnmatchcase(target, p) for p in self.patterns)

    def check(self, task: Mapping, origin: str) -> None:
        """Raise :class:`CodeNotAllowed` for the first name of ``task`` (from ``origin``) not allowed."""
        for path, ref in code_refs(task):
            if not self.allows(ref):
                raise CodeNotAllowed(path, ref, origin)


class CodeNotAllowed(ConfigError):
    """A stored study names code its operator did not allow this process to import."""

    def __init__(self, path: str, ref: str, origin: str):
        self.ref = ref
        super().__init__(
            path, ref, "code this process's operator allowed",
            f"{origin} names it, and lora-tune imports a stored study's code only when allowed "
            f"locally: give the same study file with --study-file FILE, or pass --allow-code "
            f"'{ref}' (a shell pattern such as '{ref.rpartition(':')[0]}:*' works too), or set "
            f"{ENV_ALLOW}. Nothing was imported.",
        )


def trusted_refs(task: Mapping) -> frozenset[str]:
    """The references a task section of the operator's own study file names."""
    return frozenset(ref for _, ref in code_refs(task))


def same_task(local: Mapping, stored: Mapping) -> Sequence[str]:
    """The keys of ``task`` in which a local file and the stored spec differ ([] when equal)."""
    keys = sorted(set(local) | set(stored))
    return [k for k in keys if local.get(k) != stored.get(k)]
