"""Inference speed-ups must not change answers: BatchNorm folding and the allocator setting."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pathlib import Path

from synthetic import draw_product
from ntsnet import Predictor, load_checkpoint, save_checkpoint
from ntsnet.backbones import create_backbone
from ntsnet.fuse import TrainingFold, find_conv_bn_pairs, fold_batchnorm

ROOT = Path(__file__).resolve().parents[1]


def _randomise_bn_statistics(module: nn.Module, seed: int = 0):
    """Fresh BatchNorms are the identity (mean 0, var 1, weight 1, bias 0): folding them proves nothing."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g))
    return module


@pytest.mark.parametrize("name", ["tiny", "efficientnet_lite0"])
def test_folding_a_backbone_keeps_its_output(name):
    net = _randomise_bn_statistics(create_backbone(name, pretrained=False)).eval()
    x = torch.randn(2, 3, 96, 80)  # odd sizes: TF "same" padding is asymmetric there
    folded, n = fold_batchnorm(net, torch.randn(1, 3, 64, 64))
    assert n == sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the original is untouched
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)


class _ConvReadTwice(nn.Module):
    """The conv output feeds the BatchNorm and a second module: folding would change the second reader."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.side = nn.Identity()

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + self.side(y)


class _ConvReadByFunction(nn.Module):
    """The second read is a plain function call that no hook sees."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + torch.tanh(y)


def test_a_conv_output_read_twice_is_not_folded():
    net = _randomise_bn_statistics(_ConvReadTwice()).eval()
    assert find_conv_bn_pairs(net, torch.randn(1, 3, 8, 8)) == []
    folded, n = fold_batchnorm(net, torch.randn(1, 3, 8, 8))
    assert n == 0 and isinstance(folded.bn, nn.BatchNorm2d)


def test_a_fold_that_would_change_the_output_is_refused():
    net = _randomise_bn_statistics(_ConvReadByFunction()).eval()
    with pytest.raises(RuntimeError, match="changed the output"):
        fold_batchnorm(net, torch.randn(1, 3, 8, 8))


def test_folding_needs_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train(), torch.randn(1, 3, 4, 4))


def _job_trained(net: nn.Module, frozen_up_to: int = 6) -> nn.Module:
    """As training/progressive.py trains: BatchNorms on their running statistics, the first layers frozen."""
    for i, p in enumerate(net.parameters()):
        p.requires_grad_(i >= frozen_up_to)
    net.train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return net


def _loss_and_grads(net, x, fold=None):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same stochastic-depth draws in both passes
    with fold if fold is not None else torch.enable_grad():
        loss = (net(x) ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["tiny", "efficientnet_lite0"])
def test_training_fold_gives_the_same_loss_and_gradients_and_changes_no_state(name):
    net = _job_trained(_randomise_bn_statistics(create_backbone(name, pretrained=False)))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    fold = TrainingFold(net, torch.randn(1, 3, 64, 64))
    assert len(fold.pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) > 0
    x = torch.randn(2, 3, 96, 80)  # odd sizes: TF "same" padding is asymmetric there
    want_loss, want = _loss_and_grads(net, x)
    got_loss, got = _loss_and_grads(net, x, fold)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-6)
    bn_weights = {f"{n}.weight" for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert set(got) == set(want) and bn_weights & set(got)  # BatchNorm weights get gradients through the fold too
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-3, atol=3e-5 * float(want[n].abs().max()) + 1e-8)  # fp32 sums reordered
    # the module is back as it was: same state, same modes, the classes' own forward methods
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert not any("forward" in vars(m) for m in net.modules())
    assert any(isinstance(m, nn.BatchNorm2d) and not m.training for m in net.modules()) and net.training


def test_training_fold_refuses_batch_statistics():
    net = _randomise_bn_statistics(create_backbone("tiny", pretrained=False))
    fold = TrainingFold(net, torch.randn(1, 3, 64, 64))
    net.train()  # BatchNorms on batch statistics: not a fixed scale, so not foldable
    with pytest.raises(RuntimeError, match="running statistics"), fold:
        net(torch.randn(2, 3, 64, 64))
    assert not any("forward" in vars(m) for m in net.modules())


def test_training_fold_folds_nothing_where_folding_would_change_the_output():
    net = _randomise_bn_statistics(_ConvReadByFunction())
    assert TrainingFold(net, torch.randn(1, 3, 8, 8)).pairs == []
    assert TrainingFold(_randomise_bn_statistics(_ConvReadTwice()), torch.randn(1, 3, 8, 8)).pairs == []


