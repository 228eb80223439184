"""Where tensors meet models: the device is chosen once, and every input is moved to its model's device here.

On a GPU machine a CPU batch fed to a CUDA model raises; these helpers are the one place that moves it, so a model
may live on the CPU, a GPU (or the ``meta`` device in tests) and every caller feeds it the same way.
"""
from __future__ import annotations

import contextlib
import os

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: the first CUDA GPU, else Apple's MPS, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def tune_for_fixed_shapes(device: torch.device):
    """On a CUDA GPU let cuDNN time its kernels for each new input shape once and keep the fastest: training and
    prediction feed a few fixed sizes again and again."""
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


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for the duration (cuDNN and cuBLAS run fp32 convolutions and matmuls in TF32 by default on Ampere and
    later, which changes results in the third digit): for checks that compare two fp32 computations."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def on_zero_gpu() -> bool:
    """A Hugging Face Space on ZeroGPU hardware: a GPU is lent only inside functions decorated with spaces.GPU."""
    return "SPACES_ZERO_GPU" in os.environ


def gpu_task(fn):
    """``fn`` decorated with ``spaces.GPU`` on a ZeroGPU Space (the GPU is attached while it runs), unchanged
    everywhere else."""
    if not on_zero_gpu():
        return fn
    import spaces

    return spaces.GPU(fn)
