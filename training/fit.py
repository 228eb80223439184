"""End-to-end training of one stage for a number of wall-clock seconds: stages 2 and 3 of the Train button and the
refit. Warm-up then cosine schedule over the stage's seconds, evaluations at intervals, and the most accurate
weights (of a moving average of the weights) kept; the starting weights count as the first candidate.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ntsnet.fuse import TrainingFold

from . import distributed
from .answers import selection_accuracy
from .cutmix import cutmix, mixed_losses
from .data import DataError, PhotoDataset, collate
from .feeding import EpochSampler, StepTally, as_model_input, run_loader


def train_mode(model):
    """Training mode with every BatchNorm kept on its running statistics: with a few dozen photos per batch, batch
    statistics would move the features away from what the previous stage's head was fitted on (and from what
    inference sees), so a stage would start worse than the one it continues."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


class WeightAverage:
    """An exponential moving average of the weights being trained, with a time constant in wall-clock seconds, so it
    is the same share of a stage on a slow or a fast machine. Small batches of heavily augmented photos make SGD's
    weights jitter from step to step; the average is what gets evaluated and kept. It starts from the stage's
    starting weights, so early on it leans towards them."""

    def __init__(self, model, tau_seconds: float):
        self.tau = max(tau_seconds, 1e-6)
        self.pairs = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, step_seconds: float):
        weight = 1.0 - math.exp(-step_seconds / self.tau)
        for p, avg in self.pairs:
            avg.lerp_(p.detach(), weight)

    @torch.no_grad()
    def copy_to_model(self):
        for p, avg in self.pairs:
            p.copy_(avg)

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in place of the trained ones, for an evaluation or a copy."""
        saved = [p.detach().clone() for p, _ in self.pairs]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), keep in zip(self.pairs, saved):
                    p.copy_(keep)


@dataclass
class StagePlan:
    """One stage's training: its name, photos (snapshot items), input size, seconds and loss. ``val``: (arrays,
    labels) to select the best weights on; None for a refit, whose validation photos are among its items (it ends
    on the schedule's last, averaged weights, with accuracy NaN)."""
    stage: str
    items: list
    size: int
    seconds: float
    loss_fn: Callable
    val: tuple | None = None
    head_lr_mult: float | None = None   # None: the config's (new heads learn faster); 1.0 for continued heads
    cutmix_share: float = 0.0


@dataclass
class FitContext:
    """What every stage of a job shares: its settings and device, and where it reports. ``judge`` scores a model on
    (arrays, labels) while it trains; ``mix`` mixes a batch (training/cutmix.py)."""
    cfg: object                          # ProgressiveConfig (fields: lr, head_lr_mult, weight_decay, freeze_stride, ...)
    device: torch.device
    autocast: Callable = contextlib.nullcontext
    stop: object = False
    progress: Callable = lambda **kw: None
    log: Callable = lambda *a, **k: None
    judge: Callable = selection_accuracy
    mix: Callable = cutmix


@dataclass
class FitResult:
    model: torch.nn.Module
    accuracy: float                      # the kept weights' judged accuracy (NaN for a refit)
    rows: list = field(default_factory=list)
    trained: bool = True                 # False: the kept weights are the starting weights


class StageTrainer:
    """Trains ``model`` (already on ``ctx.device``) by ``plan``; ``run()`` returns a FitResult."""

    def __init__(self, model, plan: StagePlan, ctx: FitContext):
        self.model, self.plan, self.ctx, cfg = model, plan, ctx, ctx.cfg
        self.world, self.rank, _ = distributed.info()
        self.main = self.rank == 0
        self.opt, self.base_lrs = self._optimizer()
        self.ds = PhotoDataset(plan.items, plan.size, train=True, seed=cfg.seed, mean=model.mean, std=model.std, augment="store",
                               as_uint8=ctx.device.type == "cuda")
        if len(self.ds) < self.world:
            raise DataError(f"{len(self.ds)} training photos cannot be shared among {self.world} processes")
        self.sampler = EpochSampler(len(self.ds), cfg.seed, lambda order: distributed.shard(order, self.world, self.rank))
        # workers live for the stage; for a handful of photos starting them costs more than they save
        workers = cfg.workers if len(self.sampler) >= 4 * cfg.batch_size else 0
        self.loader = run_loader(self.ds, self.sampler, cfg.batch_size, workers, ctx.device, collate)
        self.net = distributed.wrap(model, ctx.device)
        self.average = WeightAverage(model, cfg.ema_share * plan.seconds) if cfg.ema_share > 0 else None
        # BatchNorm folded while training is a CPU speed trick (fuse.py); a GPU runs the plain modules
        param = next(model.backbone.parameters())
        probe = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(param)
        self.fold = TrainingFold(model.backbone, probe) if ctx.device.type == "cpu" else contextlib.nullcontext()
        self.mix_rng = np.random.default_rng([cfg.seed, self.rank])
        self.t_start = time.perf_counter()
        self.trained_seconds, self.seen, self.steps = 0.0, 0, 0

    def _optimizer(self):
        cfg, model = self.ctx.cfg, self.model
        frozen = {id(p) for p in model.backbone.early_parameters(cfg.freeze_stride)} if cfg.freeze_stride else set()
        for p in model.parameters():
            p.requires_grad_(id(p) not in frozen)
        heads = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
        body = [p for n, p in model.named_parameters() if n.startswith("backbone.") and id(p) not in frozen]
        base = [cfg.lr, cfg.lr * (cfg.head_lr_mult if self.plan.head_lr_mult is None else self.plan.head_lr_mult)]
        opt = torch.optim.SGD([{"params": body, "lr": base[0]}, {"params": heads, "lr": base[1]}], momentum=0.9,
                              weight_decay=cfg.weight_decay, nesterov=True)
        return opt, base

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def _loader(self, epoch: int):
        self.sampler.epoch = epoch
        return self.loader

    def _schedule(self, t0: float) -> float:
        """The share of the schedule done: wall clock (loading and evaluating count against the budget), ending with
        whichever comes last, the stage's seconds or its minimum of steps."""
        frac = min(1.0, (t0 - self.t_start) / max(self.plan.seconds, 1e-9))
        min_steps = self.ctx.cfg.min_steps
        return min(frac, self.steps / min_steps) if min_steps else frac

    def _step(self, x, y, frac: float, tally: StepTally):
        """One optimiser step at schedule position ``frac``, counted in ``tally``."""
        t0 = time.perf_counter()
        warm = min(1.0, frac / 0.05)
        for group, lr in zip(self.opt.param_groups, self.base_lrs):
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * frac))
        device = self.ctx.device
        x, y = as_model_input(self.model, x), y.to(device, non_blocking=True)
        mixed = self.plan.cutmix_share > 0 and self.mix_rng.random() < self.plan.cutmix_share
        if mixed:
            x, partner, lam = self.ctx.mix(x, y, self.mix_rng)
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)  # CutMix may have returned another layout
        with self.ctx.autocast(), self.fold:
            out = self.net(x)
        losses = mixed_losses(self.plan.loss_fn, out, y, partner, lam) if mixed else self.plan.loss_fn(out, y)
        self.opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)  # one bad batch must not undo a stage
        self.opt.step()
        if self.average is not None:
            self.average.update(time.perf_counter() - t0)
        self.trained_seconds += time.perf_counter() - t0
        self.steps += 1
        self.seen += len(y)
        tally.add(losses, out.concat_logits, y)

    def _epoch(self, epoch: int) -> tuple[bool, bool, dict, int, int]:
        """One pass over the photos, or less when the stage ends in it: (done, extended, loss sums, photos, right)."""
        ctx, plan = self.ctx, self.plan
        train_mode(self.model)
        tally, shown = StepTally(ctx.device), time.perf_counter()
        for x, y, _ in self._loader(epoch):
            t0 = time.perf_counter()
            frac = self._schedule(t0)
            # spent: an evaluation or a new epoch's loader ran past the budget; no step at lr 0 follows
            spent = t0 - self.t_start >= plan.seconds and self.steps >= max(ctx.cfg.min_steps, 1)
            halt, skip, frac = distributed.step_consensus(bool(ctx.stop) or spent, x is None, frac, ctx.device)
            if halt:
                return (True, False, *self._totals(tally))
            if skip:
                continue
            self._step(x, y, frac, tally)
            if time.perf_counter() - shown >= 1.0 or ctx.device.type != "cuda":  # a GPU's figures: once a second
                shown = time.perf_counter()
                self._show(tally)
            if distributed.agree(self.elapsed() >= plan.seconds and self.steps >= ctx.cfg.min_steps, ctx.device):
                return (True, t0 - self.t_start >= plan.seconds, *self._totals(tally))  # extended: spent before this step
        return (False, False, *self._totals(tally))

    @staticmethod
    def _totals(tally: StepTally) -> tuple[dict, int, int]:
        sums, right = tally.read()
        return sums, tally.seen, right

    def _show(self, tally: StepTally):
        sums, right = tally.read()
        self.ctx.progress(stage=self.plan.stage, images_per_s=round(self.world * self.seen / max(self.trained_seconds, 1e-9), 2),
                          stage_seconds_left=round(max(0.0, self.plan.seconds - self.elapsed()), 1),
                          loss={k: round(v / tally.seen, 4) for k, v in sums.items()}, train_acc=round(right / tally.seen, 4))

    def _row(self, epoch, sums, n_seen, correct, acc) -> dict:
        select = self.plan.val is not None
        return {"stage": self.plan.stage, "epoch": epoch, **{k: round(v / n_seen, 5) for k, v in sums.items()},
                "train_acc": round(correct / n_seen, 5), "val_acc": round(acc, 5) if select else None,
                "val_n": len(self.plan.val[1]) if select else 0, "images_per_s": round(self.world * self.seen / max(self.trained_seconds, 1e-9), 2),
                "processes": self.world, "train_minutes": round(self.trained_seconds / 60, 3), "elapsed_minutes": round(self.elapsed() / 60, 3)}

    def run(self) -> FitResult:
        ctx, plan, model = self.ctx, self.plan, self.model
        select = plan.val is not None
        best_acc = ctx.judge(model, *plan.val) if self.main and select else float("nan")
        best_state, trained_best = (copy.deepcopy(model.state_dict()) if select else None), not select
        if select:
            ctx.log(f"{plan.stage}: starts at {best_acc:.1%} on the validation photos")
        self.t_start = time.perf_counter()  # the stage's seconds start after judging its start
        rows, epoch, next_eval, done, extended = [], 0, 0.0, False, False
        eval_every = max(plan.seconds / 8, 20.0)  # evaluations cost time too
        while not done:
            epoch += 1
            done, extended, sums, n_seen, correct = self._epoch(epoch)
            if not (self.main and n_seen and (self.elapsed() >= next_eval or done)):
                continue
            next_eval = self.elapsed() + eval_every
            with self.average.applied() if self.average is not None else contextlib.nullcontext():
                acc = ctx.judge(model, *plan.val) if select else float("nan")
                if select and acc >= best_acc:  # ties: the later, longer-trained weights
                    best_acc, best_state, trained_best = acc, copy.deepcopy(model.state_dict()), True
            rows.append(self._row(epoch, sums, n_seen, correct, acc))
            r = rows[-1]
            ctx.log(f"{plan.stage} epoch {epoch}: loss {r['total']:.3f}, train acc {r['train_acc']:.3f}, "
                    + (f"val acc {acc:.3f}, " if select else "") + f"{r['images_per_s']} img/s")
        self._finish(rows, extended)
        if select:
            model.load_state_dict(best_state)
        elif self.average is not None:  # a refit ends on the averaged weights, as the stage it repeats was judged on them
            self.average.copy_to_model()
        return FitResult(model.eval(), best_acc, rows, trained_best)

    def _finish(self, rows, extended: bool):
        ctx, plan = self.ctx, self.plan
        if self.main and extended and ctx.cfg.min_steps:
            ctx.log(f"{plan.stage}: its minimum of {ctx.cfg.min_steps} optimiser steps took {self.elapsed() - plan.seconds:.1f} s "
                    f"more than its {plan.seconds:.1f} s of the budget")
        agree = distributed.replicas_agree(self.model, ctx.device)
        if agree is not None:
            ctx.log(f"{plan.stage}: {self.world} processes {'hold the same' if agree else 'DIFFER in their'} weights")
            for r in rows:
                r["replicas_agree"] = agree


def fit(model, plan: StagePlan, ctx: FitContext) -> FitResult:
    """Train ``model`` by ``plan`` (see StageTrainer)."""
    return StageTrainer(model, plan, ctx).run()
