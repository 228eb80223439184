"""Checkout: the learnt empty counter, every item on it named by the model that answers now, and each session's basket.

A mixin of Studio (webapp/actions.py): it uses ``self.db``, ``self._answerer()`` and ``self._busy``; its own state
(``self._counter``; ``self._baskets``, a LiveCheckout per session) is made in Studio.__init__. The empty counter is
kept in CATALOGUE/counter.npz; the item finder trained for it (``python -m training item-finder``, or the Train
click once the counter is learnt) in CATALOGUE/item_finder.safetensors.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ntsnet.checkout import Checkout, LiveCheckout, Scan, basket_of
from ntsnet.counter import COUNTER_FILE, Counter, CounterError
from ntsnet.draw import draw_checkout
from ntsnet.images import ImageLoadError, image_paths, to_rgb_array
from ntsnet.item_finder import FINDER_FILE, ItemFinder

from .common import StudioError

LEARN_SECONDS, LEARN_EVERY_MS = 2.0, 100
log = logging.getLogger("ntsnet")


@dataclass
class CheckoutView:
    annotated: np.ndarray
    basket: list[list]          # rows [product, count] of what is counted
    message: str
    scan: Scan


def learn_counter_from(sources) -> Counter:
    """The empty counter from photos: files, or folders of them (one photo will do; a few seconds of frames are better)."""
    frames = []
    for path in image_paths([str(s) for s in sources]):
        try:
            frames.append(to_rgb_array(path))
        except ImageLoadError as exc:
            raise CounterError(f"empty counter: {exc}") from None
    if not frames:
        raise CounterError("no photo of the empty counter found there")
    return Counter.learn(frames)


class CheckoutActions:
    # ------------------------------------------------------------------------------- the counter
    @property
    def counter_path(self) -> Path:
        return Path(self.db) / COUNTER_FILE

    def counter(self) -> Counter | None:
        """The learnt empty counter (None: not learnt yet)."""
        if self._counter is None and self.counter_path.exists():
            try:
                self._counter = Counter.load(self.counter_path)
            except CounterError:
                return None
        return self._counter

    def learn_counter(self, frames) -> str:
        """Learn the empty counter from frames of it (the camera fixed, nothing on the counter); kept with the catalogue."""
        self._require("capture")
        try:
            counter = Counter.learn([np.asarray(f) for f in frames if f is not None])
        except CounterError as exc:
            raise StudioError(str(exc)) from None
        counter.save(self.counter_path)
        self._counter = counter
        self._baskets = type(self._baskets)(self._baskets.keep)  # old boxes belonged to the old view
        return f"Learnt the empty counter from {len(frames)} frames: put the shopping down."

    def learn_counter_live(self, latest_frame, seconds: float = LEARN_SECONDS, every_ms: float = LEARN_EVERY_MS, sleep=time.sleep):
        """A few seconds of the live camera's empty counter, then learn it; yields progress messages."""
        frames, last = [], None
        for _ in range(max(2, int(seconds * 1000 / every_ms))):
            frame = latest_frame()
            if frame is not None and frame is not last:
                frames.append(np.asarray(frame))
                last = frame
                yield f"Learning the empty counter: {len(frames)} frames…"
            sleep(every_ms / 1000)
        if len(frames) < 2:
            raise StudioError("No live frames arrived: start the camera first (the counter must be empty).")
        yield self.learn_counter(frames)

    def counter_crop(self, frame) -> tuple[np.ndarray, np.ndarray]:
        """The one item on the learnt counter, cropped as Checkout crops it (Collect "on the counter"), and its mask."""
        counter = self.counter()
        if counter is None:
            raise StudioError("No empty counter learnt yet (Checkout tab): learn it before capturing on the counter.")
        rgb = to_rgb_array(frame)
        try:
            rgb = counter.check_frame(rgb)
            inside, _, labels = Checkout(counter, None).regions(rgb)
        except CounterError as exc:
            raise StudioError(str(exc)) from None
        if not inside:
            raise StudioError("Nothing on the counter: put the product down inside the camera's view.")
        return Checkout.cut_out(rgb, inside[0], labels)  # the largest item: the one being captured

    def item_finder(self) -> ItemFinder | None:
        """The item finder trained for this counter (None: not trained yet); read again when its file changes."""
        path = Path(self.db) / FINDER_FILE
        stamp = path.stat().st_mtime_ns if path.exists() else None
        if stamp != self._finder_stamp:
            self._finder, self._finder_stamp = None, stamp
            if stamp is not None:
                try:
                    self._finder = ItemFinder.load(path)
                except ValueError as exc:  # a damaged file: the blob's outline splits items, as before it was trained
                    log.warning("checkout: %s; splitting touching items by their outline", exc)
        return self._finder

    def checkout_status(self) -> str:
        """One line for the Checkout tab: is the counter learnt, and what tells touching items apart."""
        if self.counter() is None:
            return ""
        finder = self.item_finder()
        if finder is None:
            return ("Empty counter learnt: put the shopping down. A Train click (Train tab) also teaches the item finder "
                    "to tell touching items apart.")
        found = finder.extra.get("held_out_recall")
        return ("Empty counter learnt: put the shopping down. Touching items are told apart by the item finder" +
                (f" (it found {found:.0%} of the items in scenes it never saw)." if found is not None else "."))

    # ------------------------------------------------------------------------------------- scan
    def _checkout(self, recogniser=None, counter: Counter | None = None) -> Checkout:
        counter = counter or self.counter()
        if counter is None:
            raise StudioError("No empty counter learnt yet: clear the counter and click “Learn the empty counter”.")
        recogniser = recogniser or self._answerer()[0]
        if recogniser is None:
            raise StudioError("No model yet: collect photos of at least two products, or train one.")
        return Checkout(counter, recogniser, finder=self.item_finder())

    def checkout_scan(self, frame, recogniser=None) -> Scan:
        """Every item on the counter in one frame, named (no basket). ``recogniser``: instead of the model that answers now."""
        checkout = self._checkout(recogniser)
        try:
            with self._busy:
                return checkout.scan(to_rgb_array(frame))
        except (CounterError, ImageLoadError) as exc:
            raise StudioError(str(exc)) from None

    def checkout_frame(self, frame, session: str = "-") -> CheckoutView | None:
        """One live frame: items boxed and named, and this session's basket (counted once an item lies still)."""
        if frame is None:
            return None
        rgb = np.asarray(frame)
        checkout = self._checkout()
        live = self._baskets.get(session)
        if live is None or live.checkout.counter is not checkout.counter:  # a new session, or the counter learnt again
            live = LiveCheckout(checkout)
        live.checkout = checkout  # the model that answers now
        try:
            with self._busy:
                scan, counts = live.update(rgb)
        except (CounterError, ImageLoadError) as exc:
            raise StudioError(str(exc)) from None
        self._baskets.put(session, live)
        counted = [any(t.counted and t.box == it.box for t in live.basket.tracks) for it in scan.items]
        total = sum(counts.values())
        message = scan.problem or (f"{total} item{'s' * (total != 1)} in the basket" +
                                   (f" · {scan.at_edge} at the edge of the view (not counted)" if scan.at_edge else ""))
        annotated = draw_checkout(rgb, scan.items, counted, banner=message)
        return CheckoutView(annotated, [[name, n] for name, n in counts.items()], message, scan)

    def new_customer(self, session: str = "-") -> str:
        live = self._baskets.get(session)
        if live is not None:
            live.clear()
        return "New customer: the basket is empty."

    def checkout_scenes(self, paths, background=None, recogniser=None) -> list[dict]:
        """The CLI's answer: per photo of the counter, its items and basket (a bad photo is reported, the rest answered).
        ``background``: photos of the empty counter to learn first (else the learnt one); ``recogniser``: a model to
        use instead of the one that answers in the app."""
        counter = None
        if background:  # learnt for these scenes only: the app's counter stays as it is
            try:
                counter = learn_counter_from(background if isinstance(background, (list, tuple)) else [background])
            except CounterError as exc:
                raise StudioError(str(exc)) from None
        checkout = self._checkout(recogniser, counter)  # no counter or no model: one clear error, before any scene
        out = []
        for path in image_paths([str(p) for p in paths]):
            try:
                with self._busy:
                    scan = checkout.scan(to_rgb_array(path))
            except (ImageLoadError, CounterError) as exc:
                out.append({"path": path, "error": str(exc)})
                continue
            out.append({"path": path, "items": [it.to_dict() for it in scan.items], "basket": basket_of(scan.items),
                        **({"problem": scan.problem} if scan.problem else {})})
        return out
