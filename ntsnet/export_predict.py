"""Recognise products with an exported NTS-Net: numpy, Pillow and ONNX Runtime (or OpenVINO); no PyTorch.

    pip install numpy pillow onnxruntime        # or: pip install numpy pillow openvino
    python predict.py photo.jpg shelf/ [--json]

This file is written beside the model by ``python -m ntsnet export`` and reads export.json there: the class names,
the input sizes, the normalisation, the anchors and their NMS table, K, the heads and the unknown threshold. It
repeats the product's Predictor step by step (resize, exposure, whole-image pass, hard NMS, part crops, part pass,
heads), so its label, confidence and K boxes are the Predictor's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class Graphs:
    """The exported graphs on ONNX Runtime (model.onnx files) or OpenVINO (.xml files), two threads by default."""

    def __init__(self, folder: Path, spec: dict, runtime: str = "auto", threads: int = 2):
        if runtime == "auto":
            runtime = "onnxruntime" if spec["format"] == "onnx" else "openvino"
        self.runtime, self.run = runtime, {}
        for name, file in spec["graphs"].items():
            path = str(folder / file)
            if runtime == "onnxruntime":
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads
                session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
                self.run[name] = lambda x, s=session: s.run(None, {s.get_inputs()[0].name: x})
            else:
                import openvino as ov

                compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
                self.run[name] = lambda x, c=compiled: [c(x)[out] for out in c.outputs]


def load_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "P"):
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
        return np.asarray(im.convert("RGB"))


def _taps(in_size: int, out_size: int):
    """Antialiased bilinear resampling along one axis as PyTorch's uint8 path does it (Pillow's scheme, weights in
    fixed point): per output pixel its input indices (out, taps), integer weights, and the fixed-point precision."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (np.arange(out_size) + 0.5)
    lo = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    idx = lo[:, None] + np.arange(int((hi - lo).max()))[None]
    w = np.maximum(0.0, 1.0 - np.abs((idx - centers[:, None] + 0.5) * inv))
    w[idx >= hi[:, None]] = 0.0
    total = w.sum(1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    bits = 0
    while bits < 22 and int(0.5 + w.max() * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    scaled = w * (1 << bits)
    return np.minimum(idx, in_size - 1), np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)), bits


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) uint8, equal to the Predictor's resize bit for bit: width first, then height, each rounded to
    uint8 (products of integer weights and pixels are exact in float64)."""
    x = rgb.astype(np.float64)
    if x.shape[1] != size:
        idx, w, bits = _taps(x.shape[1], size)
        x = np.clip(np.floor(((x[:, idx] * w[None, :, :, None]).sum(2) + (1 << (bits - 1))) / (1 << bits)), 0, 255)
    if x.shape[0] != size:
        idx, w, bits = _taps(x.shape[0], size)
        x = np.clip(np.floor(((x[idx] * w[:, :, None, None]).sum(1) + (1 << (bits - 1))) / (1 << bits)), 0, 255)
    return x.astype(np.uint8)


def model_input(rgb: np.ndarray, size: int, spec: dict) -> np.ndarray:
    """(1, 3, size, size) float32: resized with antialias, brightened when underexposed, normalised."""
    x = resize(rgb, size).astype(np.float32).transpose(2, 0, 1)[None] / 255.0
    e = spec["exposure"]
    step = max(1, round(size / 112))
    luma = (x[:, :, ::step, ::step] * np.array(e["luma"], np.float32).reshape(1, 3, 1, 1)).sum(1).reshape(-1)
    bright = float(np.quantile(luma, 0.99))
    if bright < e["trigger"]:
        x = np.clip(x * min(e["target"] / max(bright, 1 / 255), e["max_gain"]), 0, 1)
    mean, std = (np.array(spec[k], np.float32).reshape(1, 3, 1, 1) for k in ("mean", "std"))
    return ((x - mean) / std).astype(np.float32)


def hard_nms(scores: np.ndarray, table: np.ndarray, top_n: int) -> list[int]:
    """The first ``top_n`` anchors greedy hard NMS keeps, best first (the best suppressed ones fill a shortfall)."""
    order = np.argsort(-scores, kind="stable")
    dropped = np.zeros(len(scores), bool)
    picks = []
    for i in order:
        if len(picks) == top_n:
            break
        if not dropped[i]:
            picks.append(int(i))
            dropped |= table[i]
    picks += [int(j) for j in order if j not in picks][: top_n - len(picks)]
    return picks


def _crop_taps(start, end, length: int, size: int, sampling: int = 2):
    """roi_align's (aligned, spatial scale 1) sample rows and weights along one axis, per box."""
    start = start.astype(np.float32) - np.float32(0.5)
    bin_ = (end.astype(np.float32) - np.float32(0.5) - start) / np.float32(size)
    first = start[:, None] + np.arange(size, dtype=np.float32)[None] * bin_[:, None]
    pos = np.stack([first + ((np.float32(k) + np.float32(0.5)) * bin_ / np.float32(sampling))[:, None] for k in range(sampling)], -1)
    inside = (pos >= -1.0) & (pos <= length)
    pos = np.maximum(pos, 0)
    low = np.floor(pos)
    at_end = low >= length - 1
    low = np.where(at_end, np.float32(length - 1), low)
    pos = np.where(at_end, low, pos)
    frac = pos - low
    scale = inside.astype(np.float32) / sampling
    high = np.minimum(low + 1, length - 1)
    index = np.stack([low, high], -1).astype(np.int64).reshape(len(start), size, -1)
    weight = np.stack([(1 - frac) * scale, frac * scale], -1).reshape(len(start), size, -1).astype(np.float32)
    return index, weight


