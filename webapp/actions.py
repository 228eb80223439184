"""Everything the app can do, as plain Python: tests call these without a browser, the tabs wire them to Gradio.

State lives on disk, not in the web server: photos in the catalogue, training in the job runner's run
directories, the active model in CATALOGUE/active_model.json. Restarting the app loses nothing.

Studio is the one object a screen holds; its methods come by concern from
webapp/capture.py (catalogue and capture), webapp/labelling.py (selection, bulk edits, the review queue),
webapp/training_actions.py (jobs and the active model) and
webapp/live.py (recognition and evaluation) and
webapp/checkout_actions.py (the checkout counter).
"""
from __future__ import annotations

import threading
from pathlib import Path

from dataset_tools import Catalogue

from .capture import CatalogueActions
from .checkout_actions import CheckoutActions
from .empty_scene import EmptySceneGate
from .labelling import LabellingActions
from .common import (CONDITION_TAGS, MAX_BURST_SECONDS, MAX_UPLOAD_FILES, MAX_UPLOAD_MB, MIN_PHOTOS_PER_PRODUCT,  # noqa: F401
                     THUMBNAIL_PX, StudioError)
from .live import LiveAnswers, LiveWorker, Recognition, RecognitionActions, SessionMemory  # noqa: F401
from .training_actions import TrainingActions


class Studio(CatalogueActions, LabellingActions, TrainingActions, RecognitionActions, CheckoutActions):
    def __init__(self, db, checkpoint: str | None = None, backend: str = "auto", allow_capture: bool = True,
                 allow_training: bool = True, live_threads: int | None = None, precision: str = "auto"):
        """``allow_capture`` / ``allow_training`` False: every action that writes the catalogue, reads its photos,
        or trains refuses on the server, whatever the page shows (a recognise-only demo). ``live_threads``: threads
        of the compiled model for the live stream (None: all cores; app.py leaves one to a browser on this machine)."""
        self.db = Path(db)
        self.backend, self.precision = backend, precision
        self.live_threads = live_threads
        self.allow_capture, self.allow_training = allow_capture, allow_training
        self._thumbs: dict = {}
        self.catalogue = Catalogue(self.db)
        self._predictor = None
        self._predictor_path = None
        self._lock = threading.Lock()
        self._busy = threading.Lock()
        self._instant = None
        self._live = LiveAnswers()
        self._unknown_frames = SessionMemory(keep_seconds=300)  # each session's last frame answered "not in the catalogue"
        self._live_worker = None
        self._empty_scene = EmptySceneGate(self.catalogue)
        self._counter, self._baskets = None, SessionMemory(keep_seconds=600)  # checkout: the counter, each session's basket
        self._finder, self._finder_stamp = None, None  # checkout: the item finder and its file's mtime
        self._review_cache, self._review_lock = None, threading.Lock()
        if checkpoint:
            self._activate(checkpoint, pin=False)

    def _require(self, what: str):
        allowed = self.allow_training if what == "training" else self.allow_capture
        if not allowed:
            raise StudioError(f"{'Training' if what == 'training' else 'Capture and catalogue changes'} are turned off in this app.")
