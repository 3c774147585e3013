"""One declaration per setting: a :class:`Setting`, the metadata of a dataclass field of
``LoraConfig`` or ``TrainConfig`` (:func:`setting`), from which the checks, the study file's
``train:`` schema, the search space's keys and ``TrainingArguments`` are derived."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lora_tune.errors import ConfigError, short


@dataclass(frozen=True)
class Setting:
    """``kind``: int, float, str or bool (None: its class checks it); ``choices`` match by type too
    (``True`` is not ``1``); ``hf``: the ``TrainingArguments`` fields it becomes; ``section``:
    where a study file gives it, when not under its class's section; ``describe`` replaces the
    derived description of what is allowed."""

    kind: type | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] = ()
    nullable: bool = False
    searchable: bool = False
    hf: tuple[str, ...] = ()
    section: str | None = None
    describe: str | None = None

    @property
    def numeric(self) -> str | None:
        """``"int"`` / ``"float"`` where a search space may give a range, else None."""
        return self.kind.__name__ if self.kind in (int, float) and not self.choices else None

    @property
    def allowed(self) -> str:
        """What is allowed, in words: ``an integer ≥ 1``, ``null or a number > 0``, ``nf4, fp4``."""
        if self.describe:
            return self.describe
        if self.choices:
            text = ", ".join(map(show, self.choices))
        elif self.kind is bool:
            text = "true or false"
        elif self.kind in (int, float):
            limits = (("≥", self.ge), (">", self.gt), ("≤", self.le), ("<", self.lt))
            bounds = [f"{op} {bound:g}" for op, bound in limits if bound is not None]
            text = ("an integer" if self.kind is int else "a number") + (" " if bounds else "") + " and ".join(bounds)
        else:
            text = "a non-empty string" if self.kind is str else "a value its class checks"
        return f"null or {text}" if self.nullable and not self.choices else text

    def problem(self, value: Any) -> str | None:
        """None when ``value`` is allowed, else the message every layer gives for it: numbers
        ``must be an integer ≥ 1, got 0``, other values ``got 'x'; allowed: a, b``."""
        if self._allows(value):
            return None
        if self.numeric:
            return f"must be {self.allowed}, got {short(value)}"
        return f"got {short(value)}; allowed: {self.allowed}"

    def check(self, name: str, value: Any, section: str = "") -> None:
        """Raise :class:`ConfigError` naming ``section.name`` when ``value`` is not allowed."""
        if not self._allows(value):
            where = self.section if self.section is not None else section
            raise ConfigError(f"{where}.{name}" if where else name, value, self.allowed)

    def _allows(self, value: Any) -> bool:
        if value is None and self.nullable or self.kind is None and not self.choices:
            return True
        if self.choices:
            return any(value == c and type(value) is type(c) for c in self.choices)
        if self.kind is bool or self.kind is str:
            return isinstance(value, self.kind) and (self.kind is bool or bool(value))
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return False
        if not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


def setting(default: Any, kind: type | None = None, *, hf: str | tuple[str, ...] = (), **facts: Any) -> Any:
    """A dataclass field with ``default`` whose :class:`Setting` is ``kind`` and ``facts``."""
    hf = (hf,) if isinstance(hf, str) else tuple(hf)
    return dataclasses.field(default=default, metadata={"setting": Setting(kind, hf=hf, **facts)})


def settings_of(cls: type) -> dict[str, Setting]:
    """The settings a dataclass declares, in field order."""
    return {f.name: f.metadata["setting"] for f in dataclasses.fields(cls) if "setting" in f.metadata}


def defaults_of(cls: type) -> dict[str, Any]:
    """The default of every field of a dataclass that has one (factories called)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def check_settings(config: Any, section: str = "") -> None:
    """Check every declared setting of a dataclass instance; ConfigError on the first bad one."""
    for name, spec in settings_of(type(config)).items():
        spec.check(name, getattr(config, name), section)


def show(value: Any) -> str:
    """A value as a study file writes it: null, true, false, else its bounded repr."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return short(value)
