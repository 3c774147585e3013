"""bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning (logged when
it is imported on CPUs with AVX512-BF16 and the optional ``kernels`` package is missing) never
reaches lora-tune's output, while its other messages still do.

The notice is logged once per process, at import, so each check runs in a fresh interpreter."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from lora_tune.lora import quant
from lora_tune.quiet import OptionalKernelNotice

pytest.importorskip("bitsandbytes")

NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"

# a 4-bit inject, forward and backward, with logging configured as an application would
INJECT_4BIT = """
import logging, torch, lora_tune
logging.basicConfig(level=logging.{level})
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
lora_tune.inject(model, lora_tune.LoraConfig(rank=4, targets="all-linear", quant_bits=4))
model(torch.randn(3, 64)).sum().backward()
print("forward ok")
"""


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def bitsandbytes_emits_the_notice():
    """Whether a plain ``import bitsandbytes`` prints the notice here (it depends on the CPU)."""
    if NOTICE not in run_python("import bitsandbytes"):
        pytest.skip("bitsandbytes does not emit the kernels-community notice on this machine")


def test_4bit_inject_and_forward_print_no_kernels_notice(bitsandbytes_emits_the_notice):
    out = run_python(INJECT_4BIT.format(level="WARNING"))
    assert "forward ok" in out
    assert NOTICE not in out


def test_notice_is_kept_at_debug_level(bitsandbytes_emits_the_notice):
    out = run_python(INJECT_4BIT.format(level="DEBUG"))
    assert "DEBUG:lora_tune.lora.quant:bitsandbytes uses its built-in CPU 4-bit kernels" in out


def test_other_bitsandbytes_warnings_still_get_through(caplog):
    quant.QuantizedWeight(torch.zeros(4, 64), 4)  # installs the filter
    logger = logging.getLogger(OptionalKernelNotice.LOGGER)
    with caplog.at_level(logging.WARNING):
        logger.warning("a real problem: %s", "libbitsandbytes_cpu.so not found")
        logger.warning(NOTICE + ": No module named 'kernels'")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["a real problem: libbitsandbytes_cpu.so not found"]
