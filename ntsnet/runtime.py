"""Process-wide settings that make CPU work faster without changing any result.

glibc hands every freed block over ~128 KiB back to the kernel, so each forward pass maps its activation
buffers afresh and page-faults them in, zero-filled, one 4 KiB page at a time. PyTorch's CPU allocator
does not cache, so on this machine that kernel work made a Lite0 NTS-Net frame take 79 ms instead of 59 ms
(bf16; ``python benchmarks/predict_latency.py --levers``). Keeping blocks up to 32 MiB on the heap (glibc's
maximum for this setting) and trimming only above 256 MiB costs at most that much idle memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed buffers for reuse instead of unmapping them. Once per process; True when it
    took effect. A no-op (False) off Linux/glibc, or with NTSNET_KEEP_MALLOC=0 (to measure the difference)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or os.environ.get("NTSNET_KEEP_MALLOC", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl (Alpine) has no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
