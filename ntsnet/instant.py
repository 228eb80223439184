"""Instant recognition: a per-product prototype index over pretrained embeddings, updated photo by photo.

Adding a photo costs one forward pass of a frozen ImageNet backbone; each product's prototype is the mean of
its photos' L2-normalised embeddings, kept as an exact running sum (float64) so adding, removing or moving a
photo gives the same index as rebuilding from scratch. A query names the product whose prototype is the most
similar once both are whitened by the catalogue's own statistics (``WhitenedView``); below a calibrated plain
cosine similarity to every prototype it answers "unknown" instead of naming a product.

The index lives in CATALOGUE/instant_index.safetensors and is synced against the catalogue on load: photos
deleted, moved or merged since are dropped or relabelled, new ones embedded, and a changed backbone means a
full rebuild.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .backbones import create_backbone
from .checkpoint import atomic_write
from .device import exact_fp32, resolve_device, to_device_of
from .images import PREPROCESSING, to_input_tensor, to_rgb_array
from .predictor import Prediction
from .runtime import background_work, keep_freed_memory, single_torch_thread
from .whitening import Whitening, whitened_prototypes

log = logging.getLogger("ntsnet")

INDEX_FILE = "instant_index.safetensors"
TEMPERATURE = 20.0   # cosine similarity -> softmax sharpness for the reported confidence
SAVE_EVERY_S = 5.0   # captures in a burst share one write of the index file
REFIT_EVERY_S = 5.0  # a large index refits its whitening at most this often while photos keep coming
BACKGROUND_REFIT_ABOVE = 5000  # photos: above this a refit takes seconds and runs beside the answers


class Embedder:
    """Frozen pretrained backbone -> L2-normalised pooled feature. On a CPU the pooled backbone runs compiled
    (OpenVINO, built once into the user cache in a background thread; eager PyTorch answers until then)."""

    def __init__(self, backbone: str = "efficientnet_lite0", size: int = 224, backend: str = "auto", background: bool = True,
                 device: str = "auto"):
        from . import compiled

        self.name, self.size = backbone, size
        self.device = resolve_device(device)
        keep_freed_memory()  # no numeric change, see runtime.py (not folded: stored embeddings stay comparable)
        self.net = create_backbone(backbone, pretrained=True).eval().to(self.device)
        if self.device.type == "cpu":
            self.net = self.net.to(memory_format=torch.channels_last)  # faster on oneDNN in fp32
        self.graphs = None
        self._thread = None
        if compiled.resolve_backend(backend, self.device) == "openvino":
            key = compiled.state_key(self.net, "embedder", size)

            def build():
                try:
                    # fp32 on every CPU: stored embeddings must not depend on which path made them
                    self.graphs = compiled.embedder_graphs(self.net, size, key, precision="fp32")
                except Exception as exc:  # eager PyTorch keeps answering
                    log.warning("ntsnet: compiled embedder unavailable (%s); using eager PyTorch", str(exc).splitlines()[0] if str(exc) else exc)

            if background:
                self._thread = background_work(build, "ntsnet-embedder-export")
            else:
                build()

    @property
    def backend_name(self) -> str:
        return "openvino" if self.graphs is not None else "torch fp32"

    def wait_for_engine(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.graphs is not None

    @torch.inference_mode()
    def __call__(self, images) -> np.ndarray:
        arrays = [to_rgb_array(im) for im in images]
        if not arrays:
            return np.zeros((0, self.net.out_channels), np.float32)
        graphs = self.graphs
        # one frame through the compiled graph: faster without PyTorch's thread pool (runtime.py)
        with single_torch_thread() if graphs is not None and len(arrays) == 1 else contextlib.nullcontext():
            return self._embed(arrays, graphs)

    def _embed(self, arrays, graphs) -> np.ndarray:
        out = []
        for start in range(0, len(arrays), 32):
            x = to_input_tensor(arrays[start:start + 32], self.size, self.net.mean, self.net.std)
            if graphs is not None:
                f = graphs.run("pooled", x)[0]
            else:
                with exact_fp32():  # stored embeddings must not depend on TF32 either
                    f = self.net(to_device_of(self.net, x)).float().mean((2, 3)).cpu()
            out.append(torch.nn.functional.normalize(f, dim=1).numpy())
        return np.concatenate(out)


class InstantIndex:
    def __init__(self, backbone: str = "efficientnet_lite0", dim: int | None = None):
        self.backbone = backbone
        self.embeddings: dict[int, np.ndarray] = {}   # image id -> unit vector
        self.labels: dict[int, str] = {}              # image id -> product
        self.sums: dict[str, np.ndarray] = {}         # product -> float64 sum of its unit vectors
        self.counts: dict[str, int] = {}
        self.version = 0                              # bumped by every edit: the whitened view is refitted from it
        self._view: WhitenedView | None = None
        self._lock = threading.RLock()                # captures edit while the live worker classifies
        self._refitting: threading.Thread | None = None

    # ---------------------------------------------------------------------------- incremental edits
    def add(self, image_id: int, product: str, embedding: np.ndarray):
        with self._lock:
            if image_id in self.embeddings:
                self.remove(image_id)
            e = np.asarray(embedding, np.float32)
            self.embeddings[image_id], self.labels[image_id] = e, product
            self.sums[product] = self.sums.get(product, np.zeros(e.shape, np.float64)) + e.astype(np.float64)
            self.counts[product] = self.counts.get(product, 0) + 1
            self.version += 1

    def remove(self, image_id: int):
        with self._lock:
            e, product = self.embeddings.pop(image_id), self.labels.pop(image_id)
            self.counts[product] -= 1
            if self.counts[product] == 0:
                del self.counts[product], self.sums[product]
            else:
                self.sums[product] = self.sums[product] - e.astype(np.float64)
            self.version += 1

    def relabel(self, image_id: int, product: str):
        with self._lock:
            e = self.embeddings[image_id]
            self.remove(image_id)
            self.add(image_id, product, e)

    @classmethod
    def from_embeddings(cls, items, backbone: str = "efficientnet_lite0") -> "InstantIndex":
        index = cls(backbone)
        for image_id, product, e in items:
            index.add(image_id, product, e)
        return index

    # ------------------------------------------------------------------------------------ queries
    @property
    def products(self) -> list[str]:
        return sorted(self.counts)

    def prototypes(self) -> tuple[list[str], np.ndarray]:
        with self._lock:
            return unit_prototypes(self.counts, self.sums)

    def snapshot(self) -> "IndexSnapshot":
        with self._lock:
            return IndexSnapshot(self)

    def view(self) -> "WhitenedView":
        """The rule that answers: whitened prototypes and their threshold, refitted after edits. On a large
        catalogue at most every REFIT_EVERY_S seconds in a long burst, and (above BACKGROUND_REFIT_ABOVE photos) in
        a background thread while the previous fit keeps answering."""
        view = self._view
        if view is not None and view.version == self.version:
            return view
        n = len(self.embeddings)
        if view is not None and n > 512 and time.monotonic() - view.made < REFIT_EVERY_S:
            return view
        if view is None or n <= BACKGROUND_REFIT_ABOVE:
            view = self._view = WhitenedView(self.snapshot())
            return view
        with self._lock:
            if self._refitting is None or not self._refitting.is_alive():
                snap = IndexSnapshot(self)
                self._refitting = background_work(self._refit, "ntsnet-instant-refit", args=(snap,))
        return view

    def _refit(self, snap: "IndexSnapshot"):
        fitted = WhitenedView(snap)
        with self._lock:
            if self._view is None or self._view.version < fitted.version:
                self._view = fitted

    @property
    def threshold(self) -> float | None:
        """Plain cosine similarity to the closest prototype below which the answer is "unknown" (None: never)."""
        return self.view().threshold

    def classify(self, embeddings: np.ndarray, top_k: int = 5) -> list[Prediction]:
        view = self.view()  # one state of the index for the whole call: names, ranking and threshold agree
        if not view.names:
            raise ValueError("the instant index is empty: capture photos first")
        names, threshold = view.names, view.threshold
        ranked, plain = view.scores(embeddings)
        out = []
        for row, plain_row in zip(ranked, plain):
            logits = TEMPERATURE * (row - row.max())
            probs = np.exp(logits) / np.exp(logits).sum()
            order = np.argsort(-row)[:top_k]
            top = [(names[i], float(probs[i])) for i in order]
            best_sim = float(plain_row.max())
            unknown = threshold is not None and best_sim < threshold
            out.append(Prediction("unknown" if unknown else top[0][0], top[0][1], top, [], int(order[0]), (0, 0),
                                  unknown=unknown, best_guess=top[0][0], score=best_sim))
        return out

    # -------------------------------------------------------------------------------- persistence
    def save(self, path: Path):
        from safetensors.torch import save_file

        ids = sorted(self.embeddings)
        tensors = {"ids": torch.tensor(ids, dtype=torch.int64),
                   "embeddings": torch.from_numpy(np.stack([self.embeddings[i] for i in ids])) if ids else torch.zeros(0, 1)}
        meta = {"format": "ntsnet-instant-index", "backbone": self.backbone, "preprocessing": PREPROCESSING,
                "labels": json.dumps([self.labels[i] for i in ids], ensure_ascii=False)}
        atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: Path) -> "InstantIndex | None":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != "ntsnet-instant-index" or meta.get("preprocessing") != PREPROCESSING:
                    return None  # embeddings of other inputs than a frame gets now: recomputed
                ids = fh.get_tensor("ids").tolist()
                emb = fh.get_tensor("embeddings").numpy()
            labels = json.loads(meta["labels"])
        except (OSError, SafetensorError, ValueError, KeyError):
            return None  # unreadable: it is only a cache, rebuild it
        index = cls.from_embeddings(zip(ids, labels, emb), backbone=meta["backbone"])
        return index


def calibrate_threshold(known_best_scores, keep: float = 0.95) -> float:
    """The score that keeps ``keep`` of known-product validation photos: below it means 'unknown'."""
    scores = np.sort(np.asarray(known_best_scores, np.float64))
    if len(scores) == 0:
        return float("-inf")
    return float(np.quantile(scores, 1.0 - keep))


class IndexSnapshot:
    """The index at one version, copied under its lock: a refit reads it while captures keep editing the index."""

    def __init__(self, index: "InstantIndex"):
        ids = sorted(index.embeddings)
        self.version = index.version
        self.raw = np.stack([index.embeddings[i] for i in ids]) if ids else np.zeros((0, 1), np.float32)
        self.labels = [index.labels[i] for i in ids]
        self.counts, self.sums = dict(index.counts), dict(index.sums)  # sums are replaced on edit, never changed in place

def unit_prototypes(counts: dict, sums: dict) -> tuple[list[str], np.ndarray]:
    """(sorted product names, their unit-length mean embeddings) from running counts and sums."""
    names = sorted(counts)
    if not names:
        return [], np.zeros((0, 0), np.float32)
    protos = np.stack([sums[n] / counts[n] for n in names])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True) + 1e-12
    return names, protos.astype(np.float32)


class WhitenedView:
    """What the instant model answers with for one state of its index. Which product: the highest cosine similarity
    to a product's prototype, both whitened by the catalogue's own statistics (ntsnet/whitening.py). Whether it is
    one at all: the highest plain cosine similarity to a prototype against ``threshold``.

    The threshold lies between two leave-one-out distributions over the captured photos: each photo's similarity
    to its own product (what a known product scores) and to the closest other product (what a product that is not
    in the catalogue tends to score). Halfway between the 5th percentile of the first and the 95th of the second;
    few photos make the first optimistic, and the midpoint leaves room for that. (Whitened similarities cannot be
    calibrated so: a photo left out of its prototype still shaped the whitening.)"""

    def __init__(self, snap: "IndexSnapshot"):
        self.version, self.photos, self.made = snap.version, len(snap.labels), time.monotonic()
        self.names, self.plain = unit_prototypes(snap.counts, snap.sums)
        self.threshold = None
        if not self.names:
            return
        self.whiten = Whitening(snap.raw)
        self.protos = whitened_prototypes(self.whiten, snap.raw, snap.labels, self.names)
        self.threshold = self._calibrate(snap)

    def scores(self, embeddings) -> tuple[np.ndarray, np.ndarray]:
        """(whitened similarities that rank the products, plain similarities that the unknown threshold reads)."""
        e = np.asarray(embeddings, np.float32)
        return self.whiten(e) @ self.protos.T, e @ self.plain.T

    def _calibrate(self, snap: "IndexSnapshot") -> float | None:
        if len(self.names) < 2:
            return None
        rows = [k for k, label in enumerate(snap.labels) if snap.counts[label] >= 2]
        if not rows:
            return None
        emb = snap.raw[rows]
        labels = [snap.labels[k] for k in rows]
        col = {n: j for j, n in enumerate(self.names)}
        own_col = np.array([col[label] for label in labels])
        counts = np.array([snap.counts[label] for label in labels], np.float64)[:, None]
        sums = np.stack([snap.sums[n] for n in self.names])
        loo = (sums[own_col] - emb) / (counts - 1)   # own prototype without the photo
        own = np.einsum("nd,nd->n", emb, loo / (np.linalg.norm(loo, axis=1, keepdims=True) + 1e-12))
        sims = emb @ self.plain.T
        sims[np.arange(len(rows)), own_col] = -np.inf
        other = sims.max(axis=1)
        known_low = calibrate_threshold(own, keep=0.95)
        other_high = float(np.quantile(other, 0.95))
        return (known_low + other_high) / 2 if other_high < known_low else known_low


class InstantRecogniser:
    """The index kept in step with a catalogue (anything with ``.db`` and ``.image_path``)."""

    def __init__(self, catalogue, backbone: str = "efficientnet_lite0", embedder: Embedder | None = None):
        self.catalogue = catalogue
        self.path = Path(catalogue.root) / INDEX_FILE
        self._embedder = embedder
        self.backbone = backbone
        loaded = InstantIndex.load(self.path) if self.path.exists() else None
        self.index = loaded if loaded is not None and loaded.backbone == backbone else InstantIndex(backbone)
        self._saved_at = float("-inf")

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder(self.backbone)
        return self._embedder

    def _labelled(self) -> dict[int, str]:
        rows = self.catalogue.db.execute(
            "SELECT i.id, p.name FROM images i JOIN products p ON p.id = i.product_id").fetchall()
        return dict(rows)

    def sync(self, save: bool = True, progress=None) -> dict:
        """Bring the index in line with the catalogue; returns what changed."""
        want = self._labelled()
        have = self.index.labels
        removed = [i for i in list(have) if i not in want]
        for i in removed:
            self.index.remove(i)
        moved = [i for i, p in list(have.items()) if want.get(i) not in (None, p)]
        for i in moved:
            self.index.relabel(i, want[i])
        missing = [i for i in want if i not in self.index.labels]
        paths = {i: p for i, p in self.catalogue.db.execute("SELECT id, path FROM images")}
        for start in range(0, len(missing), 32):
            chunk = missing[start:start + 32]
            embs = self.embedder([self.catalogue.image_path(paths[i]) for i in chunk])
            for i, e in zip(chunk, embs):
                self.index.add(i, want[i], e)
            if progress:
                progress(min(start + 32, len(missing)), len(missing))
        changed = bool(removed or moved or missing)
        if changed:
            if save:
                self.save()
        return {"added": len(missing), "removed": len(removed), "relabelled": len(moved), "photos": len(self.index.labels)}

    def add_photo(self, image_id: int, product: str, image) -> None:
        """One new capture: one forward pass, no retraining. Saved at most every few seconds: photos a crash
        loses from the file are simply embedded again by the next ``sync``."""
        self.index.add(image_id, product, self.embedder([image])[0])
        if time.monotonic() - self._saved_at > SAVE_EVERY_S:
            self.save()

    def save(self):
        self.index.save(self.path)
        self._saved_at = time.monotonic()

    def ready(self) -> bool:
        return len(self.index.products) >= 2

    def predict(self, image) -> Prediction:
        return self.predict_batch([image])[0]

    def predict_batch(self, images) -> list[Prediction]:
        """Several photos (a checkout's items) in one call."""
        arrays = [to_rgb_array(im) for im in images]
        if not arrays:
            return []
        preds = self.index.classify(self.embedder(arrays))
        for pred, rgb in zip(preds, arrays):
            pred.image_size = (rgb.shape[1], rgb.shape[0])
        return preds
