"""How training feeds its device (training/feeding.py) and how photos become model inputs on a device: every GPU
path checked here on the CPU against the path it replaces."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ntsnet.backbones import IMAGENET_MEAN, IMAGENET_STD
from ntsnet.images import normalise_batch, resize_on_device, to_input_tensor
from ntsnet.predictor import Predictor
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


def test_the_batch_grows_with_the_free_memory_and_the_learning_rate_with_the_batch():
    assert gpu_batch("efficientnet_lite0", 448, 140) == 64          # an idle H200: the cap
    assert gpu_batch("efficientnet_lite0", 448, 15.5) == 16         # an idle 16 GB card
    assert gpu_batch("efficientnet_lite0", 224, 15.5) == 64         # a quarter of the pixels
    assert gpu_batch("resnet50", 448, 24) == 8                      # at least 8 where 8 fit
    assert gpu_batch("resnet50", 448, 4) == 2 and gpu_batch("resnet50", 448, 0.1) == 2  # fewer on a full card, never 1
    assert scaled_lr(0.001, 64, 8) == pytest.approx(0.008)


def fake_gpu(monkeypatch, free_gib, total_gib, cached_gib=0.0, cores=16):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), int(total_gib * 2**30)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(cached_gib * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=int(total_gib * 2**30)))
    monkeypatch.setattr(feeding, "usable_cores", lambda: cores)


def test_resolving_the_feeding_leaves_a_cpu_as_it_was_and_scales_a_gpu(monkeypatch):
    cpu = SimpleNamespace(batch_size=None, lr=0.005, workers=None)
    assert resolve_feeding(cpu, torch.device("cpu"), "efficientnet_lite0", 224, cpu_batch=16) == ""
    assert (cpu.batch_size, cpu.lr, cpu.workers) == (16, 0.005, 2)
    fake_gpu(monkeypatch, free_gib=140, total_gib=141)
    gpu = SimpleNamespace(batch_size=None, lr=0.005, workers=None)
    line = resolve_feeding(gpu, torch.device("cuda"), "efficientnet_lite0", 448, cpu_batch=16)
    assert (gpu.batch_size, gpu.workers) == (64, 14) and gpu.lr == pytest.approx(0.02) and "64/16" in line
    given = SimpleNamespace(batch_size=24, lr=0.005, workers=3)  # what a user asked for is kept, lr too
    resolve_feeding(given, torch.device("cuda"), "efficientnet_lite0", 448, cpu_batch=16)
    assert (given.batch_size, given.lr, given.workers) == (24, 0.005, 3)


def test_a_train_click_after_an_evaluation_on_a_16_gb_card_fits_in_what_is_free(monkeypatch):
    """The batch was sized from the card's total memory while the app's models and the evaluation's cache held part
    of it: 16 photos (6 GiB) on a card with 5 GiB free. Now the free memory decides, and the app hands its cache back
    after an evaluation (webapp/live.py)."""
    fake_gpu(monkeypatch, free_gib=5.0, total_gib=16.0)
    cfg = SimpleNamespace(batch_size=None, lr=0.005, workers=None)
    resolve_feeding(cfg, torch.device("cuda"), "efficientnet_lite0", 448, cpu_batch=16)
    assert cfg.batch_size == 8 and cfg.batch_size * feeding.GIB_PER_PHOTO_448["efficientnet_lite0"] <= 5.0
    fake_gpu(monkeypatch, free_gib=5.0, total_gib=16.0, cached_gib=6.0)  # this process's own cache is usable too
    assert feeding.batch_for(torch.device("cuda"), "efficientnet_lite0", 448, 16) == 16


def test_several_gpus_scale_the_rate_with_the_global_batch_and_share_the_cores(monkeypatch):
    """DDP averages gradients over every process's photos: the linear scaling rule wants the global batch. Each of
    the processes on a machine took every core but two for its workers."""
    fake_gpu(monkeypatch, free_gib=140, total_gib=141, cores=32)
    cfg = SimpleNamespace(batch_size=None, lr=0.005, workers=None)
    line = resolve_feeding(cfg, torch.device("cuda"), "efficientnet_lite0", 448, cpu_batch=16, world=8, local_world=4)
    assert cfg.batch_size == 64 and cfg.lr == pytest.approx(0.005 * 64 * 8 / 16) and "64 x 8 processes" in line
    assert cfg.workers == 32 // 4 - 2
    cpu = SimpleNamespace(batch_size=None, lr=0.005, workers=None)  # a CPU keeps the recipe's batch and rate
    resolve_feeding(cpu, torch.device("cpu"), "efficientnet_lite0", 224, cpu_batch=16, world=2, local_world=2)
    assert (cpu.batch_size, cpu.lr, cpu.workers) == (16, 0.005, 2)


def test_stage_1_views_travel_as_uint8_and_embed_as_the_float_ones_did():
    """Stage 1 sent float32 batches of 128 through the workers' shared memory (about 300 MB each at 448 px)."""
    from ntsnet import create_backbone
    from ntsnet.images import to_input_tensor
    from training.features import embed_batches
    from training.stages.linear import AugmentedViews

    arrays = [np.random.default_rng(i).integers(0, 256, (70, 90, 3), dtype=np.uint8) for i in range(6)]
    arrays[0] //= 8  # a dark photo: the exposure gain is applied where the batch is normalised
    views = AugmentedViews(arrays, 64, seed=0, view=1)
    batch = torch.stack([views[i] for i in range(len(arrays))])
    assert batch.dtype == torch.uint8 and batch.shape == (6, 3, 64, 64)
    torch.manual_seed(0)
    backbone = create_backbone("tiny", pretrained=False).eval()
    as_float = to_input_tensor([v.permute(1, 2, 0).numpy() for v in batch], 64, backbone.mean, backbone.std)
    assert torch.allclose(embed_batches(backbone, [batch[:4], batch[4:]]), embed_batches(backbone, [as_float]), atol=1e-5)


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
