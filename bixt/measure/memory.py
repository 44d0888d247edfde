"""Peak memory of a block of code over the memory in use when it starts: the probe behind `bixt profile`'s
`*_peak_mem_mib` / `*_act_mem_mib` and the attention benchmark's `peak_mb`.

CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs) after freed heap is handed back to the OS, so the
baseline is what is live; CUDA: `max_memory_allocated` over `memory_allocated`. Run it in a fresh process when the
figure must not depend on what ran before (allocator caches, thread pools).
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
from pathlib import Path

import torch


def is_oom(exc: BaseException) -> bool:
    """Whether an exception means memory ran out: MemoryError, torch's OutOfMemoryError (CUDA), or the CPU
    allocator's RuntimeError."""
    text = str(exc).lower()
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def _proc_status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


class PeakMemory:
    """Peak memory of a block over the memory in use when it starts, in MiB (`peak_mib` after the block).

    `hwm_reset` says whether the CPU peak could be reset (Linux >= 4.0); without it the figure is the peak since
    the process started over the peak before the block, a lower bound. `method` says the same in words.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak_mib, self.method, self.hwm_reset = device, 0.0, "", False

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base, self.method = torch.cuda.memory_allocated(self.device), "max_memory_allocated"
            return self
        with contextlib.suppress(OSError, AttributeError):  # glibc: hand freed heap back, so RSS is what is live
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_reset, self.method = True, "peak RSS (VmHWM) over the RSS before the block"
        except OSError:
            self.method = "peak RSS since start over the peak before the block (a lower bound)"
        self.base = self._peak_kib() * 1024
        return self

    def _peak_kib(self) -> int:
        hwm = _proc_status_kib("VmHWM")
        return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._peak_kib() * 1024
        self.peak_mib = max(0, peak - self.base) / 2**20
