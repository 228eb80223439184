import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from synthetic import make_dataset
from dataset_tools import Catalogue, assign_splits
from training import jobs
from training.data import DataError, take_snapshot
from training.evaluate import apply_condition, blur, compute_metrics, downscale, evaluate, format_report, wilson_interval
from training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--recipe", "paper", "--backbone", "tiny", "--no-pretrained", "--input-size", "96", "--part-size", "48", "--proposal-num", "4",
             "--cat-num", "2", "--batch-size", "8", "--lr", "0.05", "--workers", "0", "--precision", "fp32"]


def load_benchmark(name: str):
    """A script of benchmarks/ as a module, for its small functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(db, out, **kw):
    base = dict(db=str(db), out=str(out), backbone="tiny", pretrained=False, input_size=96, part_size=48, proposal_num=4,
                cat_num=2, batch_size=8, lr=0.05, workers=0, precision="fp32", epochs=3)
    return TrainConfig(**{**base, **kw})


def make_catalogue(root, n_per_class=20, seed=0, tags=True):
    cat = Catalogue(root)
    images, labels, classes = make_dataset(n_per_class, size=96, seed=seed)
    for im, label in zip(images, labels):
        cat.add_image(im, product=classes[label], create_product=True, source_kind="webcam",
                      tags=(["side"] if label == 0 else ["front"]) if tags else ())
    assign_splits(cat, val=0.2, test=0.2)
    return cat


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return make_catalogue(tmp_path_factory.mktemp("cat") / "c").root


def test_short_run_learns_a_separable_task(catalogue, tmp_path, opencv_pool_of_two):
    summary = train(tiny_config(catalogue, tmp_path / "run", epochs=8), log=lambda *a: None)
    assert opencv_pool_of_two.getNumThreads() == 1  # set before its DataLoader forked workers (ntsnet/runtime.py)
    assert summary["state"] == "finished" and summary["epoch"] == 8
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == list(range(1, 9))
    assert {"L_I", "L_S", "L_C", "train_acc", "val_acc", "images_per_s", "lr"} <= set(lines[0])
    assert lines[-1]["val_acc"] >= 0.9 and lines[-1]["train_acc"] > lines[0]["train_acc"]
    assert (tmp_path / "run" / "best.safetensors").exists() and (tmp_path / "run" / "last.safetensors").exists()
    # a finished run is not retrained
    again = train(tiny_config(catalogue, tmp_path / "run", epochs=8), log=lambda *a: None)
    assert again["state"] == "finished" and len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 8


def test_runs_are_deterministic_given_a_seed_with_any_number_of_workers(catalogue, tmp_path):
    """The same losses, epoch by epoch, with no workers and with two kept across epochs (training/feeding.py). The run
    with workers is a CLI process of its own (tests/test_feeding.py says why)."""
    a = train(tiny_config(catalogue, tmp_path / "a", epochs=2), log=lambda *a: None)
    with_workers = _run_train_cli(catalogue, tmp_path / "b", 2, extra=["--workers", "2"])
    out, _ = with_workers.communicate(timeout=300)
    assert with_workers.returncode == 0, out[-2000:]
    rows = [[{k: r[k] for k in ("total", "L_I", "L_S", "L_C", "train_acc", "val_acc")}
             for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())] for run in ("a", "b")]
    assert rows[0] == rows[1] and len(rows[0]) == 2


def _run_train_cli(db, out, epochs, extra=(), **popen):
    cmd = [sys.executable, "-m", "training", "train", "--db", str(db), "--out", str(out), "--epochs", str(epochs), *TINY_ARGS, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_kill_9_then_same_command_resumes_to_the_same_result(catalogue, tmp_path):
    run = tmp_path / "killed"
    proc = _run_train_cli(catalogue, run, epochs=3)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 1 <= done < 3, "the run should have been killed mid-way"
    proc = _run_train_cli(catalogue, run, epochs=3)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "resuming after epoch" in out
    assert [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()] == [1, 2, 3]
    # identical to a run that was never interrupted
    ref = _run_train_cli(catalogue, tmp_path / "ref", epochs=3)
    ref.communicate(timeout=300)
    from ntsnet import load_checkpoint

    a = load_checkpoint(run / "last.safetensors").state_dict
    b = load_checkpoint(tmp_path / "ref" / "last.safetensors").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cancel_through_the_job_runner(catalogue, tmp_path):
    run = tmp_path / "job"
    st = jobs.start(catalogue, out=run, recipe="paper", epochs=500, backbone="tiny", pretrained=False, input_size=96, part_size=48,
                    proposal_num=4, cat_num=2, workers=0, lr=0.05)
    assert st["alive"]
    with pytest.raises(jobs.JobError, match="already running"):
        jobs.start(catalogue, out=tmp_path / "second", recipe="paper", epochs=1, backbone="tiny", pretrained=False)
    deadline = time.time() + 120
    while time.time() < deadline and jobs.status(run)["progress"].get("state") != "running":
        time.sleep(0.1)
    live = jobs.status(run)
    assert live["state"] == "running" and live["progress"]["epochs"] == 500 and "loss" in live["progress"]
    st = jobs.cancel(run, timeout=60)
    assert st["state"] == "cancelled" and not st["alive"]
    assert jobs.active_job(catalogue) is None
    # a new job can start once the old one is gone, and the status survives a fresh reader (a restarted UI)
    jobs._children.clear()
    assert jobs.status(run)["state"] == "cancelled"


def test_evaluation_numbers_on_a_hand_made_case():
    names = ["a", "b", "c"]
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 0, 1]
    top5 = [[0, 1, 2], [0, 2, 1], [1, 2, 0], [1, 0, 2], [0, 2, 1], [1, 0, 2]]
    m = compute_metrics(y_true, y_pred, top5, names)
    assert m["n"] == 6 and m["accuracy"] == 3 / 6 and m["top5"] == 1.0
    assert m["per_class"]["a"] == {"n": 3, "correct": 2, "accuracy": 2 / 3}
    assert m["per_class"]["b"]["accuracy"] == 0.5 and m["per_class"]["c"]["accuracy"] == 0.0
    assert m["confusion"] == [[2, 1, 0], [1, 1, 0], [0, 1, 0]]
    assert {(p["true"], p["predicted"], p["count"]) for p in m["most_confused"]} == {("a", "b", 1), ("b", "a", 1), ("c", "b", 1)}
    m2 = compute_metrics([0, 1], [1, 0], [[1], [0]], ["a", "b"])
    assert m2["top5"] == 0.0  # the true class is not among a 1-long top list


def test_accuracy_comes_with_the_interval_its_photos_allow():
    # Wilson's 95% interval, checked against published values (Newcombe 1998: 5/10 -> 0.2366-0.7634, 0/10 -> 0-0.2775)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    low, high = wilson_interval(0, 0)
    assert np.isnan(low) and np.isnan(high)
    # more photos, a narrower interval around the same accuracy
    small, large = wilson_interval(25, 30), wilson_interval(250, 300)
    assert small[0] < large[0] < 25 / 30 < large[1] < small[1]
    m = compute_metrics([0, 0, 1, 1], [0, 1, 1, 1], [[0], [1], [1], [1]], ["a", "b"])
    assert m["accuracy_interval"] == wilson_interval(3, 4)
    report = {"n": 4, "split": "val", "accuracy": 0.75, "top5": 0.75, "accuracy_interval": m["accuracy_interval"],
              "conditions": {}, "most_confused": [], "per_class": m["per_class"]}
    assert f"top-1 75.0% (95% interval {m['accuracy_interval'][0]:.1%}-{m['accuracy_interval'][1]:.1%})" in format_report(report)
    assert "interval" not in format_report({k: v for k, v in report.items() if k != "accuracy_interval"})  # an older report


def test_store_conditions():
    rgb = np.full((400, 300, 3), 200, np.uint8)
    assert max(apply_condition(rgb, "low-res").shape[:2]) == 80
    assert apply_condition(rgb, "dark").mean() == pytest.approx(50, abs=1)
    checker = np.indices((100, 100)).sum(0) % 2 * 255
    img = np.repeat(checker[:, :, None], 3, 2).astype(np.uint8)
    assert apply_condition(img, "blurry").std() < img.std() / 3
    # the blur curve (benchmarks/blur_curve.py): no blur at 0, more blur as the share grows, the condition is one point
    assert blur(img, 0) is img
    stds = [blur(img, s / 100).std() for s in (0.25, 0.5, 1.0, 2.0)]
    assert stds == sorted(stds, reverse=True) and np.array_equal(blur(img, 0.015), apply_condition(img, "blurry"))


def test_blur_kernels_have_the_spread_asked_for_and_the_camera_blur_keeps_the_photo():
    from PIL import Image

    from training.data import BLUR_KINDS, blur_kernel, camera_blur

    for kind in BLUR_KINDS:
        k = blur_kernel(kind, 4.0, angle=0.0)
        assert k.sum() == pytest.approx(1.0, abs=1e-5) and (k >= 0).all()
        ys, xs = np.indices(k.shape) - k.shape[0] // 2
        spread_x = np.sqrt((k * xs ** 2).sum())
        assert spread_x == pytest.approx(4.0, rel=0.2), kind  # the Gaussian's sigma, the disk's and the streak's (along x)
    streak = blur_kernel("motion", 4.0, angle=0.0)
    assert streak[streak.shape[0] // 2].sum() == pytest.approx(1.0, abs=1e-5)  # a horizontal streak stays on its row
    with pytest.raises(ValueError, match="unknown blur kind"):
        blur_kernel("swirl", 2.0)
    checker = (np.indices((96, 128)).sum(0) // 4 % 2 * 255).astype(np.uint8)
    photo = Image.fromarray(np.repeat(checker[:, :, None], 3, 2))
    views = [camera_blur(photo, np.random.default_rng(seed)) for seed in range(12)]
    assert all(v.size == photo.size and v.mode == "RGB" for v in views)
    assert all(np.asarray(v, np.float32).std() < np.asarray(photo, np.float32).std() for v in views)
    again = camera_blur(photo, np.random.default_rng(3))
    assert np.array_equal(np.asarray(again), np.asarray(views[3]))


def test_blur_curve_shapes_of_blur():
    curve = load_benchmark("blur_curve")
    checker = (np.indices((100, 80)).sum(0) // 3 % 2 * 255).astype(np.uint8)
    img = np.repeat(checker[:, :, None], 3, 2)
    assert np.array_equal(curve.blurred(img, 0.015), apply_condition(img, "blurry"))  # the evaluation's condition
    assert curve.blurred(img, 0, "defocus") is img
    for kind in ("defocus", "motion"):
        out = curve.blurred(img, 0.015, kind)
        assert out.shape == img.shape and out.std() < img.std() / 2
        assert np.array_equal(out, curve.blurred(img, 0.015, kind))  # the same photo, the same blur
    noisy = curve.blurred(img, 0.015, "defocus", camera=True)
    assert not np.array_equal(noisy, curve.blurred(img, 0.015, "defocus"))
    assert np.array_equal(noisy, curve.blurred(img, 0.015, "defocus", camera=True))


def test_blur_read_as_an_image_size():
    curve = load_benchmark("blur_curve")
    rgb = np.zeros((300, 150, 3), np.uint8)
    assert downscale(rgb, 40).shape[:2] == (40, 20) and downscale(rgb, 400) is rgb
    assert np.array_equal(downscale(rgb, 80), apply_condition(rgb, "low-res"))
    sizes = [{"side_px": 56, "accuracy": 0.78}, {"side_px": 24, "accuracy": 0.60}, {"side_px": 40, "accuracy": 0.70}]
    assert curve.as_hard_as(0.74, sizes) == pytest.approx(48)  # between 40 px (70%) and 56 px (78%), unsorted input
    assert curve.as_hard_as(0.60, sizes) == 24 and curve.as_hard_as(0.9, sizes) is None


def test_evaluate_end_to_end(catalogue, tmp_path):
    train(tiny_config(catalogue, tmp_path / "run", epochs=3), log=lambda *a: None)
    report = evaluate(tmp_path / "run" / "best.safetensors", catalogue, split="test", out_dir=tmp_path / "rep", progress=False)
    assert report["n"] == 12 and set(report["conditions"]) == {"clean", "dark", "blurry", "low-res"}
    assert report["tags"]["side"]["n"] == 4 and report["tags"]["front"]["n"] == 8
    assert (tmp_path / "rep" / "confusion.png").exists() and (tmp_path / "rep" / "confusion.csv").read_text().count("\n") == 4
    r = subprocess.run([sys.executable, "-m", "training", "evaluate", "--checkpoint", str(tmp_path / "run" / "best.safetensors"),
                        "--db", str(catalogue), "--split", "test", "--json", "--report-dir", str(tmp_path / "rep2")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    data = json.loads(r.stdout)
    assert {"n", "accuracy", "top5", "per_class", "conditions"} <= set(data)
    assert data["accuracy"] == report["accuracy"]


def test_bad_catalogues_give_clear_messages(tmp_path):
    empty = Catalogue(tmp_path / "empty")
    with pytest.raises(DataError, match="no labelled photos"):
        take_snapshot(empty.root)
    one = make_catalogue(tmp_path / "one", n_per_class=3)
    for name in ("blue-can", "green-pack"):
        one.delete_product(name, confirm=True)
    with pytest.raises(DataError, match="at least two products"):
        take_snapshot(one.root)
    r = subprocess.run([sys.executable, "-m", "training", "train", "--db", str(one.root), "--out", str(tmp_path / "r"), *TINY_ARGS],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    # a product whose only photos are held out is left out of training, the others train
    cat = make_catalogue(tmp_path / "three", n_per_class=6)
    ids = [i["id"] for i in cat.images(product="red-box")]
    cat.set_splits({i: "val" for i in ids})
    snap = take_snapshot(cat.root)
    assert "red-box" not in snap.class_names and len(snap.class_names) == 2


def test_corrupt_photo_at_training_time_is_skipped_and_counted(tmp_path):
    cat = make_catalogue(tmp_path / "c", n_per_class=8)
    victim = cat.images(split="train")[0]
    cat.image_path(victim).write_bytes(b"corrupted after import")
    summary = train(tiny_config(cat.root, tmp_path / "run", epochs=1, batch_size=4), log=lambda *a: None)
    assert summary["state"] == "finished" and summary["skipped_images"] == 1


@pytest.mark.slow
def test_ddp_with_two_gloo_processes(catalogue, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "training", "train",
           "--db", str(catalogue), "--out", str(tmp_path / "ddp"), "--epochs", "1", *TINY_ARGS, "--device", "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "2 processes" in r.stdout + r.stderr
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1


def test_warm_start_from_a_baseline(catalogue, tmp_path):
    from ntsnet import load_checkpoint

    train(tiny_config(catalogue, tmp_path / "base", model="baseline", epochs=2), log=lambda *a: None)
    base = load_checkpoint(tmp_path / "base" / "best.safetensors").state_dict
    messages = []
    train(tiny_config(catalogue, tmp_path / "nts", epochs=1, lr=0.0, init_from=str(tmp_path / "base" / "best.safetensors")),
          log=messages.append)
    assert any("warm start" in m for m in messages)
    nts = load_checkpoint(tmp_path / "nts" / "last.safetensors").state_dict
    # lr 0 keeps the copied weights (BatchNorm running stats still move, so compare conv weights)
    convs = [k for k in base if k.startswith("backbone.") and k.endswith("weight") and base[k].dim() == 4]
    assert convs and all(torch.equal(base[k], nts[k]) for k in convs)
    assert torch.equal(base["raw_head.weight"], nts["raw_head.weight"])  # same products: the head comes too


def test_ablate_prints_the_papers_tables(catalogue, tmp_path):
    cmd = [sys.executable, "-m", "training", "ablate", "--db", str(catalogue), "--out", str(tmp_path / "abl"), "--minutes", "0.12",
           "--epochs", "2", *TINY_ARGS]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "Table 1" in out and "Table 2" in out
    for row in ("tiny (baseline)", "NTS-Net (K=0)", "NTS-Net (K=2)", "NTS-Net (K=4)"):
        line = next(l for l in out.splitlines() if row in l)
        assert re.search(r"\d+\.\d%\s*\|\s*\d+\.\d%", line), line  # paper figure next to a measured one
    assert sorted(p.name for p in (tmp_path / "abl").iterdir()) == ["baseline", "ntsnet-k0", "ntsnet-k2", "ntsnet-k4"]


def test_status_reads_only_the_end_of_a_long_log(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("x" * 5_000_000 + "\nlast line\n")
    tail = jobs.status(run)["log_tail"]
    assert tail.endswith("last line\n") and len(tail) <= 3000


def test_store_augment_without_degrading_keeps_photos_lit_sharp_and_large():
    """Stage 1's views (frozen features): framing and light only; stages 2-3 also get darkness, blur and tiny images."""
    from PIL import Image

    from training.data import store_augment

    yy, xx = np.mgrid[0:400, 0:400]
    photo = Image.fromarray(np.stack([((xx // 8 + yy // 8) % 2 * 200 + 30).astype(np.uint8)] * 3, axis=-1))
    base = np.asarray(photo, dtype=np.float32).mean()

    def views(degrade):
        return [store_augment(photo, np.random.default_rng(seed), degrade=degrade) for seed in range(60)]

    def edge(v):  # the steepest step between neighbours over the view's range: 1 for the checkerboard's hard edges
        a = np.asarray(v.convert("L"), dtype=np.float32)
        return np.abs(np.diff(a, axis=1)).max() / max(a.max() - a.min(), 1.0)

    mild, full = views(False), views(True)
    assert min(edge(v) for v in mild) > 0.9  # never blurred
    assert min(edge(v) for v in full) < 0.6
    assert min(min(v.size) for v in mild) > 150  # never a tiny image
    assert min(np.asarray(v, dtype=np.float32).mean() for v in mild) > 0.3 * base  # never a dark shelf
    assert min(min(v.size) for v in full) <= 110  # the full augmentation does both
    assert min(np.asarray(v, dtype=np.float32).mean() for v in full) < 0.3 * base


def test_store_augment_at_the_training_size_gives_the_same_kinds_of_views():
    """With ``size`` the framed photo is resized first (less work); views are then size x size, or a tiny image
    of 40-110 px as before, and blur, darkness and tiny images still occur."""
    from PIL import Image

    from training.data import PhotoDataset, store_augment

    yy, xx = np.mgrid[0:300, 0:400]
    photo = Image.fromarray(np.stack([((xx // 8 + yy // 8) % 2 * 200 + 30).astype(np.uint8)] * 3, axis=-1))
    views = [store_augment(photo, np.random.default_rng(seed), size=64) for seed in range(80)]
    big = [v for v in views if v.size == (64, 64)]
    tiny = [v for v in views if v.size != (64, 64)]
    assert len(big) > 40 and tiny and all(40 <= max(v.size) < 64 for v in tiny)
    lo = [np.asarray(v, dtype=np.float32).mean() for v in big]
    assert min(lo) < 0.5 * np.median(lo)  # dark shelves
    sharp = [np.abs(np.diff(np.asarray(v.convert("L"), dtype=np.float32), axis=1)).max() for v in big]
    assert min(sharp) < 0.5 * max(sharp)  # blurred ones


@pytest.mark.parametrize("flags, chosen", [("avx512f avx512_bf16", "fp32"), ("avx512f avx512_bf16 amx_bf16 amx_tile", "bf16"), ("avx2", "fp32")])
def test_training_takes_bf16_on_a_cpu_only_with_amx(monkeypatch, flags, chosen):
    import training.train as train_module
    from ntsnet.predictor import cpu_supports_fast_bf16

    # AVX512-BF16 without AMX (a Zen 4): inference is faster in bf16 there, training slower, so training stays fp32
    monkeypatch.setattr(train_module, "cpu_supports_fast_bf16", lambda training=False: cpu_supports_fast_bf16(f"flags : fpu {flags}", training))
    assert train_module.choose_precision(torch.device("cpu"), "auto") == chosen
    assert train_module.choose_precision(torch.device("cpu"), "bf16") == "bf16"  # asked for: given
