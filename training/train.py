"""Train NTS-Net (or the plain baseline) on a catalogue: resumable, checkpointed every epoch, DDP-ready.

    python -m training train --db data --out runs/first [--epochs 30 --max-minutes 40 ...]
    torchrun --nproc_per_node 2 -m training train ...      # DistributedDataParallel

RUN_DIR holds: config.json, snapshot.json (the frozen image list), resume.pt (model + optimizer, written
atomically at the end of every epoch), last.safetensors / best.safetensors (usable checkpoints),
metrics.jsonl (one line per epoch) and progress.json (live status for the job runner and the UI).
Running the same command again resumes from resume.pt; a finished run is not retrained.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ntsnet import NTSConfig, create_model, nts_loss, save_checkpoint
from ntsnet.checkpoint import atomic_write
from ntsnet.device import autocast_for, gpu_has_bf16, resolve_device, tune_for_fixed_shapes
from ntsnet.predictor import cpu_supports_fast_bf16
from ntsnet.runtime import keep_freed_memory, opencv_on_one_thread

from . import distributed
from .data import PhotoDataset, Snapshot, collate, take_snapshot
from .feeding import EpochSampler, StepTally, as_model_input, resolve_feeding, run_loader
from .runfiles import CancelFlag, RunFiles


@dataclass
class TrainConfig:
    db: str = "data"
    out: str = "runs/run"
    model: str = "ntsnet"              # or "baseline" (plain classifier, paper Table 1)
    backbone: str = "efficientnet_lite0"  # paper: resnet50; Lite0 has offline weights and is 3.7x faster here
    pretrained: bool = True
    epochs: int = 30
    batch_size: int | None = None      # None: 8 on a CPU, a GPU's from its memory (training/feeding.py), lr scaled with it
    input_size: int = 448              # paper 2.3
    part_size: int = 224
    proposal_num: int = 6              # M
    cat_num: int = 4                   # K
    lr: float = 0.001                  # paper: SGD, momentum 0.9, lr 0.001 fixed, weight decay 1e-4; for a batch of 8
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    max_minutes: float | None = None   # wall-clock budget, evaluations included; stops mid-epoch if needed
    device: str = "auto"
    precision: str = "auto"            # auto | fp32 | bf16
    workers: int | None = None         # None: 2 on a CPU, every core but two on a GPU
    seed: int = 0
    max_train_images: int | None = None  # for quick experiments
    exclude_products: str = ""         # comma-separated products held out (open-set evaluation)
    init_from: str = ""                # start from another checkpoint's weights (e.g. a fine-tuned baseline)


@dataclass
class RunState:
    epoch: int = 0
    train_seconds: float = 0.0
    best_val: float = -1.0
    finished: bool = False
    stop_reason: str = ""
    history: list = field(default_factory=list)
    wall_seconds: float = 0.0          # the run's wall clock over complete epochs, evaluations included
    eval_seconds: float = 0.0          # the last evaluation's length: what the budget keeps for the next


# ---------------------------------------------------------------------------------------- helpers
def choose_precision(device: torch.device, requested: str, bf16_on_cpu: bool = True) -> str:
    """Training precision for "auto": bf16 on a GPU with bf16 hardware (compute capability 8.0 and later; a T4 or V100
    would emulate it) and, with ``bf16_on_cpu``, on a CPU with AMX (elsewhere bf16 trains slower than fp32, see
    ``cpu_supports_fast_bf16``), fp32 otherwise."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if gpu_has_bf16(device) else "fp32"
    if device.type == "cpu" and bf16_on_cpu and cpu_supports_fast_bf16(training=True):
        return "bf16"
    return "fp32"


