"""glibc's allocator, set for CPU tensors: the process setting behind `bixt train`, `eval`, `profile` and `compare`.

A CPU step allocates and frees tensors of megabytes, many times over. glibc serves a block above its mmap threshold
(128 KiB, raised on the fly up to 32 MiB) with a fresh mmap and gives it back at free, and it trims the top of its
heap whenever more than twice that threshold lies free there; every reuse then page-faults and zero-fills the memory
again. In torch.profiler this shows as `copy_` and `gelu` writing at a few GB/s: the time is the first touch of new
pages. Two settings, one per trade-off:

- `tuned` (speed, the default): freed memory stays in the heap (blocks up to 256 MiB come from it, 1 GiB may lie
  free before a trim, 64 MiB of headroom per extension), so steady-state steps reuse pages already mapped.
- `lean` (memory, the default under gradient checkpointing, which trades time for memory already): every block from
  128 KiB up is its own mapping, handed back at free, so the resident set follows what is live. Without it, the
  heap fragments between the layers that checkpointing recomputes one at a time, and the resident peak keeps most of
  what checkpointing saves (BiXT-Ti training at 16,384 tokens: 2.3x lower instead of 6x).

`BIXT_MALLOC` (tuned, lean or glibc: glibc's defaults and the environment's own MALLOC_* variables, untouched)
overrides the choice. Elsewhere than glibc this is a no-op. `bixt.measure.memory.PeakMemory` trims the heap before
it measures, so peaks stay figures of what is live under either setting.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform

MODES = ("tuned", "lean", "glibc")
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_SETTINGS = {
    "tuned": {_M_MMAP_THRESHOLD: 256 << 20, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20},
    "lean": {_M_MMAP_THRESHOLD: 128 << 10, _M_TRIM_THRESHOLD: 256 << 10, _M_TOP_PAD: 0},
}


def allocator_mode(lean: bool = False) -> str:
    """The setting in force: BIXT_MALLOC if set, else lean or tuned as the caller's trade-off says."""
    mode = os.environ.get("BIXT_MALLOC") or ("lean" if lean else "tuned")
    if mode not in MODES:
        raise ValueError(f"BIXT_MALLOC={mode!r} is not a known allocator setting: use one of {', '.join(MODES)}")
    return mode


def _is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def tune_allocator(lean: bool = False) -> str:
    """Apply the setting to this process (later allocations follow it); returns the setting in effect."""
    mode = allocator_mode(lean)
    if mode == "glibc" or not _is_glibc():
        return "glibc"
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        if all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS[mode].items()):
            return mode
    return "glibc"
