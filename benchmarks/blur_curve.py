"""How blurred may a photo be? Validation accuracy of one checkpoint against the strength of a Gaussian blur.

    python benchmarks/blur_curve.py --checkpoint RUN/stage3-ntsnet.safetensors --db CATALOGUE [--split val]
                                    [--shares 0,0.25,0.5,0.75,1,1.5,2] [--plot blur_curve.png]

The evaluation's blurry condition (training/evaluate.py) is one point of this curve: sigma = 1.5% of the photo's
longest side. The curve says up to which blur the model stays within 5 points of its clean accuracy, which one
number cannot. Every photo is decoded once; each blur strength runs the same photos through the same predictor.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def blur_curve(predictor, arrays, labels, shares_percent, batch_size: int = 16) -> list[dict]:
    from training.evaluate import blur

    rows = []
    for pct in shares_percent:
        correct = 0
        for start in range(0, len(arrays), batch_size):
            batch = [blur(a, pct / 100) for a in arrays[start:start + batch_size]]
            preds = predictor.predict_batch(batch)
            correct += sum(p.index == y for p, y in zip(preds, labels[start:start + batch_size]))
        rows.append({"sigma_percent": pct, "accuracy": correct / len(arrays), "n": len(arrays)})
    return rows


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
    ax.set_xlabel("Gaussian blur sigma, % of the photo's longest side")
    ax.set_ylabel("accuracy, %")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    from train_click import cpu_line
    from ntsnet import Predictor
    from training.evaluate import _eval_items
    from training.progressive import _load_arrays

    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--db", required=True, help="the catalogue folder whose photos to read")
    ap.add_argument("--split", default="val")
    ap.add_argument("--shares", default="0,0.25,0.5,0.75,1,1.5,2", help="blur sigmas, %% of the longest side")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--plot", default=None, help="write the curve as a PNG here")
    args = ap.parse_args()

    print("CPU:", cpu_line())
    predictor = Predictor.from_checkpoint(args.checkpoint, precision=args.precision, background=False)
    items, _ = _eval_items(args.db, predictor.class_names, args.split)
    arrays, labels = _load_arrays(items)
    shares = [float(s) for s in args.shares.split(",")]
    t0 = time.time()
    rows = blur_curve(predictor, arrays, labels, shares)
    clean = next((r["accuracy"] for r in rows if r["sigma_percent"] == 0), None)
    print(f"{len(arrays)} photos ({args.split}), backend {predictor.backend_name}, {time.time() - t0:.0f} s")
    print("sigma (% of side)  accuracy" + ("  vs clean" if clean is not None else ""))
    for r in rows:
        gap = f"  {100 * (r['accuracy'] - clean):+.1f}" if clean is not None else ""
        print(f"  {r['sigma_percent']:>15.2f}  {r['accuracy']:>8.1%}{gap}")
    if args.plot:
        plot(rows, Path(args.plot), f"{Path(args.checkpoint).name}: accuracy vs blur ({len(arrays)} {args.split} photos)")
        print("plot:", args.plot)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
