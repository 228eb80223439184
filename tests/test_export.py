"""The export (ntsnet/export.py): graphs, export.json and a predict.py that needs no PyTorch, answering as the
Predictor does (label, confidence, the K boxes)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ntsnet import Predictor
from ntsnet.export import export_model
from synthetic import draw_product

NO_TORCH = ("import sys, runpy\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'torchvision', 'ntsnet'):\n"
            "            raise ImportError('predict.py must not need ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def load_predict(folder: Path):
    spec = importlib.util.spec_from_file_location(f"exported_{folder.name}", folder / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def photos(n=24):
    """Synthetic products at several sizes and shapes, with camera noise; one dark enough to be brightened."""
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        name = ("red-box", "blue-can", "green-pack")[i % 3]
        img = draw_product(rng, name, size=int(rng.integers(80, 300)), height=int(rng.integers(80, 300))).astype(np.float32)
        img = img + rng.normal(0, 6, img.shape)
        if i == 5:
            img *= 0.3
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_the_export_answers_as_the_predictor_without_pytorch(tiny_checkpoint, tmp_path, fmt):
    pytest.importorskip("onnxruntime" if fmt == "onnx" else "openvino")
    out = export_model(tiny_checkpoint, tmp_path / "export", fmt)
    spec = json.loads((out / "export.json").read_text())
    assert spec["format"] == fmt and spec["class_names"] and spec["cat_num"] == 2 and (out / "predict.py").exists()
    exported = load_predict(out).Model(out)
    reference = Predictor.from_checkpoint(tiny_checkpoint, backend="torch", precision="fp32")
    same_label = 0
    for img in photos():
        want, got = reference.predict(img), exported.predict(img)
        same_label += got["label"] == want.label
        assert abs(got["confidence"] - want.confidence) < 2e-3
        assert len(got["boxes"]) == len(want.boxes) == 2
        for b, w in zip(got["boxes"], want.boxes):
            assert max(abs(b["x0"] - w.x0), abs(b["y0"] - w.y0), abs(b["x1"] - w.x1), abs(b["y1"] - w.y1)) <= 1.0
    assert same_label == 24


def test_predict_py_runs_a_folder_without_pytorch_and_reports_a_bad_file(tiny_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "export"
    made = subprocess.run([sys.executable, "-m", "ntsnet", "export", "--checkpoint", str(tiny_checkpoint), "--format", "onnx",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert made.returncode == 0 and "predict.py" in made.stdout, made.stderr
    again = subprocess.run([sys.executable, "-m", "ntsnet", "export", "--checkpoint", str(tiny_checkpoint), "--out", str(out)],
                           capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert again.returncode == 1 and "not empty" in again.stderr
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(photos(3)):
        Image.fromarray(img).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_text("not a photo")
    r = subprocess.run([sys.executable, "-c", NO_TORCH, str(out / "predict.py"), str(folder), "--json"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and "broken.jpg" in r.stderr, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [Path(d["image"]).name for d in lines] == ["0.png", "1.png", "2.png"]
    assert all(set(d) >= {"label", "confidence", "unknown", "top5", "boxes"} for d in lines)


def test_a_failed_or_refused_export_leaves_nothing_behind(tiny_checkpoint, tmp_path, monkeypatch):
    from ntsnet import export

    with pytest.raises(ValueError, match="format must be one of"):
        export_model(tiny_checkpoint, tmp_path / "x", "tflite")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_model(tiny_checkpoint, busy, "onnx")
    assert (busy / "keep.txt").read_text() == "mine"

    def broken(*args, **kwargs):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(export, "_to_onnx", broken)
    with pytest.raises(RuntimeError, match="converter crashed"):
        export_model(tiny_checkpoint, tmp_path / "new", "onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
