""""Nothing to recognise" before any model runs: the camera's empty scene, learnt from the catalogue's latest
empty-scene capture (Collect: "Capture the empty scene"), compared with each frame whatever the light did since."""
from __future__ import annotations

import logging
import threading
import time

import numpy as np

from ntsnet.counter import Counter, CounterError
from ntsnet.images import ImageLoadError, to_rgb_array
from ntsnet.predictor import EMPTY_SCENE

log = logging.getLogger("webapp")
LEARN_FROM = 16       # the newest empty-scene photos: the camera's latest burst
GATE_WIDTH = 160      # analysis width: enough to see a product, cheap beside the model
RECHECK_S = 2.0       # how often the catalogue is asked whether the empty scene was captured again


class EmptySceneGate:
    def __init__(self, catalogue):
        self.catalogue = catalogue
        self._key, self._counter, self._checked = None, None, float("-inf")
        self._lock = threading.Lock()

    def counter(self) -> Counter | None:
        """The empty scene as the catalogue last captured it (None: never captured, or unusable)."""
        with self._lock:
            if time.monotonic() - self._checked < RECHECK_S:
                return self._counter
            self._checked = time.monotonic()
            rows = self.catalogue.db.execute(
                "SELECT i.id, i.path FROM images i JOIN products p ON p.id = i.product_id WHERE p.name = ? "
                "ORDER BY i.id DESC LIMIT ?", (EMPTY_SCENE, LEARN_FROM)).fetchall()
            key = tuple(r[0] for r in rows)
            if key != self._key:
                self._key, self._counter = key, self._learn([r[1] for r in rows])
            return self._counter

    def _learn(self, paths) -> Counter | None:
        frames = []
        for p in paths:
            try:
                frames.append(to_rgb_array(self.catalogue.image_path(p)))
            except ImageLoadError:
                continue
        if frames:  # the newest photo's size: an older capture by another camera is left out
            frames = [f for f in frames if f.shape == frames[0].shape]
        try:
            return Counter.learn(frames, width=GATE_WIDTH) if len(frames) >= 2 else None
        except CounterError as exc:
            log.warning("empty scene not learnt: %s", exc)
            return None

    def verdict(self, rgb: np.ndarray) -> bool | None:
        """True: the frame shows the captured empty scene (any light); False: something is in it; None: no empty
        scene captured, or the frame is another camera's or crop's (the model alone decides then)."""
        counter = self.counter()
        if counter is None:
            return None
        try:
            return counter.is_empty(rgb)
        except CounterError:
            return None