@torch.inference_mode()
def evaluate_accuracy(model, loader, autocast) -> tuple[float, int]:
    """Top-1 accuracy of the Scrutinizer on a loader's photos, on the model's device."""
    model.eval()
    right, total = [], 0
    with autocast():
        for x, y, _ in loader:
            if x is None:
                continue
            pred = model(as_model_input(model, x), num_parts=model.config.cat_num).concat_logits.argmax(1)
            right.append((pred == y.to(pred.device)).sum())
            total += len(y)
    correct = int(torch.stack(right).sum()) if right else 0  # one read-back for the whole evaluation
    return (correct / total if total else float("nan")), total


class PaperRun:
    """One run of the paper's recipe: its settings, device, photos, model, optimiser, files and saved state."""

    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg
        self.world, rank, _ = distributed.info()
        self.main = rank == 0
        self.log = log if self.main else (lambda *a, **k: None)
        self.run_dir = Path(cfg.out)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state, saved = RunState(), None
        if (self.run_dir / "resume.pt").exists():
            saved = torch.load(self.run_dir / "resume.pt", map_location="cpu", weights_only=True)  # our own file, still no pickle
            self.state = RunState(**saved["state"])
        self.saved = saved

    def already_finished(self) -> bool:
        return self.state.finished and self.state.epoch >= self.cfg.epochs

    def setup(self):
        cfg = self.cfg
        self.state.finished = False
        self.device = distributed.start(resolve_device(cfg.device))
        self.precision = choose_precision(self.device, cfg.precision)
        if self.device.type == "cpu":
            keep_freed_memory()  # DataLoader workers fork after this and inherit it
        tune_for_fixed_shapes(self.device)
        opencv_on_one_thread()  # inherited by the workers too
        self.feeding = resolve_feeding(cfg, self.device, cfg.backbone, cfg.input_size, cpu_batch=8, world=self.world,
                                       local_world=distributed.local_world())
        self.autocast = autocast_for(self.device, self.precision)
        self.files = RunFiles(self.run_dir, enabled=self.main)
        snap_path = self.run_dir / "snapshot.json"
        if self.main and not snap_path.exists():  # frozen at the first start, reused on resume
            take_snapshot(cfg.db, exclude=[p.strip() for p in cfg.exclude_products.split(",") if p.strip()]).save(snap_path)
            self.files.write_config(asdict(cfg))
        distributed.barrier()
        self.snap = Snapshot.load(snap_path)
        self.train_items = self.snap.train[: cfg.max_train_images] if cfg.max_train_images else self.snap.train
        self.val_items = self.snap.val or self.snap.test
        self._model()
        self.cancel = CancelFlag(self.run_dir)
        self.budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        self.files.set_metrics(self.state.history)  # metrics.jsonl mirrors the saved state: drop rows a crash lost

    def _model(self):
        cfg = self.cfg
        self.model_cfg = NTSConfig(model=cfg.model, backbone=cfg.backbone, num_classes=len(self.snap.class_names), input_size=cfg.input_size,
                                   part_size=cfg.part_size, proposal_num=cfg.proposal_num, cat_num=cfg.cat_num)
        torch.manual_seed(cfg.seed)  # the new heads' initial weights
        model = create_model(self.model_cfg, pretrained=cfg.pretrained and self.saved is None)
        if self.saved is not None:
            model.load_state_dict(self.saved["model"])
        elif cfg.init_from:
            self.log(_warm_start(model, cfg.init_from, self.snap.class_names))
        model.to(self.device)
        # oneDNN is faster in NHWC, in fp32 too
        self.model = model.to(memory_format=torch.channels_last) if self.device.type == "cpu" else model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if self.saved is not None:
            self.optimizer.load_state_dict(self.saved["optimizer"])
        self.net = distributed.wrap(self.model, self.device)

    def loaders(self):
        """One training loader for the run and one for validation, their workers kept across epochs; on a GPU photos
        travel as uint8 and are normalised there."""
        cfg, on_gpu = self.cfg, self.device.type == "cuda"
        photos = dict(mean=self.model.mean, std=self.model.std, as_uint8=on_gpu)
        train_ds = PhotoDataset(self.train_items, cfg.input_size, train=True, seed=cfg.seed, **photos)
        val_ds = PhotoDataset(self.val_items, cfg.input_size, train=False, **photos)
        rank = distributed.info()[1]
        self.sampler = EpochSampler(len(train_ds), cfg.seed, lambda order: distributed.shard(order, self.world, rank))
        self.train_loader = run_loader(train_ds, self.sampler, cfg.batch_size, cfg.workers, self.device, collate)
        self.val_loader = torch.utils.data.DataLoader(val_ds, shuffle=False, batch_size=cfg.batch_size, collate_fn=collate,
                                                      num_workers=cfg.workers, pin_memory=on_gpu, persistent_workers=cfg.workers > 0)

    def epoch_batches(self, epoch: int):
        """The epoch's batches; seeded after the iterator starts (a new one draws from torch's generator, a persistent
        one does not), so dropout is the same with any number of workers and on resume."""
        self.sampler.epoch = epoch
        batches = iter(self.train_loader)
        torch.manual_seed(self.cfg.seed * 100_003 + epoch)
        return batches

    def out_of_time(self, t_epoch: float) -> bool:
        """Wall clock, evaluations included: stop when the epoch so far and the last evaluation's length would reach
        the budget (a first epoch guesses its evaluation from the training speed)."""
        spent = self.state.wall_seconds + (time.perf_counter() - t_epoch)
        return spent + self.state.eval_seconds >= self.budget


