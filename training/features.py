"""Frozen-backbone features and what is built from them: the instant model's prototypes and stage 1's linear head."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ntsnet.device import device_of, inference_batch
from ntsnet.images import normalise_batch, to_input_tensor
from ntsnet.whitening import Whitening, whitened_prototypes

from .data import load_rgb
from .feeding import as_model_input


def load_arrays(items, paths: list | None = None) -> tuple[list[np.ndarray], list[int]]:
    """The readable photos of snapshot ``items`` as RGB arrays, and their labels; ``paths``: a list that gets each
    kept photo's path."""
    arrays, labels = [], []
    for it in items:
        im = load_rgb(it["path"])
        if im is not None:
            arrays.append(np.array(im))
            labels.append(it["label"])
            if paths is not None:
                paths.append(it["path"])
    return arrays, labels


@torch.inference_mode()
def embed_batches(backbone, batches, engine=None) -> torch.Tensor:
    """(N, C) pooled backbone features (on the CPU) of model-input batches (or uint8 ones, normalised where the
    backbone runs), computed on the backbone's device; ``engine``: compiled CPU graphs, if any."""
    out = []
    for x in batches:
        if engine is not None:
            out.append(engine.run("pooled", normalise_batch(x, backbone.mean, backbone.std) if x.dtype == torch.uint8 else x)[0])
        else:
            out.append(backbone(as_model_input(backbone, x)).float().mean((2, 3)))
    return torch.cat(out).cpu() if out else torch.zeros(0, backbone.out_channels)  # one read-back, at the end


def pooled_features(backbone, arrays, size: int, engine=None, batch: int = 32) -> torch.Tensor:
    """(N, C) pooled backbone features of RGB arrays resized to ``size`` (see embed_batches); larger batches on a GPU."""
    device = device_of(backbone) if engine is None else torch.device("cpu")
    batch = inference_batch(device, batch)
    chunks = (to_input_tensor(arrays[i:i + batch], size, backbone.mean, backbone.std, device=device) for i in range(0, len(arrays), batch))
    return embed_batches(backbone, chunks, engine)


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, C): each class's mean of its L2-normalised features, normalised again (zeros for a class
    without photos)."""
    unit = F.normalize(features, dim=1)
    protos = torch.stack([unit[labels == c].mean(0) if (labels == c).any() else torch.zeros(unit.shape[1])
                          for c in range(num_classes)])
    return F.normalize(protos, dim=1)


def imprinted_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.nn.Linear:
    """A linear head whose argmax equals the plain (unwhitened) prototype classifier's: each class's weight is its
    prototype, scaled so that logits span a useful range (cosine x ~10). A starting point for fitting: the instant
    model's whitened rule is not linear in the raw features."""
    head = torch.nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(class_prototypes(features, labels, num_classes) * (10.0 / features.norm(dim=1).mean().clamp_min(1e-6)))
        head.bias.zero_()
    return head


def prototype_predictions(train_feats, train_labels, feats, num_classes) -> torch.Tensor:
    """The instant model's rule (ntsnet/instant.py): highest cosine similarity to a product's prototype, both
    whitened by the training photos' statistics (ntsnet/whitening.py)."""
    bank = F.normalize(train_feats.float(), dim=1).numpy()
    whiten = Whitening(bank)
    protos = whitened_prototypes(whiten, bank, np.asarray(train_labels), range(num_classes))
    return torch.from_numpy(whiten(F.normalize(feats.float(), dim=1).numpy()) @ protos.T).argmax(1)


def prototype_accuracy(train_feats, train_labels, feats, labels, num_classes) -> float:
    """The instant model's top-1 accuracy as correct / n, the same exact fraction a stage's evaluation gives: a
    float32 mean can round a tie up, and the stage that ties the instant model would lose the gate."""
    if not len(labels):
        return float("nan")
    hits = prototype_predictions(train_feats, train_labels, feats, num_classes) == torch.as_tensor(labels)
    return int(hits.sum()) / len(labels)


def fit_head(head: torch.nn.Linear, feats: torch.Tensor, labels: torch.Tensor, steps: int = 300, lr: float = 0.01,
             weight_decay: float = 1e-3, label_smoothing: float = 0.1) -> torch.nn.Linear:
    """AdamW on cached features with a cosine schedule, 4096 features a step."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randperm(len(labels), generator=g)[:4096]
        loss = F.cross_entropy(head(feats[idx]), labels[idx], label_smoothing=label_smoothing)
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
    return head
