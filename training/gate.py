"""The bar every stage must clear: what answers now (the instant model, or the active trained model), measured on
this run's validation photos, or on photos the active model never trained on when it trained on some of them.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from . import active
from .answers import accuracy_by_name
from .data import Snapshot
from .features import load_arrays, pooled_features, prototype_accuracy


def photos_trained_on(extra: dict) -> set[str] | None:
    """The photos (catalogue paths: content-addressed, so a path is always the same pixels) a model of this project
    trained on: its run's training photos, and its validation photos too for a refit; None when that is unknown."""
    snap_path = Path(str(extra.get("run_dir", ""))) / "snapshot.json"
    if not extra.get("run_dir") or not snap_path.exists():
        return None
    snap = Snapshot.load(snap_path)
    return {it["path"] for split in extra.get("trained_on", ["train"]) for it in getattr(snap, split, [])}


def unseen_photos(seen: set, val_paths, val_arrays, val_labels, test_items):
    """The validation photos a model never trained on, or else the test photos it never trained on, as
    (arrays, labels, description); None when it trained on all of them."""
    keep = [i for i, p in enumerate(val_paths) if p not in seen]
    if keep:
        return [val_arrays[i] for i in keep], [val_labels[i] for i in keep], f"the {len(keep)} validation photos it never trained on"
    arrays, labels = load_arrays([it for it in test_items if it["path"] not in seen])
    return (arrays, labels, f"{len(labels)} test photos it never trained on") if labels else None


class FrozenFeatures:
    """The frozen ImageNet backbone on the training device, and its pooled features of the clean training photos
    (stage 1 reuses them); ``engine``: compiled CPU graphs where OpenVINO is installed."""

    def __init__(self, run):
        from ntsnet import create_backbone

        torch.manual_seed(run.cfg.seed)
        backbone = create_backbone(run.cfg.backbone, pretrained=run.cfg.pretrained).eval()
        self.backbone = run.on_device(backbone)
        self.engine = None
        if run.device.type == "cpu":
            with contextlib.suppress(Exception):  # compiled features when OpenVINO is there; eager otherwise
                from ntsnet import compiled

                self.engine = compiled.embedder_graphs(self.backbone, run.size, compiled.state_key(self.backbone, "embedder", run.size))
        self.size = run.size
        self.t0 = time.perf_counter()
        self.train = self(run.train_arrays)
        self.y_train = torch.as_tensor(run.train_labels)

    def __call__(self, arrays) -> torch.Tensor:
        return pooled_features(self.backbone, arrays, self.size, self.engine)

    def release_engine(self):
        self.engine = None


def measure_bar(run) -> None:
    """Load the run's photos (process 0) and set ``run.bar`` / ``bar_name`` / ``gate`` / ``instant_acc``."""
    from ntsnet import create_backbone

    if not run.main:  # under torchrun the others get their photos from the dataset and their weights from DDP
        torch.manual_seed(run.cfg.seed)
        run.backbone = create_backbone(run.cfg.backbone, pretrained=run.cfg.pretrained).eval()
        return
    run.progress(stage="loading photos")
    run.train_arrays, run.train_labels = load_arrays(run.snap.train)
    run.val_arrays, run.val_labels = load_arrays(run.snap.val or run.snap.test, run.val_paths)
    if len(set(run.train_labels)) < 2:
        raise ValueError("training needs readable photos of at least two products")
    run.features = FrozenFeatures(run)
    run.backbone = run.features.backbone
    val_feats = run.features(run.val_arrays)
    run.instant_acc = prototype_accuracy(run.features.train, run.features.y_train, val_feats, torch.as_tensor(run.val_labels), run.n_cls)
    run.bar, run.bar_name = run.instant_acc, "instant model"
    _compare_with_active_model(run)
    run.files.progress.update(instant_val_acc=run.instant_acc,
                              bar={"val_acc": run.bar, "model": run.bar_name, **({"photos": run.gate[2]} if run.gate else {})})
    where = run.gate[2] if run.gate else f"{len(run.val_labels)} validation photos"
    run.log(f"to beat: {run.bar_name} at {run.bar:.1%} on {where} (instant model {run.instant_acc:.1%} on the validation photos)")


def _compare_with_active_model(run) -> None:
    """Raise the bar to the active trained model's accuracy, measured on photos it never trained on."""
    current = active.read(run.cfg.db)
    if not current or str(current["checkpoint"]).startswith("hf://") or not Path(current["checkpoint"]).exists():
        return
    try:
        from ntsnet import Predictor

        prev = Predictor.from_checkpoint(current["checkpoint"], backend="torch", device=str(run.device))
        seen = photos_trained_on(prev.extra) or set()
        if any(p in seen for p in run.val_paths):
            # it trained on some of these photos (a refit, or splits drawn anew): the active model, the instant model
            # and every stage are compared on photos it never saw, else it would look better than it is
            run.gate = unseen_photos(seen, run.val_paths, run.val_arrays, run.val_labels, run.snap.test)
            if run.gate is None:
                run.log("the active model trained on every validation and test photo: comparing with the instant model")
                prev_acc = -1.0
            else:
                feats = run.features(run.gate[0])
                run.bar = prototype_accuracy(run.features.train, run.features.y_train, feats, run.gate[1], run.n_cls)
                prev_acc = accuracy_by_name(prev, run.gate[0], run.gate[1], run.names)
                run.log(f"comparing on {run.gate[2]}: instant model {run.bar:.1%}, active model {prev_acc:.1%}")
        else:
            prev_acc = accuracy_by_name(prev, run.val_arrays, run.val_labels, run.names)
        if prev_acc > run.bar:
            run.bar, run.bar_name = prev_acc, f"active model {active.short_name(current['checkpoint'])}"
    except Exception as exc:  # an unreadable active model is no bar to clear
        run.log(f"could not measure the active model ({exc}); comparing with the instant model")
