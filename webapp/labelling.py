"""The labelling helper: the gallery as the selection, bulk edits with Undo, and the review queue (wrong labels,
wrong capture sessions, duplicates, outliers), unlabelled uploads by suggested product, "more like this", coverage
and a map of the catalogue. A mixin of Studio (webapp/actions.py); the review itself is dataset_tools/review.py.
"""
from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataset_tools import CatalogueError, assign_splits, history
from dataset_tools.review import coverage_hints

from .common import THUMBNAIL_PX, StudioError

THUMB_DIR = Path(tempfile.gettempdir()) / "ntsnet-thumbnails"  # outside the catalogue, which is never served


@dataclass
class Selection:
    """Which of the shown photos are selected: a click toggles one, a shift-click selects the range from the last
    click, and the selection survives a new filter only for photos still shown."""
    shown: list = field(default_factory=list)     # photo ids in gallery order
    selected: set = field(default_factory=set)
    anchor: int | None = None                     # index of the last plain click

    def show(self, ids) -> "Selection":
        self.shown = list(ids)
        self.selected &= set(self.shown)
        self.anchor = None
        return self

    def click(self, index: int, shift: bool = False) -> "Selection":
        if not 0 <= index < len(self.shown):
            return self
        if shift and self.anchor is not None:
            lo, hi = sorted((self.anchor, index))
            self.selected |= set(self.shown[lo:hi + 1])
        else:
            self.selected ^= {self.shown[index]}
            self.anchor = index
        return self

    def all(self) -> "Selection":
        self.selected = set(self.shown)
        return self

    def clear(self) -> "Selection":
        self.selected, self.anchor = set(), None
        return self

    def ids(self) -> list[int]:
        return [i for i in self.shown if i in self.selected]


