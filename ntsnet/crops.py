"""The part crops: torchvision's ``roi_align(aligned=True, sampling_ratio=2)``, computed faster on a CPU.

Each output pixel of roi_align averages ``sampling``² bilinear samples, and bilinear weights factor into a
row weight times a column weight (its "zero outside the image" rule too), so a crop is
``rows_weights @ image @ column_weights``: per box, a gather of the few image rows the box reads, then one
small matrix product over the columns it spans: several times faster on a CPU than torchvision's single-threaded
kernel or OpenVINO's ROIAlign (``benchmarks/inference_backends.py``). Sample positions use torchvision's float arithmetic, so
the crops match it to summation order (~5e-7); ``tests/test_crops.py`` holds them to it.
"""
from __future__ import annotations

import torch
from torchvision.ops import roi_align


def _axis_taps(start: torch.Tensor, end: torch.Tensor, length: int, size: int, sampling: int):
    """For each box and each of ``size`` output cells along one axis: the 2·sampling source indices and their
    weights, as torchvision's roi_align kernel computes them (aligned=True, spatial_scale=1)."""
    start = start - 0.5
    bin_ = (end - 0.5 - start) / size
    cell = torch.arange(size, dtype=start.dtype, device=start.device)
    first = start[:, None] + cell[None] * bin_[:, None]
    pos = torch.stack([first + ((k + 0.5) * bin_ / sampling)[:, None] for k in range(sampling)], -1)  # (N, size, s)
    inside = (pos >= -1.0) & (pos <= length)
    pos = pos.clamp(min=0)
    low = pos.floor()
    at_end = low >= length - 1
    low = torch.where(at_end, torch.full_like(low, length - 1), low)
    pos = torch.where(at_end, low, pos)
    frac = pos - low
    scale = inside.to(pos.dtype) / sampling
    high = (low + 1).clamp(max=length - 1)
    index = torch.stack([low, high], -1).long().flatten(2)               # (N, size, 2s)
    weight = torch.stack([(1 - frac) * scale, frac * scale], -1).flatten(2)
    return index, weight


def crop_boxes(x: torch.Tensor, rois: torch.Tensor, size: int, sampling: int = 2) -> torch.Tensor:
    """(B, C, H, W) images and (N, 5) rows of (image index, x0, y0, x1, y1) -> (N, C, size, size) crops, equal
    to ``roi_align(x, rois, (size, size), 1.0, sampling, aligned=True)``. Off the CPU, that kernel itself."""
    if x.device.type != "cpu":
        return roi_align(x, rois.to(x.dtype), output_size=(size, size), spatial_scale=1.0, sampling_ratio=sampling, aligned=True)
    with torch.autocast("cpu", enabled=False):  # crops stay float32 under bf16 autocast, as roi_align's do
        x, rois = x.float(), rois.detach().float().cpu()
        _, c, h, w = x.shape
        n = rois.shape[0]
        out = x.new_empty(n, c, size, size)
        if n == 0:
            return out
        row_index, row_weight = _axis_taps(rois[:, 2], rois[:, 4], h, size, sampling)
        col_index, col_weight = _axis_taps(rois[:, 1], rois[:, 3], w, size, sampling)
        taps = row_index.shape[2]
        col_of = torch.arange(size).repeat_interleave(taps)
        for i, image in enumerate(rois[:, 0].long().tolist()):
            lo, hi = int(col_index[i].min()), int(col_index[i].max()) + 1  # only the columns this box reads
            rows = x[image, :, :, lo:hi].index_select(1, row_index[i].flatten())             # (C, size*taps, cols)
            rows = (rows.reshape(c, size, taps, hi - lo) * row_weight[i].view(1, size, taps, 1)).sum(2)
            cols = x.new_zeros(hi - lo, size)
            cols.index_put_((col_index[i].flatten() - lo, col_of), col_weight[i].flatten(), accumulate=True)
            out[i] = rows @ cols
        return out
