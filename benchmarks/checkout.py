"""The checkout counter on scenes built from real grocery photos: are the items found, named, flagged, counted?

    python benchmarks/checkout.py [--scenes 60] [--run RUN_DIR] [--no-split | --finder PATH] [--scale 2] [--json out.json]

Each scene: a rendered counter surface (benchmarks/counter_scenes.py) learnt from 12 frames of it; then 1-8 items
put down, each a real grocery val photo's middle (70%) as a cut-out, scaled to 90-150 px on a 640x480 frame,
rotated, with a soft shadow; the frame relit (exposure, white balance, gamma, gradient, shadow, noise). ``--scale 2``:
1280x960 frames with 180-300 px items (a sharper camera on the same stand; the catalogue's crops as well).
"separated": items at least 12 px apart; "touching": each item put against one already there, overlapping it by up
to a tenth of its width; "one-by-one": the touching scenes as a live stream sees them, the items put down one at a
time (ItemLayers). A quarter of the items are products of draw 0 of benchmarks/open_set.py, which the
catalogue does not have. Recognisers: the instant model (bank: the known products' training photos) and, with
``--run``, a Train job run made with those products excluded. Both know the products as Collect "on the counter"
stores them: counter crops of the training photos (``--make-catalogue DIR`` writes that catalogue for a Train click:
``python -m training train --db DIR/catalogue --out RUN --exclude-products <draw 0> --max-minutes 20``).

Reported per layout and recogniser: item recall and precision (IoU >= 0.5 with the item's visible box), item
accuracy (matched known items named right), unknown items flagged, known items flagged, cAcc (scenes of 3-6 items
whose list with counts is exactly right, unknown items counted as "unknown"), and frames/s of Checkout.scan.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from common import DATA, grocery_photos, machine_line  # noqa: E402
from counter_scenes import camera_frames, counter_surface, light_change  # noqa: E402
from ntsnet.checkout import iou  # noqa: E402
from open_set import FIRST_DRAW  # noqa: E402
from training.composites import compose, cut_out, positions  # noqa: E402

H, W, SIDE = 480, 640, (90, 150)   # frame size; an item's long side in pixels


def set_scale(scale: float):
    """Frames ``scale`` times 640x480 with the items as large a share of them: a sharper camera, same stand."""
    global H, W, SIDE
    H, W, SIDE = int(480 * scale), int(640 * scale), (90 * scale, 150 * scale)


def lists():
    return grocery_photos("train"), grocery_photos("val")


def cutout(path: str, rng) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, mask) of an item seen from above: the photo's middle, 90-150 px (at scale 1), rotated."""
    return cut_out(np.asarray(Image.open(path).convert("RGB")), rng, SIDE)


def counter_crop(path: str, rng, surfaces) -> np.ndarray:
    """A photo as Collect "on the counter" stores it: the item cut out on the counter, cropped with Checkout's margin."""
    from ntsnet.checkout import crop_with_margin

    rgb, mask = cutout(path, rng)
    h, w = mask.shape
    y, x = int(rng.integers(12, H - h - 12)), int(rng.integers(12, W - w - 12))
    frame, boxes = compose(surfaces[int(rng.integers(len(surfaces)))], [(rgb, mask)], [(y, x)])
    return crop_with_margin(light_change(frame, rng, strength=0.7), boxes[0])[0]


def make_catalogue(out: Path, seed: int):
    """The grocery train and val photos as counter crops, in a catalogue at OUT/catalogue (for a Train click)."""
    from dataset_tools import Catalogue
    from dataset_tools.transfer import import_list

    rng = np.random.default_rng(seed)
    surfaces = [counter_surface(rng, H, W) for _ in range(12)]
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        lines = [line for line in (DATA / f"{split}.txt").read_text().splitlines() if line.strip()]
        for line in lines:
            rel = line.split(",")[0].strip()
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(counter_crop(str(DATA / rel), rng, surfaces)).save(dst, quality=92)
        (out / f"{split}.txt").write_text("\n".join(lines))
    (out / "classes.csv").write_text((DATA / "classes.csv").read_text())
    cat = Catalogue(out / "catalogue")
    for split in ("train", "val"):
        import_list(cat, out / f"{split}.txt", split=split, progress=False)
    print(f"catalogue of counter crops at {out / 'catalogue'}")


def crop_bank(items, seed: int, embed) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    surfaces = [counter_surface(rng, H, W) for _ in range(12)]
    crops = [counter_crop(p, rng, surfaces) for p, _ in items]
    return np.concatenate([embed(crops[i:i + 32]) for i in range(0, len(crops), 32)])


