"""Several training processes under ``torchrun`` (DistributedDataParallel): who is who, and how they agree.

Both recipes use it: every process trains on its own share of each epoch's photos, gradients are averaged by DDP,
and process 0 alone evaluates, writes files and decides (stop, next stage, its time); the others follow its word.
A single process (plain ``python -m training``) goes through the same code with every function a no-op.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def info() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def local_world() -> int:
    """How many processes torchrun started on this machine (they share its cores); 1 for a plain process."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def start(device: torch.device, timeout_minutes: float = 60.0) -> torch.device:
    """Join the process group (NCCL between GPUs, gloo on CPUs) and return this process's device.
    ``timeout_minutes``: how long a process may wait for process 0 (which alone evaluates between stages)."""
    world, _, local_rank = info()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    if active():
        dist.barrier()


def shard(order: list, world: int, rank: int) -> list:
    """This process's share of an epoch's order. Every share has the same length (the last ``len % world`` photos
    wait for the next epoch): a process with one batch more would wait forever for the others' gradients."""
    usable = len(order) - len(order) % world
    return order[rank:usable:world]


def _tensor(values, device) -> torch.Tensor:
    # gloo and NCCL both take float64 on their own kind of device
    return torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")


def agree(value: float, device: torch.device) -> float:
    """Process 0's ``value`` (a stage's seconds, a yes/no) on every process."""
    if not active():
        return value
    t = _tensor([float(value)], device)
    dist.broadcast(t, src=0)
    return float(t.item())


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on any of them."""
    if not active():
        return flag
    t = _tensor([float(flag)], device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def step_consensus(halt: bool, skip: bool, frac: float, device: torch.device) -> tuple[bool, bool, float]:
    """One collective per training step: stop if any process must (cancel, time), skip the step if any process has
    no readable photos in its batch, and follow process 0's clock for the learning-rate schedule."""
    if not active():
        return halt, skip, frac
    t = _tensor([float(halt), float(skip), frac if dist.get_rank() == 0 else 0.0], device)
    dist.all_reduce(t)
    return bool(t[0] > 0), bool(t[1] > 0), float(t[2])


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module to call forward on: DDP around ``model`` when several processes train (it copies process 0's
    weights to the others first), ``model`` itself otherwise."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def replicas_agree(model: torch.nn.Module, device: torch.device) -> bool | None:
    """Whether every process holds the same weights (what DDP promises after each step); None for one process."""
    if not active():
        return None
    with torch.no_grad():
        total = sum(float(p.detach().double().sum()) for p in model.parameters())
    lo, hi = _tensor([total], device), _tensor([total], device)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.isclose(lo, hi, rtol=1e-9, atol=1e-6).item())


def finish():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
