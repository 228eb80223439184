"""The empty counter a fixed camera looks at, and what lies on it now.

``Counter.learn(frames)`` keeps per-pixel statistics of a few seconds of the empty scene (log colour: mean and
noise) at a small analysis size. A later frame is compared after fitting away what the light did to the whole scene
(per colour channel: exposure, white balance, a gradient across the counter, a contrast/gamma term), so the
webcam's auto-exposure drift is not "something on the counter". What stays is foreground where the colour changed,
where it got much brighter or much darker than a shadow makes it, or where new edges appeared (soft shadows make no
edges). ``is_empty`` answers "nothing to recognise"; ``regions`` splits the foreground into one box per item.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

ANALYSIS_WIDTH = 320
EMPTY_BELOW = 0.004        # foreground share of the frame under which the scene is empty
MOVED_ABOVE = 0.6          # more foreground than this: the camera moved (or the light changed beyond a fit)
CHROMA, BRIGHTER, DARKER, EDGES = 0.08, 0.20, 0.80, 0.12   # log-colour thresholds (above the learnt noise)
FIT_SHARE, FIT_SHARE_Z = 0.4, 0.524  # the light is fitted to the best 40% of the pixels (|z| < 0.524 of a normal)
ALIGNED_ABOVE = 0.3        # correlation of the counter's texture with the learnt one under which the camera moved
MIN_ITEM_SHARE = 0.002     # smaller foreground blobs are specks and reflections
SOLID_ITEM = 0.9           # a blob filling this share of its convex hull is one item: never cut
NOTCH_SCORE = 0.8          # cut only where the line is shorter than 0.8 x the two notches' depths together
FORMAT = "ntsnet-counter-v1"
COUNTER_FILE = "counter.npz"  # the learnt empty counter, kept in the catalogue's folder


class CounterError(ValueError):
    """A frame or file the counter cannot use; nothing was changed."""


@dataclass
class Region:
    box: tuple[int, int, int, int]   # x0, y0, x1, y1 in the frame's pixels
    area: float                      # share of the frame
    at_edge: bool                    # touches the frame's border: an arm or an item half outside, never counted
    label: int = 0                   # its label in the label map it came from


def _log_rgb(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    small = cv2.resize(np.asarray(frame)[..., :3], size, interpolation=cv2.INTER_AREA).astype(np.float32)
    return np.log(cv2.GaussianBlur(small, (0, 0), 0.8) + 4.0)


def _gradient(gray: np.ndarray) -> np.ndarray:
    return np.stack([cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)], -1) / 8.0


class Counter:
    def __init__(self, mean: np.ndarray, noise: np.ndarray, frame_size: tuple[int, int]):
        self.mean, self.noise = mean.astype(np.float32), noise.astype(np.float32)   # (h, w, 3) log colour; (h, w)
        self.frame_size = tuple(int(v) for v in frame_size)                          # (width, height) of the frames
        h, w = self.mean.shape[:2]
        self.size = (w, h)
        self.mean_grad = _gradient(self.mean.mean(-1))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        centred = self.mean - self.mean.reshape(-1, 3).mean(0)
        # per channel: constant, gradient in x and y, contrast (the learnt colour itself)
        self._basis = [np.stack([np.ones(h * w, np.float32), (x / w - 0.5).ravel(), (y / h - 0.5).ravel(), centred[..., c].ravel()], 1)
                       for c in range(3)]

    # ------------------------------------------------------------------------------ learn / keep
    @classmethod
    def learn(cls, frames, width: int = ANALYSIS_WIDTH) -> "Counter":
        """``width``: of the analysis size (smaller is faster; ``regions`` wants the default, ``is_empty`` does with less)."""
        frames = [np.asarray(f) for f in frames]
        if not frames:  # one photo will do; a few seconds of frames also learn the camera's noise
            raise CounterError("learning the empty counter needs a photo of it, better a few seconds of frames")
        shape = frames[0].shape[:2]
        if any(f.shape[:2] != shape for f in frames):
            raise CounterError("the empty-counter frames differ in size: were they taken by one camera?")
        h, w = shape
        size = (width, max(8, round(width * h / w)))
        return cls.from_logs([_log_rgb(f, size) for f in frames], (w, h))

    @classmethod
    def from_logs(cls, logs, frame_size: tuple[int, int]) -> "Counter":
        """From frames already in log colour at the analysis size (``log_colour``); ``frame_size``: (width, height)."""
        logs = np.stack(logs)
        return cls(logs.mean(0), np.maximum(logs.std(0).mean(-1), 0.01), frame_size)

    def save(self, path: Path):
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, format=np.array(FORMAT), mean=self.mean, noise=self.noise, frame_size=np.array(self.frame_size))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Counter":
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                if str(z["format"]) != FORMAT:
                    raise CounterError(f"{path} is not an empty-counter file")
                return cls(z["mean"], z["noise"], tuple(z["frame_size"]))
        except (OSError, KeyError, ValueError) as exc:
            raise CounterError(f"cannot read the empty counter {path}: {exc}") from None

    # ----------------------------------------------------------------------------------- compare
    def empty_view(self, frame_shape) -> np.ndarray:
        """The learnt empty counter as RGB at a frame's size (what lies under an item's neighbours)."""
        rgb = np.clip(np.exp(self.mean) - 4.0, 0, 255).astype(np.uint8)
        return cv2.resize(rgb, (frame_shape[1], frame_shape[0]), interpolation=cv2.INTER_LINEAR)

    def check_frame(self, frame: np.ndarray) -> np.ndarray:
        """The frame as RGB; a frame of another shape than the counter's is refused (scaled when only its size differs)."""
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] < 3:
            raise CounterError("the scene is not a colour image")
        h, w = frame.shape[:2]
        fw, fh = self.frame_size
        if abs(w / h - fw / fh) > 0.02 * fw / fh:
            raise CounterError(f"the scene is {w}x{h} but the empty counter was learnt at {fw}x{fh}: another camera "
                               "or crop; learn the empty counter again")
        return frame[..., :3]

    def residual(self, now: np.ndarray) -> np.ndarray:
        """Per-pixel log-colour change (h, w, 3) of ``now`` (a frame's log colour at the analysis size) left after
        fitting away the light's change of the whole scene."""
        d = now - self.mean
        out = np.empty_like(d)
        sample = slice(None, None, 7)  # a fit on every 7th pixel: as good, several times cheaper
        for c in range(3):
            basis, target = self._basis[c], d[..., c].ravel()
            bs, ts = basis[sample], target[sample]
            k = int(FIT_SHARE * len(ts))
            r = ts - np.median(ts)
            for _ in range(4):  # least trimmed squares: items may cover half the counter, the light's fit stays
                best = np.argpartition(np.abs(r), k)[:k]
                coef = np.linalg.lstsq(bs[best], ts[best], rcond=None)[0]
                r = ts - bs @ coef
            spread = np.partition(np.abs(r), k)[k] / FIT_SHARE_Z + 0.02  # the noise, from the best-fitting share
            inliers = np.abs(r) < 2.5 * spread
            coef = np.linalg.lstsq(bs[inliers], ts[inliers], rcond=None)[0]
            out[..., c] = (target - basis @ coef).reshape(d.shape[:2])
        return out

    def log_colour(self, frame: np.ndarray) -> np.ndarray:
        """The frame as this counter compares it: log colour at the analysis size (compute once, pass as ``now``)."""
        return _log_rgb(self.check_frame(frame), self.size)

    def foreground(self, frame: np.ndarray, now: np.ndarray | None = None) -> np.ndarray:
        """Bool mask at the analysis size: where something lies on the counter. ``now``: the frame's log_colour."""
        now = self.log_colour(frame) if now is None else now
        r = self.residual(now)
        bright = r.mean(-1)
        chroma = np.sqrt(((r - bright[..., None]) ** 2).sum(-1))
        edges = np.linalg.norm(_gradient(now.mean(-1)) - self.mean_grad, axis=-1)  # log gradients: exposure leaves them alone
        noise = 3.0 * self.noise
        fg = (chroma > CHROMA + noise) | (bright > BRIGHTER + noise) | (bright < -DARKER - noise) | (edges > EDGES + noise)
        fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8))
        return _fill_holes(fg).astype(bool)

    def foreground_share(self, frame: np.ndarray) -> float:
        return float(self.foreground(frame).mean())

    def is_empty(self, frame: np.ndarray) -> bool:
        """The frame shows the learnt empty counter (any light): nothing to recognise."""
        return self.foreground_share(frame) < EMPTY_BELOW

    def moved(self, frame: np.ndarray, mask: np.ndarray | None = None, now: np.ndarray | None = None) -> bool:
        """So much changed that the camera must have moved: the counter should be learnt again. Also when the
        counter's own texture, where no item covers it, no longer lines up with what was learnt (a knock onto a
        look-alike part of it). ``mask``, ``now``: this frame's foreground and log_colour, when the caller has them."""
        now = self.log_colour(frame) if now is None else now
        mask = self.foreground(frame, now) if mask is None else mask
        if mask.mean() > MOVED_ABOVE:
            return True
        bare = ~cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        learnt = self.mean_grad[bare]
        texture = float((learnt ** 2).sum())
        if texture < 1e-5 * len(learnt):  # a plain counter: nothing to line up
            return False
        grad = _gradient(now.mean(-1))[bare]
        corr = float((grad * learnt).sum() / np.sqrt((grad ** 2).sum() * texture + 1e-12))
        return corr < ALIGNED_ABOVE

    # ----------------------------------------------------------------------------------- items
    def regions(self, frame: np.ndarray, split_touching: bool = True, mask: np.ndarray | None = None) -> list[Region]:
        """One region per item on the counter, boxes in the frame's pixels, largest first."""
        frame = self.check_frame(frame)
        return self.boxes(self.label_items(frame, mask, split_touching), frame.shape)

    def label_items(self, frame: np.ndarray, mask: np.ndarray | None = None, split_touching: bool = True) -> np.ndarray:
        """Item labels at the analysis size (0 = counter) of ``mask`` (default: the frame's foreground)."""
        mask = (self.foreground(frame) if mask is None else mask).astype(np.uint8)
        if not split_touching:
            return cv2.connectedComponents(mask)[1]
        return split_items(mask, cv2.resize(np.asarray(frame)[..., :3], self.size, interpolation=cv2.INTER_AREA))

    def boxes(self, labels: np.ndarray, frame_shape) -> list[Region]:
        """Regions of a label map at the analysis size, in the pixels of a frame of ``frame_shape``, largest first."""
        sx, sy = frame_shape[1] / self.size[0], frame_shape[0] / self.size[1]
        h, w = labels.shape
        out = []
        for lab in range(1, int(labels.max()) + 1):
            ys, xs = np.nonzero(labels == lab)
            if len(xs) < MIN_ITEM_SHARE * h * w:
                continue
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            edge = x0 <= 2 or y0 <= 2 or x1 >= w - 2 or y1 >= h - 2
            out.append(Region((int(x0 * sx), int(y0 * sy), int(round(x1 * sx)), int(round(y1 * sy))), len(xs) / (h * w),
                              bool(edge), lab))
        return sorted(out, key=lambda r: -r.area)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """A product's own print can match the counter's colour in places: what the item's outline encloses is the item."""
    h, w = mask.shape
    flood = np.pad(mask, 1).copy()
    cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    return mask | (1 - flood[1:-1, 1:-1])


