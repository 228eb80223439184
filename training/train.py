"""Train NTS-Net (or the plain baseline) on a catalogue: resumable, checkpointed every epoch, DDP-ready.

    python -m training train --db data --out runs/first [--epochs 30 --max-minutes 40 ...]
    torchrun --nproc_per_node 2 -m training train ...      # DistributedDataParallel

RUN_DIR holds: config.json, snapshot.json (the frozen image list), resume.pt (model + optimizer, written
atomically at the end of every epoch), last.safetensors / best.safetensors (usable checkpoints),
metrics.jsonl (one line per epoch) and progress.json (live status for the job runner and the UI).
Running the same command again resumes from resume.pt; a finished run is not retrained.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ntsnet import NTSConfig, create_model, nts_loss, save_checkpoint
from ntsnet.checkpoint import atomic_write
from ntsnet.predictor import cpu_supports_fast_bf16, resolve_device
from ntsnet.runtime import keep_freed_memory, opencv_on_one_thread

from . import distributed
from .data import PhotoDataset, Snapshot, collate, take_snapshot


@dataclass
class TrainConfig:
    db: str = "data"
    out: str = "runs/run"
    model: str = "ntsnet"              # or "baseline" (plain classifier, paper Table 1)
    backbone: str = "efficientnet_lite0"  # paper: resnet50; Lite0 has offline weights and is 3.7x faster here
    pretrained: bool = True
    epochs: int = 30
    batch_size: int = 8
    input_size: int = 448              # paper 2.3
    part_size: int = 224
    proposal_num: int = 6              # M
    cat_num: int = 4                   # K
    lr: float = 0.001                  # paper: SGD, momentum 0.9, lr 0.001 fixed, weight decay 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    max_minutes: float | None = None   # training-time budget (evaluation excluded); stops mid-epoch if needed
    device: str = "auto"
    precision: str = "auto"            # auto | fp32 | bf16
    workers: int = 2
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


# ---------------------------------------------------------------------------------------- helpers
def choose_precision(device: torch.device, requested: str, bf16_on_cpu: bool = True) -> str:
    """Training precision for "auto": bf16 on a GPU that has it and, with ``bf16_on_cpu``, on a CPU with AMX
    (elsewhere bf16 trains slower than fp32, see ``cpu_supports_fast_bf16``), fp32 otherwise."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and bf16_on_cpu and cpu_supports_fast_bf16(training=True):
        return "bf16"
    return "fp32"


