"""How a training loop feeds its device: the batch size and the learning rate that goes with it, the DataLoader's
workers, and one loader per run whose workers live across epochs.

On a CPU nothing changes from the recipes' own settings (their batch sizes and workers were measured there). On a
GPU the batch is as large as its memory allows (up to MAX_GPU_BATCH), the learning rate grows with it (the linear
scaling rule, Goyal et al. 2017, "Accurate, Large Minibatch SGD"), every core but two decodes and augments photos,
and batches travel as uint8 (a quarter of float's bytes) to be normalised on the GPU (``ntsnet.images.normalise_batch``).
"""
from __future__ import annotations

import os

import torch

from ntsnet.device import free_memory_gib, to_device_of
from ntsnet.images import normalise_batch

MAX_GPU_BATCH = 64
# training memory per photo of NTS-Net at 448 px (M=6 parts at 224, bf16 autocast): measured for Lite0 (24 GiB at
# batch 64, ../shared/notes/gpu-machine.md); other backbones are taken at ResNet-50's size, which is larger
GIB_PER_PHOTO_448 = {"efficientnet_lite0": 0.375, "tiny": 0.05}
GIB_PER_PHOTO_OTHER = 1.0
# of the memory free when the job starts, for the batch: the rest for cuDNN's workspaces, the job's evaluations and
# the allocator's fragmentation. Free, not total: the app's models and caches share the card with the job.
MEMORY_SHARE = 0.6
MIN_GPU_BATCH = 2  # BatchNorm needs two photos; below 8 only when a busy card leaves no room for more


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def gpu_batch(backbone: str, input_size: int, free_gib: float, cap: int = MAX_GPU_BATCH) -> int:
    """The largest power of two up to ``cap`` whose training memory fits in MEMORY_SHARE of ``free_gib``: at least 8
    when 8 fit, never below MIN_GPU_BATCH."""
    per_photo = GIB_PER_PHOTO_448.get(backbone, GIB_PER_PHOTO_OTHER) * (input_size / 448) ** 2
    fits = MEMORY_SHARE * free_gib / per_photo
    batch = 8 if fits >= 8 else MIN_GPU_BATCH
    while batch * 2 <= min(cap, fits):
        batch *= 2
    return batch


def batch_for(device: torch.device, backbone: str, input_size: int, cpu_batch: int) -> int:
    """The batch size a recipe gets when none is given: its own on a CPU, ``gpu_batch`` of the GPU's free memory on
    a CUDA GPU."""
    if device.type != "cuda":
        return cpu_batch
    return gpu_batch(backbone, input_size, free_memory_gib(device))


def scaled_lr(lr: float, batch: int, base_batch: int) -> float:
    """The learning rate for ``batch`` photos of one given for ``base_batch`` (linear scaling)."""
    return lr * batch / base_batch


def workers_for(device: torch.device, requested: int | None, cpu_workers: int = 2, processes_here: int = 1) -> int:
    """DataLoader workers of one process: as asked; otherwise ``cpu_workers`` on a CPU (its cores also train) and on
    a GPU every core but two per process (its training loop and pin-memory thread), shared among the
    ``processes_here`` processes on this machine, at most 16."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return cpu_workers
    processes_here = max(1, processes_here)
    return max(2, min(16, usable_cores() // processes_here - 2))


def resolve_feeding(cfg, device: torch.device, backbone: str, input_size: int, cpu_batch: int, world: int = 1,
                    local_world: int = 1) -> str:
    """Fill in ``cfg.batch_size`` (each process's batch; the learning rate scales with the batch of all ``world``
    processes together, which DDP averages gradients over, when the batch is chosen here) and ``cfg.workers``
    (shared among the ``local_world`` processes on this machine); returns a line for the log. The settings go to the
    run's config.json as they were used."""
    line = ""
    if cfg.batch_size is None:
        cfg.batch_size = batch_for(device, backbone, input_size, cpu_batch)
        # a CPU keeps the recipe's own batch and rate, measured there, also under torchrun
        total = cfg.batch_size * (world if device.type == "cuda" else 1)
        if total != cpu_batch:
            lr = scaled_lr(cfg.lr, total, cpu_batch)
            of = f"{cfg.batch_size} x {world} processes" if world > 1 else f"{cfg.batch_size}"
            line = f"batch {of} for this {device.type} (learning rate {cfg.lr:g} x {total}/{cpu_batch} = {lr:g})"
            cfg.lr = lr
    cfg.workers = workers_for(device, cfg.workers, processes_here=local_world)
    return line


class EpochSampler(torch.utils.data.Sampler):
    """Each epoch's order (a seeded permutation, this process's share of it), yielding (epoch, index) pairs: the
    epoch travels with the index, so workers kept across epochs draw that epoch's augmentation."""

    def __init__(self, n: int, seed: int, shard=lambda order: order):
        self.n, self.seed, self.shard, self.epoch = n, seed, shard, 0

    def order(self, epoch: int) -> list[int]:
        return self.shard(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)).tolist())

    def __iter__(self):
        return iter([(self.epoch, i) for i in self.order(self.epoch)])

    def __len__(self):
        return len(self.order(self.epoch))


def run_loader(dataset, sampler: EpochSampler, batch_size: int, workers: int, device: torch.device, collate_fn):
    """One DataLoader for a whole run: its workers start once (persistent) and each reads batches ahead of the step
    (four on a GPU)."""
    extra = dict(persistent_workers=True, prefetch_factor=4 if device.type == "cuda" else 2) if workers else {}
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_size, collate_fn=collate_fn,
                                       num_workers=workers, drop_last=len(sampler) > batch_size,  # BatchNorm needs two
                                       pin_memory=device.type == "cuda", **extra)


def as_model_input(model, x: torch.Tensor) -> torch.Tensor:
    """A collated batch as ``model``'s input on its device; a uint8 batch (a GPU's loader) is normalised there."""
    x = to_device_of(model, x)
    return normalise_batch(x, model.mean, model.std) if x.dtype == torch.uint8 else x


class StepTally:
    """Loss sums and right answers of the steps so far, kept on the device: adding a step reads nothing back, so a GPU
    runs ahead of Python; ``read()`` does, when a figure is shown. Sums are float64 as Python's floats were."""
    KEYS = ("total", "L_I", "L_S", "L_C")

    def __init__(self, device: torch.device):
        device = device if device.type in ("cpu", "cuda") else torch.device("cpu")  # MPS has no float64
        self.sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in self.KEYS}
        self.right = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0

    def add(self, losses: dict, logits: torch.Tensor, y: torch.Tensor):
        device = self.right.device
        for k, total in self.sums.items():
            total += losses[k].detach().to(device).double() * len(y)
        self.right += (logits.detach().argmax(1) == y).sum().to(device)
        self.seen += len(y)

    def read(self) -> tuple[dict, int]:
        """(loss sums as floats, photos right): one read-back for all of them."""
        values = torch.stack([*self.sums.values(), self.right.double()]).tolist()
        return dict(zip(self.KEYS, values[:-1])), int(values[-1])
