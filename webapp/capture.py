"""Catalogue actions: products, capture (photos, bursts, uploads), the gallery, and labels (move, delete, suggestions).

A mixin of Studio (webapp/actions.py): it uses ``self.catalogue``, ``self._require`` and the instant model's index.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from dataset_tools import CatalogueError, DuplicateImage, InvalidImage, assign_splits
from ntsnet.predictor import EMPTY_SCENE

from .common import MAX_BURST_SECONDS, MAX_UPLOAD_FILES, MAX_UPLOAD_MB, MIN_BURST_INTERVAL_MS, THUMBNAIL_PX, StudioError


class CatalogueActions:
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
    def save_photo(self, image, product: str | None, tags=(), source: str = "webcam", on_counter: bool = False) -> dict:
        """Store one photo; returns {message, warnings, count, image_id}. A duplicate is reported, not an error.
        ``on_counter``: the product lies on the learnt checkout counter; only its crop is stored, as Checkout sees it."""
        self._require("capture")
        if image is None:
            raise StudioError("No photo: start the camera or choose a file first.")
        if not product:
            raise StudioError("Choose or create a product first.")
        mask = None
        if on_counter:
            image, mask = self.counter_crop(image)
        try:
            res = self.catalogue.add_image(image, product=product, source_kind=source, tags=tags, mask=mask)
        except DuplicateImage as exc:
            return {"message": f"Not saved: {exc}", "warnings": ["duplicate"], "count": self.photo_count(product), "image_id": exc.image_id}
        except (InvalidImage, CatalogueError) as exc:
            raise StudioError(f"Not saved: {exc}") from None
        self._after_capture(product)
        self._instant_add(res.image_id, product, self.catalogue.root / res.path)
        count = self.photo_count(product)
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

    def photo_count(self, product: str) -> int:
        """How many photos ``product`` has (0 for an unknown product)."""
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
        """Label photos an existing product (Undo can reverse it); see LabellingActions.move_selected for new ones."""
        self._require("capture")
        if not list(image_ids):
            raise StudioError("Select photos first.")
        if product not in self.product_names():
            raise StudioError(f"no product named {product!r}")
        return self.move_selected(image_ids, product)

    def delete_photos(self, image_ids) -> str:
        """Photos to the catalogue's trash (Undo brings them back)."""
        self._require("capture")
        if not list(image_ids):
            raise StudioError("Select photos first.")
        return self.delete_selected(image_ids)

    def possible_mislabels(self, limit: int = 500) -> list[dict]:
        """Photos that look more like another product than their own, judged out of sample (dataset_tools/review.py:
        neither a photo's label nor its capture session vouches for it), most suspicious first."""
        self._require("capture")
        paths = {r["id"]: r["path"] for r in self.catalogue.images()}
        return [{"id": s["id"], "path": str(self.catalogue.root / paths[s["id"]]), "label": s["product"], "predicted": s["suggested"],
                 "confidence": s["score"], "kind": s["kind"]}
                for s in self.review_queue(refresh=True) if s["kind"] in ("wrong-label", "session", "duplicate")][:limit]

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

    # ------------------------------------------------------------------------------------ burst
    def burst(self, latest_frame, product: str | None, tags=(), every_ms: float = 500, seconds: float = 5, sleep=time.sleep,
              on_counter: bool = False):
        """Save the newest camera frame (``latest_frame()``: an array or None) every ``every_ms`` for ``seconds``,
        yielding {saved, message} after each try and once more at the end. The limits apply whatever a page sent."""
        self._require("capture")
        if not product:
            raise StudioError("Choose or create a product first.")
        seconds = min(max(float(seconds or 1), 1.0), MAX_BURST_SECONDS)
        every = max(float(every_ms or 500), MIN_BURST_INTERVAL_MS) / 1000
        end, saved = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            frame = latest_frame()
            if frame is not None:
                try:
                    r = self.save_photo(frame, product, tags, source="webcam", on_counter=on_counter)
                    saved += "duplicate" not in r["warnings"]
                    message = r["message"]
                except StudioError as exc:
                    message = str(exc)
                yield {"saved": saved, "message": f"Burst: {saved} saved. {message}", "done": False}
            sleep(every)
        yield {"saved": saved, "message": f"Burst finished: {saved} photos saved.", "done": True}

    def capture_empty_scene(self, latest_frame, seconds: float = 3, every_ms: float = 250, sleep=time.sleep):
        """A burst of the camera's empty scene (no product in view) under the catalogue's EMPTY_SCENE product, created
        on first use: every model then learns what "nothing to recognise" looks like here and answers it so."""
        self._require("capture")
        if self.catalogue.product_id(EMPTY_SCENE, missing_ok=True) is None:
            self.create_product(EMPTY_SCENE)
        for step in self.burst(latest_frame, EMPTY_SCENE, (), every_ms, seconds, sleep=sleep):
            yield {**step, "message": step["message"].replace("Burst", "Empty scene", 1)}

    def label_view(self, product: str | None = None, unlabelled: bool = False) -> list[dict]:
        """The photos the Label screen lists: one product's, or the unlabelled uploads."""
        self._require("capture")
        if unlabelled:
            return self.catalogue.images(unlabelled=True)
        return self.catalogue.images(product=product) if product else []
