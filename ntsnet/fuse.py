"""An inference-only rewrite that computes the same function faster: BatchNorm folded into the conv before it.

In eval mode a BatchNorm is an affine map per channel, so it can be multiplied into the preceding conv's
weights and bias, which removes a full pass over every activation map (benchmarks/RESULTS.md). In fp32 the answers are the same;
in bf16 the folded weights round differently, as much as bf16 itself moves answers from fp32. Which conv feeds which BatchNorm is not
guessed from names: a probe forward pass records it, and a pair is folded only when the BatchNorm reads
the conv's output directly and nothing else reads that output.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .device import exact_fp32

log = logging.getLogger("ntsnet")


def _parent_and_name(root: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    parent_name, _, name = qualified.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), name


def find_conv_bn_pairs(module: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv, batchnorm) module names where the BatchNorm's only input is the conv's output, found by running
    ``module(example)``. A conv whose output is also read by anything else is left out."""
    names = {m: n for n, m in module.named_modules()}
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (conv name, output kept alive so ids stay unique)
    readers: dict[str, int] = {}
    pairs: dict[str, str] = {}
    hooks = []

    def on_conv(mod, inputs, output):
        produced[id(output)] = (names[mod], output)

    def on_any(mod, inputs):
        for t in inputs:
            if isinstance(t, torch.Tensor) and id(t) in produced:
                conv = produced[id(t)][0]
                readers[conv] = readers.get(conv, 0) + 1
                if isinstance(mod, nn.BatchNorm2d):
                    pairs[conv] = names[mod]

    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(on_conv))
        # leaves only (a container re-passes its input to its first child), and norm+activation layers, whose
        # children read the normalised output, not the input
        if not list(m.children()) or isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(on_any))
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in hooks:
            h.remove()
    return [(c, b) for c, b in pairs.items() if readers.get(c) == 1]


def fold_batchnorm(module: nn.Module, example: torch.Tensor, rtol: float = 1e-3) -> tuple[nn.Module, int]:
    """A copy of ``module`` (in eval mode) with every BatchNorm2d that directly follows a conv folded into it,
    and how many were folded. The copy is checked against the original on ``example``; a mismatch (a conv
    output read by a plain function call the hooks cannot see) raises instead of returning a wrong model."""
    if module.training:
        raise ValueError("fold_batchnorm needs a module in eval mode (BatchNorm must use its running statistics)")
    folded = copy.deepcopy(module)
    pairs = [(c, b) for c, b in find_conv_bn_pairs(folded, example) if after_norm(folded.get_submodule(b)) is not None]
    for conv_name, bn_name in pairs:
        conv_parent, conv_attr = _parent_and_name(folded, conv_name)
        bn_parent, bn_attr = _parent_and_name(folded, bn_name)
        bn = getattr(bn_parent, bn_attr)
        setattr(conv_parent, conv_attr, fuse_conv_bn_eval(getattr(conv_parent, conv_attr), bn))
        setattr(bn_parent, bn_attr, after_norm(bn))
    with torch.no_grad():
        difference = _changed_output(module(example), folded(example), rtol)
    if difference is not None:
        raise RuntimeError(f"folding BatchNorm changed the output (max difference {difference:.3g}); not folded")
    return folded, len(pairs)


def after_norm(bn: nn.Module) -> nn.Module | None:
    """What a BatchNorm layer does after normalising, which stays when the normalisation is folded away: nothing
    for a plain BatchNorm2d; dropout then activation for a norm+activation layer (timm's BatchNormAct2d keeps them
    as ``drop`` and ``act``); None for any other kind (left unfolded)."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
    if isinstance(bn, nn.BatchNorm2d) and isinstance(act, nn.Module) and isinstance(drop, nn.Module):
        return nn.Sequential(drop, act)
    return None


def _changed_output(want: torch.Tensor, got: torch.Tensor, rtol: float) -> float | None:
    """The largest difference if it exceeds ``rtol`` of the output's scale, else None."""
    difference = float((want - got).abs().max())
    return difference if difference > rtol * float(want.abs().max().clamp_min(1e-6)) else None


def inference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of an NTS-Net or baseline whose backbone has its BatchNorms folded; the original is
    left as it was (it is what checkpoints are saved from). Folding is a CPU speed trick: on any other device, or
    when the folded copy does not reproduce the original, the model itself answers (said once in the log), so
    loading a model never fails for it."""
    param = next(model.backbone.parameters())
    if param.device.type != "cpu":
        return model.eval()
    example = torch.randn(1, 3, 64, 64, device=param.device, dtype=param.dtype)
    try:
        with exact_fp32():
            folded, _ = fold_batchnorm(model.backbone.eval(), example)  # already a copy
    except RuntimeError as exc:
        _warn_once(f"ntsnet: {exc}; answering with the unfolded model")
        return model.eval()
    # copy the rest of the model, taking the folded backbone in place of the original instead of copying it too
    return copy.deepcopy(model, memo={id(model.backbone): folded}).eval()


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


class TrainingFold:
    """BatchNorm folded into the conv before it while training, for models whose BatchNorms stay on their
    running statistics (training/progressive.py trains them so). Such a BatchNorm is a fixed per-channel scale
    and shift of the conv's output, so one conv with its weights scaled computes the same; inside ``with fold:``
    each paired conv computes with weights folded anew from the live parameters on every call, so autograd
    carries the gradients to the conv's weights and to the BatchNorm's weight and bias exactly as without the
    fold, and the state dict (what checkpoints, the weight average and DDP see) does not change. It saves the
    BatchNorm's own pass over every activation map, forward and backward (``train_throughput.py --fold``).

    Pairs are found as for ``fold_batchnorm``; if the folded module's output differs from the original on a
    probe (a conv output read where hooks cannot see), nothing is folded and ``self.pairs`` is empty."""

    def __init__(self, module: nn.Module, example: torch.Tensor, rtol: float = 1e-3):
        modes = {m: m.training for m in module.modules()}
        module.eval()
        try:
            pairs = [(module.get_submodule(c), module.get_submodule(b)) for c, b in find_conv_bn_pairs(module, example)]
            self.pairs = [(c, b) for c, b in pairs if b.affine and b.track_running_stats and after_norm(b) is not None]
            with torch.no_grad(), exact_fp32():
                want = module(example)
                with self:
                    got = module(example)
            if _changed_output(want, got, rtol) is not None:
                self.pairs = []
        finally:
            for m, training in modes.items():
                m.training = training

    def __enter__(self):
        for conv, bn in self.pairs:
            conv.forward = _folded_forward(conv, bn)
            bn.forward = after_norm(bn).forward  # what the layer does after normalising (an activation, or nothing)
        return self

    def __exit__(self, *exc):
        for conv, bn in self.pairs:  # the instance attributes go; the classes' forward methods are back
            del conv.forward, bn.forward
        return False


def _folded_forward(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if bn.training:
            raise RuntimeError("TrainingFold needs BatchNorms on their running statistics (eval mode)")
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
        if plain:
            return conv._conv_forward(x, weight, bias)
        # a conv whose forward does more than convolve (timm's Conv2dSame pads first): its own forward, run on a
        # stand-in that shares everything but the two folded tensors
        stand_in = object.__new__(type(conv))
        stand_in.__dict__ = {**conv.__dict__, "_parameters": {**conv._parameters, "weight": weight, "bias": bias}}
        return type(conv).forward(stand_in, x)

    plain = type(conv).forward is nn.Conv2d.forward
    return forward