def crop_parts(x: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(K, 3, size, size) crops of the (1, 3, H, W) input at (K, 4) boxes, as the Predictor's roi_align crops."""
    _, c, h, w = x.shape
    rows, row_w = _crop_taps(boxes[:, 1], boxes[:, 3], h, size)
    cols, col_w = _crop_taps(boxes[:, 0], boxes[:, 2], w, size)
    out = np.empty((len(boxes), c, size, size), np.float32)
    for i in range(len(boxes)):
        r = x[0][:, rows[i].reshape(-1), :].reshape(c, size, -1, w)           # (C, size, taps, W)
        r = (r * row_w[i][None, :, :, None]).sum(2)                             # (C, size, W)
        m = np.zeros((w, size), np.float32)
        for t in range(cols.shape[2]):  # one tap per output column at a time: no index repeats within a step
            m[cols[i][:, t], np.arange(size)] += col_w[i][:, t]
        out[i] = r @ m
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


class Model:
    def __init__(self, folder: Path = HERE, runtime: str = "auto"):
        self.spec = json.loads((folder / "export.json").read_text())
        arrays = np.load(folder / self.spec["arrays"], allow_pickle=False)
        self.arrays = {k: arrays[k] for k in arrays.files}
        self.table = np.unpackbits(self.arrays["nms_table"], axis=1)[:, : len(self.arrays["anchors"])].astype(bool) \
            if "nms_table" in self.arrays else None
        self.graphs = Graphs(folder, self.spec, runtime)

    def predict(self, rgb: np.ndarray, top_k: int = 5) -> dict:
        s, a = self.spec, self.arrays
        x = model_input(rgb, s["input_size"], s)
        out = self.graphs.run["whole"](x)
        whole = out[0].astype(np.float32)
        raw = whole @ a["raw_head.weight"].T + a["raw_head.bias"]
        boxes = np.zeros((0, 4), np.float32)
        if s["model"] == "ntsnet" and s["cat_num"] > 0:
            scores = out[1][0]
            picks = hard_nms(scores, self.table, s["cat_num"])
            boxes = a["anchors"][picks]
            parts = self.graphs.run["parts"](crop_parts(x, boxes, s["part_size"]))[0].astype(np.float32)
            part_logits = parts @ a["teacher_head.weight"].T + a["teacher_head.bias"]
            concat = np.concatenate([parts.reshape(1, -1), whole], 1) @ a["scrutinizer_head.weight"].T + a["scrutinizer_head.bias"]
            probs = softmax(concat)
            if s["answer"] == "all-heads":
                probs = (probs + softmax(raw) + softmax(part_logits.mean(0, keepdims=True))) / 3
            box_scores = scores[picks]
        else:
            probs, box_scores = softmax(raw), []
        probs = probs[0]
        order = np.argsort(-probs, kind="stable")[:top_k]
        top = [(s["class_names"][i], float(probs[i])) for i in order]
        h, w = rgb.shape[:2]
        sx, sy = w / s["input_size"], h / s["input_size"]
        threshold = (s.get("unknown_threshold") or {}).get("value")
        unknown = threshold is not None and top[0][1] < threshold
        return {"label": "unknown" if unknown else top[0][0], "confidence": round(top[0][1], 6), "unknown": unknown,
                "top5": [{"label": n, "confidence": round(p, 6)} for n, p in top],
                "boxes": [{"x0": round(float(np.clip(b[0] * sx, 0, w)), 2), "y0": round(float(np.clip(b[1] * sy, 0, h)), 2),
                           "x1": round(float(np.clip(b[2] * sx, 0, w)), 2), "y1": round(float(np.clip(b[3] * sy, 0, h)), 2),
                           "score": round(float(sc), 2)} for b, sc in zip(boxes, box_scores)]}


def photos(paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        out += sorted(q for q in p.rglob("*") if q.suffix.lower() in SUFFIXES) if p.is_dir() else [p]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="+", help="photos, or folders of photos")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "openvino"])
    args = ap.parse_args(argv)
    model = Model(HERE, args.runtime)
    failed = 0
    for path in photos(args.images):
        try:
            answer = model.predict(load_rgb(path))
        except (OSError, ValueError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        if args.json:
            print(json.dumps({"image": str(path), **answer}, ensure_ascii=False), flush=True)
        else:
            print(f"{path}: {answer['label']} ({answer['confidence']:.1%})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
