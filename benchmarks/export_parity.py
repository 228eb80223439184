"""Does the exported model answer as the Predictor does on real photos, and how fast is each runtime?

    python benchmarks/export_parity.py --checkpoint RUN/best.safetensors [--n 296]

Exports the checkpoint as ONNX and as OpenVINO IR (python -m ntsnet export), runs each export's predict.py (ONNX
Runtime; OpenVINO) on the grocery val photos, and compares with the Predictor in fp32 PyTorch: the same top-1, the
confidence, the K boxes within a pixel. Times one photo's answer (median, after warm-up) for each runtime and for
the Predictor's own paths (eager PyTorch, its OpenVINO engine).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np

from common import grocery_photos, machine_line, median_ms  # noqa: E402


def load_predict(folder: Path):
    spec = importlib.util.spec_from_file_location(f"exported_{folder.name}", folder / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--n", type=int, default=296)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from ntsnet import Predictor
    from ntsnet.export import export_model
    from ntsnet.images import to_rgb_array

    print(machine_line())
    paths = [path for path, _ in grocery_photos("val")][: args.n]
    photos = [to_rgb_array(p) for p in paths]
    reference = Predictor.from_checkpoint(args.checkpoint, backend="torch", precision="fp32")
    want = [reference.predict(p) for p in photos]
    report = {"machine": machine_line(), "photos": len(photos), "checkpoint": args.checkpoint}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, runtime in (("onnx", "onnxruntime"), ("openvino", "openvino")):
            folder = export_model(args.checkpoint, Path(tmp) / fmt, fmt)
            model = load_predict(folder).Model(folder, runtime)
            got = [model.predict(p) for p in photos]
            same = np.mean([g["label"] == w.label for g, w in zip(got, want)])
            conf = max(abs(g["confidence"] - w.confidence) for g, w in zip(got, want))
            boxes = np.mean([all(max(abs(b[k] - getattr(x, k)) for k in ("x0", "y0", "x1", "y1")) <= 1.0
                                 for b, x in zip(g["boxes"], w.boxes)) for g, w in zip(got, want)])
            ms = median_ms(lambda: model.predict(photos[0]), runs=20, warmup=3)
            spec = model.spec
            x = np.zeros((1, 3, spec["input_size"], spec["input_size"]), np.float32)
            crops = np.zeros((spec["cat_num"], 3, spec["part_size"], spec["part_size"]), np.float32)
            graphs = median_ms(lambda: (model.graphs.run["whole"](x), model.graphs.run["parts"](crops)), runs=20, warmup=3)
            report[runtime] = {"same_top1": float(same), "max_confidence_gap": float(conf), "same_boxes": float(boxes), "ms": ms,
                               "graphs_ms": graphs}
            print(f"{runtime:12s} same top-1 {same:.1%}, boxes within 1 px {boxes:.1%}, max confidence gap {conf:.4f}, "
                  f"{ms:.1f} ms a photo (its two graphs {graphs:.1f} ms)", flush=True)
    report["predictor_torch_ms"] = median_ms(lambda: reference.predict(photos[0]), runs=20, warmup=3)
    compiled = Predictor.from_checkpoint(args.checkpoint, backend="openvino", precision="fp32", background=False)
    report["predictor_openvino_ms"] = median_ms(lambda: compiled.predict(photos[0]), runs=20, warmup=3)
    print(f"Predictor: eager PyTorch {report['predictor_torch_ms']:.1f} ms, its OpenVINO engine "
          f"{report['predictor_openvino_ms']:.1f} ms a photo (fp32)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
