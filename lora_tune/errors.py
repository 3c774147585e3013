"""Error types of lora-tune; every error caused by bad input is also a ``ValueError``."""
from __future__ import annotations

import itertools
import reprlib
from typing import Any
from collections.abc import Iterable, Sequence

SHORT_LIMIT = 200


class _ShortRepr(reprlib.Repr):
    """``reprlib`` bounded in time and memory for any value a YAML or JSON file can give: only a
    container's first items are read (no sorting), subclasses show as their base types, huge ints
    are not converted to decimal."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdeque = 6
        self.maxdict = 4
        self.maxstring = 160
        self.maxlong = 40
        self.maxother = 80

    def repr1(self, x: Any, level: int) -> str:
        for base, method in ((bool, None), (str, self.repr_str), (bytes, self._repr_bytes), (int, self.repr_int),
                             (list, self.repr_list), (tuple, self.repr_tuple), (dict, self.repr_dict),
                             (frozenset, self.repr_frozenset), (set, self.repr_set)):
            if isinstance(x, base):
                return method(x, level) if method else repr(bool(x))
        return self.repr_instance(x, level)

    def repr_str(self, x: str, level: int) -> str:
        n = len(x)
        if n <= self.maxstring:
            return repr(x[:n])  # a plain str, even for a subclass
        head = self.maxstring * 2 // 3
        return f"{x[:head] + '...' + x[n - (self.maxstring - head):]!r} ({n} characters)"

    def _repr_bytes(self, x: bytes, level: int) -> str:
        shown = repr(bytes(x[: self.maxstring]))
        return shown if len(x) <= self.maxstring else f"{shown[:-1]}...' ({len(x)} bytes)"

    def repr_int(self, x: int, level: int) -> str:
        x = int(x)
        if x.bit_length() > 4 * self.maxlong:  # no decimal conversion of a huge int
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)

    def _items(self, x: Any, limit: int) -> tuple[list[Any], bool]:
        items = list(itertools.islice(iter(x), limit + 1))
        return items[:limit], len(items) > limit

    def _sequence(self, x: Any, level: int, limit: int, left: str, right: str, trail: str = "") -> str:
        n = len(x)
        if n == 0:
            return left + right
        if level <= 0:
            return left + self.fillvalue + right
        items, more = self._items(x, limit)
        parts = [self.repr1(item, level - 1) for item in items]
        if more:
            parts.append(f"{self.fillvalue} ({n} items)")
        return left + ", ".join(parts) + (trail if n == 1 else "") + right

    def repr_list(self, x: list, level: int) -> str:
        return self._sequence(x, level, self.maxlist, "[", "]")

    def repr_tuple(self, x: tuple, level: int) -> str:
        return self._sequence(x, level, self.maxtuple, "(", ")", ",")

    def repr_set(self, x: set, level: int) -> str:
        return self._sequence(x, level, self.maxset, "{", "}") if x else "set()"

    def repr_frozenset(self, x: frozenset, level: int) -> str:
        return "frozenset(" + self._sequence(x, level, self.maxfrozenset, "{", "}") + ")" if x else "frozenset()"

    def repr_dict(self, x: dict, level: int) -> str:
        n = len(x)
        if n == 0:
            return "{}"
        if level <= 0:
            return "{" + self.fillvalue + "}"
        keys, more = self._items(x, self.maxdict)
        parts = [f"{self.repr1(k, level - 1)}: {self.repr1(dict.__getitem__(x, k), level - 1)}" for k in keys]
        if more:
            parts.append(f"{self.fillvalue} ({n} keys)")
        return "{" + ", ".join(parts) + "}"

    def repr_instance(self, x: Any, level: int) -> str:
        try:
            return super().repr_instance(x, level)
        except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the error being reported
            return f"<{type(x).__name__} object>"


_SHORT = _ShortRepr()


def short(value: Any, limit: int = SHORT_LIMIT) -> str:
    """``repr(value)`` for an error message, bounded: at most ``limit`` characters, computed in
    bounded time and memory whatever ``value`` is (a huge list, a deeply shared structure)."""
    try:
        text = _SHORT.repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 1000) -> str:
    """``text`` cut to at most ``limit`` characters (its head and the count of what was left out)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class LoraTuneError(Exception):
    """Base class of every error raised on purpose by lora-tune."""


