import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from synthetic import draw_product

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ntsnet", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_predict_json_and_bad_files(tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(2)
    good = tmp_path / "green.png"
    Image.fromarray(draw_product(rng, "green-pack")).save(good)
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    missing = tmp_path / "missing.jpg"
    good2 = tmp_path / "red.jpg"
    Image.fromarray(draw_product(rng, "red-box")).save(good2)
    r = run_cli("predict", "--checkpoint", tiny_checkpoint, good, not_image, missing, good2, "--json")
    assert r.returncode == 1
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [d["image"] for d in lines] == [str(good), str(good2)]
    assert [d["label"] for d in lines] == ["green-pack", "red-box"]
    for d in lines:
        assert set(d) == {"image", "label", "confidence", "unknown", "nothing", "top5", "boxes", "backend"}
        assert d["backend"] == "openvino"  # auto on a CPU with OpenVINO installed (requirements.txt)
        assert len(d["boxes"]) == 2 and set(d["boxes"][0]) == {"x0", "y0", "x1", "y1", "score"}
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 2 and "notes.txt" in errors[0] and "missing.jpg" in errors[1]
    r = run_cli("predict", "--checkpoint", tiny_checkpoint, good)
    assert r.returncode == 0 and "green-pack" in r.stdout and "top-5" in r.stdout


def test_draw_writes_an_annotated_image(tiny_checkpoint, tmp_path):
    src = tmp_path / "in.png"
    img = draw_product(np.random.default_rng(4), "blue-can", size=200, height=120)
    Image.fromarray(img).save(src)
    out = tmp_path / "out.png"
    r = run_cli("draw", "--checkpoint", tiny_checkpoint, src, "--out", out)
    assert r.returncode == 0, r.stderr
    drawn = np.array(Image.open(out))
    assert drawn.shape == img.shape and (drawn != img).any()
    assert (drawn[:5] == 0).all()  # label banner across the top


def test_bad_checkpoint_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    r = run_cli("predict", "--checkpoint", bad, bad)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_live_mode_headless_on_a_generated_video(tiny_checkpoint, tmp_path):
    video = tmp_path / "shelf.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (160, 120))
    rng = np.random.default_rng(0)
    for i in range(12):
        writer.write(cv2.cvtColor(draw_product(rng, "red-box", size=160, height=120), cv2.COLOR_RGB2BGR))
    writer.release()
    out = tmp_path / "annotated.mp4"
    r = subprocess.run([sys.executable, "-m", "ntsnet", "live", "--checkpoint", str(tiny_checkpoint), "--source", str(video), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "12 frames" in r.stdout and "frames/s" in r.stdout
    cap = cv2.VideoCapture(str(out))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 12
    r = run_cli("live", "--checkpoint", tiny_checkpoint, "--source", tmp_path / "nope.mp4", "--no-window", "--out", out)
    assert r.returncode == 1 and "cannot open" in r.stderr


def test_predict_over_a_folder_in_batches(tiny_checkpoint, tmp_path):
    """A folder stands for its photos (subfolders too, sorted); they are predicted in batches, answered in order, and
    an unreadable one is an error line that does not stop the others."""
    rng = np.random.default_rng(4)
    names = ["green-pack", "red-box", "blue-can", "red-box", "green-pack"]
    (tmp_path / "shelf" / "more").mkdir(parents=True)
    paths = []
    for i, name in enumerate(names):
        path = tmp_path / "shelf" / ("more" if i >= 3 else "") / f"{i}-{name}.png"
        Image.fromarray(draw_product(rng, name)).save(path)
        paths.append(path)
    (tmp_path / "shelf" / "2b-broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "shelf" / "readme.txt").write_text("not a photo, not read")
    r = run_cli("predict", "--checkpoint", tiny_checkpoint, tmp_path / "shelf", "--json", "--backend", "torch")
    assert r.returncode == 1
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [d["image"] for d in lines] == sorted(map(str, paths))
    assert [d["label"] for d in lines] == [p.stem.split("-", 1)[1] for p in sorted(paths)]
    assert "2b-broken.jpg" in r.stderr and "readme" not in r.stderr
