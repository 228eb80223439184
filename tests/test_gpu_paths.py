"""What broke on the first GPU machine, reproduced without one.

A model whose weights live on the ``meta`` device stands in for a CUDA model: every input it receives must have been
moved to its device first, as a CUDA model needs (a CPU batch fed to it raised on the H200). The fold's exactness
check is fed the noise TF32 adds on a GPU.
"""
from __future__ import annotations

import sys
import time
import types

import numpy as np
import pytest
import torch

from ntsnet import NTSConfig, Predictor, create_model
from ntsnet.device import device_of, to_device_of
from ntsnet.model import NTSOutput


class OnAnotherDevice(torch.nn.Module):
    """A model double on the meta device: records the device of every input and answers with CPU tensors of the
    right shape, so the code around it runs on; ``stride`` > 1 makes it a backbone (a feature map)."""

    def __init__(self, num_classes=3, input_size=64, channels=8, backbone=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(1, device="meta"))
        self.config = NTSConfig(model="baseline", backbone="tiny", num_classes=num_classes, input_size=input_size, cat_num=0)
        self.mean, self.std, self.out_channels = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channels
        self.backbone_mode, self.seen = backbone, []

    def forward(self, x, num_parts=None):
        self.seen.append(x.device)
        if x.device != self.weight.device:
            raise RuntimeError(f"Input type ({x.device}) and weight type ({self.weight.device}) should be the same")
        b = x.shape[0]
        if self.backbone_mode:
            return torch.ones(b, self.out_channels, 2, 2)
        logits = torch.arange(b * self.config.num_classes, dtype=torch.float32).view(b, -1)
        empty = torch.zeros(b, 0)
        return NTSOutput(logits, logits, torch.zeros(b, 0, self.config.num_classes), empty, torch.zeros(b, 0, 4), empty.long())


def photos(n=5):
    return [np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8) for i in range(n)]


def test_every_input_reaches_the_models_device_in_one_place():
    model = OnAnotherDevice()
    assert device_of(model).type == "meta" and device_of(torch.nn.ReLU()).type == "cpu"
    x = to_device_of(model, torch.zeros(2, 3, 8, 8))
    assert x.device.type == "meta"
    on_cpu = to_device_of(torch.nn.Conv2d(3, 4, 1), torch.zeros(2, 3, 8, 8))
    assert on_cpu.is_contiguous(memory_format=torch.channels_last)  # NHWC on a CPU, where oneDNN is faster


def test_the_jobs_evaluation_feeds_the_model_on_its_own_device():
    """Stage 2 died at its first evaluation on the H200: answer_predictions fed CPU batches to the CUDA model."""
    from training.answers import answer_predictions, evaluate_model, selection_accuracy

    model = OnAnotherDevice()
    preds = answer_predictions(model, photos())
    assert preds["scrutinizer"][0] == [2, 2, 2, 2, 2]  # the double's logits grow with the class index
    assert selection_accuracy(model, photos(), [2, 2, 0, 2, 1]) == pytest.approx(0.6)
    assert evaluate_model(model, photos(), [2] * 5)[0] == 1.0
    assert model.seen and {d.type for d in model.seen} == {"meta"}


def test_stage_1_embeds_on_the_backbones_device():
    """Stage 1 embedded 2 views of 2,640 photos on the CPU (244 s) while a GPU waited: the backbone stays on the
    training device, and its features come back to the CPU for the head."""
    from training.features import embed_batches, pooled_features

    backbone = OnAnotherDevice(backbone=True)
    feats = pooled_features(backbone, photos(7), size=64, batch=3)
    assert feats.shape == (7, 8) and feats.device.type == "cpu"
    assert len(backbone.seen) == 3 and {d.type for d in backbone.seen} == {"meta"}
    batches = [torch.zeros(4, 3, 64, 64), torch.zeros(2, 3, 64, 64)]
    assert embed_batches(backbone, batches).shape == (6, 8)


def test_the_paper_recipes_evaluation_feeds_the_model_on_its_own_device():
    from training.train import evaluate_accuracy

    model = OnAnotherDevice()
    model.config.cat_num = 0
    loader = [(torch.zeros(3, 3, 64, 64), torch.tensor([2, 2, 1]), 0), (None, None, 1)]
    acc, n = evaluate_accuracy(model, loader, autocast=lambda: torch.autocast("cpu", enabled=False))
    assert (acc, n) == (pytest.approx(2 / 3), 3) and {d.type for d in model.seen} == {"meta"}


