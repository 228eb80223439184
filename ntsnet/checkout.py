"""A checkout counter: every item a fixed camera sees on the learnt empty counter, boxed and named, and the basket.

``Checkout(counter, recogniser).scan(frame)`` finds the items (ntsnet/counter.py), crops each with a margin and asks
the recogniser about all of them in one batched call (anything with ``predict_batch(list of RGB arrays)`` returning
``Prediction`` objects: the trained Predictor, the instant model). An item the catalogue does not know keeps the
recogniser's own "unknown" answer, the rule single-product recognition uses.

``Basket`` turns scans of a live stream into a steady list: an item is counted once it has lain still for
``still_s``, its name is the vote over the frames it was seen in, and it leaves the basket when it is taken away.
"""
from __future__ import annotations

import time
from collections import Counter as Tally
from dataclasses import dataclass, field

import cv2
import numpy as np

from .counter import Counter, Region
from .predictor import Box

MARGIN = 0.12            # of the item's box, added on each side of its crop: the recogniser sees its outline
MIN_CROP_PX = 24         # smaller boxes are specks at this camera distance


@dataclass
class Item:
    box: tuple[int, int, int, int]      # x0, y0, x1, y1 in the frame's pixels
    label: str                          # the product, or "unknown"
    confidence: float
    unknown: bool
    best_guess: str
    parts: list[Box] = field(default_factory=list)   # the Navigator's top-K parts, in the frame's pixels

    def to_dict(self) -> dict:
        return {"box": list(self.box), "label": self.label, "confidence": round(self.confidence, 4), "unknown": self.unknown,
                "best_guess": self.best_guess, "parts": [[round(v, 1) for v in (p.x0, p.y0, p.x1, p.y1)] for p in self.parts]}


@dataclass
class Scan:
    items: list[Item]
    at_edge: int = 0          # regions touching the frame's border (an arm, an item half outside): not counted
    problem: str = ""         # why nothing could be counted in this frame (the camera moved, the frame is unusable)


def basket_of(items) -> dict[str, int]:
    """{product: count}; unknown items are counted under "unknown"."""
    return dict(sorted(Tally(it.label for it in items).items()))


