"""Turning whatever the caller has (path, PIL image, numpy array) into an RGB image, and into a model input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageLoadError(ValueError):
    """The input could not be read as an image."""


def to_rgb_array(image) -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array. Numpy input is taken as RGB (convert OpenCV's BGR first)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            with Image.open(path) as im:
                im.load()
                image = ImageOps.exif_transpose(im)
        except FileNotFoundError:
            raise ImageLoadError(f"{path}: no such file") from None
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageLoadError(f"{path}: not a readable image ({exc})") from None
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            bg = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(bg, image)
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ImageLoadError(f"unsupported image type {type(image).__name__}")
    arr = image
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageLoadError(f"expected an HxWx3 image, got shape {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageLoadError("empty image")
    arr = np.ascontiguousarray(arr)
    return arr if arr.flags.writeable else arr.copy()  # PIL hands out read-only buffers


# names what to_input_tensor does to a photo; stored with cached embeddings, which are recomputed when it changes
PREPROCESSING = "resize-antialias+exposure-1"


def to_input_tensor(images: list[np.ndarray], size: int, mean, std) -> torch.Tensor:
    """Resize each RGB array to size x size (the paper scales, it does not crop) and normalise: (B, 3, S, S)."""
    batch = []
    for arr in images:
        # resized as uint8 (an HWC array is a channels_last tensor: PyTorch's vectorised PIL-style path), like the
        # training photos (PIL); converting the full frame to float first costs twice as much
        t = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        batch.append(t)
    x = normalise_exposure(torch.cat(batch).float() / 255.0)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


# An underexposed photo (a dark shelf, a camera whose auto-exposure gave up) is brightened the way a camera's gain
# would: scaled so its brightest 1% reach EXPOSURE_TARGET. Only photos whose 99th-percentile luminance is below
# EXPOSURE_TRIGGER are touched (none of the 296 grocery val photos is), and the gain is capped, so noise in a nearly
# black frame is not blown up into a picture. Training and inference both pass through here (to_input_tensor and
# training/data.py: to_tensor), so a model sees the same inputs in both.
EXPOSURE_TRIGGER = 0.5
EXPOSURE_TARGET = 0.85
EXPOSURE_MAX_GAIN = 4.0
_LUMA = (0.299, 0.587, 0.114)


def exposure_gain(x: torch.Tensor) -> torch.Tensor:
    """Per image of a (B, 3, H, W) float batch in [0, 1]: the gain ``normalise_exposure`` applies (1 when none)."""
    step = max(1, round(x.shape[-1] / 112))  # ~112 x 112 samples: the percentile moves by under a grey level, 0.5 ms
    sub = x[:, :, ::step, ::step]
    luma = (sub * torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)).sum(1).flatten(1)
    bright = torch.quantile(luma, 0.99, dim=1)
    gain = (EXPOSURE_TARGET / bright.clamp_min(1.0 / 255)).clamp(max=EXPOSURE_MAX_GAIN)
    return torch.where(bright < EXPOSURE_TRIGGER, gain, torch.ones_like(gain))


def normalise_exposure(x: torch.Tensor) -> torch.Tensor:
    """Brighten the underexposed images of a (B, 3, H, W) or (3, H, W) float batch in [0, 1]; others pass unchanged."""
    batch = x if x.dim() == 4 else x.unsqueeze(0)
    gain = exposure_gain(batch)
    if bool((gain == 1).all()):
        return x
    out = (batch * gain.view(-1, 1, 1, 1)).clamp_(0, 1)
    return out if x.dim() == 4 else out[0]