def _noisy_tiny_model():
    """A model whose backbone's output moves a little on every call, as TF32 convolutions do on a GPU: no folded copy
    can reproduce it exactly."""
    torch.manual_seed(0)
    model = create_model(NTSConfig(model="baseline", backbone="tiny", num_classes=2, input_size=64, cat_num=0, proposal_num=1),
                         pretrained=False).eval()
    model.backbone.register_forward_hook(lambda module, inputs, out: out + 0.05 * torch.randn_like(out))
    return model


def test_a_fold_that_does_not_reproduce_the_model_falls_back_and_says_so_once(caplog):
    """On the H200 no model loaded: the fold's check failed under TF32 and raised out of Predictor's constructor."""
    from ntsnet import fuse

    fuse._warned.clear()
    with caplog.at_level("WARNING", logger="ntsnet"):
        first = Predictor(_noisy_tiny_model(), ["a", "b"], device="cpu", backend="torch", precision="fp32")
        second = Predictor(_noisy_tiny_model(), ["a", "b"], device="cpu", backend="torch", precision="fp32")
    assert first.net is first.model and second.net is second.model  # the unfolded model answers
    assert first.predict(photos(1)[0]).label in ("a", "b")
    assert sum("folding BatchNorm changed the output" in r.message for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="changed the output"):  # the fold itself still refuses a wrong copy
        fuse.fold_batchnorm(_noisy_tiny_model().backbone, torch.randn(1, 3, 64, 64))


def test_folding_is_a_cpu_trick_that_other_devices_skip():
    from ntsnet.fuse import inference_copy

    model = _noisy_tiny_model()
    model.to("meta")
    assert inference_copy(model) is model  # no probe pass, no copy: the model answers as it is


def test_stage_training_folds_batchnorm_on_a_cpu_only(tmp_path):
    """TrainingFold is a CPU speed trick: a stage on any other device trains the plain modules."""
    import contextlib

    from ntsnet.fuse import TrainingFold
    from training.fit import FitContext, StagePlan, StageTrainer
    from training.progressive import ProgressiveConfig

    cfg = ProgressiveConfig(backbone="tiny", batch_size=16, workers=0, freeze_stride=0)  # as ProgressiveRun resolves it
    items = [{"path": "unused.jpg", "label": 0}, {"path": "unused.jpg", "label": 1}]
    for device in ("cpu", "meta"):
        model = create_model(NTSConfig(model="baseline", backbone="tiny", num_classes=2, input_size=64, cat_num=0,
                                       proposal_num=1), pretrained=False).to(device)
        plan = StagePlan("finetune", items, 64, 1.0, lambda out, y: None)
        trainer = StageTrainer(model, plan, FitContext(cfg, torch.device(device)))
        assert isinstance(trainer.fold, TrainingFold if device == "cpu" else contextlib.nullcontext)


def test_the_training_folds_check_runs_with_tf32_off_and_restores_it():
    from ntsnet.device import exact_fp32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with exact_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.slow
def test_the_paper_recipes_budget_is_wall_clock_with_its_evaluations(tmp_path, monkeypatch):
    """--max-minutes counted only training steps: a slow evaluation (a large validation set, a busy GPU) ran the job
    far past its budget. Now each epoch's evaluation counts, and the next one's is kept in reserve."""
    from synthetic import make_dataset

    import training.train as train_module
    from dataset_tools import Catalogue, assign_splits

    cat = Catalogue(tmp_path / "cat")
    images, labels, names = make_dataset(6, size=64, seed=0)
    for im, label in zip(images, labels):
        if label < 2:
            cat.add_image(im, product=names[label], create_product=True, source_kind="webcam")
    assign_splits(cat, val=0.3, test=0.0)
    real = train_module.evaluate_accuracy

    def slow_evaluation(*a, **k):  # a stand-in for a slow device: the same answer, 1 s later
        time.sleep(1.0)
        return real(*a, **k)

    monkeypatch.setattr(train_module, "evaluate_accuracy", slow_evaluation)
    cfg = train_module.TrainConfig(db=str(cat.root), out=str(tmp_path / "run"), backbone="tiny", pretrained=False, input_size=64,
                                   part_size=32, proposal_num=3, cat_num=2, batch_size=4, workers=0, precision="fp32", epochs=1000,
                                   max_minutes=3.5 / 60)
    t0 = time.perf_counter()
    summary = train_module.train(cfg, log=lambda *a: None)
    assert summary["state"] == "finished"
    wall = time.perf_counter() - t0
    assert 2 <= summary["epoch"] <= 4  # about 1.1 s an epoch, evaluation included, in 3.5 s
    assert summary["wall_minutes"] * 60 <= 3.5 * 1.1 + 0.5 and wall < 15