def split_items(mask: np.ndarray, rgb: np.ndarray, max_cuts: int = 12) -> np.ndarray:
    """Labels (0 = counter) with touching items apart. Two items side by side make a blob with a notch at each end
    of the line where they meet: the blob is cut along the shortest such line that stays inside it and leaves two
    item-sized parts, again and again; what is left of each part seeds a watershed over the colour image (so the
    line follows the items' real border)."""
    cut = mask.copy()
    for _ in range(max_cuts):
        if not _cut_once(cut):
            break
    n, seeds, stats, _ = cv2.connectedComponentsWithStats(cv2.erode(cut, np.ones((3, 3), np.uint8)))
    markers = np.zeros(mask.shape, np.int32)
    keep = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= MIN_ITEM_SHARE * mask.size]
    for label, k in enumerate(keep, start=1):  # slivers seed nothing: the watershed gives them to a neighbour
        markers[seeds == k] = label
    counter_id = len(keep) + 1
    markers[mask == 0] = counter_id  # the counter is known: only the blobs are flooded
    ws = cv2.watershed(np.ascontiguousarray(rgb), markers)
    ws[(ws == counter_id) | (ws < 0)] = 0
    return ws


def _cut_once(mask: np.ndarray) -> bool:
    """Cut one blob of ``mask`` (in place) along its best line between two notches; False when none is worth it."""
    best = None
    for contour in cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0]:
        area = cv2.contourArea(contour)
        if area < 2 * MIN_ITEM_SHARE * mask.size or len(contour) < 20:
            continue
        if _solidity(contour) >= SOLID_ITEM:
            continue  # as convex as one item is: notches there are its own outline's, not a meeting line
        for score, p, q in _notch_pairs(mask, contour, area):
            if score >= NOTCH_SCORE or (best is not None and score >= best[0]):
                continue
            blob = np.zeros_like(mask)
            cv2.drawContours(blob, [contour], -1, 1, -1)
            blob &= mask
            cv2.line(blob, tuple(int(v) for v in p), tuple(int(v) for v in q), 0, 2)
            parts = [cv2.contourArea(c) for c in cv2.findContours(blob, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0]]
            if sum(a >= 0.15 * area for a in parts) >= 2:  # two item-sized parts, not a sliver shaved off
                best = (score, p, q)
    if best is None:
        return False
    cv2.line(mask, tuple(int(v) for v in best[1]), tuple(int(v) for v in best[2]), 0, 2)
    return True


