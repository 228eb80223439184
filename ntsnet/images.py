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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def image_paths(paths) -> list[str]:
    """The paths given, a folder standing for the photos in it and its subfolders (sorted)."""
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            out += sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            out.append(str(path))
    return out


def read_in_batches(paths: list, batch: int, threads: int = 4, read=None):
    """Yields lists of (path, what ``read(path)`` gave), ``batch`` photos at a time, in order; ``threads`` decode the
    next batch while the caller works on this one (decoders release the GIL). The default ``read`` gives an RGB
    array, or the ImageLoadError for a photo that cannot be read."""
    from concurrent.futures import ThreadPoolExecutor

    def rgb_or_error(path):
        try:
            return to_rgb_array(path)
        except ImageLoadError as exc:
            return exc

    read = read or rgb_or_error

    chunks = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        ahead = [pool.submit(read, p) for p in chunks[0]] if chunks else []
        for i, chunk in enumerate(chunks):
            current, ahead = ahead, [pool.submit(read, p) for p in chunks[i + 1]] if i + 1 < len(chunks) else []
            yield [(path, f.result()) for path, f in zip(chunk, current)]


# names what to_input_tensor does to a photo; stored with cached embeddings, which are recomputed when it changes
PREPROCESSING = "resize-antialias+exposure-1"


def to_input_tensor(images: list[np.ndarray], size: int, mean, std, device=None) -> torch.Tensor:
    """Resize each RGB array to size x size (the paper scales, it does not crop) and normalise: (B, 3, S, S).
    ``device`` (other than the CPU): the photos travel as uint8 and are resized there (``resize_on_device``)."""
    return normalise_batch(resize_batch(images, size, device), mean, std)


def resize_batch(images: list[np.ndarray], size: int, device=None) -> torch.Tensor:
    """(B, 3, size, size) uint8: each RGB array resized with antialias, on the CPU or (``device``) on that device."""
    if device is not None and torch.device(device).type != "cpu":
        return resize_on_device(images, size, torch.device(device))
    batch = []
    for arr in images:
        # resized as uint8 (an HWC array is a channels_last tensor: PyTorch's vectorised PIL-style path), like the
        # training photos (PIL); converting the full frame to float first costs twice as much
        t = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
        batch.append(F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    return torch.cat(batch)


# Pixels (height x width, all photos together) resized on a device in one go. Each pixel costs 18 bytes there (three
# channels as uint8, their NCHW copy, float32 for the kernel): 16 M pixels hold one 12-megapixel phone photo (under
# 300 MiB); a larger photo goes alone. Bounded by pixels, not photos: 128 full-resolution photos cost what one does.
DEVICE_RESIZE_PIXELS = 16 * 2**20


def pixel_chunks(indices: list[int], pixels_each: int, budget: int = DEVICE_RESIZE_PIXELS) -> list[list[int]]:
    """``indices`` (photos of one shape) in runs of at most ``budget`` pixels together; at least one photo a run."""
    per = max(1, budget // max(1, pixels_each))
    return [indices[i:i + per] for i in range(0, len(indices), per)]


def resize_on_device(images: list[np.ndarray], size: int, device: torch.device) -> torch.Tensor:
    """(B, 3, size, size) uint8 on ``device``: the photos copied as uint8 (a quarter of float's bytes, pinned, without
    blocking), photos of one shape resized together in float, at most DEVICE_RESIZE_PIXELS at a time, and rounded
    back to uint8, as the CPU's uint8 path rounds (the two agree to one grey level)."""
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=device)
    by_shape: dict[tuple, list[int]] = {}
    for i, arr in enumerate(images):
        by_shape.setdefault(arr.shape, []).append(i)
    for shape, same in by_shape.items():
        for idx in pixel_chunks(same, shape[0] * shape[1]):
            host = torch.from_numpy(np.stack([images[i] for i in idx]))
            if device.type == "cuda":
                host = host.pin_memory()
            # NCHW-contiguous while still uint8: the antialias kernel would copy a channels-last float batch again
            x = host.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float()
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            out[torch.as_tensor(idx, device=device)] = x.round_().clamp_(0, 255).to(torch.uint8)
            del x
    return out


def normalise_batch(x: torch.Tensor, mean, std) -> torch.Tensor:
    """A (B, 3, S, S) uint8 batch as the model's float input, on its own device: [0, 1], exposure, mean and std."""
    x = normalise_exposure(x.float() / 255.0)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
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
    luma = (sub * torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(1).flatten(1)
    bright = torch.quantile(luma, 0.99, dim=1)
    gain = (EXPOSURE_TARGET / bright.clamp_min(1.0 / 255)).clamp(max=EXPOSURE_MAX_GAIN)
    return torch.where(bright < EXPOSURE_TRIGGER, gain, torch.ones_like(gain))


def normalise_exposure(x: torch.Tensor) -> torch.Tensor:
    """Brighten the underexposed images of a (B, 3, H, W) or (3, H, W) float batch in [0, 1]; others pass unchanged."""
    batch = x if x.dim() == 4 else x.unsqueeze(0)
    gain = exposure_gain(batch)
    # the shortcut reads a value back: a GPU skips it (times 1 and the clamp leave a lit photo's values unchanged)
    if batch.device.type == "cpu" and bool((gain == 1).all()):
        return x
    out = (batch * gain.view(-1, 1, 1, 1)).clamp_(0, 1)
    return out if x.dim() == 4 else out[0]