def test_predictor_answers_the_same_folded_and_saves_the_unfolded_model(tiny_checkpoint, tmp_path):
    folded = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32", backend="torch")
    plain = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32", fold_batchnorm=False, backend="torch")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.net.modules())
    rng = np.random.default_rng(5)
    images = [draw_product(rng, n) for n in folded.class_names for _ in range(4)]
    for a, b in zip(folded.predict_batch(images), plain.predict_batch(images)):
        assert a.label == b.label and a.confidence == pytest.approx(b.confidence, abs=1e-4)
        assert [round(x.x0, 1) for x in a.boxes] == [round(x.x0, 1) for x in b.boxes]
    # the checkpoint written from a predictor keeps the trained layout (BatchNorms and all)
    copy = tmp_path / "copy.safetensors"
    save_checkpoint(copy, folded.model, folded.class_names)
    assert load_checkpoint(copy).state_dict.keys() == load_checkpoint(tiny_checkpoint).state_dict.keys()


def _keep_freed_memory_in_subprocess(env_value: str) -> str:
    code = "from ntsnet.runtime import keep_freed_memory as k; print(k(), k())"
    env = {**os.environ, "NTSNET_KEEP_MALLOC": env_value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()


def test_allocator_setting_applies_once_on_glibc_and_can_be_switched_off():
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert _keep_freed_memory_in_subprocess("1") == [str(on_glibc)] * 2
    assert _keep_freed_memory_in_subprocess("0") == ["False", "False"]


_FORKED_WORKERS_BLUR = """
import numpy as np, torch, cv2
from ntsnet.runtime import opencv_on_one_thread
from training.data import convolve
photo, kernel = np.random.rand(300, 400, 3).astype(np.float32) * 255, np.ones((9, 9), np.float32) / 81
cv2.setNumThreads(2)  # what a 2-core machine starts with, whatever this one has
for _ in range(10):
    convolve(photo, kernel)  # the pool is running before the workers fork, as after an evaluation's blur
opencv_on_one_thread()

class Blurs(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        convolve(photo, kernel)
        return torch.tensor([float(cv2.getNumThreads())])

loader = torch.utils.data.DataLoader(Blurs(), batch_size=2, num_workers=2, timeout=60)
print(sorted({float(x.max()) for x in loader}), cv2.getNumThreads())
"""


def test_dataloader_workers_forked_after_the_setting_blur_on_one_thread_without_hanging():
    """Two workers' OpenCV pools (as many threads as cores each) fought the training step's threads on 2 cores. The
    setting is made in the training process, never in a worker: resizing the pool a worker inherited hung one."""
    done = subprocess.run([sys.executable, "-c", _FORKED_WORKERS_BLUR], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["[1.0]", "1"]


def test_single_torch_thread_scopes_overlap_and_restore_the_process_setting():
    """Live frames and single photos open the scope from different threads at once: each sees one thread inside,
    every thread has the process's count again afterwards (also one that started while a scope was open), and an
    engine compiled meanwhile takes the process's count."""
    import threading

    from ntsnet.runtime import single_torch_thread, torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen, opened, release = {}, threading.Event(), threading.Event()

        def live_worker():
            with single_torch_thread():
                seen["live"] = torch.get_num_threads()
                opened.set()
                release.wait(5)
            seen["live after"] = torch.get_num_threads()

        def late_thread():  # starts while the live scope is open: PyTorch hands it the last count set (1)
            with single_torch_thread():
                seen["late"] = torch.get_num_threads()
            seen["late after"] = torch.get_num_threads()

        live = threading.Thread(target=live_worker)
        live.start()
        opened.wait(5)
        assert torch_threads() == 2
        late = threading.Thread(target=late_thread)
        late.start()
        late.join(5)
        release.set()
        live.join(5)
        assert seen == {"live": 1, "late": 1, "late after": 2, "live after": 2}
        assert torch.get_num_threads() == 2 and torch_threads() == 2
        with pytest.raises(RuntimeError):
            with single_torch_thread():
                raise RuntimeError("a failed frame")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_one_frame_answers_the_same_with_or_without_the_thread_pool(tiny_checkpoint):
    pytest.importorskip("openvino")
    pred = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32", backend="openvino", background=False)
    assert pred.engine is not None
    frame = draw_product(np.random.default_rng(5), "red-box")
    threads = torch.get_num_threads()
    one = pred.predict(frame)                             # one frame: PyTorch on one thread around the graphs
    assert torch.get_num_threads() == threads
    (pooled,) = pred._predict_batch([frame], 5, None, 4)  # the same call on PyTorch's pool
    assert one.to_dict() == pooled.to_dict()


def test_the_process_ends_only_after_its_background_builds(tmp_path):
    # a daemon thread cut off inside native code aborted the checkout command with SIGABRT instead of its status
    done = tmp_path / "done"
    code = ("import sys, time; from ntsnet.runtime import background_work\n"
            f"background_work(lambda: (time.sleep(1.0), open({str(done)!r}, 'w').write('built')), 'build')\n"
            "sys.exit(3)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert done.read_text() == "built"