def train_one_epoch(run: PaperRun, epoch: int, stop: dict) -> dict:
    """One epoch of SGD (the paper's fixed learning rate); returns its sums (losses, photos, right, skipped, steps)."""
    cfg, state, device = run.cfg, run.state, run.device
    batches, n_steps = run.epoch_batches(epoch), len(run.train_loader)
    run.net.train()
    tally = StepTally(device)
    counts = {"skipped": 0, "steps": 0, "t_epoch": time.perf_counter()}
    bar = tqdm(batches, total=n_steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not run.main, leave=True)
    for x, y, n_skipped in bar:
        counts["skipped"] += n_skipped
        if run.cancel:
            stop["reason"] = "cancelled"
        if stop["reason"]:
            break
        if x is None:
            continue
        t0 = time.perf_counter()
        x, y = as_model_input(run.model, x), y.to(device, non_blocking=True)
        with run.autocast():
            out = run.net(x)
        losses = nts_loss(out, y, run.model_cfg, label_smoothing=cfg.label_smoothing)
        run.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        run.optimizer.step()
        tally.add(losses, out.concat_logits, y)  # nothing read back: the GPU runs on while the next batch comes
        state.train_seconds += time.perf_counter() - t0
        counts["steps"] += 1
        if counts["steps"] % 5 == 0 or counts["steps"] in (1, n_steps):  # the first step guesses the evaluation's length
            _report_step(run, bar, epoch, n_steps, tally, counts)
        if run.out_of_time(counts["t_epoch"]):
            stop["reason"] = "time budget"
            break
    sums, correct = tally.read()
    return {"sums": sums, "seen": tally.seen, "correct": correct, **counts}


def _report_step(run: PaperRun, bar, epoch: int, n_steps: int, tally: StepTally, counts: dict):
    sums, correct = tally.read()
    seen, steps = tally.seen, counts["steps"]
    elapsed = time.perf_counter() - counts["t_epoch"]
    rate = seen * run.world / max(elapsed, 1e-9)
    if not run.state.eval_seconds:  # a first guess: inference costs about a third of a training step
        run.state.eval_seconds = len(run.val_items) / max(rate, 1e-9) / 3
    bar.set_postfix(loss=f"{sums['total'] / seen:.3f}", L_I=f"{sums['L_I'] / seen:.2f}", L_S=f"{sums['L_S'] / seen:.2f}",
                    L_C=f"{sums['L_C'] / seen:.2f}", acc=f"{correct / seen:.2f}", img_s=f"{rate:.1f}")
    left = (n_steps - steps) * elapsed / steps + (run.cfg.epochs - epoch) * n_steps * elapsed / steps
    spent = run.state.wall_seconds + elapsed
    run.files.update(state="running", epoch=epoch, epochs=run.cfg.epochs, step=steps, steps=n_steps,
                     loss={k: round(v / seen, 4) for k, v in sums.items()}, train_acc=round(correct / seen, 4),
                     images_per_s=round(rate, 2), eta_seconds=round(min(left, run.budget - spent), 1),
                     best_val_acc=run.state.best_val if run.state.best_val >= 0 else None, device=str(run.device), precision=run.precision)


