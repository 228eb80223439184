"""The fast CPU crops are torchvision's roi_align (aligned, 2x2 samples), box for box."""
import pytest
import torch
from torchvision.ops import roi_align

from ntsnet.crops import crop_boxes


def reference(x, rois, size):
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def random_rois(gen, n, batch, h, w):
    """Boxes of every kind NTS-Net meets: inside, past one or two borders, wholly outside, thinner than a
    pixel, larger than the image, at fractional coordinates."""
    cx = torch.rand(n, generator=gen) * (w + 80) - 40
    cy = torch.rand(n, generator=gen) * (h + 80) - 40
    bw = torch.rand(n, generator=gen) ** 2 * 1.5 * w + 0.3
    bh = torch.rand(n, generator=gen) ** 2 * 1.5 * h + 0.3
    image = torch.randint(0, batch, (n,), generator=gen).float()
    return torch.stack([image, cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)


@pytest.mark.parametrize("batch,h,w,size", [(1, 448, 448, 224), (3, 96, 80, 32), (2, 17, 23, 9)])
def test_crops_equal_roi_align_on_boxes_of_every_kind(batch, h, w, size):
    gen = torch.Generator().manual_seed(batch * 1000 + h)
    x = torch.randn(batch, 3, h, w, generator=gen)
    rois = random_rois(gen, 40, batch, h, w)
    rois[0] = torch.tensor([0, -500, -500, -300, -300])     # wholly outside: zeros
    rois[1] = torch.tensor([0, 0, 0, w - 1, h - 1])          # the whole image
    rois[2] = torch.tensor([0, w - 2.5, h - 2.5, w + 0.7, h + 0.9])  # the far corner, where the kernel clamps
    got, want = crop_boxes(x, rois, size), reference(x, rois, size)
    assert got.shape == want.shape == (40, 3, size, size)
    assert torch.allclose(got, want, atol=2e-5, rtol=0), (got - want).abs().max()
    assert got[0].abs().max() == 0


def test_crops_ignore_memory_format_and_autocast():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    rois = random_rois(gen, 12, 2, 64, 64)
    want = reference(x, rois, 32)
    assert torch.allclose(crop_boxes(x.contiguous(memory_format=torch.channels_last), rois, 32), want, atol=2e-5, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = crop_boxes(x, rois, 32)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=2e-5, rtol=0)
    assert crop_boxes(x, rois[:0], 32).shape == (0, 3, 32, 32)
