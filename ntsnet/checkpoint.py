"""Self-describing checkpoints: one ``.safetensors`` file holding the weights, the config and the class names.

safetensors stores raw tensors plus a JSON header, so loading never unpickles anything. A SHA-256 of the
tensor data sits in the header: a flipped byte, a truncated file or a swapped tensor fails loudly instead
of quietly giving a broken model.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import NTSConfig

FORMAT = "ntsnet-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """The file is not a usable NTS-Net checkpoint; the message says why."""


@dataclass
class Checkpoint:
    config: NTSConfig
    class_names: list[str]
    state_dict: dict[str, torch.Tensor]
    extra: dict = field(default_factory=dict)  # metrics, training data size, threshold ... (JSON-able)
    sha256: str = ""                            # of the tensors: identifies the weights (compiled-export cache key)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path, model: torch.nn.Module, class_names, extra: dict | None = None) -> Path:
    config: NTSConfig = model.config
    class_names = [str(c) for c in class_names]
    if len(class_names) != config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {config.num_classes} classes")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config.to_dict()),
        "class_names": json.dumps(class_names, ensure_ascii=False),
        "extra": json.dumps(extra or {}),
        "sha256": _digest(tensors),
    }
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def _read_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata() or {}


def load_checkpoint(path) -> Checkpoint:
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise CheckpointError(f"{path} is a folder with {len(candidates)} .safetensors files; pass the file itself")
        path = candidates[0]
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        meta = _read_metadata(path)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt?): {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not an NTS-Net checkpoint (no '{FORMAT}' header)")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer version (format {meta['format_version']}); upgrade ntsnet")
    if meta.get("sha256") != _digest(tensors):
        raise CheckpointError(f"{path} failed its integrity check: the weights were modified or damaged")
    try:
        config = NTSConfig.from_dict(json.loads(meta["config"]))
        class_names = json.loads(meta["class_names"])
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has a damaged header: {exc}") from None
    if len(class_names) != config.num_classes:
        raise CheckpointError(f"{path}: {len(class_names)} class names but the config says {config.num_classes} classes")
    return Checkpoint(config, class_names, tensors, extra, meta["sha256"])


def upgrade_state_dict(backbone: str, state: dict) -> dict:
    """Weights saved before the backbones came from timm: EfficientNet-Lite's parameters renamed to timm's
    (nothing a user trained is lost); any other state passes unchanged."""
    old = ".net._blocks."
    if not backbone.startswith("efficientnet_lite") or not any(old in k for k in state):
        return state
    from .backbones import lite_key_map

    names = lite_key_map(int(backbone[-1]))
    out = {}
    for key, value in state.items():
        head, sep, tail = key.partition(".net.")
        out[head + sep + names[tail] if sep and head.endswith("features") and tail in names else key] = value
    return out


def build_model(ckpt: Checkpoint):
    """Instantiate the architecture the checkpoint describes and load its weights strictly."""
    from .model import create_model

    model = create_model(ckpt.config, pretrained=False)  # the checkpoint's weights replace any pretrained ones
    try:
        model.load_state_dict(upgrade_state_dict(ckpt.config.backbone, ckpt.state_dict), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"weights do not fit the described architecture (backbone {ckpt.config.backbone!r}): {first} ..."
        ) from None
    return model