class InstantItems:
    """The instant model's rule on a bank of embeddings, as Checkout asks it (predict_batch)."""

    def __init__(self, bank, labels):
        from ntsnet.instant import Embedder, InstantIndex

        self.embed = Embedder("efficientnet_lite0", background=False)
        self.index = InstantIndex.from_embeddings(zip(range(len(bank)), labels, bank))

    def predict_batch(self, arrays):
        return self.index.classify(self.embed(arrays))


def match(pred_boxes, true_boxes):
    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(pred_boxes) for j, t in enumerate(true_boxes)), reverse=True)
    used_p, used_t, out = set(), set(), []
    for v, i, j in pairs:
        if v >= 0.5 and i not in used_p and j not in used_t:
            used_p.add(i), used_t.add(j), out.append((i, j))
    return out


def one_by_one(checkout, surface, items, corners, rng):
    """The live path: the items put down one at a time (each shown for a few still frames) into ItemLayers, in one
    light with fresh sensor noise; returns the last frame, its visible boxes and the ItemLayers."""
    from ntsnet.checkout import ItemLayers

    layers = ItemLayers(checkout.counter, finder=checkout.finder)
    light_seed = int(rng.integers(1 << 30))
    for k in range(1, len(items) + 1):
        frame, boxes = compose(surface, items[:k], corners[:k])
        lit = light_change(frame, np.random.default_rng(light_seed), strength=0.7)
        for _ in range(layers.still_frames + 2):
            shown = np.clip(lit + rng.normal(0, 2.0, lit.shape), 0, 255).astype(np.uint8)
            layers.label_items(shown)
    return shown, boxes, layers


def run_layout(recogniser, val, unknown_names, touching: bool, scenes: int, seed: int, split: bool, sequential: bool = False,
               finder=None):
    from ntsnet.checkout import Checkout, basket_of
    from ntsnet.counter import Counter

    known = [v for v in val if v[1] not in unknown_names]
    unknown = [v for v in val if v[1] in unknown_names]
    tally = dict(true=0, pred=0, matched=0, known_matched=0, known_right=0, unk_matched=0, unk_flagged=0, known_flagged=0,
                 cacc_scenes=0, cacc_right=0, seconds=0.0)
    for i in range(scenes):
        rng = np.random.default_rng([seed, i])  # scene i is the same items in every layout and every run
        corners = None
        while corners is None:
            surface = counter_surface(rng, H, W)
            n = int(rng.integers(1, 9))
            picks = [unknown[int(rng.integers(len(unknown)))] if rng.random() < 0.25 else known[int(rng.integers(len(known)))]
                     for _ in range(n)]
            items = [cutout(p, rng) for p, _ in picks]
            corners = positions(rng, [m.shape for _, m in items], touching, H, W)
        checkout = Checkout(Counter.learn(camera_frames(surface, rng, 12)), recogniser, split=split, finder=finder)
        layers = None
        if sequential:
            frame, boxes, layers = one_by_one(checkout, surface, items, corners, rng)
        else:
            frame, boxes = compose(surface, items, corners)
            frame = light_change(frame, rng, strength=0.7)
        t0 = time.perf_counter()
        scan = checkout.scan(frame, layers)
        tally["seconds"] += time.perf_counter() - t0
        truth = [(b, name, name in unknown_names) for b, (_, name) in zip(boxes, picks) if b is not None]
        tally["true"] += len(truth)
        tally["pred"] += len(scan.items)
        for i, j in match([it.box for it in scan.items], [t[0] for t in truth]):
            it, (_, name, is_unknown) = scan.items[i], truth[j]
            tally["matched"] += 1
            if is_unknown:
                tally["unk_matched"] += 1
                tally["unk_flagged"] += it.unknown
            else:
                tally["known_matched"] += 1
                tally["known_right"] += it.label == name
                tally["known_flagged"] += it.unknown
        if 3 <= len(truth) <= 6:
            tally["cacc_scenes"] += 1
            want = basket_of(type("T", (), {"label": "unknown" if u else n})() for _, n, u in truth)
            tally["cacc_right"] += basket_of(scan.items) == want
    t = tally
    div = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"scenes": scenes, "items": t["true"], "recall": div(t["matched"], t["true"]), "precision": div(t["matched"], t["pred"]),
            "item_accuracy": div(t["known_right"], t["known_matched"]), "unknown_flagged": div(t["unk_flagged"], t["unk_matched"]),
            "known_flagged": div(t["known_flagged"], t["known_matched"]), "cacc": div(t["cacc_right"], t["cacc_scenes"]),
            "cacc_scenes": t["cacc_scenes"], "fps": div(scenes, t["seconds"])}


