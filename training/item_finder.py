"""Train the item finder (ntsnet/item_finder.py) on composites of the catalogue's own photos on the learnt counter.

``train_item_finder(photos, backgrounds)``: each composite is one of the ``backgrounds`` (an empty counter and the
``Counter`` learnt from it) with 1-8 of the photos put down on it, apart or touching, and relit; its foreground is
what that counter sees and its boxes what the items cover, so no box is ever drawn by hand. The backbone is frozen:
each composite's features are computed once, and the small head trains on them for several passes. A tenth of the
composites are held out and the finder's recall and precision on them (IoU >= 0.5) travel with the file.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ntsnet.checkout import iou
from ntsnet.item_finder import STRIDE, FinderConfig, ItemFinder, decode, loss, targets

from .composites import compose, cut_out, light_change, positions


@dataclass
class FinderTrainConfig:
    composites: int = 1200
    epochs: int = 30
    batch: int = 32
    lr: float = 2e-3
    frame_width: int = 640          # composites are made at this width (the finder reads half of it)
    item_size: tuple = (0.12, 0.28)  # an item's long side as a share of the frame's width
    max_items: int = 8
    touching: float = 0.5           # share of composites whose items touch
    max_photos: int = 800           # photos kept decoded in memory
    held_out: float = 0.1
    seed: int = 0


def _small(photo, mask=None, long_side: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
    """The photo (and its item mask, if it has one) with its long side at most ``long_side``."""
    from ntsnet.images import to_rgb_array

    im = to_rgb_array(photo)
    if mask is not None and np.shape(mask) != im.shape[:2]:
        mask = None  # not this photo's: its middle stands in
    s = long_side / max(im.shape[:2])
    if s >= 1:
        return im, mask
    size = (int(im.shape[1] * s), int(im.shape[0] * s))
    small = None if mask is None else cv2.resize(np.asarray(mask, np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    return cv2.resize(im, size, interpolation=cv2.INTER_AREA), small


class CompositeMaker:
    """Counter scenes from photos on the given empty counters, with their foreground and item boxes. A photo is
    an image, or (image, item mask) for one cut out on the counter: its real outline is then what is put down."""

    def __init__(self, photos, backgrounds, cfg: FinderTrainConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        picked = list(photos)
        if len(picked) > cfg.max_photos:
            picked = [picked[i] for i in rng.choice(len(picked), cfg.max_photos, replace=False)]
        self.photos = [_small(*p) if isinstance(p, tuple) else _small(p) for p in picked]
        if not self.photos:
            raise ValueError("the item finder needs photos of products to learn from")
        self.backgrounds = []
        for surface, counter in backgrounds:
            fw, fh = counter.frame_size
            size = (cfg.frame_width, int(round(cfg.frame_width * fh / fw)))
            self.backgrounds.append((cv2.resize(np.asarray(surface)[..., :3], size, interpolation=cv2.INTER_AREA), counter))
        if not self.backgrounds:
            raise ValueError("the item finder needs the empty counter: learn it first")

    def make(self, rng) -> tuple[np.ndarray, np.ndarray, list]:
        """(frame, foreground mask at the counter's analysis size, item boxes in the frame's pixels)."""
        surface, counter = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
        h, w = surface.shape[:2]
        touching = rng.random() < self.cfg.touching
        corners = None
        while corners is None:
            n = int(rng.integers(1, self.cfg.max_items + 1))
            side = (self.cfg.item_size[0] * w, self.cfg.item_size[1] * w)
            items = []
            for _ in range(n):
                photo, mask = self.photos[int(rng.integers(len(self.photos)))]
                items.append(cut_out(photo, rng, side, mask=mask))
            corners = positions(rng, [m.shape for _, m in items], touching, h, w)
        frame, boxes = compose(surface, items, corners)
        frame = light_change(frame, rng, strength=0.7)
        return frame, counter.foreground(frame), [b for b in boxes if b is not None]


def _feature_set(finder: ItemFinder, maker: CompositeMaker, n: int, rng, progress, share: float):
    """Features (float16) and targets of ``n`` composites, and their boxes in the finder's input pixels."""
    feats, tgts, truth = [], [], []
    cfg = finder.cfg
    for start in range(0, n, 16):
        images, masks = [], []
        for _ in range(min(16, n - start)):
            frame, mask, boxes = maker.make(rng)
            x, m = finder.prepare(frame, mask)
            images.append(x), masks.append(m)
            sx, sy = cfg.width / frame.shape[1], cfg.height / frame.shape[0]
            truth.append([(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes])
        f = finder.features(torch.cat(images), torch.cat(masks))
        feats.append(f.half())
        grid = f.shape[-2:]
        tgts.extend(targets(b, grid) for b in truth[-len(images):])
        if progress:
            progress(share * (start + len(images)) / n, f"item finder: composites {start + len(images)}/{n}")
    return torch.cat(feats), torch.stack(tgts), truth


def found_share(finder: ItemFinder, feats: torch.Tensor, truth) -> tuple[float, float]:
    """(recall, precision) at IoU >= 0.5 of the finder's boxes on held-out composites."""
    hits = found = want = 0
    with torch.inference_mode():
        for i in range(len(feats)):
            boxes = [b for b, _ in decode(finder(feats[i:i + 1].float())[0], finder.cfg.threshold)]
            found += len(boxes)
            want += len(truth[i])
            used = set()
            for t in truth[i]:
                best = max(((iou(b, t), j) for j, b in enumerate(boxes) if j not in used), default=(0.0, -1))
                if best[0] >= 0.5:
                    hits += 1
                    used.add(best[1])
    return hits / max(1, want), hits / max(1, found)


def train_item_finder(photos, backgrounds, cfg: FinderTrainConfig = FinderTrainConfig(),
                      finder_cfg: FinderConfig = FinderConfig(), progress=None, finder: ItemFinder | None = None) -> ItemFinder:
    """The trained finder; ``finder.extra`` holds its held-out recall and precision. ``backgrounds``: [(empty
    counter RGB, Counter)]; ``progress(fraction, message)`` is told as composites are made and passes run."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 1])
    finder = finder or ItemFinder(finder_cfg)
    maker = CompositeMaker(photos, backgrounds, cfg)
    t0 = time.perf_counter()
    feats, tgts, truth = _feature_set(finder, maker, cfg.composites, rng, progress, 0.5)
    n_val = max(1, int(cfg.held_out * len(feats)))
    train_f, train_t = feats[n_val:], tgts[n_val:]
    opt = torch.optim.AdamW(finder.head.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * math.ceil(len(train_f) / cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    finder.train()
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train_f), generator=g)
        for start in range(0, len(order), cfg.batch):
            idx = order[start:start + cfg.batch]
            value = loss(finder(train_f[idx].float()), train_t[idx])
            opt.zero_grad()
            value.backward()
            opt.step()
            sched.step()
            step += 1
        if progress:
            progress(0.5 + 0.5 * step / steps, f"item finder: pass {epoch + 1}/{cfg.epochs}, loss {value.item():.3f}")
    finder.eval()
    recall, precision = found_share(finder, feats[:n_val], truth[:n_val])
    finder.extra = {"held_out_recall": round(recall, 4), "held_out_precision": round(precision, 4),
                    "composites": cfg.composites, "photos": len(maker.photos), "seconds": round(time.perf_counter() - t0, 1),
                    "stride": STRIDE}
    return finder


def train_for_catalogue(db, cfg: FinderTrainConfig = FinderTrainConfig(), progress=None) -> tuple[Path, ItemFinder]:
    """Train the item finder on a catalogue's labelled photos and its learnt empty counter; written (atomically)
    beside the counter as CATALOGUE/item_finder.safetensors, which the Checkout tab and CLI then use."""
    from dataset_tools import Catalogue
    from ntsnet.counter import COUNTER_FILE, Counter, CounterError
    from ntsnet.item_finder import FINDER_FILE
    from ntsnet.predictor import EMPTY_SCENE

    db = Path(db)
    try:
        counter = Counter.load(db / COUNTER_FILE)
    except (CounterError, OSError) as exc:
        raise ValueError(f"the item finder learns on the empty counter, and none is learnt for {db} ({exc}): "
                         "learn it in the Checkout tab first") from None
    catalogue = Catalogue(db, create=False)
    try:
        photos = [(catalogue.image_path(im), catalogue.mask(im)) for im in catalogue.images()
                  if im["product"] not in (None, EMPTY_SCENE)]
    finally:
        catalogue.close()
    fw, fh = counter.frame_size
    finder = train_item_finder(photos, [(counter.empty_view((fh, fw)), counter)], cfg, progress=progress)
    finder.save(db / FINDER_FILE, finder.extra)
    return db / FINDER_FILE, finder
