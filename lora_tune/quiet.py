"""Library noise kept out of lora-tune's output: one filter per known message, and a trial's
library warnings and log records collected instead of printed (imports only the standard library)."""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

log = logging.getLogger("lora_tune.lora.quant")


class OptionalKernelNotice(logging.Filter):
    """Moves bitsandbytes' "Failed to load CPU gemm_4bit_forward" warning to DEBUG."""

    LOGGER = "bitsandbytes.backends.cpu.ops"
    PREFIX = "Failed to load CPU gemm_4bit_forward from kernels-community"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.PREFIX):
            return True
        log.debug("bitsandbytes uses its built-in CPU 4-bit kernels: %s", message)
        return False

    @classmethod
    def install(cls) -> None:
        """Attach the filter to the bitsandbytes logger that emits the notice (once)."""
        logger = logging.getLogger(cls.LOGGER)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())


def quiet_bitsandbytes() -> None:
    """Drop bitsandbytes' optional-kernel notice (see :class:`OptionalKernelNotice`)."""
    OptionalKernelNotice.install()


# The libraries whose log records a trial collects (their child loggers, e.g. trl.trainer.sft_trainer, too).
LIBRARY_LOGGERS = ("transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub")
LOG_LIMIT = 100  # entries kept (the first ones; each distinct message once)
ENTRY_LIMIT = 2000  # characters of one entry


class _Collect(logging.Handler):
    def __init__(self, out: list[str]):
        super().__init__(logging.WARNING)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.out.append(f"{record.name} {record.levelname}: {record.getMessage()}")
        except Exception:  # a record whose arguments do not format: never fail the trial for it
            self.out.append(f"{record.name} {record.levelname}: {record.msg!r}")


@contextlib.contextmanager
def captured_library_output() -> Iterator[list[str]]:
    """Collect, instead of printing, every ``warnings.warn`` and every record of
    :data:`LIBRARY_LOGGERS` at WARNING or above while the block runs; the yielded list holds them
    (``FutureWarning: ...``, ``trl.trainer.sft_trainer WARNING: ...``) in order, each distinct one
    once, at most :data:`LOG_LIMIT`, once the block is left. Loggers and warning filters are
    restored after it."""
    out: list[str] = []
    handler = _Collect(out)
    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers, logger.propagate = [handler], False

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: object = None, line: str | None = None) -> None:
        out.append(f"{category.__name__}: {message} ({filename}:{lineno})")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # each one, even if shown before: the log is the trial's
            warnings.showwarning = show
            yield out
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        kept = list(dict.fromkeys(entry[:ENTRY_LIMIT] for entry in out))
        out[:] = kept[:LOG_LIMIT]
