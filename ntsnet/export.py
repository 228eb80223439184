"""The model leaves the app: a trained checkpoint as graphs any runtime reads, plus what inference needs around them.

``export_model(checkpoint, out_dir, "onnx" | "openvino")`` writes
- the two backbone passes as graphs (``whole``: image -> whole-image feature and the Navigator's anchor scores;
  ``parts``: part crops -> part features), ONNX files or OpenVINO IR, fp32;
- ``arrays.npz``: the three heads' weights, the anchors and their hard-NMS table (bit-packed);
- ``export.json``: class names, sizes, normalisation and exposure rule, K, which heads answer, the unknown rule;
- ``predict.py`` (ntsnet/export_predict.py): the Predictor's steps in numpy and Pillow on those graphs;
- ``requirements.txt`` for it, and a README.

Written to a temporary folder and renamed into place: a failed export leaves nothing half-written.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .anchors import generate_anchors, suppression_table
from .checkpoint import build_model, load_checkpoint
from .compiled import _convert, model_graphs
from .images import EXPOSURE_MAX_GAIN, EXPOSURE_TARGET, EXPOSURE_TRIGGER, _LUMA

FORMATS = ("onnx", "openvino")
EXPORT_VERSION = 1
RUNTIME_REQUIREMENTS = {"onnx": "numpy\npillow\nonnxruntime\n", "openvino": "numpy\npillow\nopenvino\n"}


def _to_onnx(module: torch.nn.Module, size: int, path: Path, outputs: list[str]):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TF-same padding traced as a constant for the fixed input size: as it should be
        torch.onnx.export(module.eval(), (torch.zeros(1, 3, size, size),), str(path), opset_version=17, dynamo=False,
                          input_names=["x"], output_names=outputs,
                          dynamic_axes={"x": {0: "batch"}, **{o: {0: "batch"} for o in outputs}})


def _arrays(model) -> dict[str, np.ndarray]:
    cfg = model.config
    out = {f"{name}.{p}": getattr(getattr(model, name), p).detach().float().numpy()
           for name in ("raw_head", "teacher_head", "scrutinizer_head") if hasattr(model, name) for p in ("weight", "bias")}
    if cfg.model == "ntsnet":
        anchors = generate_anchors(cfg.input_size)
        out["anchors"] = anchors.float().numpy()
        out["nms_table"] = np.packbits(suppression_table(anchors, cfg.nms_iou), axis=1)
    return out


def _spec(ckpt, model, fmt: str, graphs: dict[str, str]) -> dict:
    cfg = model.config
    return {
        "format": fmt, "version": EXPORT_VERSION, "source_sha256": ckpt.sha256, "model": cfg.model, "backbone": cfg.backbone,
        "class_names": list(ckpt.class_names), "input_size": cfg.input_size, "part_size": cfg.part_size,
        "cat_num": cfg.cat_num if cfg.model == "ntsnet" else 0, "nms_iou": cfg.nms_iou, "answer": cfg.answer,
        "mean": list(map(float, model.mean)), "std": list(map(float, model.std)),
        "exposure": {"trigger": EXPOSURE_TRIGGER, "target": EXPOSURE_TARGET, "max_gain": EXPOSURE_MAX_GAIN, "luma": list(_LUMA)},
        "resize": "bilinear with antialias as PyTorch's uint8 path (predict.py: resize), whole image to input_size, no crop",
        "unknown_threshold": ckpt.extra.get("unknown_threshold"),
        "graphs": graphs, "arrays": "arrays.npz",
    }


def export_model(checkpoint, out_dir, fmt: str = "onnx") -> Path:
    """Export ``checkpoint`` into ``out_dir`` (created; refused if it exists and is not empty)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty: choose a new folder")
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt).eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        files = {}
        for name, (module, size) in model_graphs(model).items():
            if fmt == "onnx":
                files[name] = f"{name}.onnx"
                _to_onnx(module, size, tmp / files[name], ["whole", "scores"] if name == "whole" and ckpt.config.model == "ntsnet"
                         else ["features"])
            else:
                files[name] = f"{name}.xml"
                _convert(module, size, tmp / files[name])
        np.savez(tmp / "arrays.npz", **_arrays(model))
        (tmp / "export.json").write_text(json.dumps(_spec(ckpt, model, fmt, files), indent=1, ensure_ascii=False))
        shutil.copyfile(Path(__file__).with_name("export_predict.py"), tmp / "predict.py")
        (tmp / "requirements.txt").write_text(RUNTIME_REQUIREMENTS[fmt])
        (tmp / "README.md").write_text(
            f"# {len(ckpt.class_names)} products, NTS-Net ({ckpt.config.backbone}), exported as {fmt}\n\n"
            "```bash\npip install -r requirements.txt\npython predict.py photo.jpg photos/ --json\n```\n\n"
            "`predict.py` needs no PyTorch: it resizes, runs the two graphs, applies hard NMS and the heads, and prints "
            "each photo's label, confidence, top 5 and the Navigator's K boxes in the photo's pixels; `export.json` "
            "holds every setting it reads.\n")
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