class ConfigError(LoraTuneError, ValueError):
    """An invalid configuration value: ``field`` names it, ``allowed`` says what is accepted."""

    def __init__(self, field: str, value: object, allowed: str, hint: str | None = None):
        self.field = field
        self.value = value
        self.allowed = allowed
        self.hint = hint
        msg = f"{field}: got {short(value)}; allowed: {allowed}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


class NoMatchingModulesError(ConfigError):
    """No module of the model matched the requested target patterns."""

    def __init__(self, patterns: Sequence[str], candidates: Iterable[str], exclude: Sequence[str] = ()):
        self.patterns = list(patterns)
        self.candidates = list(candidates)
        shown = self.candidates[:40]
        more = "" if len(self.candidates) <= 40 else f" ... ({len(self.candidates) - 40} more)"
        hint = "Patterns may be exact names, '.suffix' matches, globs ('layers.*.q_proj') or 're:' regexes."
        if exclude:
            hint += f" Excluded: {list(exclude)}."
        ConfigError.__init__(self, "targets", self.patterns,
                             "module names of supported layers: " + ", ".join(shown) + more, hint)


class UnsupportedLayerError(ConfigError):
    """A matched module has a type the injector cannot adapt."""

    def __init__(self, name: str, type_name: str, supported: Sequence[str]):
        self.name = name
        self.type_name = type_name
        ConfigError.__init__(
            self, "targets", name, "modules of type " + ", ".join(supported),
            f"Module {name!r} is a {type_name}; exclude it or target a supported layer.",
        )


class AdapterFormatError(LoraTuneError, ValueError):
    """An adapter file or directory does not match the model or is not a known format."""


class QuantizationError(LoraTuneError, ValueError):
    """Quantization was requested but cannot be done (missing bitsandbytes, bad layer)."""


MAX_SHOWN_ERRORS = 50


class StudySpecError(LoraTuneError, ValueError):
    """A study file has one or more errors; ``errors`` holds ``(path, message)`` pairs."""

    def __init__(self, errors: Sequence[tuple[str, str]], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        head = f"{source}: " if source else ""
        lines = [f"{head}{len(self.errors)} error(s) in study file:"]
        lines += [f"  {clip(str(path), 200)}: {clip(str(message))}" for path, message in self.errors[:MAX_SHOWN_ERRORS]]
        if len(self.errors) > MAX_SHOWN_ERRORS:
            lines.append(f"  ... and {len(self.errors) - MAX_SHOWN_ERRORS} more")
        super().__init__("\n".join(lines))


class StudyNotFoundError(LoraTuneError, ValueError):
    """No study of that name exists in the storage; ``available`` lists those that do."""

    def __init__(self, name: str, storage_display: str, available: Sequence[str]):
        self.name = name
        self.available = list(available)
        listing = ", ".join(self.available) if self.available else "(none)"
        super().__init__(
            f"study {name!r} not found in {storage_display}; studies in that storage: {listing}"
        )


class StorageError(LoraTuneError):
    """The storage could not be reached or used."""


class NonFiniteLossError(LoraTuneError):
    """Training produced a NaN or infinite loss."""

    def __init__(self, step: int, value: float):
        self.step = step
        self.value = value
        super().__init__(f"non-finite loss {value} at step {step}")


class TrainingOutOfMemoryError(LoraTuneError):
    """The device ran out of memory while training at ``batch_size``; ``peak_bytes`` is the
    device's peak allocation when it did."""

    def __init__(self, batch_size: int, peak_bytes: int, device: str = "cuda"):
        self.batch_size = batch_size
        self.peak_bytes = peak_bytes
        self.device = device
        super().__init__(f"out of memory at batch size {batch_size}, peak {peak_bytes / 2**30:.2f} GiB on {device}")
