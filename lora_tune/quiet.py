"""Library noise kept out of lora-tune's output: one filter per known message (imports only logging)."""
from __future__ import annotations

import logging

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