class LabellingActions:
    """Uses ``self._review_cache`` (the last review: report, rows, embeddings) and ``self._review_lock``."""

    # ------------------------------------------------------------------------------------- browsing
    def photos(self, product=None, split=None, tag=None, source=None, warning=None, unlabelled=False,
               suspects_only=False, limit: int = 400) -> list[dict]:
        """The photos the Label screen shows, newest first, filtered; ``suspects_only``: those the review flags."""
        self._require("capture")
        rows = self.catalogue.images(product=product or None, unlabelled=unlabelled)
        if split:
            rows = [r for r in rows if r["split"] == split]
        if tag:
            rows = [r for r in rows if tag in r["tags"]]
        if source:
            rows = [r for r in rows if r["source"] == source]
        if warning:
            rows = [r for r in rows if warning in r["warnings"]]
        if suspects_only:
            flagged = {s["id"] for s in self.review_queue()}
            rows = [r for r in rows if r["id"] in flagged]
        return list(reversed(rows))[:limit]

    def thumbnail_file(self, photo: dict, selected: bool = False) -> str:
        """A JPEG thumbnail written once under a content-addressed name (temp file, then rename): the gallery is
        served these files, never catalogue files, and never a file being rewritten."""
        path = THUMB_DIR / f"{photo['hash']}{'-selected' if selected else ''}.jpg"
        if not path.exists():
            from PIL import Image, ImageDraw

            THUMB_DIR.mkdir(parents=True, exist_ok=True)
            with Image.open(self.catalogue.image_path(photo)) as im:
                im = im.convert("RGB")
                im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            if selected:  # a thick frame and a tick: visible at a glance
                draw = ImageDraw.Draw(im)
                w, h = im.size
                draw.rectangle([0, 0, w - 1, h - 1], outline=(37, 99, 235), width=max(4, w // 20))
                draw.ellipse([w - 30, 4, w - 6, 28], fill=(37, 99, 235))
                draw.line([(w - 25, 16), (w - 19, 22), (w - 10, 9)], fill=(255, 255, 255), width=3)
            tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
            im.save(tmp, "JPEG", quality=85)
            tmp.replace(path)
        return str(path)

    def photo_pixels(self, image_id: int) -> np.ndarray | None:
        """One photo's RGB pixels (None if it is gone): what a screen shows large, never the file itself."""
        from PIL import Image

        self._require("capture")
        row = self.catalogue.db.execute("SELECT path FROM images WHERE id = ?", [int(image_id)]).fetchone()
        if row is None:
            return None
        with Image.open(self.catalogue.root / row[0]) as im:
            return np.asarray(im.convert("RGB"))

    def gallery_items(self, photos: list[dict], selection: Selection) -> list[tuple[str, str]]:
        return [(self.thumbnail_file(p, p["id"] in selection.selected), self._caption(p)) for p in photos]

    # ------------------------------------------------------------------------------ bulk edits, Undo
    def _edited(self, message: str) -> str:
        assign_splits(self.catalogue)
        self._instant_sync()
        with self._review_lock:
            self._review_cache = None
        return message

    def _edit(self, fn, *args, **kwargs) -> str:
        self._require("capture")
        try:
            done = fn(self.catalogue, *args, **kwargs)
            return self._edited(done[:1].upper() + done[1:] + ".")
        except CatalogueError as exc:
            raise StudioError(str(exc)) from None

    def move_selected(self, ids, product: str) -> str:
        if not product or not str(product).strip():
            raise StudioError("Choose the product to move the photos to (or type a new name).")
        return self._edit(history.move, ids, str(product).strip(), create=True)

    def delete_selected(self, ids) -> str:
        return self._edit(history.delete, ids) + " Undo brings them back."

    def set_split(self, ids, split: str | None) -> str:
        return self._edit(history.set_split, ids, split or None)

    def tag_selected(self, ids, add=(), remove=()) -> str:
        return self._edit(history.tag, ids, add=add, remove=remove)

    def undo(self) -> str:
        return self._edit(history.undo)

    def last_edit(self) -> str | None:
        edit = history.last_edit(self.catalogue)
        return edit["summary"] if edit else None

    # -------------------------------------------------------------------------------- review queue
    def review(self, refresh: bool = False):
        """The last review (report, rows, embeddings), computed again when asked or after an edit."""
        self._require("capture")
        from dataset_tools.review_catalogue import review_catalogue

        with self._review_lock:
            if self._review_cache is None or refresh:
                self._review_cache = review_catalogue(self.catalogue)
            return self._review_cache

    def review_queue(self, refresh: bool = False) -> list[dict]:
        """One suspect per photo, most suspicious first (a capture session's photos come together)."""
        report, _, _ = self.review(refresh)
        seen, queue = set(), []
        for s in report.suspects:
            if s["id"] not in seen:
                seen.add(s["id"])
                queue.append(s)
        return queue

    def answer(self, suspect: dict, answer: str) -> str:
        """accept: move the photo (a session: all its photos) to the suggestion; keep: remember the label is right;
        delete: to the trash; skip: nothing. Applied at once; "keep" is remembered and not asked again."""
        from dataset_tools.review_catalogue import remember

        self._require("capture")
        report, _, _ = self.review()
        ids = report.sessions[suspect["session"]]["ids"] if suspect.get("kind") == "session" else [suspect["id"]]
        if answer == "accept" and suspect.get("suggested"):
            message = self.move_selected(ids, suspect["suggested"])
        elif answer == "delete":
            message = self.delete_selected(ids)
        elif answer == "keep":
            remember(self.catalogue, ids, suspect["kind"], "keep", suspect.get("product"))
            message = self._edited(f"Kept {len(ids)} photo(s) as “{suspect.get('product')}”: not asked again.")
        elif answer in ("skip", "accept"):
            return "Skipped."
        else:
            raise StudioError(f"unknown answer {answer!r}")
        return message

    # --------------------------------------------------------------------- unlabelled, similar, coverage
    def unlabelled_groups(self) -> dict[str, list[int]]:
        """Unlabelled photos grouped by the product they look most like (the nearest labelled photos)."""
        report, rows, _ = self.review()
        if report.probabilities is None or not len(report.probabilities):
            return {}
        products = sorted({r["product"] for r in rows if r["product"]})
        groups: dict[str, list[int]] = {}
        for r, p in zip(rows, report.probabilities):
            if r["product"] is None:
                groups.setdefault(products[int(np.argmax(p))], []).append(r["id"])
        return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))

    def join_duplicate_splits(self) -> str:
        """Near-duplicates of one product split between training and evaluation photos: the evaluation ones join
        training (an evaluation must not see a copy of a training photo). Undo reverses it."""
        report, rows, _ = self.review()
        by_id = {r["id"]: r for r in rows}
        move = sorted({b if by_id[a]["split"] == "train" else a for a, b, _ in report.duplicates
                       if by_id[a]["product"] and by_id[a]["product"] == by_id[b]["product"]
                       and "train" in (by_id[a]["split"], by_id[b]["split"])})
        if not move:
            return "No near-duplicates are split between training and evaluation photos."
        return self._edit(history.set_split, move, "train")

    def confirm_group(self, ids, product: str) -> str:
        return self.move_selected(ids, product)

    def more_like_this(self, image_id: int, k: int = 12) -> list[dict]:
        """The photos most similar to this one across the catalogue, most similar first."""
        _, rows, emb = self.review()
        where = {r["id"]: n for n, r in enumerate(rows)}
        if image_id not in where:
            raise StudioError(f"no photo with id {image_id}")
        sims = emb @ emb[where[image_id]]
        order = [int(i) for i in np.argsort(-sims) if rows[i]["id"] != image_id][:k]
        return [{**rows[i], "similarity": round(float(sims[i]), 3)} for i in order]

    def coverage(self) -> tuple[list[list], list[str]]:
        """Per product: photos by split and view tags, the product it is most confused with; and 'capture next' hints."""
        report, rows, _ = self.review()
        counts, tags, splits = {}, {}, {}
        for r in rows:
            if r["product"]:
                counts[r["product"]] = counts.get(r["product"], 0) + 1
                splits.setdefault(r["product"], {}).setdefault(r["split"] or "-", 0)
                splits[r["product"]][r["split"] or "-"] += 1
                for t in r["tags"]:
                    tags.setdefault(r["product"], {}).setdefault(t, 0)
                    tags[r["product"]][t] += 1
        table = [[p, n, *(splits[p].get(s, 0) for s in ("train", "val", "test")),
                  ", ".join(f"{t} {c}" for t, c in sorted(tags.get(p, {}).items())),
                  ", ".join(f"{o} ({c})" for o, c in sorted(report.confusion.get(p, {}).items(), key=lambda kv: -kv[1])[:2])]
                 for p, n in sorted(counts.items())]
        return table, coverage_hints(counts, tags, report.confusion)

    def embedding_map(self) -> list[dict]:
        """Every photo at a point of the plane (the embeddings' first two principal components), with its product and
        whether it is a suspect: the map of the catalogue."""
        report, rows, emb = self.review()
        if len(rows) < 3:
            return []
        centred = emb - emb.mean(0)
        _, _, vt = np.linalg.svd(centred[:: max(1, len(centred) // 5000)], full_matrices=False)
        xy = centred @ vt[:2].T
        flagged = {s["id"] for s in report.suspects}
        return [{"id": r["id"], "x": round(float(a), 4), "y": round(float(b), 4), "product": r["product"] or "(unlabelled)",
                 "suspect": r["id"] in flagged, "colour": "⚠ suspect" if r["id"] in flagged else (r["product"] or "(unlabelled)")}
                for r, (a, b) in zip(rows, xy)]

    def map_region(self, x_range, y_range=None, limit: int = 48) -> list[dict]:
        """The photos inside a region of the map (what a person selected on it), suspects first."""
        points = self.embedding_map()
        inside = [p for p in points if x_range[0] <= p["x"] <= x_range[1] and (y_range is None or y_range[0] <= p["y"] <= y_range[1])]
        ids = {p["id"] for p in sorted(inside, key=lambda p: not p["suspect"])[:limit]}
        return [r for r in self.photos(limit=10 ** 9) if r["id"] in ids]

