"""How training feeds its device (training/feeding.py) and how photos become model inputs on a device: every GPU
path checked here on the CPU against the path it replaces."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ntsnet.backbones import IMAGENET_MEAN, IMAGENET_STD
from ntsnet.images import normalise_batch, resize_on_device, to_input_tensor
from ntsnet.predictor import GPU_BF16_FROM_BATCH, Predictor
from training import feeding
from training.data import PhotoDataset, collate
from training.feeding import EpochSampler, StepTally, as_model_input, gpu_batch, resolve_feeding, run_loader, scaled_lr


def test_resizing_on_the_device_agrees_with_the_cpu_to_one_grey_level(rng):
    frames = [rng.integers(0, 255, (120, 160, 3), dtype=np.uint8) for _ in range(3)] + [rng.integers(0, 255, (70, 50, 3), dtype=np.uint8)]
    frames.append(frames[0] // 6)  # a dark photo: the exposure gain applies on both paths
    cpu = to_input_tensor(frames, 96, IMAGENET_MEAN, IMAGENET_STD)
    pixels = resize_on_device(frames, 96, torch.device("cpu"))  # the GPU's steps, run here
    assert pixels.dtype == torch.uint8 and pixels.shape == (5, 3, 96, 96)
    reference = torch.stack([torch.nn.functional.interpolate(torch.from_numpy(f).permute(2, 0, 1)[None], size=(96, 96), mode="bilinear",
                                                             antialias=True)[0] for f in frames])
    assert int((pixels.int() - reference.int()).abs().max()) <= 1  # photos of two shapes, back in their order
    grey = (normalise_batch(pixels, IMAGENET_MEAN, IMAGENET_STD) - cpu) * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    assert float(grey[:4].abs().max()) <= 1.0 + 1e-3 and float(grey[4].abs().max()) <= 4.0 + 1e-3  # times the dark photo's gain


def test_uint8_batches_normalised_on_the_device_equal_the_workers_float_ones(tmp_path, rng):
    """A GPU's loader sends uint8 pixels and normalises them there: the same values as the CPU's float batches."""
    from PIL import Image

    items = []
    for i in range(6):
        arr = rng.integers(0, 255, (60 + 10 * i, 80, 3), dtype=np.uint8) // (5 if i == 2 else 1)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        items.append({"path": str(tmp_path / f"{i}.png"), "label": i % 2})
    floats = PhotoDataset(items, 64, train=True, seed=3)
    pixels = PhotoDataset(items, 64, train=True, seed=3, as_uint8=True)
    x_float, _, _ = collate([floats[i] for i in range(6)])
    x_uint8, _, _ = collate([pixels[i] for i in range(6)])
    model = SimpleNamespace(mean=IMAGENET_MEAN, std=IMAGENET_STD, parameters=lambda: iter([torch.zeros(1)]))
    assert x_uint8.dtype == torch.uint8
    torch.testing.assert_close(as_model_input(model, x_uint8), x_float, rtol=0, atol=1e-6)


def compare_kept_and_fresh_workers(folder: str):
    """Asserts that the run's loader, its workers kept across epochs, loads what a new DataLoader per epoch
    loaded: the same photos, order and augmentation, epoch after epoch."""
    from pathlib import Path

    from PIL import Image

    rng, items = np.random.default_rng(0), []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(Path(folder) / f"{i}.png")
        items.append({"path": str(Path(folder) / f"{i}.png"), "label": i % 3})
    ds = PhotoDataset(items, 32, train=True, seed=5, augment="store")
    sampler = EpochSampler(len(ds), seed=5)
    loader = run_loader(ds, sampler, 4, 2, torch.device("cpu"), collate)
    for epoch in (1, 2):
        sampler.epoch = epoch
        kept = [(x, y) for x, y, _ in loader]
        old = PhotoDataset(items, 32, train=True, seed=5, augment="store")
        old.epoch = epoch
        order = torch.randperm(12, generator=torch.Generator().manual_seed(5 * 7919 + epoch)).tolist()
        fresh = [(x, y) for x, y, _ in torch.utils.data.DataLoader(old, sampler=order, batch_size=4, collate_fn=collate, drop_last=True)]
        assert len(kept) == len(fresh) == 3
        for (a, ya), (b, yb) in zip(kept, fresh):
            assert torch.equal(a, b) and torch.equal(ya, yb)


def test_workers_kept_across_epochs_load_the_batches_fresh_loaders_did(tmp_path):
    """In a fresh process: DataLoader workers forked from the test process after test_compiled.py's OpenVINO exports
    crashed it at their shutdown now and then (SIGSEGV, kept or fresh workers alike; a job's process, which also runs
    OpenVINO before its loaders, did not in 32 loaders)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    code = f"import sys; sys.path[:0] = [{str(tests)!r}, {str(tests.parent)!r}]; import test_feeding; " \
           f"test_feeding.compare_kept_and_fresh_workers({str(tmp_path)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_batch_grows_with_the_gpu_and_the_learning_rate_with_the_batch():
    assert gpu_batch("efficientnet_lite0", 448, 141) == 64          # an H200: the cap
    assert gpu_batch("efficientnet_lite0", 448, 16) == 16           # a 16 GB card
    assert gpu_batch("efficientnet_lite0", 224, 16) == 64           # a quarter of the pixels
    assert gpu_batch("resnet50", 448, 24) == 8 and gpu_batch("resnet50", 448, 4) == 8  # never below 8
    assert scaled_lr(0.001, 64, 8) == pytest.approx(0.008)