class CudaForbidden(RuntimeError):
    pass


def forbid_cuda(monkeypatch):
    """What a ZeroGPU Space's main process does: ``spaces`` makes torch report a GPU, and initialising CUDA (a model
    moved there, a tensor pinned) raises outside a spaces.GPU function."""
    def refuse(*a, **k):
        raise CudaForbidden("CUDA must not be initialized in the main process on Spaces with Stateless GPU environment")

    fake = types.ModuleType("spaces")
    fake.GPU = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "_lazy_init", refuse)
    monkeypatch.setattr(torch.cuda, "init", refuse)
    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)


def test_a_zerogpu_space_runs_the_app_on_its_cpu_and_never_touches_cuda(monkeypatch, tmp_path, tiny_checkpoint):
    """A ZeroGPU Space lends its GPU only inside spaces.GPU functions, pickles their arguments (the instant model
    cannot be pickled) and raises when CUDA is touched anywhere else: capture, the instant model, live and single
    recognition, the evaluation and the Train job's device all stay on the CPU there."""
    from synthetic import draw_product, stable_seed

    from ntsnet.device import resolve_device
    from webapp import Studio

    forbid_cuda(monkeypatch)
    with pytest.raises(CudaForbidden):
        torch.zeros(1).pin_memory()  # the double bites
    assert resolve_device("auto").type == "cpu" and resolve_device(torch.device("cpu")).type == "cpu"
    with pytest.raises(ValueError, match="ZeroGPU"):
        resolve_device("cuda")
    studio = Studio(tmp_path / "cat")
    for name in ("red-box", "blue-can"):
        studio.create_product(name)
        for i in range(3):
            studio.save_photo(draw_product(np.random.default_rng(stable_seed(name, i)), name, size=120), name)
    assert studio.instant.embedder.device.type == "cpu"
    assert studio.recognise(draw_product(np.random.default_rng(7), "red-box", size=120), wait=True).model.startswith("instant")
    studio.set_active_model(str(tiny_checkpoint))
    frame = draw_product(np.random.default_rng(8), "red-box", size=120)
    assert studio.recognise(frame, wait=True).label == "red-box" and studio.predictor().device.type == "cpu"
    deadline = time.time() + 60
    while (live := studio.recognise(frame, session="s")) is None or not live.fresh:  # the live worker thread too
        assert time.time() < deadline
        time.sleep(0.05)
    assert studio.evaluate("train")["accuracy"] >= 0


def peak_device_bytes(fn):
    """Peak bytes of the tensors ``fn`` holds at once, counted per storage as each op returns (views share theirs);
    on the ``meta`` device nothing is allocated, so photos of any size and number can be measured."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Peak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.refs, self.peak = {}, {}, 0

        def _release(self, key):
            self.refs[key] -= 1
            if not self.refs[key]:
                del self.refs[key], self.live[key]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key = storage._cdata
                    self.live.setdefault(key, storage.nbytes())
                    self.refs[key] = self.refs.get(key, 0) + 1
                    weakref.finalize(t, self._release, key)
            self.peak = max(self.peak, sum(self.live.values()))
            return out

    with Peak() as mode:
        fn()
    return mode.peak


def test_resizing_on_a_device_is_bounded_by_pixels_not_by_photos():
    """A phone's 12-megapixel photos share one shape: stacked whole as float32, 128 of them (stage 1's batch) took
    about 39 GiB of a GPU. Now photos go in runs of at most DEVICE_RESIZE_PIXELS."""
    from ntsnet.images import DEVICE_RESIZE_PIXELS, resize_on_device

    phone = np.zeros((3000, 4000, 3), np.uint8)  # the same array again: the host holds one photo
    meta = torch.device("meta")
    one = peak_device_bytes(lambda: resize_on_device([phone], 448, meta))
    many = peak_device_bytes(lambda: resize_on_device([phone] * 24, 448, meta))
    assert one <= 18 * 3000 * 4000 * 1.05  # uint8, its NCHW copy and float32, three channels
    assert many <= one + 24 * 3 * 448 * 448  # one more photo's result each, nothing else
    small = np.zeros((480, 640, 3), np.uint8)  # webcam frames still go together, up to the budget
    frames = peak_device_bytes(lambda: resize_on_device([small] * 64, 224, meta))
    assert 18 * 480 * 640 * 20 < frames <= 18 * DEVICE_RESIZE_PIXELS * 1.05


def test_the_resize_in_runs_matches_the_cpus_to_one_grey_level(monkeypatch):
    from ntsnet import images

    photos_ = [np.random.default_rng(i).integers(0, 256, (60, 80, 3), dtype=np.uint8) for i in range(5)]
    monkeypatch.setattr(images, "DEVICE_RESIZE_PIXELS", 2 * 60 * 80)  # runs of two photos
    assert images.pixel_chunks([0, 1, 2, 3, 4], 60 * 80, images.DEVICE_RESIZE_PIXELS) == [[0, 1], [2, 3], [4]]
    on_device = images.resize_on_device(photos_, 32, torch.device("cpu")).int()
    on_cpu = images.resize_batch(photos_, 32).int()
    assert (on_device - on_cpu).abs().max() <= 1


def test_tf32_comes_back_after_overlapping_exact_checks_in_two_threads():
    """Two requests' checks overlapped: A saved TF32 on and turned it off, B saved 'off', A restored 'on', B restored
    'off' for good. Now the last to leave restores what the first found."""
    import threading

    from ntsnet.device import exact_fp32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with exact_fp32():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with exact_fp32():
            b_in.set()
            a_out.wait(5)
            assert not torch.backends.cudnn.allow_tf32  # A left, B still checks: still off

    try:
        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        [t.start() for t in threads]
        [t.join(10) for t in threads]
        assert a_out.is_set() and torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_the_app_never_asks_cudnn_to_time_kernels(monkeypatch, tiny_checkpoint):
    """cuDNN's benchmark mode re-times kernels for every new batch size: the app's batches vary, the job's do not."""
    from ntsnet import predictor as predictor_module

    asked = []
    monkeypatch.setattr(predictor_module, "tune_for_fixed_shapes", asked.append, raising=False)
    Predictor.from_checkpoint(tiny_checkpoint, device="cpu", backend="torch")
    assert asked == []


