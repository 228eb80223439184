"""From catalogue to batches: a frozen snapshot of the image list, and a Dataset over it.

The snapshot (RUN_DIR/snapshot.json) is taken when a run starts and reused when it resumes, so photos
captured, relabelled or deleted during training do not change what the run trains on. Photos are stored
content-addressed, so a path in the snapshot keeps meaning the same pixels; a photo deleted meanwhile is
skipped and counted like a corrupt one.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from dataset_tools import Catalogue, assign_splits
from ntsnet.backbones import IMAGENET_MEAN, IMAGENET_STD
from ntsnet.images import normalise_exposure

ImageFile.LOAD_TRUNCATED_IMAGES = False


class DataError(ValueError):
    """The catalogue cannot be trained on as it is; the message says what to do."""


@dataclass
class Snapshot:
    class_names: list[str]
    train: list[dict]   # {"path", "label", "tags"}
    val: list[dict]
    test: list[dict]

    def save(self, path: Path):
        from ntsnet.checkpoint import atomic_write

        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(self.__dict__, ensure_ascii=False)))

    @classmethod
    def load(cls, path: Path) -> "Snapshot":
        return cls(**json.loads(Path(path).read_text()))


def take_snapshot(db, min_per_class: int = 1, exclude=()) -> Snapshot:
    """Labelled photos by split. Fills in missing splits (stable: earlier assignments never move).
    ``exclude``: products held out entirely (they stay unknown to the model)."""
    cat = Catalogue(db, create=False)
    excluded = {e.lower() for e in exclude}
    missing = excluded - {p["name"].lower() for p in cat.products()}
    if missing:
        raise DataError(f"cannot exclude unknown products: {', '.join(sorted(missing))}")
    if cat.db.execute("SELECT COUNT(*) FROM images WHERE product_id IS NOT NULL AND split IS NULL").fetchone()[0]:
        assign_splits(cat)
    products = [p for p in cat.products() if p["name"].lower() not in excluded]
    if not products or sum(p["images"] for p in products) == 0:
        raise DataError("the catalogue has no labelled photos yet: capture or import photos of at least two products first")
    trainable = [p for p in products if p["train"] >= min_per_class]
    skipped = [p["name"] for p in products if p["train"] < min_per_class]
    if len(trainable) < 2:
        raise DataError(f"training needs at least two products with training photos; found {len(trainable)}"
                        + (f" (no training photos: {', '.join(skipped)})" if skipped else ""))
    names = [p["name"] for p in trainable]
    index = {n: i for i, n in enumerate(names)}
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for img in cat.images():
        if img["product"] in index and img["split"] in splits:
            splits[img["split"]].append({"path": str(cat.image_path(img).resolve()), "label": index[img["product"]], "tags": img["tags"]})
    cat.close()
    return Snapshot(names, splits["train"], splits["val"], splits["test"])


def load_rgb(path: str) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError):
        return None


def to_tensor(im: Image.Image, size: int, flip: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
              as_uint8: bool = False) -> torch.Tensor:
    """The model input (3, size, size) of a photo; ``as_uint8``: its pixels only, for ``normalise_batch`` to finish on
    the device (the same values: the same steps in the same order)."""
    im = im.resize((size, size), Image.BILINEAR)
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    if as_uint8:
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)
    x = normalise_exposure(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def store_augment(im: Image.Image, rng: np.random.Generator, degrade: bool = True, size: int | None = None) -> Image.Image:
    """What a store camera does to a product photo: framing (random resized crop), small rotation and
    perspective, lighting and colour, darkness, blur, and tiny low-resolution images. The strengths cover the
    evaluation's store conditions (training/evaluate.py: 25% brightness, blur of 1.5% of the side, 80 px).

    ``size``: the framed photo is brought to size x size (as ``to_tensor`` would) before the rest, so rotation,
    light, noise and blur work on the pixels the model gets rather than on the photo's: the same views (blur is a
    share of the side, the tiny image a number of pixels) for two thirds of the work; stages 2-3 prepare photos on the cores that
    train, so this is training time (``python benchmarks/train_throughput.py --photos 264``).

    ``degrade=False``: framing, flip and light/colour only, for a head fitted on frozen features (stage 1). Those
    features cannot learn to see through darkness, blur or a tiny image, so such views only add noise to the head."""
    from PIL import ImageEnhance

    w, h = im.size
    if rng.random() < 0.8:  # random resized crop: 35-100% of the area, aspect 3/4-4/3
        area = w * h * rng.uniform(0.35, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = min(w, int(round(np.sqrt(area * aspect)))), min(h, int(round(np.sqrt(area / aspect))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    if size:
        im = im.resize((size, size), Image.BILINEAR)
    if not degrade:
        return _light_and_colour(im, rng)
    if rng.random() < 0.3:
        im = im.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
    if rng.random() < 0.2:  # mild perspective: move the corners by up to 8% of the side
        w2, h2 = im.size
        d = 0.08 * np.array([w2, h2])
        quad = [c + rng.uniform(-1, 1, 2) * d for c in ([0, 0], [0, h2], [w2, h2], [w2, 0])]
        im = im.transform((w2, h2), Image.QUAD, [float(v) for c in quad for v in c], resample=Image.BILINEAR)
    im = _light_and_colour(im, rng)
    if rng.random() < 0.25:  # a dark shelf: less light, and the sensor noise that the camera's gain then amplifies
        im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.15, 0.5)))
        im = Image.fromarray(to_uint8(sensor_noise(np.asarray(im, dtype=np.float32), rng)))
    if rng.random() < 0.35:  # focus and motion blur: the condition the job's models held up worst in (training/evaluate.py)
        im = camera_blur(im, rng)
    if rng.random() < 0.2:  # a tiny image: the model sees it upscaled
        scale = rng.uniform(40, 110) / max(im.size)
        if scale < 1:
            im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.BILINEAR)
    return im


def blur_kernel(kind: str, spread: float, angle: float = 0.0) -> np.ndarray:
    """A normalised blur kernel whose standard deviation along its extent is ``spread`` pixels: 'gaussian' (sigma =
    spread), 'defocus' (a disk of radius 2 x spread, what an out-of-focus lens does) or 'motion' (a line of length
    sqrt(12) x spread at ``angle`` radians, a hand or a trolley moving during the exposure)."""
    if kind == "gaussian":
        n = max(1, int(np.ceil(3 * spread)))
        g = np.exp(-0.5 * (np.arange(-n, n + 1) / max(spread, 1e-6)) ** 2)
        k = np.outer(g, g)
    elif kind == "defocus":
        r = 2 * spread
        n = max(1, int(np.ceil(r)))
        y, x = np.mgrid[-n:n + 1, -n:n + 1]
        k = (x ** 2 + y ** 2 <= max(r, 0.5) ** 2).astype(np.float64)
    elif kind == "motion":
        length = np.sqrt(12) * spread
        n = max(1, int(np.ceil(length / 2)))
        k = np.zeros((2 * n + 1, 2 * n + 1))
        for t in np.linspace(-length / 2, length / 2, 4 * n + 1):
            k[int(round(n + t * np.sin(angle))), int(round(n + t * np.cos(angle)))] = 1
    else:
        raise ValueError(f"unknown blur kind {kind!r}")
    return (k / k.sum()).astype(np.float32)


BLUR_KINDS = ("gaussian", "defocus", "motion")


def camera_blur(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A blur as a store camera makes it: a Gaussian, a defocus disk or a motion streak (one in three each) whose
    spread is 0.3 px to 2.5% of the side, then, half of the time, the sensor noise and JPEG compression that a real
    blurred frame carries: a model trained on Gaussians alone reads the other shapes worse (``blur_curve.py --kind``)."""
    kind = BLUR_KINDS[int(rng.integers(len(BLUR_KINDS)))]
    k = blur_kernel(kind, float(rng.uniform(0.3, 0.025 * max(im.size))), float(rng.uniform(0, np.pi)))
    a = convolve(np.asarray(im), k)
    if rng.random() >= 0.5:
        return Image.fromarray(to_uint8(a))
    return jpeg_round_trip(Image.fromarray(to_uint8(sensor_noise(a, rng))), int(rng.integers(50, 96)))


