"""Process-wide settings that make CPU work faster without changing any result.

glibc hands every freed block over ~128 KiB back to the kernel, so each forward pass maps its activation
buffers afresh and page-faults them in, zero-filled, one 4 KiB page at a time. PyTorch's CPU allocator
does not cache, so that kernel work is paid on every frame (``benchmarks/predict_latency.py --levers``). Keeping blocks up to 32 MiB on the heap (glibc's
maximum for this setting) and trimming only above 256 MiB costs at most that much idle memory.

``single_torch_thread`` keeps PyTorch's thread pool off the cores while a compiled graph runs one frame.
``opencv_on_one_thread`` keeps a training process's DataLoader workers from each blurring with a pool of threads.
``background_work`` runs a build beside the answers and lets the process end only after it.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
import weakref

def isa_cap_allows_bf16(training: bool = False) -> bool:
    """oneDNN (in PyTorch and in OpenVINO's convolutions) never goes above ``ONEDNN_MAX_CPU_ISA``. Capped below
    AVX512_CORE_BF16 (AMX for training), bf16 is emulated or refused: OpenVINO, choosing bf16 by itself from the
    CPU's flags, failed at the first frame ("Convolution node ... is not initialized") on a Zen 4 capped to AVX2."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").strip().upper()
    if cap == "ALL":
        return True
    return "AMX" in cap if training else cap.startswith(("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10"))


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


def opencv_on_one_thread() -> None:
    """OpenCV on one thread in this process and in every DataLoader worker it forks from now on.

    Each worker blurs photos for the store augmentation, by default with an OpenCV pool as large as the machine, so on
    2 cores two workers' pools fight the training step's threads (PyTorch already keeps its own threads to one in a
    worker). It is set in the training process because a worker must never resize OpenCV's pool itself: the pool it inherits from a parent that
    already used it has lost its threads in the fork, and calling ``cv2.setNumThreads`` there hung a worker in the full
    test suite. With one thread OpenCV runs each call in the calling thread and a worker never touches that pool."""
    import cv2

    cv2.setNumThreads(1)


_glue_lock = threading.Lock()
_glue_scopes = 0
_glue_outside = 0  # the thread count outside the scopes, while any is open


@contextlib.contextmanager
def single_torch_thread():
    """PyTorch on one thread for the small work around a compiled graph (resize, NMS, crops, heads) of one frame.

    PyTorch's OpenMP threads spin for a while after each parallel op, on the cores OpenVINO's threads are about to
    use (benchmarks/RESULTS.md, "Inference on a CPU"). PyTorch keeps a thread count per thread, and a thread that starts meanwhile
    copies the last one set; so every scope leaves its thread at the count from before the first open scope."""
    global _glue_scopes, _glue_outside
    import torch

    with _glue_lock:
        if _glue_scopes == 0:
            _glue_outside = torch.get_num_threads()
        _glue_scopes += 1
        outside = _glue_outside
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(outside)
        with _glue_lock:
            _glue_scopes -= 1


def torch_threads() -> int:
    """PyTorch's thread count outside ``single_torch_thread`` scopes, also while one is open in another thread (an
    engine compiled then takes its thread count from here)."""
    import torch

    with _glue_lock:
        return _glue_outside if _glue_scopes else torch.get_num_threads()


_background: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()


def background_work(target, name: str, args=()) -> threading.Thread:
    """Start ``target`` in a thread that never holds up an answer but is joined when the process ends: a daemon
    thread still inside OpenVINO or PyTorch while the interpreter tears down aborts the whole process
    ("terminate called without an active exception"), which turned a command's exit status into SIGABRT."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    _background.add(thread)
    thread.start()
    return thread


@atexit.register
def _join_background_work():
    for thread in list(_background):
        thread.join()
