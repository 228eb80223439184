"""The label review of a catalogue: its photos' embeddings, capture sessions and earlier answers, fed to
dataset_tools/review.py; and the answers a person gives, remembered so that a "keep" is not asked again.

Only ``catalogue_embeddings`` loads model code (the instant model's embedder, or a trained checkpoint's backbone).
"""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from .catalogue import Catalogue
from .review import ReviewReport, find_sessions, review

ANSWERS = ("accept", "keep", "delete", "skip")


def _ensure_table(db) -> None:
    db.execute("""CREATE TABLE IF NOT EXISTS review_answers (
        image_id INTEGER NOT NULL, kind TEXT NOT NULL, answer TEXT NOT NULL, product TEXT, created_at TEXT NOT NULL,
        PRIMARY KEY (image_id, kind))""")


def remember(cat: Catalogue, image_ids, kind: str, answer: str, product: str | None) -> None:
    """A person's answer about these photos for this kind of suspicion (the product they had then)."""
    if answer not in ANSWERS:
        raise ValueError(f"answer must be one of {', '.join(ANSWERS)}")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with cat.transaction() as db:
        _ensure_table(db)
        for i in image_ids:
            db.execute("INSERT OR REPLACE INTO review_answers VALUES (?, ?, ?, ?, ?)", [int(i), kind, answer, product, now])


def kept(cat: Catalogue) -> set[tuple[int, str]]:
    """(photo, kind) pairs answered "keep" while the photo had the product it has now; keeping a label answers
    every suspicion about that label (wrong label, wrong session, duplicate under another product)."""
    db = cat.db
    _ensure_table(db)
    rows = db.execute("""SELECT a.image_id, a.kind FROM review_answers a JOIN images i ON i.id = a.image_id
                         LEFT JOIN products p ON p.id = i.product_id
                         WHERE a.answer = 'keep' AND COALESCE(p.name, '') = COALESCE(a.product, '')""").fetchall()
    label_kinds = ("wrong-label", "session", "duplicate")  # a label confirmed once is confirmed for all of these
    return {(int(i), k2) for i, k in rows for k2 in (label_kinds if k in label_kinds else (k,))}


def photo_rows(cat: Catalogue) -> list[dict]:
    """Every photo in capture order: id, path, product (None: unlabelled), source, split, created_at, tags."""
    return [{k: img[k] for k in ("id", "path", "product", "source", "split", "created_at", "tags")} for img in cat.images()]


def catalogue_embeddings(cat: Catalogue, rows: list[dict], checkpoint: str | None = None, progress=None) -> np.ndarray:
    """(N, D) unit embeddings of ``rows``: the instant model's (cached in the catalogue, computed for new photos), or
    with ``checkpoint`` the trained model's backbone features at its input size."""
    if checkpoint:
        return _model_embeddings(cat, rows, checkpoint)
    from ntsnet.instant import InstantRecogniser

    instant = InstantRecogniser(cat)
    instant.sync(progress=progress)
    have = instant.index.embeddings
    missing = [r for r in rows if r["id"] not in have]  # unlabelled photos: not in the index
    extra = dict(zip([r["id"] for r in missing], instant.embedder([cat.image_path(r) for r in missing]))) if missing else {}
    return np.stack([have[r["id"]] if r["id"] in have else extra[r["id"]] for r in rows]).astype(np.float32)


def _model_embeddings(cat: Catalogue, rows, checkpoint: str) -> np.ndarray:
    import torch

    from ntsnet.checkpoint import build_model, load_checkpoint
    from ntsnet.device import resolve_device
    from training.features import pooled_features

    from ntsnet.images import read_in_batches

    ckpt = load_checkpoint(checkpoint)
    backbone = build_model(ckpt).backbone.eval().to(resolve_device("auto"))
    out = []
    for chunk in read_in_batches([cat.image_path(r) for r in rows], 64, read=lambda path: np.asarray(_rgb(path))):
        out.append(pooled_features(backbone, [arr for _, arr in chunk], ckpt.config.input_size))
    feats = torch.cat(out).numpy()
    return feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12)


def _rgb(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def review_catalogue(cat: Catalogue, checkpoint: str | None = None, embeddings: np.ndarray | None = None,
                     rows: list[dict] | None = None) -> tuple[ReviewReport, list[dict], np.ndarray]:
    """The review of the whole catalogue, without the suspicions a person already answered "keep" to; returns the
    report, the photo rows and their embeddings (for "more like this" and the map)."""
    rows = rows if rows is not None else photo_rows(cat)
    if embeddings is None:
        embeddings = catalogue_embeddings(cat, rows, checkpoint) if rows else np.zeros((0, 1), np.float32)
    products = sorted({r["product"] for r in rows if r["product"]})
    index = {p: i for i, p in enumerate(products)}
    labels = [index[r["product"]] if r["product"] else -1 for r in rows]
    report = review(embeddings, labels, [r["id"] for r in rows], products, find_sessions(rows),
                    splits=[r["split"] for r in rows], skip=kept(cat))
    return report, rows, embeddings
