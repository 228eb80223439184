"""Stage 1 (seconds): a linear head on the frozen backbone's pooled features of several augmented views of each
photo, initialised from the products' prototypes (weight imprinting), then fitted. The views are framed, flipped, lit and coloured, never darkened, blurred or
shrunk: frozen features cannot learn to see through those, so such views only add noise to the head.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from ntsnet.images import resize_batch

from ..data import store_augment
from ..features import embed_batches, fit_head, imprinted_head

VIEW_SHARE = 0.05  # augmenting costs as much as the features: views until this share of the budget is spent


class AugmentedViews(torch.utils.data.Dataset):
    """View ``view`` of every photo, resized; randomness from (seed, view, photo), so any number of
    DataLoader workers gives the same views."""

    def __init__(self, arrays, size: int, seed: int, view: int):
        self.arrays, self.size, self.seed, self.view = arrays, size, seed, view

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        """(3, size, size) uint8: a quarter of float's bytes through the workers' shared memory; normalised where
        the backbone runs (embed_batches)."""
        rng = np.random.default_rng([self.seed, 99, self.view, i])
        aug = np.array(store_augment(Image.fromarray(self.arrays[i]), rng, degrade=False))
        return resize_batch([aug], self.size)[0]


def view_features(run, view: int) -> torch.Tensor:
    """Pooled features of one augmented view of every training photo. On a GPU DataLoader workers prepare the views
    while the backbone embeds; on a CPU the main process does both (the cores are the backbone's)."""
    feats = run.features
    ds = AugmentedViews(run.train_arrays, run.size, run.cfg.seed, view)
    on_gpu = run.device.type == "cuda"
    loader = torch.utils.data.DataLoader(ds, batch_size=128 if on_gpu else 32, num_workers=run.cfg.workers if on_gpu else 0,
                                         pin_memory=on_gpu)
    return embed_batches(feats.backbone, loader, feats.engine)


def run(run) -> torch.nn.Module | None:
    """Stage 1 on process 0; returns the classifier (frozen backbone + fitted head), or None when not asked for."""
    if "linear" not in run.stages or not run.main:
        if run.features is not None:
            run.features.release_engine()
        return None
    run.progress(stage="linear")
    feats, cfg = run.features, run.cfg
    all_feats, labels, t_views, views = [feats.train], [feats.y_train], time.perf_counter(), 1
    for v in range(1, cfg.views):
        per_view = (time.perf_counter() - t_views) / max(1, v - 1) if v > 1 else 0.0
        if v > 1 and (time.perf_counter() - feats.t0) + per_view > VIEW_SHARE * run.budget:
            break
        run.progress(stage="linear", step=v, steps=cfg.views, stage_seconds_left=round(per_view * (cfg.views - v)))
        all_feats.append(view_features(run, v))
        labels.append(feats.y_train)
        views += 1
        if run.stop:
            break
    feats.release_engine()
    head = imprinted_head(feats.train, feats.y_train, run.n_cls)
    head = fit_head(head, torch.cat(all_feats), torch.cat(labels), label_smoothing=cfg.label_smoothing)
    classifier = run.on_device(run.classifier())
    classifier.raw_head.load_state_dict(head.state_dict())
    acc, scores = run.evaluate(classifier, run.val_arrays, run.val_labels)
    seconds = time.perf_counter() - feats.t0
    run.record([{"stage": "linear", "total": 0.0, "L_I": 0.0, "L_S": 0.0, "L_C": 0.0, "train_acc": None, "val_acc": round(acc, 5),
                 "val_n": len(run.val_labels), "views": views, "seconds": round(seconds, 1)}])
    run.log(f"linear: {views} views of {len(run.train_arrays)} photos in {seconds:.0f} s")
    run.finish_stage("linear", classifier, acc, scores)
    return classifier