def convolve(rgb: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The photo (H x W x 3) filtered with ``kernel``, borders reflected as the evaluation's Gaussian does; float32."""
    import cv2

    return cv2.filter2D(rgb.astype(np.float32), -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def sensor_noise(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``a`` (float32 pixels) plus the Gaussian noise of a camera sensor, 0-3 grey levels."""
    return a + rng.standard_normal(a.shape, dtype=np.float32) * rng.uniform(0.0, 3.0)


def to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(a, 0, 255).round().astype(np.uint8)


def jpeg_round_trip(im: Image.Image, quality: int) -> Image.Image:
    """The photo as a camera or a browser would hand it over: compressed to JPEG at ``quality`` and decoded."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _light_and_colour(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    from PIL import ImageEnhance

    im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.6, 1.4)))
    im = ImageEnhance.Contrast(im).enhance(float(rng.uniform(0.6, 1.4)))
    return ImageEnhance.Color(im).enhance(float(rng.uniform(0.6, 1.4)))


class PhotoDataset(torch.utils.data.Dataset):
    """Resize to size x size, random horizontal flip for training (the paper's augmentation), normalise.

    Randomness comes from (seed, epoch, index), not from worker state, so a run is reproducible with any
    number of DataLoader workers and after a resume. Unreadable photos yield None (dropped by ``collate``).
    """

    def __init__(self, items: list[dict], size: int, train: bool, seed: int = 0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 augment: str = "flip", as_uint8: bool = False):
        """``augment``: 'flip' (the paper's recipe) or 'store' (``store_augment``); only when ``train``. ``as_uint8``:
        photos as uint8 pixels, normalised on the device (training/feeding.py: as_model_input)."""
        self.items, self.size, self.train, self.seed, self.augment = items, size, train, seed, augment
        self.mean, self.std, self.as_uint8 = mean, std, as_uint8
        self.epoch = 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        """``i``: an index, or (epoch, index) from an EpochSampler (workers kept across epochs learn the epoch so)."""
        epoch, i = i if isinstance(i, tuple) else (self.epoch, i)
        item = self.items[i]
        im = load_rgb(item["path"])
        if im is None:
            return None
        flip = False
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, i])
            if self.augment == "store":
                im = store_augment(im, rng, size=self.size)
            else:
                flip = bool(rng.random() < 0.5)
        return to_tensor(im, self.size, flip, self.mean, self.std, self.as_uint8), item["label"]


def collate(batch):
    """Drop unreadable photos; report how many were dropped as the third element."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    return torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good]), skipped
