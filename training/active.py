"""Which trained model answers in Recognise: CATALOGUE/active_model.json, shared by the app and training jobs.

A training job proposes each stage's model with its validation accuracy; it becomes the active model only
if it is at least as accurate as the one it would replace, measured on the same photos (ties go to the newer
model), and never while a person has pinned a model. Written atomically, so the app (another process) reads
either the old or the new choice.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ntsnet.checkpoint import atomic_write

FILE = "active_model.json"


def read(db) -> dict:
    try:
        data = json.loads((Path(db) / FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("checkpoint") else {}


def write(db, checkpoint: str, **info) -> dict:
    data = {"checkpoint": str(checkpoint), "since": time.time(), **info}
    atomic_write(Path(db) / FILE, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))
    return data


def short_name(checkpoint: str) -> str:
    """A name for people: 'run-20261127-1605 / finetune' rather than a file path."""
    if str(checkpoint).startswith("hf://"):
        return str(checkpoint)[5:]
    p = Path(str(checkpoint))
    stem = p.stem.split("-", 1)[-1] if p.stem.startswith("stage") else p.stem
    return f"{p.parent.name} / {stem}" if p.parent.name else stem


def propose(db, checkpoint, val_acc: float, baseline_acc: float, **info) -> tuple[bool, str]:
    """Make ``checkpoint`` active if it is at least as accurate as ``baseline_acc`` (the accuracy, on the same
    validation photos, of whatever answers now) and nothing is pinned. Returns (switched, why)."""
    current = read(db)
    if current.get("pinned"):
        return False, f"kept the pinned model {short_name(current['checkpoint'])}"
    if val_acc < baseline_acc:
        return False, f"not better than the model answering now ({val_acc:.1%} < {baseline_acc:.1%})"
    write(db, str(checkpoint), val_acc=val_acc, name=short_name(checkpoint), **info)
    return True, f"active now ({val_acc:.1%} >= {baseline_acc:.1%})"