def _write_json(path: Path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


class Progress:
    """progress.json: what the job runner and the UI show while the run is alive."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path, self.enabled, self.data = run_dir / "progress.json", enabled, {}

    def update(self, **kw):
        if not self.enabled:
            return
        self.data.update(kw, updated=time.time(), pid=os.getpid())
        _write_json(self.path, self.data)


def _evaluate_accuracy(model, loader, device, autocast, channels_last) -> tuple[float, int]:
    model.eval()
    correct = total = 0
    with torch.inference_mode(), autocast():
        for x, y, _ in loader:
            if x is None:
                continue
            x = x.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            pred = model(x, num_parts=model.config.cat_num).concat_logits.argmax(1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    return (correct / total if total else float("nan")), total


# -------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, log=print) -> dict:
    world, rank, _ = distributed.info()
    main_proc = rank == 0
    log = log if main_proc else (lambda *a, **k: None)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_path = run_dir / "resume.pt"

    state = RunState()
    if resume_path.exists():
        saved = torch.load(resume_path, map_location="cpu", weights_only=True)  # our own file, still no pickle
        state = RunState(**saved["state"])
        if state.finished and state.epoch >= cfg.epochs:
            log(f"run {run_dir} already finished ({state.epoch} epochs, {state.stop_reason}); nothing to do")
            return {"run_dir": str(run_dir), "state": "finished", **(state.history[-1] if state.history else {})}
        state.finished = False
    else:
        saved = None

    device = distributed.start(resolve_device(cfg.device))
    precision = choose_precision(device, cfg.precision)
    if device.type == "cpu":
        keep_freed_memory()  # DataLoader workers fork after this and inherit it
    opencv_on_one_thread()  # inherited by the workers too
    channels_last = device.type == "cpu"  # oneDNN is faster in NHWC in fp32 too (1.3x on AVX2, benchmarks/train_throughput.py)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    # snapshot: frozen at the first start, reused on resume
    snap_path = run_dir / "snapshot.json"
    if main_proc and not snap_path.exists():
        take_snapshot(cfg.db, exclude=[p.strip() for p in cfg.exclude_products.split(",") if p.strip()]).save(snap_path)
        _write_json(run_dir / "config.json", asdict(cfg))
    distributed.barrier()
    snap = Snapshot.load(snap_path)
    train_items = snap.train[: cfg.max_train_images] if cfg.max_train_images else snap.train
    val_items = snap.val or snap.test

    model_cfg = NTSConfig(model=cfg.model, backbone=cfg.backbone, num_classes=len(snap.class_names), input_size=cfg.input_size,
                          part_size=cfg.part_size, proposal_num=cfg.proposal_num, cat_num=cfg.cat_num)
    torch.manual_seed(cfg.seed)  # the new heads' initial weights
    model = create_model(model_cfg, pretrained=cfg.pretrained and saved is None)
    if saved is not None:
        model.load_state_dict(saved["model"])
    elif cfg.init_from:
        log(_warm_start(model, cfg.init_from, snap.class_names))
    model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
    net = distributed.wrap(model, device)

    progress = Progress(run_dir, main_proc)
    stop = {"reason": ""}
    cancel_file = run_dir / "CANCEL"

    def on_signal(signum, frame):
        stop["reason"] = "cancelled"

    with contextlib.suppress(ValueError):  # only possible in the main thread
        signal.signal(signal.SIGTERM, on_signal)

    log(f"device {device} ({world} process{'es' if world > 1 else ''}), precision {precision}"
        + (" autocast + channels_last" if channels_last else "") + f"; {cfg.model} on {cfg.backbone}, "
        f"{len(snap.class_names)} products, {len(train_items)} training / {len(val_items)} validation photos")
    if state.epoch:
        log(f"resuming after epoch {state.epoch} ({state.train_seconds / 60:.1f} min trained so far)")

    train_ds = PhotoDataset(train_items, cfg.input_size, train=True, seed=cfg.seed, mean=model.mean, std=model.std)
    val_ds = PhotoDataset(val_items, cfg.input_size, train=False, mean=model.mean, std=model.std)
    loader_kw = dict(batch_size=cfg.batch_size, collate_fn=collate, num_workers=cfg.workers, persistent_workers=False)
    val_loader = torch.utils.data.DataLoader(val_ds, shuffle=False, **loader_kw)
    budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    # metrics.jsonl mirrors the saved state: drop lines of epochs a crash lost
    metrics_path = run_dir / "metrics.jsonl"
    if main_proc:
        _write_json_lines(metrics_path, state.history)

    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        train_ds.epoch = epoch
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout and anything else random: reproducible on resume
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)).tolist()
        order = distributed.shard(order, world, rank)
        drop_last = len(order) > cfg.batch_size  # BatchNorm cannot train on a batch of one
        loader = torch.utils.data.DataLoader(train_ds, sampler=order, drop_last=drop_last, **loader_kw)
        net.train()
        sums = {"total": 0.0, "L_I": 0.0, "L_S": 0.0, "L_C": 0.0}
        seen = correct = skipped = steps = 0
        t_epoch = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not main_proc, leave=True)
        for x, y, n_skipped in bar:
            skipped += n_skipped
            if cancel_file.exists():
                stop["reason"] = "cancelled"
            if stop["reason"]:
                break
            if x is None:
                continue
            t0 = time.perf_counter()
            x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                out = net(x)
            losses = nts_loss(out, y, model_cfg, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            state.train_seconds += time.perf_counter() - t0
            steps += 1
            seen += len(y)
            correct += int((out.concat_logits.argmax(1) == y).sum())
            for k in sums:
                sums[k] += float(losses[k].detach()) * len(y)
            rate = seen * world / max(time.perf_counter() - t_epoch, 1e-9)
            bar.set_postfix(loss=f"{sums['total'] / seen:.3f}", L_I=f"{sums['L_I'] / seen:.2f}", L_S=f"{sums['L_S'] / seen:.2f}",
                            L_C=f"{sums['L_C'] / seen:.2f}", acc=f"{correct / seen:.2f}", img_s=f"{rate:.1f}")
            if steps % 5 == 0 or steps == len(loader):
                left = (len(loader) - steps) * (time.perf_counter() - t_epoch) / steps
                left += (cfg.epochs - epoch) * len(loader) * (time.perf_counter() - t_epoch) / steps
                progress.update(state="running", epoch=epoch, epochs=cfg.epochs, step=steps, steps=len(loader),
                                loss={k: round(v / seen, 4) for k, v in sums.items()}, train_acc=round(correct / seen, 4),
                                images_per_s=round(rate, 2), eta_seconds=round(min(left, budget - state.train_seconds), 1),
                                best_val_acc=state.best_val if state.best_val >= 0 else None, device=str(device), precision=precision)
            if state.train_seconds >= budget:
                stop["reason"] = "time budget"
                break
        if world > 1:  # every process must agree to stop, or the others hang in all-reduce
            flag = torch.tensor([1.0 if stop["reason"] else 0.0], device=device)
            dist.all_reduce(flag)
            if flag.item() and not stop["reason"]:
                stop["reason"] = "time budget"
        if stop["reason"] == "cancelled":
            log(f"cancelled during epoch {epoch}; the last complete epoch ({state.epoch}) is saved")
            break
        if seen == 0:
            log("error: no readable training photos in this epoch")
            stop["reason"] = "no data"
            break
        if main_proc:
            val_acc, n_val = _evaluate_accuracy(model, val_loader, device, autocast, channels_last)
            epoch_seconds = time.perf_counter() - t_epoch
            row = {"epoch": epoch, **{k: round(v / seen, 5) for k, v in sums.items()}, "train_acc": round(correct / seen, 5),
                   "val_acc": None if math.isnan(val_acc) else round(val_acc, 5), "val_n": n_val,
                   "images_per_s": round(seen * world / epoch_seconds, 2), "lr": optimizer.param_groups[0]["lr"],
                   "train_minutes": round(state.train_seconds / 60, 3), "skipped_images": skipped, "partial_epoch": bool(stop["reason"])}
            state.epoch = epoch
            state.history.append(row)
            score = row["val_acc"] if row["val_acc"] is not None else row["train_acc"]
            improved = score > state.best_val
            state.best_val = max(state.best_val, score)
            state.finished = epoch >= cfg.epochs or bool(stop["reason"])
            state.stop_reason = stop["reason"] or ("finished" if state.finished else "")
            extra = {"metrics": row, "class_count": len(snap.class_names), "train_images": len(train_items), "run_dir": str(run_dir),
                     "train_config": asdict(cfg)}
            _save_epoch(run_dir, model, optimizer, state, snap.class_names, extra, improved)
            _write_json_lines(metrics_path, state.history)
            log(f"epoch {epoch}: loss {row['total']:.3f} (L_I {row['L_I']:.3f}, L_S {row['L_S']:.3f}, L_C {row['L_C']:.3f}), "
                f"train acc {row['train_acc']:.3f}, val acc {row['val_acc'] if row['val_acc'] is not None else '-'}, "
                f"{row['images_per_s']} img/s" + (f", skipped {skipped} unreadable photos" if skipped else ""))
        else:
            state.epoch = epoch
        distributed.barrier()
        if stop["reason"]:
            log(f"stopped: {stop['reason']} after {state.train_seconds / 60:.1f} min of training")
            break

    if main_proc and state.finished and (run_dir / "best.safetensors").exists() and snap.val:
        from .openset import calibrate_checkpoint

        t = calibrate_checkpoint(run_dir / "best.safetensors", snap.val)
        log("unknown-product threshold: " + (f"{t:.3f} (max softmax keeping 95% of validation photos)" if t is not None
                                             else "none (too few validation photos to calibrate: never answers 'unknown')"))
    final = "cancelled" if stop["reason"] == "cancelled" else ("failed" if stop["reason"] == "no data" else "finished")
    if final == "finished" and state.epoch < cfg.epochs and not stop["reason"]:
        final = "cancelled"
    progress.update(state=final, epoch=state.epoch, epochs=cfg.epochs, best_val_acc=state.best_val if state.best_val >= 0 else None,
                    stop_reason=stop["reason"] or "finished", eta_seconds=0)
    distributed.finish()
    last = state.history[-1] if state.history else {}
    return {"run_dir": str(run_dir), "state": final, "best_val_acc": state.best_val, **last}


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


def _write_json_lines(path: Path, rows):
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))


def _save_epoch(run_dir: Path, model, optimizer, state: RunState, class_names, extra, improved: bool):
    """resume.pt first (what a restart needs), then the user-facing checkpoints; each write is atomic."""
    payload = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "optimizer": optimizer.state_dict(), "state": asdict(state)}
    atomic_write(run_dir / "resume.pt", lambda tmp: torch.save(payload, tmp))
    save_checkpoint(run_dir / "last.safetensors", model, class_names, extra=extra)
    if improved:
        save_checkpoint(run_dir / "best.safetensors", model, class_names, extra=extra)