def end_epoch(run: PaperRun, epoch: int, tally: dict, stop: dict):
    """Process 0 evaluates, saves resume.pt and the checkpoints, and writes the metrics; the clock counts it all."""
    state, cfg = run.state, run.cfg
    sums, seen = tally["sums"], tally["seen"]
    t_eval = time.perf_counter()
    val_acc, n_val = evaluate_accuracy(run.model, run.val_loader, run.autocast)
    state.eval_seconds = time.perf_counter() - t_eval
    epoch_seconds = time.perf_counter() - tally["t_epoch"]
    state.wall_seconds += epoch_seconds
    partial = bool(stop["reason"])
    if not stop["reason"] and state.wall_seconds + state.eval_seconds >= run.budget:
        stop["reason"] = "time budget"  # no room for another epoch's evaluation: end here, not one evaluation late
    row = {"epoch": epoch, **{k: round(v / seen, 5) for k, v in sums.items()}, "train_acc": round(tally["correct"] / seen, 5),
           "val_acc": None if math.isnan(val_acc) else round(val_acc, 5), "val_n": n_val,
           "images_per_s": round(seen * run.world / epoch_seconds, 2), "lr": run.optimizer.param_groups[0]["lr"],
           "train_minutes": round(state.train_seconds / 60, 3), "wall_minutes": round(state.wall_seconds / 60, 3),
           "skipped_images": tally["skipped"], "partial_epoch": partial}
    state.epoch = epoch
    state.history.append(row)
    score = row["val_acc"] if row["val_acc"] is not None else row["train_acc"]
    improved = score > state.best_val
    state.best_val = max(state.best_val, score)
    state.finished = epoch >= cfg.epochs or bool(stop["reason"])
    state.stop_reason = stop["reason"] or ("finished" if state.finished else "")
    extra = {"metrics": row, "class_count": len(run.snap.class_names), "train_images": len(run.train_items), "run_dir": str(run.run_dir),
             "train_config": asdict(cfg)}
    _save_epoch(run.run_dir, run.model, run.optimizer, state, run.snap.class_names, extra, improved)
    run.files.set_metrics(state.history)
    run.log(f"epoch {epoch}: loss {row['total']:.3f} (L_I {row['L_I']:.3f}, L_S {row['L_S']:.3f}, L_C {row['L_C']:.3f}), "
            f"train acc {row['train_acc']:.3f}, val acc {row['val_acc'] if row['val_acc'] is not None else '-'}, "
            f"{row['images_per_s']} img/s" + (f", skipped {tally['skipped']} unreadable photos" if tally["skipped"] else ""))


