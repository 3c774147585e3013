"""Peak memory of a training run: CUDA ``max_memory_allocated``, or on CPU the growth of the
resident set and of the C heap in use (glibc ``mallinfo2``)."""
from __future__ import annotations

import ctypes
import os
import resource

import torch


class MemoryMeter:
    """Peak memory growth during training: CUDA ``max_memory_allocated``, else resident set size."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
            self.base = self._rss()
            self.lifetime_before = _max_rss()
            # RSS misses memory that reuses pages freed earlier in the process; the C heap's
            # own count of bytes in use (glibc) does not.
            self.heap_base = _heap_in_use()
            self.heap_max = self.heap_base
        self.max = self.base

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm", "rb") as fh:
                return int(fh.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return _max_rss()

    def sample(self) -> None:
        if not self.cuda:
            rss = self._rss()
            if rss > self.max:
                self.max = rss
            if self.heap_max is not None:  # set when heap_base is
                self.heap_max = max(self.heap_max, _heap_in_use() or 0)

    def peak(self) -> int:
        """Growth over the start. On CPU, samples taken between steps miss transient peaks, so
        when the process's lifetime peak RSS rose during training that peak is used instead."""
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        lifetime = _max_rss()
        top = max(self.max, lifetime) if lifetime > self.lifetime_before else self.max
        heap = self.heap_max - self.heap_base if self.heap_max is not None and self.heap_base is not None else 0
        return max(0, int(top - self.base), int(heap))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _load_mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()


def _heap_in_use() -> int | None:
    """Bytes the C heap has handed out (small blocks + mmapped ones), or None off glibc."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def _max_rss() -> int:
    """The process's peak resident set size in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_total_bytes(device: torch.device) -> int:
    """The process's absolute peak on ``device``: CUDA ``max_memory_allocated`` since the last
    reset, else the peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _max_rss()