def test_resolving_the_feeding_leaves_a_cpu_as_it_was_and_scales_a_gpu(monkeypatch):
    cpu = SimpleNamespace(batch_size=None, lr=0.005, workers=None)
    assert resolve_feeding(cpu, torch.device("cpu"), "efficientnet_lite0", 224, cpu_batch=16) == ""
    assert (cpu.batch_size, cpu.lr, cpu.workers) == (16, 0.005, 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=141 * 2**30))
    monkeypatch.setattr(feeding, "usable_cores", lambda: 16)
    gpu = SimpleNamespace(batch_size=None, lr=0.005, workers=None)
    line = resolve_feeding(gpu, torch.device("cuda"), "efficientnet_lite0", 448, cpu_batch=16)
    assert (gpu.batch_size, gpu.workers) == (64, 14) and gpu.lr == pytest.approx(0.02) and "64/16" in line
    given = SimpleNamespace(batch_size=24, lr=0.005, workers=3)  # what a user asked for is kept, lr too
    resolve_feeding(given, torch.device("cuda"), "efficientnet_lite0", 448, cpu_batch=16)
    assert (given.batch_size, given.lr, given.workers) == (24, 0.005, 3)


def test_the_step_tally_adds_up_as_python_floats_did(rng):
    tally, sums, right = StepTally(torch.device("cpu")), dict.fromkeys(StepTally.KEYS, 0.0), 0
    for _ in range(5):
        losses = {k: torch.tensor(float(rng.uniform(0, 3)), dtype=torch.float32) for k in StepTally.KEYS}
        logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
        tally.add(losses, logits, y)
        for k in sums:
            sums[k] += float(losses[k]) * 6
        right += int((logits.argmax(1) == y).sum())
    assert tally.read() == (sums, right) and tally.seen == 30


def test_a_gpu_predicts_one_frame_in_fp32_and_batches_in_bf16():
    gpu = SimpleNamespace(auto_precision=True, device=torch.device("cuda"))
    assert not Predictor.bf16_for(gpu, 1) and Predictor.bf16_for(gpu, GPU_BF16_FROM_BATCH)
    assert Predictor.bf16_for(SimpleNamespace(auto_precision=False, device=torch.device("cuda")), 1)  # asked for: always


def test_cudnn_times_its_kernels_on_a_gpu_only():
    from ntsnet.device import tune_for_fixed_shapes

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        tune_for_fixed_shapes(torch.device("cpu"))
        assert not torch.backends.cudnn.benchmark
        tune_for_fixed_shapes(torch.device("cuda"))
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before


def test_predicting_many_photos_takes_four_times_larger_batches_on_a_gpu():
    from ntsnet.device import inference_batch

    assert inference_batch(torch.device("cpu")) == 16 and inference_batch(torch.device("cuda")) == 64
    assert inference_batch(torch.device("cuda"), 32) == 128
    assert Predictor.preferred_batch.fget(SimpleNamespace(device=torch.device("cuda"))) == 64