# -------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, log=print) -> dict:
    """The paper's recipe (see the module docstring); returns the run's summary."""
    run = PaperRun(cfg, log)
    if run.already_finished():
        st = run.state
        run.log(f"run {run.run_dir} already finished ({st.epoch} epochs, {st.stop_reason}); nothing to do")
        return {"run_dir": str(run.run_dir), "state": "finished", **(st.history[-1] if st.history else {})}
    run.setup()
    run.loaders()
    state, stop = run.state, {"reason": ""}
    run.log(f"device {run.device} ({run.world} process{'es' if run.world > 1 else ''}), precision {run.precision}"
            f"; {cfg.model} on {cfg.backbone}, {len(run.snap.class_names)} products, {len(run.train_items)} training / "
            f"{len(run.val_items)} validation photos")
    if run.feeding:
        run.log(run.feeding)
    if state.epoch:
        run.log(f"resuming after epoch {state.epoch} ({state.train_seconds / 60:.1f} min trained so far)")
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        tally = train_one_epoch(run, epoch, stop)
        if distributed.any_process(bool(stop["reason"]), run.device) and not stop["reason"]:
            stop["reason"] = "time budget"  # every process must stop together, or the others hang in all-reduce
        if stop["reason"] == "cancelled":
            run.log(f"cancelled during epoch {epoch}; the last complete epoch ({state.epoch}) is saved")
            break
        if tally["seen"] == 0:
            run.log("error: no readable training photos in this epoch")
            stop["reason"] = "no data"
            break
        if run.main:
            end_epoch(run, epoch, tally, stop)
        else:
            state.epoch = epoch
        if distributed.any_process(bool(stop["reason"]), run.device) and not stop["reason"]:
            stop["reason"] = "time budget"  # process 0's clock ended the run
        if stop["reason"]:
            run.log(f"stopped: {stop['reason']} after {state.wall_seconds / 60:.1f} min")
            break
    return _finish(run, stop)


def _finish(run: PaperRun, stop: dict) -> dict:
    state, cfg = run.state, run.cfg
    if run.main and state.finished and (run.run_dir / "best.safetensors").exists() and run.snap.val:
        from .openset import calibrate_checkpoint

        t = calibrate_checkpoint(run.run_dir / "best.safetensors", run.snap.val)
        run.log("unknown-product threshold: " + (f"{t:.3f} (max softmax keeping 95% of validation photos)" if t is not None
                                                 else "none (too few validation photos to calibrate: never answers 'unknown')"))
    final = "cancelled" if stop["reason"] == "cancelled" else ("failed" if stop["reason"] == "no data" else "finished")
    if final == "finished" and state.epoch < cfg.epochs and not stop["reason"]:
        final = "cancelled"
    run.files.update(state=final, epoch=state.epoch, epochs=cfg.epochs, best_val_acc=state.best_val if state.best_val >= 0 else None,
                     stop_reason=stop["reason"] or "finished", eta_seconds=0)
    distributed.finish()
    last = state.history[-1] if state.history else {}
    return {"run_dir": str(run.run_dir), "state": final, "best_val_acc": state.best_val, **last}


def _warm_start(model, checkpoint: str, class_names) -> str:
    """Copy every tensor whose name and shape match (the backbone; heads too when the products are the same)."""
    from ntsnet import load_checkpoint

    src = load_checkpoint(checkpoint)
    if src.config.backbone != model.config.backbone:
        raise ValueError(f"--init-from has backbone {src.config.backbone!r}, this run uses {model.config.backbone!r}")
    same_classes = src.class_names == list(class_names)
    own = model.state_dict()
    take = {k: v for k, v in src.state_dict.items() if k in own and own[k].shape == v.shape
            and (same_classes or not k.split(".")[0].endswith("_head"))}
    model.load_state_dict(take, strict=False)
    return f"warm start from {checkpoint}: {len(take)} of {len(own)} tensors" + ("" if same_classes else " (backbone only: other products)")


def _save_epoch(run_dir: Path, model, optimizer, state: RunState, class_names, extra, improved: bool):
    """resume.pt first (what a restart needs), then the user-facing checkpoints; each write is atomic."""
    payload = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "optimizer": optimizer.state_dict(), "state": asdict(state)}
    atomic_write(run_dir / "resume.pt", lambda tmp: torch.save(payload, tmp))
    save_checkpoint(run_dir / "last.safetensors", model, class_names, extra=extra)
    if improved:
        save_checkpoint(run_dir / "best.safetensors", model, class_names, extra=extra)
