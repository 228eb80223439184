"""Deterministic, stratified train/val/test assignment that stays stable as new photos arrive.

Per product, the target share of each split follows the ratios; photos that already have a split keep it
(unless ``reset``), and each new photo goes to the split furthest below its target, in an order fixed by a
seeded hash of the photo's content. A product with one or two photos puts them all in train, and any product
keeps at least one training photo, so every product can be learned.
"""
from __future__ import annotations

import hashlib

from .catalogue import SPLITS, Catalogue, CatalogueError

MIN_FOR_HOLDOUT = 3


def _order_key(seed: int, image_hash: str) -> str:
    return hashlib.sha256(f"{seed}:{image_hash}".encode()).hexdigest()


def targets(n: int, val: float, test: float) -> dict[str, int]:
    if n < MIN_FOR_HOLDOUT:
        return {"train": n, "val": 0, "test": 0}
    n_val, n_test = int(round(n * val)), int(round(n * test))
    while n_val + n_test > n - 1:  # keep at least one training photo
        if n_test >= n_val and n_test:
            n_test -= 1
        else:
            n_val -= 1
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def assign_splits(cat: Catalogue, val: float = 0.15, test: float = 0.15, seed: int = 0, reset: bool = False,
                  product: str | None = None) -> dict:
    """``product``: only that product's photos (what one new capture needs: cheap at any catalogue size)."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise CatalogueError("ratios must satisfy 0 <= val, test and val + test < 1")
    changes: dict[int, str] = {}
    if product is not None:
        rows = cat.db.execute("SELECT id, hash, product_id, split FROM images WHERE product_id = ?", [cat.product_id(product)]).fetchall()
    else:
        rows = cat.db.execute("SELECT id, hash, product_id, split FROM images WHERE product_id IS NOT NULL").fetchall()
    by_product: dict[int, list] = {}
    for r in rows:
        by_product.setdefault(r[2], []).append(r)
    for members in by_product.values():
        want = targets(len(members), val, test)
        have = {s: 0 for s in SPLITS}
        pending = []
        for image_id, h, _, split in members:
            if split and not reset:
                have[split] += 1
            else:
                pending.append((image_id, h, split))
        pending.sort(key=lambda m: _order_key(seed, m[1]))
        for image_id, _, old in pending:
            # the split with the largest shortfall relative to its target (ties: train, val, test)
            split = max(SPLITS, key=lambda s: (want[s] - have[s], -SPLITS.index(s)))
            have[split] += 1
            if split != old:
                changes[image_id] = split
    if changes:
        cat.set_splits(changes)
    if product is not None:
        return {"changed": len(changes)}
    counts = {s: 0 for s in SPLITS}
    for (s, n) in cat.db.execute("SELECT split, COUNT(*) FROM images WHERE product_id IS NOT NULL GROUP BY split"):
        if s in counts:
            counts[s] = n
    return {"changed": len(changes), **counts}
