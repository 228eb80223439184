"""Validate and normalise one incoming photo before it enters the catalogue.

Rules: it must decode completely; EXIF orientation is applied; the result is 8-bit RGB (alpha flattened on
white, 16-bit scaled down, CMYK converted). The stored bytes are the original JPEG/PNG when nothing had to
change (no recompression loss), otherwise a lossless PNG. The content hash is taken over the pixels decoded
from the stored bytes, so the same photo re-encoded elsewhere and exported-then-reimported keeps its hash.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False

MAX_PIXELS = 60_000_000      # ~ a 60-megapixel photo; beyond that it is a decompression bomb or a scan
MAX_SIDE = 20_000
MIN_SIDE = 8                 # smaller than this is not a photo of anything
MAX_ASPECT = 25.0
MAX_FILE_BYTES = 80 * 1024 * 1024


class InvalidImage(ValueError):
    """The input is not a usable photo; the message is meant for the person who supplied it."""


@dataclass
class PreparedImage:
    data: bytes          # bytes to store
    ext: str             # ".jpg" or ".png"
    hash: str            # sha256 of the decoded RGB pixels (and their shape)
    width: int
    height: int
    pixels: np.ndarray   # H x W x 3 uint8 RGB, for quality checks


def pixel_hash(rgb: np.ndarray) -> str:
    h = hashlib.sha256(f"{rgb.shape[0]}x{rgb.shape[1]}:".encode())
    h.update(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes())
    return h.hexdigest()


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return Image.fromarray((arr / top * 255).round().clip(0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray((arr * scale).clip(0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def _decode(data: bytes) -> Image.Image:
    if not data:
        raise InvalidImage("empty file (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise InvalidImage(f"file too large ({len(data) / 1e6:.0f} MB > {MAX_FILE_BYTES / 1e6:.0f} MB)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
                raise InvalidImage(f"image too large ({w}x{h} pixels); possible decompression bomb")
            im.load()
            return im
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(f"refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"damaged or truncated image: {exc}") from None


def prepare_image(source) -> PreparedImage:
    """``source``: bytes, a path, a PIL image or an RGB numpy array (a webcam frame). Raises InvalidImage."""
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.size == 0:
            raise InvalidImage(f"expected an HxWx3 image array, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        source = Image.fromarray(arr)
    if isinstance(source, Image.Image):
        buf = io.BytesIO()
        im = _to_rgb(source)
        im.save(buf, format="JPEG", quality=95)  # camera frames: JPEG like any photo
        source = buf.getvalue()
    elif not isinstance(source, (bytes, bytearray)):
        with open(source, "rb") as fh:
            source = fh.read()
    data = bytes(source)
    im = _decode(data)
    w, h = im.size
    if min(w, h) < MIN_SIDE:
        raise InvalidImage(f"image too small ({w}x{h} pixels; at least {MIN_SIDE} needed)")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise InvalidImage(f"absurd aspect ratio ({w}x{h})")
    fmt = im.format
    oriented = ImageOps.exif_transpose(im)
    rgb = _to_rgb(oriented)
    untouched = oriented is im or oriented.size == im.size and im.getexif().get(0x0112, 1) == 1
    if fmt in ("JPEG", "PNG") and im.mode == "RGB" and untouched:
        stored, ext = data, (".jpg" if fmt == "JPEG" else ".png")
    else:
        buf = io.BytesIO()
        rgb.save(buf, format="PNG", optimize=False)
        stored, ext = buf.getvalue(), ".png"
    pixels = np.asarray(rgb)
    return PreparedImage(stored, ext, pixel_hash(pixels), rgb.size[0], rgb.size[1], pixels)
