"""FPN-style anchors of the NTS-Net reference design and the hard NMS that picks the Navigator's proposals.

Anchors are (x0, y0, x1, y1) in input-image pixels, ordered level by level and, within a level,
(scale, aspect ratio, row, column): the same order in which the Navigator's 1x1 "tidy" convolutions
flatten their (channels, H, W) scores, so score i belongs to anchor i.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import batched_nms


@dataclass(frozen=True)
class AnchorLevel:
    stride: int
    size: float
    scales: tuple[float, ...]
    aspect_ratios: tuple[float, ...] = (0.667, 1.0, 1.5)

    @property
    def per_cell(self) -> int:
        return len(self.scales) * len(self.aspect_ratios)


# Yang et al., "Learning to Navigate for Fine-grained Classification" (ECCV 2018), reference settings.
DEFAULT_LEVELS = (
    AnchorLevel(stride=32, size=48, scales=(2 ** (1 / 3), 2 ** (2 / 3))),
    AnchorLevel(stride=64, size=96, scales=(2 ** (1 / 3), 2 ** (2 / 3))),
    AnchorLevel(stride=128, size=192, scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3))),
)


def _as_hw(input_size) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    h, w = input_size
    return int(h), int(w)


def level_shapes(input_size, levels=DEFAULT_LEVELS) -> list[tuple[int, int]]:
    """Feature-map size of each level: ceil(size / stride), what stride-2 'same'-padded convs produce."""
    h, w = _as_hw(input_size)
    return [(math.ceil(h / lv.stride), math.ceil(w / lv.stride)) for lv in levels]


def generate_anchors(input_size=448, levels=DEFAULT_LEVELS) -> torch.Tensor:
    """All anchors for an input of ``input_size`` (int or (H, W)): a float tensor (A, 4) of x0, y0, x1, y1.

    448x448 gives 14*14*6 + 7*7*6 + 4*4*9 = 1614 anchors. Anchors may extend past the image border;
    cropping treats the outside as zero (mean colour after normalisation), like the reference's padding.
    """
    out = []
    for lv, (mh, mw) in zip(levels, level_shapes(input_size, levels)):
        cy = (torch.arange(mh, dtype=torch.float64) * lv.stride + lv.stride / 2).view(mh, 1).expand(mh, mw)
        cx = (torch.arange(mw, dtype=torch.float64) * lv.stride + lv.stride / 2).view(1, mw).expand(mh, mw)
        for scale in lv.scales:
            for ratio in lv.aspect_ratios:
                bh = lv.size * scale / math.sqrt(ratio)
                bw = lv.size * scale * math.sqrt(ratio)
                boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
                out.append(boxes.reshape(-1, 4))
    return torch.cat(out).float()


def anchor_count(input_size=448, levels=DEFAULT_LEVELS) -> int:
    return sum(h * w * lv.per_cell for lv, (h, w) in zip(levels, level_shapes(input_size, levels)))


def suppression_table(anchors: torch.Tensor, iou_threshold: float) -> np.ndarray:
    """(A, A) bools: anchor j is dropped when anchor i is kept (IoU > threshold). The anchors never change, so
    this is computed once per model; it repeats torchvision's NMS kernel arithmetic (float32, in its order, on the
    same shifted boxes) so that the greedy picks are the ones ``batched_nms`` makes."""
    boxes = (anchors - anchors.min()).float()
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, None], x2[None]) - torch.maximum(x1[:, None], x1[None])).clamp_min(0)
    h = (torch.minimum(y2[:, None], y2[None]) - torch.maximum(y1[:, None], y1[None])).clamp_min(0)
    inter = w * h
    overlap = inter / (areas[:, None] + areas[None] - inter)
    return (overlap.double() > iou_threshold).numpy()  # the kernel compares with the threshold as a double


def _greedy_picks(order: np.ndarray, suppress: np.ndarray, top_n: int) -> list[int]:
    """The first ``top_n`` anchors hard NMS keeps, walking ``order`` (best first); fewer if fewer survive."""
    dropped = np.zeros(len(order), dtype=bool)
    picks, pos = [], 0
    while len(picks) < top_n:
        alive = np.flatnonzero(~dropped[order[pos:]])
        if not alive.size:
            break
        pos += int(alive[0])
        i = int(order[pos])
        picks.append(i)
        dropped |= suppress[i]
        pos += 1
    return picks


def select_on_device(scores: torch.Tensor, table: torch.Tensor, top_n: int) -> torch.Tensor:
    """Hard NMS of every image at once with the suppression table as a (A, A) bool tensor on the scores' device:
    ``top_n`` rounds of "the best anchor still alive" for the whole batch. No value is read back to the host, so a
    GPU's queue stays full and a captured or compiled step sees one graph. Picks equal ``_greedy_picks``': argmax
    returns the first of equal scores, as the stable sort does."""
    b, a = scores.shape
    s = scores.detach().float()
    lowest = torch.finfo(torch.float32).min
    dropped = torch.zeros(b, a, dtype=torch.bool, device=s.device)
    taken = torch.zeros_like(dropped)
    rows = torch.arange(b, device=s.device)
    picks = []
    for _ in range(top_n):
        alive = s.masked_fill(dropped, lowest).argmax(1)
        spare = s.masked_fill(taken, lowest).argmax(1)  # none left alive: the best suppressed one fills the gap
        pick = torch.where((~dropped).any(1), alive, spare)
        taken[rows, pick] = True
        dropped |= table[pick] | taken
        picks.append(pick)
    return torch.stack(picks, 1)


def select_proposals(scores: torch.Tensor, anchors: torch.Tensor, top_n: int, iou_threshold: float = 0.25,
                     table: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """Hard NMS per image; returns (B, top_n) anchor indices, best first.

    Greedy: take the highest-scoring anchor, drop every anchor overlapping it by IoU > threshold, repeat.
    With the anchors' ``suppression_table`` this stops after ``top_n`` picks (torchvision's ``batched_nms``
    suppresses over all anchors): as a numpy array on a CPU, walked per image (fastest for one live frame); as
    a tensor on the scores' device, ``select_on_device``. Without a table all images go through one
    ``batched_nms`` call. In the rare case that fewer than ``top_n`` anchors survive (tiny inputs have few
    anchors), the best suppressed ones fill the gap so shapes stay fixed.
    """
    b, a = scores.shape
    if top_n == 0:
        return torch.empty(b, 0, dtype=torch.long, device=scores.device)
    if isinstance(table, torch.Tensor):
        return select_on_device(scores, table.to(scores.device), top_n)
    if table is not None and scores.device.type == "cpu":
        # a stable descending sort: the order torchvision's kernel walks, ties included
        orders = scores.detach().float().sort(dim=1, descending=True, stable=True).indices.numpy()
        result = np.empty((b, top_n), dtype=np.int64)
        for i, order in enumerate(orders):
            picks = _greedy_picks(order, table, top_n)
            if len(picks) < top_n:
                taken = set(picks)
                picks += [int(j) for j in order if j not in taken][: top_n - len(picks)]
            result[i] = picks
        return torch.from_numpy(result)
    flat_scores = scores.detach().float().reshape(-1)
    # batched_nms separates images by offsetting coordinates, which assumes boxes >= 0; anchors reach past
    # the border, so shift them (IoU is unchanged by translation).
    shifted = anchors.to(scores.device) - anchors.min()
    flat_boxes = shifted.repeat(b, 1)
    image_of = torch.arange(b, device=scores.device).repeat_interleave(a)
    keep = batched_nms(flat_boxes, flat_scores, image_of, iou_threshold)  # sorted by score, all images
    kept_image = image_of[keep]
    result = torch.empty(b, top_n, dtype=torch.long, device=scores.device)
    for i in range(b):
        idx = keep[kept_image == i] - i * a
        if idx.numel() < top_n:
            rest = scores[i].detach().argsort(descending=True)
            rest = rest[~torch.isin(rest, idx)]
            idx = torch.cat([idx, rest[: top_n - idx.numel()]])
        result[i] = idx[:top_n]
    return result
