"""Recognition: one photo or a live stream, the model that answers it, and the evaluation of the active model.

Live frames go to one background worker (LiveWorker) that serves each session's newest frame, least recently
answered session first; the page gets its frame back at once with that session's latest answer drawn on it.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ntsnet.device import release_cached_memory
from ntsnet.draw import draw_prediction
from ntsnet.predictor import EMPTY_SCENE, Prediction
from training import active

from . import common
from .common import StudioError

log = logging.getLogger("webapp")


@dataclass
class Recognition:
    annotated: np.ndarray
    label: str                       # product name, or a sentence when unsure / no model
    confidence: float
    top5: dict[str, float]
    sure: bool
    model: str                       # which model answered
    backend: str = ""                # what ran it: openvino, torch fp32 ...
    answers_per_s: float = 0.0       # the model's own answer rate over the last seconds (all sessions)
    fresh: bool = True               # False: the newest frame drawn with the last answer while the model was busy


class SessionMemory:
    """Per-session values that are forgotten ``keep_seconds`` after their last update (a closed tab's frame or
    answer must not live on), at most ``max_sessions`` of them (the most recent)."""

    def __init__(self, keep_seconds: float = 60.0, max_sessions: int = 256):
        self.keep, self.max = keep_seconds, max_sessions
        self._items: dict[str, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def put(self, session: str, value):
        now = time.monotonic()
        with self._lock:
            self._items[session] = (now, value)
            if len(self._items) > self.max or any(now - t > self.keep for t, _ in self._items.values()):
                live = sorted(((t, k) for k, (t, _) in self._items.items() if now - t <= self.keep), reverse=True)[: self.max]
                self._items = {k: self._items[k] for _, k in live}

    def get(self, session: str, default=None):
        with self._lock:
            hit = self._items.get(session)
        return default if hit is None or time.monotonic() - hit[0] > self.keep else hit[1]

    def stamp(self, session: str) -> float | None:
        with self._lock:
            hit = self._items.get(session)
        return None if hit is None else hit[0]

    def __len__(self):
        with self._lock:
            return len(self._items)


class LiveAnswers:
    """Each live session's last answer (kept for a minute after its last frame, so a closed tab's memory goes)
    and the model's recent answer rate."""

    def __init__(self, keep_seconds: float = 60.0, max_sessions: int = 256):
        self._last = SessionMemory(keep_seconds, max_sessions)
        self._memories = SessionMemory(keep_seconds, max_sessions)  # each session's reusable part features
        self._news = SessionMemory(keep_seconds, max_sessions)      # an answer not shown yet
        self._times: list[float] = []
        self._lock = threading.Lock()

    def answered(self, session: str, answer: tuple, seconds: float):
        self._last.put(session, answer)
        self._news.put(session, True)
        now = time.monotonic()
        with self._lock:
            self._times = [t for t in self._times if now - t < 5.0] + [now]

    def last(self, session: str):
        return self._last.get(session)

    def memory(self, session: str, predictor) -> dict:
        """The session's live-video memory for ``predictor`` (a new model starts a new one)."""
        mem = self._memories.get(session)
        if mem is None or mem.get("predictor") is not predictor:
            mem = {"predictor": predictor}
            self._memories.put(session, mem)
        return mem

    def take_news(self, session: str) -> bool:
        """True once per new answer: the caller updates the label and top-5 only then."""
        news = self._news.get(session, False)
        if news:
            self._news.put(session, False)
        return bool(news)

    def least_recently_answered(self, sessions) -> str:
        return min(sessions, key=lambda k: self._last.stamp(k) or float("-inf"))

    def rate(self) -> float:
        with self._lock:
            now = time.monotonic()
            recent = [t for t in self._times if now - t < 5.0]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)

    def sessions(self) -> int:
        return len(self._last)


class LiveWorker:
    """One background thread that runs the model on live frames: each session has a slot holding only its newest
    frame (older ones are replaced, never queued), and the next slot served is the session answered least
    recently, so several visitors share the model round robin."""

    def __init__(self, studio: "RecognitionActions"):
        self.studio = studio
        self._slots: dict[str, np.ndarray] = {}
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="live-recognition", daemon=True)
        self._thread.start()

    def submit(self, session: str, rgb: np.ndarray):
        with self._cond:
            self._slots[session] = rgb
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._slots)

    def _run(self):
        live = self.studio._live
        while True:
            with self._cond:
                while not self._slots:
                    self._cond.wait()
                session = live.least_recently_answered(list(self._slots))
                rgb = self._slots.pop(session)
            try:
                with self.studio._busy:
                    self.studio._answer(rgb, session, live=True)
            except Exception as exc:  # a bad frame or a model being swapped must not end live recognition
                log.warning("live recognition: %s", exc)