def crop_with_margin(frame: np.ndarray, box, margin: float = MARGIN):
    """The crop and its top-left corner in the frame."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = box
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    cx0, cy0 = max(0, int(x0 - mx)), max(0, int(y0 - my))
    cx1, cy1 = min(w, int(round(x1 + mx))), min(h, int(round(y1 + my)))
    return frame[cy0:cy1, cx0:cx1], (cx0, cy0)


def label_items(counter: Counter, frame: np.ndarray, mask: np.ndarray, split: bool = True, finder=None) -> np.ndarray:
    """Item labels (0 = counter) at the analysis size of the foreground ``mask``: touching items apart by the
    finder's boxes where there is one, else by the blob's outline (``split`` False: one item per blob)."""
    if finder is not None and split:
        return finder.label_items(frame, mask)
    return counter.label_items(frame, mask, split)


class Checkout:
    def __init__(self, counter: Counter, recogniser, split: bool = True, finder=None):
        """``split`` False: one item per connected blob (touching items stay one). ``finder``: a trained
        ItemFinder (ntsnet/item_finder.py) that tells touching items apart by their looks, instead of the blob's
        outline."""
        self.counter, self.recogniser, self.split, self.finder = counter, recogniser, split, finder

    def label_items(self, frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return label_items(self.counter, frame, mask, self.split, self.finder)

    def regions(self, frame: np.ndarray, mask=None, layers: "ItemLayers | None" = None, now=None):
        """(items to recognise, regions at the frame's edge, the label map). ``layers``: a live stream's memory of
        the items already lying still, which tells a new item from its neighbours however closely they touch.
        ``mask``, ``now``: the frame's foreground and log colour, when the caller has them."""
        if layers is not None:
            labels = layers.label_items(frame, mask, now)
        else:
            labels = self.label_items(frame, self.counter.foreground(frame, now) if mask is None else mask)
        found = self.counter.boxes(labels, frame.shape)
        inside = [r for r in found if not r.at_edge and min(r.box[2] - r.box[0], r.box[3] - r.box[1]) >= MIN_CROP_PX]
        return inside, [r for r in found if r.at_edge], labels

    @staticmethod
    def cut_out(frame: np.ndarray, region: Region, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One item's crop with its margin, and where in the crop the item lies (bool, the crop's size)."""
        crop, (ox, oy) = crop_with_margin(frame, region.box)
        own = cv2.resize((labels == region.label).astype(np.float32), (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(crop), own[oy:oy + crop.shape[0], ox:ox + crop.shape[1]] > 0.5

    def crops(self, frame: np.ndarray, regions, labels: np.ndarray):
        """Each item's crop with its margin, the neighbours that reach into it painted over with the empty counter;
        and each crop's top-left corner in the frame."""
        big = cv2.resize(labels.astype(np.int32), (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_NEAREST)
        empty = None
        out = []
        for r in regions:
            crop, (ox, oy) = crop_with_margin(frame, r.box)
            lab = big[oy:oy + crop.shape[0], ox:ox + crop.shape[1]]
            others = (lab > 0) & (lab != r.label)
            if others.any():
                empty = self.counter.empty_view(frame.shape) if empty is None else empty
                crop = np.where(others[..., None], empty[oy:oy + crop.shape[0], ox:ox + crop.shape[1]], crop)
            out.append((np.ascontiguousarray(crop), (ox, oy)))
        return out

    def scan(self, frame: np.ndarray, layers: "ItemLayers | None" = None) -> Scan:
        frame = self.counter.check_frame(frame)
        now = self.counter.log_colour(frame)  # once: the foreground, the moved check and the layers all read it
        mask = self.counter.foreground(frame, now)
        if self.counter.moved(frame, mask, now):
            return Scan([], problem="The camera moved or the light changed beyond recognition: learn the empty counter again.")
        inside, edge, labels = self.regions(frame, mask, layers, now)
        if not inside:
            return Scan([], at_edge=len(edge))
        crops, corners = zip(*self.crops(frame, inside, labels))
        preds = self.recogniser.predict_batch(list(crops))
        items = []
        for region, pred, (ox, oy) in zip(inside, preds, corners):
            if pred.nothing:  # the recogniser sees the counter itself there (a shadow or glare the counter kept)
                continue
            parts = [Box(b.x0 + ox, b.y0 + oy, b.x1 + ox, b.y1 + oy, b.score) for b in pred.boxes]
            items.append(Item(region.box, pred.label, float(pred.confidence), bool(pred.unknown),
                              pred.best_guess or pred.label, parts))
        return Scan(items, at_edge=len(edge))


class ItemLayers:
    """Items are put down one at a time: what changed since the scene last lay still is the new item, however close
    it lies to the others, and an item already there keeps its own outline. Kept per live stream.

    ``still_frames``: frames in a row with (almost) nothing changing before the scene counts as settled again."""

    def __init__(self, counter: Counter, split: bool = True, still_frames: int = 3, finder=None):
        self.counter, self.split, self.still_frames = counter, split, still_frames
        self.finder = finder
        self.settled: Counter | None = None       # the scene as it last lay still, items and all
        self.settled_labels: np.ndarray | None = None
        self._previous: Counter | None = None
        self._still = 0

    def label_items(self, frame: np.ndarray, mask: np.ndarray | None = None, now: np.ndarray | None = None) -> np.ndarray:
        """Item labels at the analysis size; ``mask``, ``now``: the frame's foreground and log colour, if known
        (every counter here shares the empty counter's analysis size, so one log colour serves them all)."""
        frame = self.counter.check_frame(frame)
        now = self.counter.log_colour(frame) if now is None else now
        mask = self.counter.foreground(frame, now) if mask is None else mask
        if self.settled is None:
            labels = label_items(self.counter, frame, mask, self.split, self.finder)
        else:
            added = mask & self.settled.foreground(frame, now)     # on the counter now and not in the settled scene
            kept = np.where(mask & ~added, self.settled_labels, 0)  # settled items' pixels still there
            new = label_items(self.counter, frame, added, self.split, self.finder)
            labels = np.where(new > 0, new + kept.max(), kept)
        self._note_stillness(frame, now, labels)
        return labels

    def _note_stillness(self, frame: np.ndarray, now: np.ndarray, labels: np.ndarray):
        moving = self._previous is not None and self._previous.foreground(frame, now).mean() > 0.002
        self._still = 0 if (self._previous is None or moving) else self._still + 1
        self._previous = Counter.from_logs([now], self.counter.frame_size)
        if self._still >= self.still_frames:  # settled: later frames are compared with this scene
            self.settled, self.settled_labels = self._previous, labels
            self._still = 0

    def clear(self):
        self.settled = self.settled_labels = self._previous = None
        self._still = 0


class LiveCheckout:
    """One live stream at the counter: its item layers (who was put down when) and its basket."""

    def __init__(self, checkout: Checkout, clock=None):
        self.checkout = checkout
        self.layers = ItemLayers(checkout.counter, checkout.split, finder=checkout.finder)
        self.basket = Basket(clock=clock)

    def update(self, frame: np.ndarray) -> tuple[Scan, dict[str, int]]:
        self.layers.finder = self.checkout.finder  # a finder trained meanwhile splits the next arrivals
        scan = self.checkout.scan(frame, self.layers)
        return scan, self.basket.update(scan)

    def clear(self):
        """New customer."""
        self.basket.clear()
        self.layers.clear()


def iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    box: tuple[int, int, int, int]
    still_since: float
    last_seen: float
    votes: Tally = field(default_factory=Tally)
    counted: bool = False

    @property
    def label(self) -> str:
        return self.votes.most_common(1)[0][0] if self.votes else "unknown"


class Basket:
    """Items tracked from scan to scan (by box overlap). ``still_s``: how long an item lies still before it counts;
    ``gone_s``: how long it is missed before it leaves (a hand passing over it hides it for a moment);
    ``moved_px``: how far its box may shift and still be "still" (the segmentation's own jitter)."""

    def __init__(self, still_s: float = 0.5, gone_s: float = 0.8, moved_px: float = 8.0, clock=None):
        self.still_s, self.gone_s, self.moved_px = still_s, gone_s, moved_px
        self.clock = clock or (lambda: time.monotonic())
        self.tracks: list[Track] = []

    def clear(self):
        """New customer."""
        self.tracks = []

    def update(self, scan: Scan) -> dict[str, int]:
        now = self.clock()
        if scan.problem:  # an unusable frame changes nothing
            return self.counts()
        unmatched = list(range(len(self.tracks)))
        for item in sorted(scan.items, key=lambda it: -(it.box[2] - it.box[0]) * (it.box[3] - it.box[1])):
            best = max(unmatched, key=lambda t: iou(self.tracks[t].box, item.box), default=None)
            if best is None or iou(self.tracks[best].box, item.box) < 0.3:
                self.tracks.append(Track(item.box, now, now, Tally([item.label])))
                continue
            unmatched.remove(best)
            track = self.tracks[best]
            if max(abs(a - b) for a, b in zip(track.box, item.box)) > self.moved_px:
                track.still_since, track.votes = now, Tally()  # moved (or swapped): it counts again once still
            track.box, track.last_seen = item.box, now
            track.votes[item.label] += 1
            if not track.counted and now - track.still_since >= self.still_s:
                track.counted = True
                self._drop_moved_from(track, now)
        self.tracks = [t for t in self.tracks if now - t.last_seen <= self.gone_s]
        return self.counts()

    def _drop_moved_from(self, track: Track, now: float):
        """An item just counted where a counted item of the same name went missing: it was moved, not added."""
        for other in self.tracks:
            if other is not track and other.counted and other.last_seen < now and other.label == track.label:
                self.tracks.remove(other)
                return

    def counts(self) -> dict[str, int]:
        return dict(sorted(Tally(t.label for t in self.tracks if t.counted).items()))
