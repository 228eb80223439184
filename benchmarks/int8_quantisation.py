"""Would INT8 reach the 80 ms frame? NNCF post-training quantisation of the two OpenVINO graphs, measured.

    pip install nncf   # not a dependency of the product: this script measures whether it should become one
    python benchmarks/int8_quantisation.py --checkpoint RUN/stage3-ntsnet.safetensors [--size 448] [--preset mixed]

The checkpoint's weights at --size (parts at half of it), K=4. Calibration: the graphs' own inputs recorded on
--calibration grocery training photos; then predict() latency (fp32 vs INT8 graphs, interleaved rounds), each
graph alone, and agreement with the fp32 graphs on the grocery val photos: the issue's bar is top-1 >= 99% and
identical K boxes >= 95%. ``--keep-fp32 PATTERN`` leaves matching layers unquantised (e.g. '.*navigator.*').
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from timing import median_ms  # noqa: E402
from train_click import DATA, cpu_line  # noqa: E402


def record_graph_inputs(predictor, photos):
    """The exact arrays each compiled graph receives while the predictor answers ``photos``."""
    seen = {"whole": [], "parts": []}
    engine = predictor.engine
    whole, parts = engine.whole_and_scores, engine.part_features
    engine.whole_and_scores = lambda x: (seen["whole"].append(x.numpy().copy()), whole(x))[1]
    engine.part_features = lambda c: (seen["parts"].append(c.numpy().copy()), parts(c))[1]
    try:
        for photo in photos:
            predictor.predict(photo)
    finally:
        del engine.whole_and_scores, engine.part_features  # back to the class's methods
    return seen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True, help="a trained NTS-Net checkpoint (its heads matter for agreement)")
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--preset", choices=["performance", "mixed"], default="mixed")
    ap.add_argument("--keep-fp32", default="", help="comma-separated regex patterns of layers NNCF must not quantise")
    ap.add_argument("--calibration", type=int, default=96)
    ap.add_argument("--photos", type=int, default=296)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    try:
        import nncf
    except ImportError:
        raise SystemExit("this benchmark needs NNCF: pip install nncf") from None
    import openvino as ov
    from PIL import Image

    from ntsnet import Predictor, compiled, save_checkpoint
    from ntsnet.checkpoint import build_model, load_checkpoint

    if not DATA.exists():
        raise SystemExit(f"needs the grocery photos in {DATA}")
    print(f"CPU: {cpu_line()}; torch {torch.__version__}, OpenVINO {compiled.openvino_version()}, NNCF {nncf.__version__}")
    ckpt = load_checkpoint(args.checkpoint)
    ckpt = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, input_size=args.size, part_size=args.size // 2))
    tmp = Path(tempfile.mkdtemp())
    path = tmp / "nts.safetensors"
    save_checkpoint(path, build_model(ckpt), ckpt.class_names)
    fp32 = Predictor.from_checkpoint(path, backend="openvino", precision="fp32", background=False)
    if fp32.engine is None:
        raise SystemExit(f"no OpenVINO engine: {fp32.build_error}")

    def photos(split, n, seed=None):
        names = [l.split(",")[0] for l in (DATA / f"{split}.txt").read_text().splitlines() if l.strip()]
        if seed is not None:
            names = [names[i] for i in np.random.default_rng(seed).choice(len(names), n, replace=False)]
        return [np.array(Image.open(DATA / p).convert("RGB")) for p in names[:n]]

    seen = record_graph_inputs(fp32, photos("train", args.calibration, seed=0))
    export = fp32.engine.graphs.out_dir
    qdir = tmp / "int8"
    qdir.mkdir()
    t0 = time.perf_counter()
    for name in ("whole", "parts"):
        model = ov.Core().read_model(str(export / f"{name}.xml"))
        data = seen[name]
        extra = {"ignored_scope": nncf.IgnoredScope(patterns=args.keep_fp32.split(","), validate=False)} if args.keep_fp32 else {}
        quantised = nncf.quantize(model, nncf.Dataset(data), preset=getattr(nncf.QuantizationPreset, args.preset.upper()),
                                  subset_size=len(data), **extra)
        ov.save_model(quantised, str(qdir / f"{name}.xml"), compress_to_fp16=False)
    print(f"quantised both graphs in {time.perf_counter() - t0:.0f} s ({args.calibration} calibration photos, preset {args.preset}"
          + (f", kept fp32: {args.keep_fp32}" if args.keep_fp32 else "") + ")")
    int8 = Predictor.from_checkpoint(path, backend="openvino", precision="fp32", background=False)
    int8.engine = compiled.CompiledNTS(compiled.OpenVINOGraphs(qdir, fp32.engine.graphs.manifest, precision="fp32"))

    frame = photos("val", 1)[0]
    x = torch.zeros(1, 3, args.size, args.size)
    crops = torch.zeros(4, 3, args.size // 2, args.size // 2)
    timings: dict[str, list[float]] = {}
    for _ in range(args.rounds):  # interleaved: this VM's speed drifts by 15-25% within minutes
        for name, p in (("fp32", fp32), ("int8", int8)):
            g = p.engine.graphs
            timings.setdefault(f"{name} predict", []).append(median_ms(lambda: p.predict(frame), 15, warmup=3))
            timings.setdefault(f"{name} graph 1 (whole + Navigator)", []).append(median_ms(lambda: g.run("whole", x), 15, warmup=3))
            timings.setdefault(f"{name} graph 2 (K parts)", []).append(median_ms(lambda: g.run("parts", crops), 15, warmup=3))
    print(f"\n| {args.size}/{args.size // 2} px, K=4, one grocery val photo (348x348) | ms (median of {args.rounds} rounds) |\n|---|---|")
    for name, values in timings.items():
        print(f"| {name} | {statistics.median(values):.1f} |")

    same_top1 = same_boxes = 0
    val = photos("val", args.photos)
    for photo in val:
        a, b = fp32.predict(photo), int8.predict(photo)
        same_top1 += a.index == b.index
        same_boxes += [(q.x0, q.y0, q.x1, q.y1) for q in a.boxes] == [(q.x0, q.y0, q.x1, q.y1) for q in b.boxes]
    n = len(val)
    print(f"\nINT8 vs fp32 on {n} grocery val photos: top-1 agreement {same_top1 / n:.1%} (bar 99%), "
          f"identical K boxes {same_boxes / n:.1%} (bar 95%)")


if __name__ == "__main__":
    main()