def six_items_speed(recogniser, val, scenes: int = 15, finder=None) -> float:
    """Median frames/s of Checkout.scan with six separated items in view (the issue's speed case)."""
    from ntsnet.checkout import Checkout
    from ntsnet.counter import Counter

    from common import median_ms

    times = []
    for i in range(scenes):
        rng = np.random.default_rng([99, i])
        corners = None
        while corners is None:
            surface = counter_surface(rng, H, W)
            items = [cutout(val[int(rng.integers(len(val)))][0], rng) for _ in range(6)]
            corners = positions(rng, [m.shape for _, m in items], False, H, W)
        frame = light_change(compose(surface, items, corners)[0], rng, strength=0.7)
        checkout = Checkout(Counter.learn(camera_frames(surface, rng, 12)), recogniser, finder=finder)
        times.append(median_ms(lambda: checkout.scan(frame), runs=3, warmup=1))
    return 1000.0 / float(np.median(times))


def item_finder(path: Path, train, seed: int):
    """The item finder at PATH, trained there first if missing: on the known products' training photos (never the
    scenes' val photos) on 12 rendered counters that no scene uses."""
    from ntsnet.counter import Counter
    from ntsnet.item_finder import ItemFinder
    from training.item_finder import FinderTrainConfig, train_item_finder

    if not path.exists():
        rng = np.random.default_rng([seed, 1000])
        backgrounds = []
        for _ in range(12):
            surface = counter_surface(rng, H, W)
            backgrounds.append((surface, Counter.learn(camera_frames(surface, rng, 12))))
        t0 = time.perf_counter()
        finder = train_item_finder([p for p, _ in train], backgrounds, FinderTrainConfig(seed=seed))
        print(f"item finder trained in {time.perf_counter() - t0:.0f} s: {finder.extra}", flush=True)
        finder.save(path, finder.extra)
    return ItemFinder.load(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=60)
    ap.add_argument("--run", default=None, help="a Train job run made with draw 0's products excluded")
    ap.add_argument("--no-split", action="store_true", help="connected components only (the baseline)")
    ap.add_argument("--finder", default=None, metavar="PATH",
                    help="split touching items with the item finder at PATH (trained there first if missing)")
    ap.add_argument("--layouts", default="separated,touching,one-by-one", help="or none: the speed only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="frames this many times 640x480, items as large a share")
    ap.add_argument("--json", default=None)
    ap.add_argument("--make-catalogue", default=None, metavar="DIR",
                    help="write the grocery photos as counter crops into a catalogue at DIR/catalogue and stop")
    args = ap.parse_args()
    set_scale(args.scale)
    import torch

    torch.set_num_threads(2)
    print(machine_line())
    train, val = lists()
    unknown_names = set(FIRST_DRAW)
    recognisers = {}
    if args.make_catalogue:
        return make_catalogue(Path(args.make_catalogue), args.seed)
    cache = Path(f"/tmp/checkout-bench-bank-{args.seed}{'' if args.scale == 1 else f'-x{args.scale:g}'}.npz")
    bank_items = [(p, n) for p, n in train if n not in unknown_names]
    instant = InstantItems(np.zeros((0, 1280), np.float32), [])
    if cache.exists():
        bank = np.load(cache)["e"]
    else:  # the catalogue as Collect "on the counter" captures it: counter crops of the training photos
        bank = crop_bank(bank_items, args.seed, instant.embed)
        np.savez(cache, e=bank)
    instant.index = type(instant.index).from_embeddings(zip(range(len(bank)), [n for _, n in bank_items], bank))
    recognisers["instant"] = instant
    if args.run:
        from ntsnet import Predictor

        recognisers["trained"] = Predictor.from_checkpoint(Path(args.run) / "best.safetensors")
        recognisers["trained"].wait_for_engine()
    finder = item_finder(Path(args.finder), [t for t in train if t[1] not in unknown_names], args.seed) if args.finder else None
    results = {}
    for name, rec in recognisers.items():
        for layout in [name for name in args.layouts.split(",") if name not in ("", "none")]:
            r = run_layout(rec, val, unknown_names, layout != "separated", args.scenes, args.seed, split=not args.no_split,
                           sequential=layout == "one-by-one", finder=finder)
            results[f"{name}/{layout}"] = r
            print(f"{name:8s} {layout:10s} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()), flush=True)
        results[f"{name}/six-items-fps"] = six_items_speed(rec, val, finder=finder)
        print(f"{name:8s} six separated items: {results[f'{name}/six-items-fps']:.1f} frames/s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
