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


def test_a_zerogpu_space_runs_the_gpu_work_inside_spaces_gpu(monkeypatch):
    from ntsnet.device import gpu_task

    def plain(x):
        return x + 1

    assert gpu_task(plain) is plain  # anywhere else: a no-op
    calls = []
    fake = types.ModuleType("spaces")
    fake.GPU = lambda fn: calls.append(fn) or (lambda *a, **k: ("on the GPU", fn(*a, **k)))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    wrapped = gpu_task(plain)
    assert calls == [plain] and wrapped(1) == ("on the GPU", 2)
