"""ProgressiveRun: the state the Train button's stages share (the bar to beat, the best so far, each stage's start,
the run's files and clock), and the one rule that decides which model answers.

The stages (training/stages/) read and update it; tests build one and call the stages on it directly. Its hooks
``judge``, ``evaluate``, ``loss`` and ``mix`` are the functions that score, evaluate, compute the loss and mix
batches, replaceable on an instance.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ntsnet import NTSConfig, create_model, nts_loss, save_checkpoint
from ntsnet.checkpoint import atomic_write
from ntsnet.device import autocast_for, resolve_device, tune_for_fixed_shapes
from ntsnet.runtime import keep_freed_memory, opencv_on_one_thread

from . import active, distributed, gate
from .answers import choose_test_size, evaluate_model, selection_accuracy
from .cutmix import cutmix
from .data import Snapshot, take_snapshot
from .feeding import resolve_feeding
from .fit import FitContext, StagePlan, fit
from .openset import threshold_record
from .progressive import STAGES, ProgressiveConfig, auto_minutes
from .runfiles import CancelFlag, RunFiles
from .train import choose_precision


def resolve_freeze_stride(requested: int | None, device: torch.device) -> int:
    """None: 8 on a CPU (the early, high-resolution layers cost half of a training step there and change least in
    fine-tuning), 0 (train everything) on a GPU."""
    if requested is None:
        return 0 if device.type == "cuda" else 8
    return requested


class ProgressiveRun:
    judge = staticmethod(selection_accuracy)   # a model's score while it trains
    evaluate = staticmethod(evaluate_model)    # (accuracy, scores) of a model's own answer
    loss = staticmethod(nts_loss)
    mix = staticmethod(cutmix)

    def __init__(self, cfg: ProgressiveConfig, log=print):
        self.cfg, self.stages = cfg, cfg.stage_list()
        device = resolve_device(cfg.device)
        cfg.freeze_stride = resolve_freeze_stride(cfg.freeze_stride, device)
        self.world, rank, _ = distributed.info()
        self.main = rank == 0
        # the others wait while process 0 alone runs stage 1 and measures test sizes: minutes on a CPU
        self.device = distributed.start(device, timeout_minutes=max(60.0, 2 * (cfg.max_minutes or 30)))
        self.log = log if self.main else (lambda *a, **k: None)
        self.run_dir = Path(cfg.out)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.t_job = time.perf_counter()
        self.stop = CancelFlag(self.run_dir)
        if self.device.type == "cpu":
            keep_freed_memory()
        tune_for_fixed_shapes(self.device)
        opencv_on_one_thread()  # before the first DataLoader forks its workers
        # "auto" on a CPU means fp32 even with AMX: this job's training ran slower in bf16 there (benchmarks/RESULTS.md)
        self.precision = choose_precision(self.device, cfg.precision, bf16_on_cpu=False)
        self.autocast = autocast_for(self.device, self.precision)
        self.files = RunFiles(self.run_dir, enabled=self.main, clock_start=self.t_job)
        size = cfg.input_size or (448 if self.device.type == "cuda" else 224)
        feeding = resolve_feeding(cfg, self.device, cfg.backbone, max(size, cfg.ntsnet_size or size), cpu_batch=16,
                                  world=self.world, local_world=distributed.local_world())
        self.snap = self._snapshot()
        self.names, self.n_cls = self.snap.class_names, len(self.snap.class_names)
        self.budget = (cfg.max_minutes if cfg.max_minutes is not None else auto_minutes(len(self.snap.train))) * 60
        self.size = cfg.input_size or (448 if self.device.type == "cuda" else 224)
        self.results: list[dict] = []
        self.bar, self.bar_name, self.gate, self.instant_acc = float("nan"), "", None, float("nan")
        self.train_arrays, self.train_labels, self.val_arrays, self.val_labels, self.val_paths = [], [], [], [], []
        self.backbone = self.features = None
        self.best_path, self.winner = None, None  # winner: this run's best end-to-end stage, what a refit trains again
        self.starts: dict = {}                     # stage -> (start weights, seconds, model config, head lr mult, CutMix share)
        self.finetune_speed, self.sizes_seconds = None, 0.0
        val_items = self.snap.val or self.snap.test
        self.files.progress.update(state="running", recipe="progressive", stages=self.stages, stage="", results=self.results,
                                   budget_seconds=round(self.budget), products=self.n_cls, train_images=len(self.snap.train),
                                   val_images=len(val_items), device=str(self.device), precision=self.precision, processes=self.world)
        self.log(f"progressive training: {self.n_cls} products, {len(self.snap.train)} training / {len(val_items)} validation photos, "
                 f"budget {self.budget / 60:.1f} min, stages {' -> '.join(self.stages)}, device {self.device} {self.precision}")
        if feeding:
            self.log(feeding)

    def _snapshot(self) -> Snapshot:
        snap_path = self.run_dir / "snapshot.json"
        if self.main:
            if not snap_path.exists():
                exclude = [p.strip() for p in self.cfg.exclude_products.split(",") if p.strip()]
                take_snapshot(self.cfg.db, exclude=exclude).save(snap_path)
            self.files.write_config({**asdict(self.cfg), "recipe": "progressive", "model": "progressive", "processes": self.world})
        distributed.barrier()
        return Snapshot.load(snap_path)

    # ------------------------------------------------------------------------------------------ clock and files
    def left(self) -> float:
        """Seconds of the budget left, wall clock: evaluations and exports count."""
        return self.budget - (time.perf_counter() - self.t_job)

    def progress(self, **kw):
        self.files.update(**{"eta_seconds": round(max(0.0, self.left()), 1), **kw})

    def record(self, rows):
        self.files.add_metrics(rows)

    def minutes(self) -> float:
        return round((time.perf_counter() - self.t_job) / 60, 2)

    # ----------------------------------------------------------------------------------------------- training
    def measure_bar(self):
        """Load the photos and measure what answers now: the bar every stage must clear (training/gate.py)."""
        gate.measure_bar(self)

    def on_device(self, model):
        """The model on the training device; NHWC on a CPU (oneDNN is faster in it, in fp32 too)."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.device.type == "cpu" else model

    def classifier(self, size: int | None = None):
        """The plain classifier (stages 1-2) on a copy of the frozen backbone's weights, head still to be set."""
        model = create_model(NTSConfig(model="baseline", backbone=self.cfg.backbone, num_classes=self.n_cls, input_size=size or self.size,
                                       cat_num=0, proposal_num=1), pretrained=False)
        model.backbone.load_state_dict(self.backbone.state_dict())
        return model

    def stage_loss(self, config: NTSConfig):
        return lambda out, y: self.loss(out, y, config, label_smoothing=self.cfg.label_smoothing)

    def fit(self, model, plan: StagePlan):
        ctx = FitContext(self.cfg, self.device, self.autocast, self.stop, self.progress, self.log, self.judge, self.mix)
        return fit(model, plan, ctx)

    def starts_stage(self, stage: str) -> bool:
        """Stages 2-3 start unless cancelled; with a minimum of steps even when the budget is spent."""
        return stage in self.stages and bool(distributed.agree(not self.stop and (self.left() > 3 or self.cfg.min_steps > 0), self.device))

    def remember_start(self, stage: str, model, seconds: float, head_lr_mult, cutmix_share: float):
        """What a refit of this stage repeats: its starting weights, seconds, config, head rate and CutMix share."""
        self.starts[stage] = (copy.deepcopy(model.state_dict()) if self.main else None, seconds, model.config, head_lr_mult, cutmix_share)

    def trained_size(self, stage: str) -> int:
        """The input size a stage trained at (its saved model answers at its best test size)."""
        return self.starts[stage][2].input_size if stage in self.starts else self.size

    def answering_model(self, model, acc, trained):
        """A trained stage at its best test size; one that never beat its start (not proposed) as it is."""
        if trained:
            return choose_test_size(model, self.val_arrays, self.val_labels, self.log)
        return model, acc, self.evaluate(model, self.val_arrays, self.val_labels)[1], None

    # -------------------------------------------------------------------------------------- which model answers
    def promote(self, path: Path, acc: float, to_beat: float, **info) -> tuple[bool, str]:
        """The run's best so far: best.safetensors, its export built, then proposed as the catalogue's active model."""
        self.best_path = path
        atomic_write(self.run_dir / "best.safetensors", lambda tmp: Path(tmp).write_bytes(path.read_bytes()))
        if not self.cfg.activate:
            return False, "activation off"
        if self.device.type == "cpu":  # the compiled export is a CPU speed trick
            _prebuild_export(path, self.log)
        return active.propose(self.cfg.db, path, acc, to_beat, **info)

    def _extra(self, stage: str, scores, **more) -> dict:
        return {"stage": stage, "class_count": self.n_cls, "run_dir": str(self.run_dir), "train_config": asdict(self.cfg),
                "unknown_threshold": threshold_record(scores), **more}

    def finish_stage(self, stage, model, acc, scores, trained=True, sizes=None):
        """Save the stage and propose it if it clears the bar. ``trained`` False: its best weights are the ones it
        started from (the same answers as the model before it), so it is saved but not proposed."""
        gate_acc = acc if self.gate is None else self.evaluate(model, self.gate[0], self.gate[1])[0]
        path = self.run_dir / f"stage{STAGES.index(stage) + 1}-{stage}.safetensors"
        save_checkpoint(path, model, self.names, extra=self._extra(
            stage, scores, metrics={"val_acc": acc, "val_n": len(self.val_labels)}, train_images=len(self.snap.train),
            train_input_size=self.trained_size(stage), test_sizes=sizes))
        if not trained:
            switched, verdict = False, f"kept {self.bar_name}: training never beat the stage's starting point ({acc:.1%})"
        elif gate_acc >= self.bar:
            switched, verdict = self.promote(path, gate_acc, self.bar, val_n=len(self.val_labels), stage=stage)
            self.bar, self.bar_name = gate_acc, f"stage {stage}"
            if stage != "linear":
                self.winner = {"stage": stage, "model": model, "path": path, "active": switched}
        else:
            switched, verdict = False, f"kept {self.bar_name} ({gate_acc:.1%} < {self.bar:.1%})"
        self.results.append({"stage": stage, "val_acc": acc, "active": switched, "verdict": verdict, "checkpoint": str(path),
                             "input_size": model.config.input_size, "answer": model.config.answer, "test_sizes": sizes,
                             **({"gate": {"acc": gate_acc, "photos": self.gate[2]}} if self.gate else {}), "minutes": self.minutes()})
        self.log(f"stage {stage}: validation accuracy {acc:.1%}: {verdict}")
        self.progress()

    def finish_refit(self, model, of: str, test_arrays, test_labels):
        """The refit replaces the winner if it is at least as accurate on the test photos (neither trained on them)."""
        win_acc = self.evaluate(self.winner["model"], test_arrays, test_labels)[0]
        acc, scores = self.evaluate(model, test_arrays, test_labels)
        path = self.run_dir / f"stage4-refit-{of}.safetensors"  # short name "run-... / refit-ntsnet": which model it is
        save_checkpoint(path, model, self.names, extra=self._extra(
            "refit", scores, refit_of=of, trained_on=["train", "val"], train_input_size=self.trained_size(of),
            metrics={"test_acc": acc, "test_n": len(test_labels), "replaced_test_acc": win_acc},
            train_images=len(self.snap.train) + len(self.snap.val)))
        switched = False
        if acc < win_acc:
            verdict = f"kept stage {of} ({acc:.1%} < {win_acc:.1%} on {len(test_labels)} test photos)"
        elif not self.winner["active"]:
            verdict = f"stage {of} was not made active, so neither is its refit"
        else:
            switched, verdict = self.promote(path, acc, win_acc, test_n=len(test_labels), stage="refit", measured_on="test")
        self.results.append({"stage": "refit", "refit_of": of, "val_acc": None, "test_acc": acc, "test_n": len(test_labels),
                             "compared_with": {"stage": of, "test_acc": win_acc}, "active": switched, "verdict": verdict,
                             "checkpoint": str(path), "input_size": model.config.input_size, "answer": model.config.answer,
                             "minutes": self.minutes()})
        self.log(f"refit of {of}: {acc:.1%} on the test photos ({of}: {win_acc:.1%}): {verdict}")
        self.progress()

    def finish(self) -> dict:
        final = "cancelled" if distributed.agree(bool(self.stop), self.device) else "finished"
        distributed.finish()
        self.progress(state=final, stage="done", eta_seconds=0, stage_seconds_left=0)
        self.log(f"{final} after {(time.perf_counter() - self.t_job) / 60:.1f} min; "
                 + "; ".join(f"{r['stage']} {r['val_acc'] if r['val_acc'] is not None else r['test_acc']:.1%}{' (active)' if r['active'] else ''}"
                             for r in self.results))
        return {"run_dir": str(self.run_dir), "state": final, "results": self.results, "instant_val_acc": self.instant_acc,
                "best_checkpoint": str(self.best_path) if self.best_path else None}


def _prebuild_export(path: Path, log):
    """Compile the inference export before the app sees the model, so its first live frame does not wait."""
    try:
        from ntsnet import Predictor

        p = Predictor.from_checkpoint(path, background=False, device="cpu")
        if p.engine is None and p.build_error:
            log(f"compiled export not built ({p.build_error}); the app will answer with eager PyTorch")
    except Exception as exc:  # never let the export cost the model
        log(f"compiled export not built ({exc})")
