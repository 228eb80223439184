"""Everything the app can do, as plain Python: tests call these without a browser, app.py wires them to Gradio.

State lives on disk, not in the web server: photos in the catalogue, training in the job runner's run
directories, the active model in CATALOGUE/active_model.json. Restarting the app loses nothing.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataset_tools import Catalogue, CatalogueError, DuplicateImage, InvalidImage, assign_splits
from ntsnet.draw import draw_prediction
from training import active, jobs

log = logging.getLogger("webapp")

CONDITION_TAGS = ["front", "side", "back", "top", "dark", "bright", "blurry", "far", "close"]
MIN_PHOTOS_PER_PRODUCT = 5
MAX_UPLOAD_MB = 20          # per file (Gradio refuses larger uploads before they reach us)
MAX_UPLOAD_FILES = 100      # per click
MAX_BURST_SECONDS = 60
THUMBNAIL_PX = 160
UNSURE_BELOW = 0.5  # below this confidence the app says it is unsure instead of naming a product


class StudioError(ValueError):
    """A user action that cannot be done; the message is shown as is."""


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

    def __init__(self, studio: "Studio"):
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


class Studio:
    def __init__(self, db, checkpoint: str | None = None, backend: str = "auto", allow_capture: bool = True,
                 allow_training: bool = True, live_threads: int | None = None, precision: str = "auto"):
        """``allow_capture`` / ``allow_training`` False: every action that writes the catalogue, reads its photos,
        or trains refuses on the server, whatever the page shows (a recognise-only demo). ``live_threads``: threads
        of the compiled model for the live stream (None: all cores; app.py leaves one to a browser on this machine)."""
        self.db = Path(db)
        self.backend, self.precision = backend, precision
        self.live_threads = live_threads
        self.allow_capture, self.allow_training = allow_capture, allow_training
        self._thumbs: dict[str, np.ndarray] = {}
        self.catalogue = Catalogue(self.db)
        self._predictor = None
        self._predictor_path = None
        self._lock = threading.Lock()
        self._busy = threading.Lock()
        self._instant = None
        self._live = LiveAnswers()
        self._live_worker = None
        if checkpoint:
            self._activate(checkpoint, pin=False)

    def _require(self, what: str):
        allowed = self.allow_training if what == "training" else self.allow_capture
        if not allowed:
            raise StudioError(f"{'Training' if what == 'training' else 'Capture and catalogue changes'} are turned off in this app.")

    # --------------------------------------------------------------------------------- products
    def product_names(self) -> list[str]:
        return [p["name"] for p in self.catalogue.products()]

    def create_product(self, name: str, sku: str = "") -> str:
        self._require("capture")
        try:
            self.catalogue.add_product(name, sku=sku or None)
        except CatalogueError as exc:
            raise StudioError(str(exc)) from None
        return f"Created product “{name.strip()}”."

    def product_table(self) -> list[list]:
        return [[p["name"], p["sku"] or "", p["images"], p["train"], p["val"], p["test"]] for p in self.catalogue.products()]

    # ---------------------------------------------------------------------------------- collect
    def save_photo(self, image, product: str | None, tags=(), source: str = "webcam") -> dict:
        """Store one photo; returns {message, warnings, count, image_id}. A duplicate is reported, not an error."""
        self._require("capture")
        if image is None:
            raise StudioError("No photo: start the camera or choose a file first.")
        if not product:
            raise StudioError("Choose or create a product first.")
        try:
            res = self.catalogue.add_image(image, product=product, source_kind=source, tags=tags)
        except DuplicateImage as exc:
            return {"message": f"Not saved: {exc}", "warnings": ["duplicate"], "count": self._count(product), "image_id": exc.image_id}
        except (InvalidImage, CatalogueError) as exc:
            raise StudioError(f"Not saved: {exc}") from None
        self._after_capture(product)
        self._instant_add(res.image_id, product, self.catalogue.root / res.path)
        count = self._count(product)
        warn = f" Warnings: {', '.join(res.warnings)}." if res.warnings else ""
        return {"message": f"Saved photo {res.image_id} of “{product}” ({count} photos).{warn}", "warnings": res.warnings,
                "count": count, "image_id": res.image_id}

    def save_uploads(self, files, product: str | None, tags=()) -> dict:
        """Uploaded files: with a product they are labelled, without one they wait as 'unlabelled' for review."""
        self._require("capture")
        files = list(files or [])
        if len(files) > MAX_UPLOAD_FILES:
            raise StudioError(f"{len(files)} files at once: at most {MAX_UPLOAD_FILES} per upload, please split them.")
        saved, messages = 0, []
        for f in files:
            path = Path(getattr(f, "name", f))
            try:
                if path.stat().st_size > MAX_UPLOAD_MB * 1024 * 1024:
                    messages.append(f"{path.name}: larger than {MAX_UPLOAD_MB} MB, not saved")
                    continue
                if product:
                    r = self.save_photo(path.read_bytes(), product, tags, source="upload")
                    saved += "duplicate" not in r["warnings"]
                    messages.append(f"{path.name}: {r['message']}")
                else:
                    self.catalogue.add_image(path.read_bytes(), source_kind="upload", tags=tags, original_name=path.name)
                    saved += 1
                    messages.append(f"{path.name}: saved as unlabelled (see Label → suggestions)")
            except (StudioError, InvalidImage, CatalogueError, OSError) as exc:
                messages.append(f"{path.name}: {exc}")
        return {"saved": saved, "message": "\n".join(messages) or "No files."}

    # ---------------------------------------------------------------------------- instant model
    @property
    def instant(self):
        """The prototype index (one forward pass per photo), used until a trained NTS-Net is active."""
        if self._instant is None:
            from ntsnet.instant import InstantRecogniser

            self._instant = InstantRecogniser(self.catalogue)
            self._instant.sync()
        return self._instant

    def _instant_add(self, image_id, product, stored_path):
        # the stored (normalised) photo is what a rebuild would embed, so incremental == rebuilt
        if self._instant is not None:
            self._instant.add_photo(image_id, product, stored_path)

    def _instant_sync(self):
        if self._instant is not None:
            self._instant.sync()

    def _count(self, product: str) -> int:
        return next((p["images"] for p in self.catalogue.products() if p["name"].lower() == product.lower()), 0)

    def _after_capture(self, product: str | None = None):
        """Give new photos a split at once (stable), so the catalogue is always ready to train."""
        assign_splits(self.catalogue, product=product)

    def gallery(self, product: str | None = None, limit: int = 200, unlabelled: bool = False) -> list[tuple[np.ndarray, str]]:
        """(thumbnail, caption) pairs, newest first. Thumbnails, not file paths: the app never serves catalogue files."""
        self._require("capture")
        if not product and not unlabelled:
            return []
        imgs = self.catalogue.images(product=product or None, unlabelled=unlabelled)[-limit:]
        return [(self._thumbnail(self.catalogue.image_path(i)), self._caption(i)) for i in reversed(imgs)]

    def _thumbnail(self, path: Path) -> np.ndarray:
        key = str(path)  # photos are content-addressed: a path always means the same pixels
        if key not in self._thumbs:
            from PIL import Image

            with Image.open(path) as im:
                im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                if len(self._thumbs) > 2000:
                    self._thumbs.clear()
                self._thumbs[key] = np.asarray(im.convert("RGB"))
        return self._thumbs[key]

    @staticmethod
    def _caption(img: dict) -> str:
        bits = [f"#{img['id']}", img["split"] or "-"]
        bits += img["warnings"] + img["tags"]
        return " · ".join(bits)

    # ------------------------------------------------------------------------------------ label
    def move_photos(self, image_ids, product: str) -> str:
        self._require("capture")
        ids = [int(i) for i in image_ids]
        if not ids:
            raise StudioError("Select photos first.")
        try:
            n = self.catalogue.move_images(ids, product)
        except CatalogueError as exc:
            raise StudioError(str(exc)) from None
        self._instant_sync()
        return f"Moved {n} photo(s) to “{product}”."

    def delete_photos(self, image_ids) -> str:
        self._require("capture")
        ids = [int(i) for i in image_ids]
        if not ids:
            raise StudioError("Select photos first.")
        try:
            n = self.catalogue.delete_images(ids)
        except CatalogueError as exc:
            raise StudioError(str(exc)) from None
        self._instant_sync()
        return f"Deleted {n} photo(s)."

    def possible_mislabels(self, limit: int = 500) -> list[dict]:
        """Photos whose predicted product differs from their label, most confident disagreement first."""
        self._require("capture")
        predictor = self.predictor()
        if predictor is None:
            return []
        known = set(predictor.class_names)
        imgs = [i for i in self.catalogue.images() if i["product"] in known][-limit:]
        out = []
        for start in range(0, len(imgs), 16):
            batch = imgs[start:start + 16]
            for img, pred in zip(batch, predictor.predict_batch([self.catalogue.image_path(i) for i in batch])):
                guess = pred.best_guess or pred.label  # an "unknown" answer still has a best guess to compare
                if guess != img["product"]:
                    out.append({"id": img["id"], "path": str(self.catalogue.image_path(img)), "label": img["product"],
                                "predicted": guess, "confidence": pred.confidence})
        return sorted(out, key=lambda r: -r["confidence"])

    def suggestions(self, limit: int = 100) -> list[dict]:
        """A suggested product for each unlabelled photo (needs a model)."""
        self._require("capture")
        predictor = self.predictor()
        imgs = self.catalogue.images(unlabelled=True)[:limit]
        if predictor is None or not imgs:
            return [{"id": i["id"], "path": str(self.catalogue.image_path(i)), "suggested": None, "confidence": 0.0} for i in imgs]
        preds = predictor.predict_batch([self.catalogue.image_path(i) for i in imgs])
        return [{"id": i["id"], "path": str(self.catalogue.image_path(i)), "suggested": p.best_guess or p.label,
                 "confidence": p.confidence, "unknown": p.unknown} for i, p in zip(imgs, preds)]

    def confirm_suggestion(self, image_id: int, product: str) -> str:
        self._require("capture")
        if product not in self.product_names():
            self.catalogue.add_product(product, exist_ok=True)
        self.catalogue.move_images([image_id], product)
        self._after_capture(product)
        self._instant_sync()
        return f"Photo {image_id} labelled “{product}”."

    # ------------------------------------------------------------------------------------ train
    def training_readiness(self) -> tuple[bool, str]:
        products = self.catalogue.products()
        ready = [p for p in products if p["images"] >= MIN_PHOTOS_PER_PRODUCT]
        if len(ready) < 2:
            short = ", ".join(f"{p['name']} ({p['images']})" for p in products if p["images"] < MIN_PHOTOS_PER_PRODUCT)
            return False, (f"Training needs at least 2 products with {MIN_PHOTOS_PER_PRODUCT}+ photos each; "
                           f"you have {len(ready)}." + (f" Too few photos: {short}." if short else ""))
        return True, f"Ready: {len(ready)} products, {sum(p['images'] for p in ready)} photos."

    def start_training(self, backbone: str = "efficientnet_lite0", max_minutes: float | None = None, cat_num: int = 4,
                       input_size: int | None = None, exclude_products=(), recipe: str = "progressive", **paper_args) -> dict:
        """One click: the progressive job (training/progressive.py), which makes each stage active only if it is
        better. ``recipe='paper'`` runs the paper's single NTS-Net run instead (``paper_args``: epochs, lr ...)."""
        self._require("training")
        ok, why = self.training_readiness()
        if not ok:
            raise StudioError(why)
        from ntsnet.backbones import backbone_spec

        try:
            spec = backbone_spec(backbone)
        except ValueError as exc:
            raise StudioError(str(exc)) from None
        if recipe not in ("progressive", "paper"):
            raise StudioError(f"unknown recipe {recipe!r}")
        if paper_args and recipe != "paper":
            raise StudioError(f"{', '.join(sorted(paper_args))}: settings of the paper's recipe (recipe='paper')")
        assign_splits(self.catalogue)
        args = dict(backbone=backbone, pretrained=spec.has_pretrained, max_minutes=float(max_minutes) if max_minutes else None,
                    cat_num=int(cat_num), input_size=int(input_size) if input_size else None,
                    exclude_products=",".join(exclude_products) or None)
        if recipe == "paper":
            args.update(recipe="paper", proposal_num=max(6, int(cat_num)), **paper_args)
            if input_size and "part_size" not in paper_args:
                args["part_size"] = max(32, int(input_size) // 2)
        try:
            return jobs.start(self.db, **args)
        except jobs.JobError as exc:
            raise StudioError(str(exc)) from None

    def current_run(self) -> dict | None:
        """The running job, else the most recent run."""
        active = jobs.active_job(self.db)
        if active:
            return active
        runs = jobs.list_runs(self.db)
        return runs[0] if runs else None

    def cancel_training(self) -> str:
        self._require("training")
        run = jobs.active_job(self.db)
        if not run:
            return "No training is running."
        st = jobs.cancel(run["run_dir"])
        return f"{st['name']}: {st['state']}."

    def runs(self) -> list[dict]:
        return jobs.list_runs(self.db)

    @staticmethod
    def describe_run(run: dict | None) -> str:
        if not run:
            return "No training run yet."
        p = run["progress"]
        lines = [f"**{run['name']}** — {run['state']}"]
        if p.get("recipe") == "progressive":
            stage = p.get("stage") or "starting"
            order = p.get("stages") or []
            if stage in order:
                lines.append(f"stage {order.index(stage) + 1}/{len(order)}: **{stage}**"
                             + (f", about {p['stage_seconds_left'] / 60:.1f} min left in this stage" if p.get("stage_seconds_left") else ""))
            elif run["state"] == "running":
                lines.append(f"{stage} …")
            if p.get("instant_val_acc") is not None:
                lines.append(f"instant model: {p['instant_val_acc']:.1%} on {p.get('val_images', '?')} validation photos")
            for r in p.get("results", []):
                mark = "became the active model" if r["active"] else "not better: the previous model kept answering"
                size = f" at {r['input_size']} px" if r.get("input_size") else ""
                if r.get("answer") == "all-heads":
                    size += ", all heads answering"
                if r["stage"] == "refit":  # trained on the validation photos too: only the test photos can tell
                    other = r["compared_with"]
                    lines.append(f"refit of {r['refit_of']} on training + validation photos: {r['test_acc']:.1%} on {r['test_n']} test "
                                 f"photos ({other['stage']}: {other['test_acc']:.1%}){size} — {mark}")
                else:
                    lines.append(f"{r['stage']}: {r['val_acc']:.1%}{size} — {mark}")
        elif p.get("epoch"):
            lines.append(f"epoch {p['epoch']}/{p.get('epochs')}, step {p.get('step', '-')}/{p.get('steps', '-')}")
        if p.get("loss"):
            lines.append("loss " + ", ".join(f"{k} {v:.3f}" for k, v in p["loss"].items()))
        if p.get("train_acc") is not None:
            lines.append(f"train accuracy {p['train_acc']:.1%}")
        if run.get("best_val_acc") is not None:
            lines.append(f"best validation accuracy {run['best_val_acc']:.1%}")
        if p.get("eta_seconds") and run["state"] == "running":
            lines.append(f"about {p['eta_seconds'] / 60:.1f} min left in the job (measured speed)")
        if p.get("device"):
            lines.append(f"{p['device']}, {p.get('precision')}, {p.get('images_per_s', 0):.1f} images/s")
        if run["state"] in ("failed", "interrupted") and run.get("log_tail"):
            lines.append("last log line: " + run["log_tail"].strip().splitlines()[-1][-300:])
        return "  \n".join(lines)

    # ----------------------------------------------------------------------------- active model
    def active_checkpoint(self) -> str | None:
        path = active.read(self.db).get("checkpoint")
        return path if path and (path.startswith("hf://") or Path(path).exists()) else None

    def active_model_name(self) -> str | None:
        path = self.active_checkpoint()
        return active.short_name(path) if path else None

    def set_active_model(self, checkpoint: str, pin: bool = False) -> str:
        """Make a checkpoint (a run name, a file, or hf://user/repo) the model that answers. ``pin``: keep it
        active while training jobs find better models (they are listed, not switched to)."""
        self._require("training")
        return self._activate(checkpoint, pin)

    def _activate(self, checkpoint: str, pin: bool) -> str:
        run_dir = jobs.runs_root(self.db) / checkpoint
        if (run_dir / "best.safetensors").exists():
            checkpoint = str(run_dir / "best.safetensors")
        predictor = self._load(checkpoint)
        active.write(self.db, str(checkpoint), pinned=bool(pin), name=active.short_name(checkpoint), chosen_by="person")
        with self._lock:
            self._predictor, self._predictor_path = predictor, str(checkpoint)
        return (f"Active model: {active.short_name(checkpoint)} ({len(predictor.class_names)} products)"
                + (", pinned: training will not replace it." if pin else "."))

    def _load(self, checkpoint: str):
        from ntsnet import CheckpointError, Predictor

        try:
            if str(checkpoint).startswith("hf://"):
                predictor = Predictor.from_pretrained(str(checkpoint)[5:], backend=self.backend, precision=self.precision)
            else:
                predictor = Predictor.from_checkpoint(checkpoint, backend=self.backend, precision=self.precision)
        except (CheckpointError, OSError, ValueError) as exc:
            raise StudioError(f"Cannot load model {checkpoint}: {exc}") from None
        predictor.live_threads = self.live_threads
        return predictor

    def predictor(self):
        path = self.active_checkpoint()
        if path is None:
            return None
        with self._lock:
            if self._predictor is None or self._predictor_path != path:
                self._predictor, self._predictor_path = self._load(path), path
            return self._predictor

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
            return self._present(rgb, *last, fresh=fresh)
        with self._busy:
            answer = self._answer(rgb, session, live=False)
        return self._no_model(rgb) if answer is None else self._present(rgb, *answer, fresh=True)

    def _no_model(self, rgb) -> Recognition:
        return Recognition(rgb, "No model yet: collect photos of at least two products (the instant model is ready after "
                           "the first few), or train one (Train tab).", 0.0, {}, False, "none")

    def _answer(self, rgb, session: str, live: bool):
        """Run the model that answers now on one frame (the caller holds ``_busy``); records and returns the answer."""
        predictor, model, backend = self._answerer()
        if predictor is None:
            return None
        t0 = time.perf_counter()
        if live and hasattr(predictor, "unknown_threshold"):  # a trained model: reuse still parts between frames
            pred = predictor.predict(rgb, memory=self._live.memory(session, predictor))
        else:
            pred = predictor.predict(rgb)
        answer = (pred, model, getattr(predictor, "backend_name", backend))
        self._live.answered(session, answer, time.perf_counter() - t0)
        return answer

    def _worker(self) -> "LiveWorker":
        with self._lock:
            if self._live_worker is None:
                self._live_worker = LiveWorker(self)
            return self._live_worker

    def _present(self, rgb, pred, model, backend, fresh: bool) -> Recognition:
        sure = pred.confidence >= UNSURE_BELOW and not pred.unknown
        if pred.unknown:
            label, banner = f"Not in the catalogue (closest: {pred.best_guess})", "unknown product"
        elif not sure:
            label, banner = f"Not sure (best guess {pred.label}, {pred.confidence:.0%})", f"not sure: {pred.label}?"
        else:
            label, banner = pred.label, None
        annotated = draw_prediction(rgb, pred, fps=self._live.rate(), label=banner)
        return Recognition(annotated, label, pred.confidence, dict(pred.top5), sure, model, backend=backend,
                           answers_per_s=self._live.rate(), fresh=fresh)

    # --------------------------------------------------------------------------------- evaluate
    def evaluate(self, split: str = "test", progress: bool = False, unknown_products=()) -> dict:
        self._require("capture")
        from training.evaluate import evaluate

        path = self.active_checkpoint()
        if path is None:
            raise StudioError("No active model: train one first (Train tab) and make it active.")
        out = Path(path).parent / f"evaluation-{split}" if not path.startswith("hf://") else self.db / "evaluation"
        try:
            return {**evaluate(path, self.db, split=split, out_dir=out, progress=progress, predictor=self.predictor(),
                               unknown_products=[u for u in unknown_products if u]),
                    "confusion_png": str(out / "confusion.png")}
        except ValueError as exc:
            raise StudioError(str(exc)) from None