def test_bf16_only_on_gpus_with_bf16_hardware(monkeypatch):
    """torch.cuda.is_bf16_supported() says yes on a T4 or V100 (emulation), where cuDNN has no bf16 convolutions."""
    from ntsnet.device import gpu_has_bf16
    from ntsnet.predictor import inference_precision
    from training.train import choose_precision

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    for capability, bf16 in (((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert gpu_has_bf16(cuda) is bf16
        assert choose_precision(cuda, "auto") == ("bf16" if bf16 else "fp32")
        assert inference_precision(cuda, "bf16") == ("bf16" if bf16 else "fp32", False)
    assert not gpu_has_bf16(torch.device("cpu"))


def test_a_predictor_answers_with_one_precision_whatever_the_batch(monkeypatch):
    """On CUDA a single frame ran in fp32 and batches from 8 in bf16: live answers, the app's evaluation and the
    threshold's calibration saw different scores. Now the rule has no batch size in it: fp32 on a GPU (as the job
    evaluates and calibrates), the CPU's rule unchanged."""
    import inspect

    from ntsnet import predictor as predictor_module
    from ntsnet.predictor import inference_precision

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert inference_precision(torch.device("cuda"), "auto") == ("fp32", False)
    monkeypatch.setattr(predictor_module, "cpu_supports_fast_bf16", lambda: True)
    assert inference_precision(torch.device("cpu"), "auto") == ("bf16", True)  # the Navigator's pass stays fp32
    monkeypatch.setattr(predictor_module, "cpu_supports_fast_bf16", lambda: False)
    assert inference_precision(torch.device("cpu"), "auto") == ("fp32", False)
    assert list(inspect.signature(Predictor._autocast).parameters) == ["self"]
    with pytest.raises(ValueError):
        inference_precision(torch.device("cpu"), "fp16")


def test_the_apps_evaluation_hands_its_gpu_cache_back(monkeypatch, tmp_path, tiny_checkpoint):
    """PyTorch's allocator keeps an evaluation's blocks cached in the app's process, where the Train job (another
    process) cannot use them."""
    from synthetic import draw_product, stable_seed

    from ntsnet import device as device_module
    from webapp import Studio
    from webapp import live as live_module

    emptied = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    device_module.release_cached_memory(torch.device("cpu"))
    assert emptied == []
    device_module.release_cached_memory(torch.device("cuda"))
    assert emptied == [True]
    released = []
    monkeypatch.setattr(live_module, "release_cached_memory", released.append)
    studio = Studio(tmp_path / "cat")
    studio.create_product("red-box")
    studio.save_photo(draw_product(np.random.default_rng(stable_seed("red-box", 0)), "red-box", size=120), "red-box")
    studio.set_active_model(str(tiny_checkpoint))
    studio.evaluate("train")
    assert released == [studio.predictor().device]
