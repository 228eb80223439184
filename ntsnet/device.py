"""Where tensors meet models: the device is chosen once, and every input is moved to its model's device here.

On a GPU machine a CPU batch fed to a CUDA model raises; these helpers are the one place that moves it, so a model
may live on the CPU, a GPU (or the ``meta`` device in tests) and every caller feeds it the same way.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading

import torch

log = logging.getLogger("ntsnet")


def on_zero_gpu() -> bool:
    """A Hugging Face Space on ZeroGPU hardware: its GPU is lent only inside functions decorated with spaces.GPU, and
    touching CUDA anywhere else raises. This product keeps its models between requests and trains in a process of its
    own, which that model does not fit, so on ZeroGPU it runs on the CPU and never touches CUDA (README: Spaces)."""
    return "SPACES_ZERO_GPU" in os.environ


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: the first CUDA GPU, else Apple's MPS, else the CPU; on a ZeroGPU Space always the CPU."""
    if isinstance(device, torch.device):
        device = str(device)
    if on_zero_gpu():
        if device not in ("auto", "cpu"):
            raise ValueError(f"device {device!r} on a ZeroGPU Space: this app runs on its CPU there (CUDA may only be "
                             "touched inside spaces.GPU functions); use CPU or dedicated GPU hardware for a GPU")
        return torch.device("cpu")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def tune_for_fixed_shapes(device: torch.device):
    """On a CUDA GPU let cuDNN time its kernels for each new input shape once and keep the fastest: for training,
    which feeds a few fixed sizes again and again (the app's batches vary in size, and each new one would be timed)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def inference_batch(device: torch.device, cpu_batch: int = 16) -> int:
    """Photos per forward pass when predicting many (an evaluation, a folder, features): four times more on a CUDA
    GPU, where small batches leave it idle."""
    return cpu_batch * 4 if device.type == "cuda" else cpu_batch


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (a module without any: the CPU)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def to_device_of(module: torch.nn.Module, x: torch.Tensor, channels_last: bool | None = None) -> torch.Tensor:
    """``x`` on ``module``'s device (pinned and copied without blocking from the CPU to a GPU); NHWC on a CPU, where
    oneDNN's convolutions are faster in it (``channels_last`` forces either way)."""
    device = device_of(module)
    if x.device != device:
        if device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory().to(device, non_blocking=True)
        else:
            x = x.to(device)
    if channels_last is None:
        channels_last = device.type == "cpu"
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def autocast_for(device: torch.device, precision: str):
    """A context factory: bf16 autocast on ``device`` when ``precision`` is bf16, nothing otherwise."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class _ExactFp32:
    """TF32 off while any thread is inside ``exact_fp32``: the first to enter saves the flags, the last to leave
    restores them (two overlapping checks that each saved and restored on their own could leave TF32 off for good)."""

    def __init__(self):
        self.lock, self.depth, self.saved = threading.Lock(), 0, None

    @contextlib.contextmanager
    def __call__(self):
        with self.lock:
            if self.depth == 0:
                self.saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            self.depth += 1
        try:
            yield
        finally:
            with self.lock:
                self.depth -= 1
                if self.depth == 0:
                    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


# TF32 off for the duration (cuDNN and cuBLAS run fp32 convolutions and matmuls in TF32 by default on Ampere and
# later, which changes results in the third digit): for checks that compare two fp32 computations. Thread-safe.
exact_fp32 = _ExactFp32()


def gpu_has_bf16(device: torch.device) -> bool:
    """bf16 in hardware: CUDA compute capability 8.0 (Ampere) or later. ``torch.cuda.is_bf16_supported()`` also counts
    emulation, and says yes on a T4 or V100, where cuDNN has no bf16 convolutions."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def free_memory_gib(device: torch.device) -> float:
    """GiB a new allocation on ``device`` can have now: what the card has free (other processes, the app's models
    included, hold the rest) plus what this process's allocator keeps cached but unused."""
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return (free + cached) / 2**30


def release_cached_memory(device: torch.device):
    """Give the blocks PyTorch's allocator cached on a GPU back to the card (after an evaluation in the app, so a
    Train click started next finds them free)."""
    if device.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
