"""Error types of lora-tune.

Every error caused by bad user input is also a ``ValueError`` so that callers who
only know the standard library can still catch it. The CLI turns ``LoraTuneError``
subclasses that are also ``ValueError`` into exit code 2 (bad input).
"""
from __future__ import annotations

from typing import Iterable, Sequence


class LoraTuneError(Exception):
    """Base class of every error raised on purpose by lora-tune."""


class ConfigError(LoraTuneError, ValueError):
    """An invalid configuration value.

    ``field`` names the offending field, ``allowed`` describes what is accepted.
    """

    def __init__(self, field: str, value: object, allowed: str, hint: str | None = None):
        self.field = field
        self.value = value
        self.allowed = allowed
        msg = f"{field}: got {value!r}; allowed: {allowed}"
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
        hint = (
            "Patterns may be exact names, '.suffix' matches, globs ('layers.*.q_proj') or 're:' regexes."
        )
        if exclude:
            hint += f" Excluded: {list(exclude)}."
        ConfigError.__init__(
            self,
            "targets",
            self.patterns,
            "module names of supported layers: " + ", ".join(shown) + more,
            hint,
        )


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


class StudySpecError(LoraTuneError, ValueError):
    """A study file has one or more errors; ``errors`` holds ``(path, message)`` pairs."""

    def __init__(self, errors: Sequence[tuple[str, str]], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        head = f"{source}: " if source else ""
        lines = [f"{head}{len(self.errors)} error(s) in study file:"]
        lines += [f"  {path}: {message}" for path, message in self.errors]
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
