"""Does the instant model answer "nothing to recognise" for the camera's empty scene, and only for it?

    python benchmarks/empty_scene.py [--scenes 10] [--later 40] [--per-product 14]

The catalogue: the grocery training photos (the first ``--per-product`` of each of the 81 products, as a store's
catalogue captured from a webcam), plus, per scene, Collect's "capture the empty scene": 12 frames of one counter
surface (benchmarks/counter_scenes.py; rendered, since no photo of an empty counter ships with the set). The app
answers "nothing" when the frame matches the captured scene (webapp/empty_scene.py); where that rule applies (same
camera), a model that names the empty scene while something is in view is overruled; elsewhere the model decides.
Then:
- later frames of that scene with the light changed (exposure, white balance, gamma, gradient, shadow, noise,
  the stand knocked by up to 1% of the frame): the share answered "nothing to recognise" (each rule alone too);
- the scene with a grocery photo held into it: the share wrongly answered "nothing";
- the 296 grocery val photos: the share the model answers "nothing", and top-1 with and without the empty scene.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from common import grocery_photos, machine_line  # noqa: E402
from counter_scenes import camera_frames, counter_surface, light_change  # noqa: E402

CAPTURED = 12  # Collect's empty-scene burst: 3 s at 250 ms


def grocery_lists(per_product: int):
    """The first ``per_product`` training photos of each product, and every val photo: (path, name) lists."""
    train, seen = [], {}
    for path, name in grocery_photos("train"):
        if seen.get(name, 0) < per_product:
            train.append((path, name))
            seen[name] = seen.get(name, 0) + 1
    return train, grocery_photos("val")


def product_in_view(surface, path: str, rng) -> np.ndarray:
    """The scene with a product held into it: a grocery photo's middle, 120-240 px, somewhere in the frame, relit."""
    im = np.asarray(Image.open(path).convert("RGB"))
    h, w = im.shape[:2]
    im = im[h // 6:h - h // 6, w // 6:w - w // 6]
    side = int(rng.integers(120, 240))
    im = cv2.resize(im, (side, side * im.shape[0] // im.shape[1]), interpolation=cv2.INTER_AREA)
    out = surface.copy()
    y, x = int(rng.integers(0, out.shape[0] - im.shape[0])), int(rng.integers(0, out.shape[1] - im.shape[1]))
    out[y:y + im.shape[0], x:x + im.shape[1]] = im
    return light_change(out, rng)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=10)
    ap.add_argument("--later", type=int, default=40, help="later frames per scene, with light changes")
    ap.add_argument("--per-product", type=int, default=14)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from ntsnet.counter import Counter
    from ntsnet.instant import Embedder, InstantIndex
    from ntsnet.predictor import EMPTY_SCENE
    from webapp.empty_scene import GATE_WIDTH

    print(machine_line())
    embed = Embedder("efficientnet_lite0", background=False)
    train, val = grocery_lists(args.per_product)
    t0 = time.perf_counter()
    bank = np.concatenate([embed([p for p, _ in train[i:i + 32]]) for i in range(0, len(train), 32)])
    val_emb = np.concatenate([embed([p for p, _ in val[i:i + 32]]) for i in range(0, len(val), 32)])
    print(f"embedded {len(train)} + {len(val)} photos in {time.perf_counter() - t0:.0f} s")
    items = [(i, name, e) for i, ((_, name), e) in enumerate(zip(train, bank))]
    plain = InstantIndex.from_embeddings(items)
    val_names = np.array([n for _, n in val])
    top1_plain = float(np.mean([p.best_guess == n for p, n in zip(plain.classify(val_emb), val_names)]))

    rng = np.random.default_rng(args.seed)
    rows = []
    for s in range(args.scenes):
        surface = counter_surface(rng)
        captured = camera_frames(surface, rng, CAPTURED)
        index = InstantIndex.from_embeddings(items)
        for j, e in enumerate(embed(captured)):
            index.add(len(train) + j, EMPTY_SCENE, e)
        gate = Counter.learn(captured, width=GATE_WIDTH)
        later = [light_change(surface, rng, shift_px=6) for _ in range(args.later)]
        model_nothing = np.array([p.nothing for p in index.classify(embed(later))])
        gate_nothing = np.array([gate.is_empty(f) for f in later])
        shown = [product_in_view(surface, val[int(rng.integers(len(val)))][0], rng) for _ in range(args.later)]
        shown_gate = np.array([gate.is_empty(f) for f in shown])
        shown_model = np.array([p.nothing for p in index.classify(embed(shown))])
        val_pred = index.classify(val_emb)
        rows.append({
            "scene": s, "later_nothing": float(gate_nothing.mean()),  # the counter decides where it applies
            "later_nothing_model": float(model_nothing.mean()), "later_nothing_counter": float(gate_nothing.mean()),
            "product_shown_nothing": float(shown_gate.mean()),
            "product_shown_nothing_model": float(shown_model.mean()), "product_shown_nothing_counter": float(shown_gate.mean()),
            "val_nothing": float(np.mean([p.nothing for p in val_pred])),
            "val_top1": float(np.mean([p.best_guess == n for p, n in zip(val_pred, val_names)])),
        })
        print(json.dumps(rows[-1]))
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "scene"}
    worst = min(r["later_nothing"] for r in rows)
    print(f"later frames answered 'nothing': {mean['later_nothing']:.1%} (worst scene {worst:.1%}; the model alone "
          f"{mean['later_nothing_model']:.1%}, the counter alone {mean['later_nothing_counter']:.1%}); a product shown "
          f"answered 'nothing': {mean['product_shown_nothing']:.2%} (the model alone {mean['product_shown_nothing_model']:.2%}, the "
          f"counter alone {mean['product_shown_nothing_counter']:.2%}); val photos answered 'nothing' by the model: "
          f"{mean['val_nothing']:.2%}; val top-1 {mean['val_top1']:.1%} (without the empty scene {top1_plain:.1%})")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(), "rows": rows, "mean": mean, "top1_without": top1_plain}, indent=1))


if __name__ == "__main__":
    main()