def _solidity(contour) -> float:
    return cv2.contourArea(contour) / max(1.0, cv2.contourArea(cv2.convexHull(contour)))


def _notch_pairs(mask: np.ndarray, contour, area: float):
    """(score, p, q) for each pair of deep notches of the outline whose joining line stays inside the blob;
    lower score = shorter line for deeper notches."""
    try:
        defects = cv2.convexityDefects(contour, np.sort(cv2.convexHull(contour, returnPoints=False), axis=0))
    except cv2.error:  # a self-touching outline
        return []
    if defects is None:
        return []
    deep = [(contour[f][0], d / 256.0) for _, _, f, d in defects.reshape(-1, 4) if d / 256.0 >= max(2.5, 0.04 * np.sqrt(area))]
    out = []
    for i in range(len(deep)):
        for j in range(i + 1, len(deep)):
            (p, dp), (q, dq) = deep[i], deep[j]
            length = float(np.hypot(*(p - q)))
            if 1 <= length <= np.sqrt(area) and _inside(mask, p, q):
                out.append((length / (dp + dq), p, q))
    return sorted(out, key=lambda t: t[0])


def _inside(mask: np.ndarray, p, q, samples: int = 20) -> bool:
    t = np.linspace(0.15, 0.85, samples)[:, None]
    pts = np.round(p[None, :] * (1 - t) + q[None, :] * t).astype(int)
    return bool(mask[pts[:, 1], pts[:, 0]].all())