class RecognitionActions:
    """A mixin of Studio (webapp/actions.py): it uses ``self.predictor()``, ``self.instant`` and the live state
    ``self._live``, ``self._busy``, ``self._lock``."""

    # -------------------------------------------------------------------------------- recognise
    def _answerer(self):
        """(predictor, model name, backend name) that answers now: the active trained model, else the instant one."""
        predictor = self.predictor()
        if predictor is not None:
            return predictor, active.short_name(self._predictor_path or "model"), getattr(predictor, "backend_name", "torch")
        if self.instant.ready():
            return (self.instant, f"instant (prototypes of {len(self.instant.index.labels)} photos)",
                    self.instant.embedder.backend_name if self.instant._embedder is not None else "torch")
        return None, "none", ""

    def recognise(self, frame, session: str = "-", wait: bool = False) -> Recognition | None:
        """One frame in, the annotated frame and the answer out.

        Live (``wait`` False): the frame goes to the background model worker, which always takes the newest
        frame of the session that was answered least recently, and this frame comes back at once with the
        session's latest answer and boxes drawn on it (``fresh`` when that answer is new since the last call).
        So the picture keeps moving at the camera's pace however slow the model is, and nothing queues.
        None until the session's first answer exists. ``wait``: a single photo, answered when the model is free."""
        if frame is None:
            return None
        rgb = np.asarray(frame)
        if not wait:
            last = self._live.last(session)
            # which model answers is the worker's question; here only a session with no answer yet asks it
            if last is None and self._answerer()[0] is None:
                return self._no_model(rgb)
            self._worker().submit(session, rgb)
            fresh = self._live.take_news(session)
            last = self._live.last(session)  # read after the news: the answer shown is never older than what was taken
            if last is None:
                return None
            return self._present(rgb, session, *last, fresh=fresh)
        with self._busy:
            answer = self._answer(rgb, session, live=False)
        return self._no_model(rgb) if answer is None else self._present(rgb, session, *answer, fresh=True)

    def _no_model(self, rgb) -> Recognition:
        return Recognition(rgb, "No model yet: collect photos of at least two products (the instant model is ready after "
                           "the first few), or train one (Train tab).", 0.0, {}, False, "none")

    def _answer(self, rgb, session: str, live: bool):
        """Run the model that answers now on one frame (the caller holds ``_busy``); records and returns the answer."""
        predictor, model, backend = self._answerer()
        if predictor is None:
            return None
        t0 = time.perf_counter()
        reuse = live and hasattr(predictor, "unknown_threshold")  # a trained model: reuse still parts between frames
        empty = self._empty_scene.verdict(rgb)
        if empty:  # the captured empty scene: no model needed to say "nothing here"
            pred = Prediction(EMPTY_SCENE, 1.0, [(EMPTY_SCENE, 1.0)], image_size=(rgb.shape[1], rgb.shape[0]))
        else:
            pred = predictor.predict(rgb, memory=self._live.memory(session, predictor)) if reuse else predictor.predict(rgb)
            if empty is False and pred.nothing:  # something is in view that the model took for the scene (small, far)
                pred = pred.without_empty_scene()
        answer = (pred, model, getattr(predictor, "backend_name", backend))
        self._live.answered(session, answer, time.perf_counter() - t0)
        return answer

    def _worker(self) -> "LiveWorker":
        with self._lock:
            if self._live_worker is None:
                self._live_worker = LiveWorker(self)
            return self._live_worker

    def _present(self, rgb, session: str, pred, model, backend, fresh: bool) -> Recognition:
        if pred.unknown:
            self._unknown_frames.put(session, rgb)
        sure = pred.confidence >= common.UNSURE_BELOW and not pred.unknown and not pred.nothing
        if pred.nothing:  # the camera's empty scene: no product named, no parts drawn
            label, banner = "Nothing to recognise: no product in view", "no product"
            pred = dataclasses.replace(pred, boxes=[])
        elif pred.unknown:
            closest = ", ".join(name for name, _ in pred.top5[:2]) or pred.best_guess
            label, banner = f"Not in the catalogue — closest: {closest}", "unknown product"
        elif not sure:
            label, banner = f"Not sure (best guess {pred.label}, {pred.confidence:.0%})", f"not sure: {pred.label}?"
        else:
            label, banner = pred.label, None
        annotated = draw_prediction(rgb, pred, fps=self._live.rate(), label=banner)
        return Recognition(annotated, label, pred.confidence, dict(pred.top5), sure, model, backend=backend,
                           answers_per_s=self._live.rate(), fresh=fresh)

    def add_unknown_as_product(self, session: str, name: str, sku: str = "") -> dict:
        """The natural next step after "Not in the catalogue": a new product whose first photo is the last frame this
        session saw answered so. Returns save_photo's result."""
        self._require("capture")
        frame = self._unknown_frames.get(session)
        if frame is None:
            raise StudioError("No frame was answered “Not in the catalogue” in this session yet: show the product to "
                              "the camera (or upload its photo) first.")
        self.create_product(name, sku)
        try:
            saved = self.save_photo(frame, name.strip(), source="webcam")
            if "duplicate" in saved["warnings"]:
                raise StudioError(f"Nothing added: {saved['message'][len('Not saved: '):]}")
        except StudioError:
            self.catalogue.delete_product(name, confirm=True)  # all or nothing: no product without its photo
            raise
        return {**saved, "message": f"Added “{name.strip()}” with its first photo: take a few more in Collect. " + saved["message"]}

    # --------------------------------------------------------------------------------- evaluate
    def evaluate(self, split: str = "test", progress: bool = False, unknown_products=()) -> dict:
        self._require("capture")
        from training.evaluate import evaluate

        path = self.active_checkpoint()
        if path is None:
            raise StudioError("No active model: train one first (Train tab) and make it active.")
        out = Path(path).parent / f"evaluation-{split}" if not path.startswith("hf://") else self.db / "evaluation"
        predictor = self.predictor()
        try:
            return {**evaluate(path, self.db, split=split, out_dir=out, progress=progress, predictor=predictor,
                               unknown_products=[u for u in unknown_products if u]),
                    "confusion_png": str(out / "confusion.png")}
        except ValueError as exc:
            raise StudioError(str(exc)) from None
        finally:  # a Train click started next finds the evaluation's GPU memory free
            if predictor is not None:
                release_cached_memory(predictor.device)
