"""How blurred may a photo be? Validation accuracy of one checkpoint against the strength of a Gaussian blur.

    python benchmarks/blur_curve.py --checkpoint RUN/stage3-ntsnet.safetensors --db CATALOGUE [--split val]
                                    [--shares 0,0.25,0.5,0.75,1,1.5,2] [--sides 24,32,40,56,80] [--plot blur_curve.png]

The evaluation's blurry condition (training/evaluate.py) is one point of this curve: sigma = 1.5% of the photo's
longest side. The curve says up to which blur the model stays within 5 points of its clean accuracy, which one
number cannot. ``--sides``: the same photos shrunk to these longest sides (the low-res condition is 80 px), so the
blur can be read as an image size: "as hard for this model as a 48-pixel photo". Every photo is decoded once; each
point runs the same photos through the same predictor.

``--kind defocus|motion``: the same spreads as a lens out of focus (a disk of radius 2 sigma) or a streak of motion
(a line of the same standard deviation, at an angle fixed for each photo) instead of the evaluation's Gaussian;
``--camera``: then sensor noise (2 grey levels) and JPEG at quality 85, as a real blurred frame carries them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def accuracy_curve(predictor, arrays, labels, degrade, points, batch_size: int = 16) -> list[dict]:
    """Accuracy on ``degrade(photo, point)`` of every photo, for each point."""
    rows = []
    for point in points:
        correct = 0
        for start in range(0, len(arrays), batch_size):
            preds = predictor.predict_batch([degrade(a, point) for a in arrays[start:start + batch_size]])
            correct += sum(p.index == y for p, y in zip(preds, labels[start:start + batch_size]))
        rows.append({"accuracy": correct / len(arrays), "n": len(arrays)})
    return rows


def camera_noise(rgb: np.ndarray, sd: float = 2.0, quality: int = 85) -> np.ndarray:
    """Sensor noise of ``sd`` grey levels and a JPEG round trip, the same for the same photo."""
    from PIL import Image

    from training.data import jpeg_round_trip, to_uint8

    rng = np.random.default_rng(zlib.crc32(rgb[::7, ::7].tobytes()))
    return np.asarray(jpeg_round_trip(Image.fromarray(to_uint8(rgb + rng.standard_normal(rgb.shape) * sd)), quality))


def blurred(rgb: np.ndarray, share: float, kind: str = "gaussian", camera: bool = False) -> np.ndarray:
    """The photo blurred with a spread of ``share`` x its longest side: the evaluation's Gaussian, a defocus disk or a
    motion streak (training/data.py: blur_kernel; the streak's angle follows from the photo, so it repeats)."""
    from training.data import blur_kernel, convolve, to_uint8
    from training.evaluate import blur

    if share > 0 and kind != "gaussian":
        angle = (zlib.crc32(rgb[::5, ::5].tobytes()) % 1000) / 1000 * np.pi
        out = to_uint8(convolve(rgb, blur_kernel(kind, share * max(rgb.shape[:2]), angle)))
    else:
        out = blur(rgb, share)
    return camera_noise(out) if camera and share > 0 else out


def blur_curve(predictor, arrays, labels, shares_percent, batch_size: int = 16, kind: str = "gaussian",
               camera: bool = False) -> list[dict]:
    rows = accuracy_curve(predictor, arrays, labels, lambda a, pct: blurred(a, pct / 100, kind, camera), shares_percent,
                          batch_size)
    return [{"sigma_percent": pct, **r} for pct, r in zip(shares_percent, rows)]


def size_curve(predictor, arrays, labels, sides, batch_size: int = 16) -> list[dict]:
    from training.evaluate import downscale

    rows = accuracy_curve(predictor, arrays, labels, downscale, sides, batch_size)
    return [{"side_px": side, **r} for side, r in zip(sides, rows)]


def as_hard_as(accuracy: float, sizes: list[dict]) -> float | None:
    """The image side (px) at which the size curve reads ``accuracy``, interpolated linearly between the two
    measured sides around it (the smallest such side where 296 photos make the curve wobble); None when the accuracy
    lies outside the measured range."""
    pts = sorted((r["side_px"], r["accuracy"]) for r in sizes)
    for (s0, a0), (s1, a1) in zip(pts, pts[1:]):
        if min(a0, a1) <= accuracy <= max(a0, a1):
            return s0 if a1 == a0 else s0 + (accuracy - a0) * (s1 - s0) / (a1 - a0)
    return None


def plot(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["sigma_percent"] for r in rows]
    y = [100 * r["accuracy"] for r in rows]
    clean = next((r["accuracy"] for r in rows if r["sigma_percent"] == 0), rows[0]["accuracy"]) * 100
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, y, marker="o", label="validation top-1")
    ax.axhline(clean - 5, color="grey", ls="--", lw=1, label="clean − 5 points")
    ax.axvline(1.5, color="tab:red", ls=":", lw=1, label="evaluation's 'blurry' (1.5%)")
    ax.set_xlabel("blur spread (sigma), % of the photo's longest side")
    ax.set_ylabel("accuracy, %")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    from common import cpu_line
    from ntsnet import Predictor
    from training.evaluate import eval_items
    from training.features import load_arrays

    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--db", required=True, help="the catalogue folder whose photos to read")
    ap.add_argument("--split", default="val")
    ap.add_argument("--shares", default="0,0.25,0.5,0.75,1,1.5,2", help="blur sigmas, %% of the longest side")
    ap.add_argument("--sides", default="", help="also shrink the photos to these longest sides (px), e.g. 24,32,40,56,80")
    ap.add_argument("--kind", default="gaussian", choices=["gaussian", "defocus", "motion"],
                    help="the blur's shape at the same spread: the evaluation's Gaussian, a defocus disk, a motion streak")
    ap.add_argument("--camera", action="store_true", help="add sensor noise and JPEG to every blurred photo")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--plot", default=None, help="write the curve as a PNG here")
    args = ap.parse_args()

    print("CPU:", cpu_line())
    predictor = Predictor.from_checkpoint(args.checkpoint, precision=args.precision, background=False)
    items, _ = eval_items(args.db, predictor.class_names, args.split)
    arrays, labels = load_arrays(items)
    shares = [float(s) for s in args.shares.split(",")]
    t0 = time.time()
    rows = blur_curve(predictor, arrays, labels, shares, kind=args.kind, camera=args.camera)
    clean = next((r["accuracy"] for r in rows if r["sigma_percent"] == 0), None)
    print(f"{len(arrays)} photos ({args.split}), backend {predictor.backend_name}, {time.time() - t0:.0f} s; blur: {args.kind}"
          + (", with sensor noise and JPEG" if args.camera else ""))
    print("sigma (% of side)  accuracy" + ("  vs clean" if clean is not None else ""))
    for r in rows:
        gap = f"  {100 * (r['accuracy'] - clean):+.1f}" if clean is not None else ""
        print(f"  {r['sigma_percent']:>15.2f}  {r['accuracy']:>8.1%}{gap}")
    sizes = size_curve(predictor, arrays, labels, [int(v) for v in args.sides.split(",")]) if args.sides else []
    if sizes:
        print("longest side (px)  accuracy" + ("  vs clean" if clean is not None else ""))
        for r in sizes:
            gap = f"  {100 * (r['accuracy'] - clean):+.1f}" if clean is not None else ""
            print(f"  {r['side_px']:>15d}  {r['accuracy']:>8.1%}{gap}")
        for r in rows:
            side = as_hard_as(r["accuracy"], sizes)
            if r["sigma_percent"] > 0 and side is not None:
                print(f"a blur of {r['sigma_percent']:g}% of the side is as hard for this model as a {side:.0f}-px photo")
    if args.plot:
        plot(rows, Path(args.plot), f"{Path(args.checkpoint).name}: accuracy vs {args.kind} blur ({len(arrays)} {args.split} photos)")
        print("plot:", args.plot)
    print(json.dumps({"blur": rows, "sides": sizes}))


if __name__ == "__main__":
    main()
