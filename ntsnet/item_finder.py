"""A class-agnostic item finder: "a product is here", one box per item, whatever the product.

The counter's foreground says where something lies; where items touch it is one blob, and only what the items look
like tells them apart. The finder reads an ImageNet backbone's stride-8 and stride-16 features (frozen) plus the
foreground mask and predicts, CenterNet-style, a heat map of item centres and each item's size at every cell. It
learns from composites of the catalogue's own photos on the learnt empty counter (training/item_finder.py), so
a new product needs no drawn boxes. ``label_items`` turns its boxes into the label map Checkout uses: each found
item's middle seeds a watershed over the colour image inside the foreground, so every item keeps its own outline.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import FeatureBackbone, create_backbone

FORMAT = "ntsnet-item-finder-v1"
FINDER_FILE = "item_finder.safetensors"  # trained for the learnt counter, kept beside it in the catalogue's folder
STRIDE = 8


@dataclass
class FinderConfig:
    backbone: str = "efficientnet_lite0"
    width: int = 320          # frames are read at this width (the counter's analysis size)
    height: int = 240
    hidden: int = 64
    threshold: float = 0.3    # a centre's heat above which an item is reported
    seed_share: float = 0.5   # of an item's box, around its centre, that seeds its region


class _Stop(Exception):
    """Raised by the last tap's hook: the backbone's deeper layers are not needed."""


def _taps(backbone: FeatureBackbone) -> tuple[nn.Module, nn.Module, int, int]:
    """The modules whose outputs are the last stride-8 and stride-16 maps, and their channels."""
    trunk = backbone.features
    info = getattr(getattr(trunk, "net", None), "feature_info", None)
    if info is not None:  # timm knows its stages
        by_stride = {f["reduction"]: f for f in info}
        return (trunk.net.get_submodule(by_stride[8]["module"]), trunk.net.get_submodule(by_stride[16]["module"]),
                by_stride[8]["num_chs"], by_stride[16]["num_chs"])
    last = {}
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        for child in trunk.children():  # a plain Sequential trunk (ResNet, the tests' tiny one)
            x = child(x)
            last[64 // x.shape[-1]] = (child, x.shape[1])
    return last[8][0], last[16][0], last[8][1], last[16][1]


class ItemFinder(nn.Module):
    def __init__(self, cfg: FinderConfig = FinderConfig(), pretrained: bool = True, backbone: FeatureBackbone | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = (backbone or create_backbone(cfg.backbone, pretrained=pretrained)).eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        tap8, tap16, c8, c16 = _taps(self.backbone)
        self._taps = (tap8, tap16)  # a tuple: the backbone's own modules, not registered twice
        h = cfg.hidden
        self.head = nn.Sequential(
            nn.Conv2d(c8 + c16 + 1, h, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(h, h, 3, padding=2, dilation=2), nn.ReLU(inplace=True),
            nn.Conv2d(h, h, 3, padding=4, dilation=4), nn.ReLU(inplace=True),
            nn.Conv2d(h, 5, 1))  # centre heat (logit), centre offset (2), log size (2) in cells
        nn.init.constant_(self.head[-1].bias[:1], -4.0)  # few cells are centres: start near "nothing here"
        self.register_buffer("mean", torch.tensor(self.backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.backbone.std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: its BatchNorm statistics stay ImageNet's
        return self

    # ------------------------------------------------------------------------------------------ tensors
    @torch.no_grad()
    def features(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B, C, H/8, W/8) head input from uint8-range RGB ``images`` (B, 3, H, W) and 0/1 ``masks`` (B, 1, H, W)."""
        got = {}

        def keep(name, stop=False):
            def hook(_m, _i, out):
                got[name] = out
                if stop:
                    raise _Stop
            return hook

        images, masks = images.to(self.mean.device), masks.to(self.mean.device)  # the finder's device, wherever it is
        handles = [self._taps[0].register_forward_hook(keep(8)), self._taps[1].register_forward_hook(keep(16, stop=True))]
        try:
            self.backbone((images / 255.0 - self.mean) / self.std)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        f8 = got[8]
        f16 = F.interpolate(got[16], size=f8.shape[-2:], mode="bilinear", align_corners=False)
        m = F.adaptive_avg_pool2d(masks.float(), f8.shape[-2:])
        return torch.cat([f8, f16, m], 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def prepare(self, frame: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame and its foreground (any size) as the finder reads them."""
        size = (self.cfg.width, self.cfg.height)
        rgb = cv2.resize(np.ascontiguousarray(frame[..., :3]), size, interpolation=cv2.INTER_AREA)
        m = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        return (torch.from_numpy(rgb).permute(2, 0, 1)[None].float(), torch.from_numpy(m)[None, None].float())

    # ------------------------------------------------------------------------------------------ answers
    @torch.inference_mode()
    def find(self, frame: np.ndarray, mask: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        """[(box x0, y0, x1, y1 in the frame's pixels, score)], best first."""
        out = self(self.features(*self.prepare(frame, mask)))[0]
        boxes = decode(out, self.cfg.threshold)
        sx, sy = frame.shape[1] / self.cfg.width, frame.shape[0] / self.cfg.height
        return [((x0 * sx, y0 * sy, x1 * sx, y1 * sy), s) for (x0, y0, x1, y1), s in boxes]

    def label_items(self, frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Item labels (0 = counter) at ``mask``'s size. A blob holding two or more found items is split between
        them (each item's middle seeds a watershed over the colour image); any other blob is one item, whole."""
        mask = mask.astype(np.uint8)
        h, w = mask.shape
        n, blobs = cv2.connectedComponents(mask)
        if n <= 1:
            return blobs
        seeds = self._seeds(frame, blobs)
        blob_of = [int(np.bincount(blobs[s]).argmax()) for s in seeds]  # the blob each seed lies in
        markers = np.zeros((h, w), np.int32)
        label = 0
        for k in range(1, n):
            inside = [s for s, b in zip(seeds, blob_of) if b == k]
            if len(inside) < 2:  # one item, or one the finder missed: the blob's own outline
                label += 1
                markers[cv2.erode((blobs == k).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)] = label
                continue
            for s in inside:
                label += 1
                markers[s & (markers == 0)] = label
        counter_id = label + 1
        markers[mask == 0] = counter_id
        rgb = cv2.resize(np.ascontiguousarray(frame[..., :3]), (w, h), interpolation=cv2.INTER_AREA)
        ws = cv2.watershed(rgb, markers)
        ws[(ws == counter_id) | (ws < 0)] = 0
        return ws

    def _seeds(self, frame: np.ndarray, blobs: np.ndarray) -> list[np.ndarray]:
        """Each found item's middle (an ellipse ``seed_share`` of its box) inside the foreground, best first."""
        h, w = blobs.shape
        sx, sy = w / frame.shape[1], h / frame.shape[0]
        out = []
        for (x0, y0, x1, y1), _ in self.find(frame, blobs > 0):
            seed = np.zeros((h, w), np.uint8)
            axes = (max(1, int((x1 - x0) * sx / 2 * self.cfg.seed_share)), max(1, int((y1 - y0) * sy / 2 * self.cfg.seed_share)))
            cv2.ellipse(seed, (int((x0 + x1) / 2 * sx), int((y0 + y1) / 2 * sy)), axes, 0, 0, 360, 1, -1)
            seed = seed.astype(bool) & (blobs > 0)
            if seed.sum() >= 4:
                out.append(seed)
        return out

    # ------------------------------------------------------------------------------------------ files
    def save(self, path: Path, extra: dict | None = None):
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(tmp), metadata={"format": FORMAT, "config": json.dumps(asdict(self.cfg)),
                                             "extra": json.dumps(extra or {})})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "ItemFinder":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path.name} is not an item finder ({meta.get('format') or 'no format'})")
            cfg = FinderConfig(**json.loads(meta["config"]))
            finder = cls(cfg, pretrained=False)
            finder.load_state_dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"cannot read the item finder {path}: {exc}") from None
        finder.extra = json.loads(meta.get("extra") or "{}")
        return finder.eval()


def decode(out: torch.Tensor, threshold: float) -> list[tuple[tuple[float, float, float, float], float]]:
    """Boxes in input pixels from one (5, h, w) head output: local maxima of the centre heat above ``threshold``."""
    from torchvision.ops import nms

    heat = torch.sigmoid(out[0])
    peaks = (heat == F.max_pool2d(heat[None, None], 3, 1, 1)[0, 0]) & (heat > threshold)
    ys, xs = torch.nonzero(peaks, as_tuple=True)
    if len(xs) == 0:
        return []
    cx = (xs.float() + torch.sigmoid(out[1, ys, xs])) * STRIDE
    cy = (ys.float() + torch.sigmoid(out[2, ys, xs])) * STRIDE
    w, h = torch.exp(out[3, ys, xs].clamp(max=6)) * STRIDE, torch.exp(out[4, ys, xs].clamp(max=6)) * STRIDE
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    scores = heat[ys, xs]
    keep = nms(boxes, scores, 0.6)
    return [(tuple(float(v) for v in boxes[i]), float(scores[i])) for i in keep]


def targets(boxes, grid: tuple[int, int]) -> torch.Tensor:
    """(5, h, w) training target of one composite: Gaussian centre heat (1 at each item's centre cell), and the
    centre's offset within its cell and log size in cells at those cells (NaN elsewhere)."""
    gh, gw = grid
    t = torch.zeros(5, gh, gw)
    t[1:] = float("nan")
    yy, xx = torch.meshgrid(torch.arange(gh).float(), torch.arange(gw).float(), indexing="ij")
    for x0, y0, x1, y1 in boxes:
        cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
        w, h = max(1.0, (x1 - x0) / STRIDE), max(1.0, (y1 - y0) / STRIDE)
        ix, iy = min(gw - 1, int(cx)), min(gh - 1, int(cy))
        sx, sy = max(0.5, w / 6), max(0.5, h / 6)
        g = torch.exp(-((xx - ix) ** 2 / (2 * sx ** 2) + (yy - iy) ** 2 / (2 * sy ** 2)))
        t[0] = torch.maximum(t[0], g)
        t[0, iy, ix] = 1.0
        t[1:, iy, ix] = torch.tensor([cx - ix, cy - iy, np.log(w), np.log(h)])
    return t


def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """CenterNet's focal loss on the centre heat plus L1 on offsets and log sizes at the centres."""
    p = torch.sigmoid(out[:, 0]).clamp(1e-4, 1 - 1e-4)
    heat = t[:, 0]
    pos = heat >= 1.0
    pos_loss = -(torch.log(p) * (1 - p) ** 2)[pos].sum()
    neg_loss = -(torch.log(1 - p) * p ** 2 * (1 - heat) ** 4)[~pos].sum()
    n = pos.sum().clamp(min=1)
    at = pos[:, None].expand_as(t[:, 1:])
    off = torch.sigmoid(out[:, 1:3])
    reg = torch.cat([off, out[:, 3:5]], 1)
    l1 = (reg[at] - t[:, 1:][at]).abs().sum() / n
    return (pos_loss + neg_loss) / n + l1
