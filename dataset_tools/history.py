"""Bulk edits that can be undone: move, delete (to the catalogue's trash), set split, add or remove a tag.

Every edit is one transaction that also records, in the ``edits`` table, what it changed; ``undo(cat)`` reverses
the newest one exactly (rows, files, splits, tags). A deleted photo's file waits in ``trash/`` until its edit falls
out of the last ``KEEP_EDITS`` (``Catalogue.verify`` leaves such files alone). The tables are added on first use,
so older programs still open the catalogue.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from .catalogue import SPLITS, Catalogue, CatalogueError

KEEP_EDITS = 50
ROW_COLUMNS = ("id", "hash", "path", "product_id", "split", "source", "width", "height", "tags", "blur", "brightness",
               "warnings", "original_name", "created_at")


def _ensure_table(db) -> None:
    db.execute("""CREATE TABLE IF NOT EXISTS edits (
        id INTEGER PRIMARY KEY, kind TEXT NOT NULL, summary TEXT NOT NULL, payload TEXT NOT NULL, created_at TEXT NOT NULL)""")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _ids(image_ids) -> list[int]:
    ids = sorted({int(i) for i in image_ids})
    if not ids:
        raise CatalogueError("no photos selected")
    return ids


def _rows(db, ids) -> list[dict]:
    marks = ",".join("?" * len(ids))
    rows = [dict(zip(ROW_COLUMNS, r)) for r in db.execute(f"SELECT {', '.join(ROW_COLUMNS)} FROM images WHERE id IN ({marks})", ids)]
    missing = set(ids) - {r["id"] for r in rows}
    if missing:
        raise CatalogueError(f"no photo with id {min(missing)}")
    return rows


def _record(db, kind: str, summary: str, payload) -> None:
    _ensure_table(db)
    db.execute("INSERT INTO edits (kind, summary, payload, created_at) VALUES (?, ?, ?, ?)", [kind, summary, json.dumps(payload), _now()])
    db.execute("DELETE FROM edits WHERE id NOT IN (SELECT id FROM edits ORDER BY id DESC LIMIT ?)", [KEEP_EDITS])


def _set_column(cat: Catalogue, ids, column: str, value, kind: str, summary: str) -> str:
    """One column of the photos set to ``value`` in one transaction, its previous values recorded for undo."""
    with cat.transaction() as db:
        before = {r["id"]: r[column] for r in _rows(db, ids)}
        db.execute(f"UPDATE images SET {column} = ? WHERE id IN ({','.join('?' * len(ids))})", [value, *ids])
        _record(db, kind, summary, {"before": before})
    return summary


def move(cat: Catalogue, image_ids, product: str, create: bool = False) -> str:
    """Label the photos ``product`` (created first when ``create``); returns what was done."""
    ids = _ids(image_ids)
    if create:
        cat.add_product(product, exist_ok=True)
    return _set_column(cat, ids, "product_id", cat.product_id(product), "move", f"moved {len(ids)} photo(s) to “{product}”")


def set_split(cat: Catalogue, image_ids, split: str | None) -> str:
    if split is not None and split not in SPLITS:
        raise CatalogueError(f"split must be one of {', '.join(SPLITS)}")
    ids = _ids(image_ids)
    return _set_column(cat, ids, "split", split, "split", f"set {len(ids)} photo(s) to {split or 'no split'}")


def tag(cat: Catalogue, image_ids, add=(), remove=()) -> str:
    ids = _ids(image_ids)
    add = {str(t).strip().lower() for t in add if str(t).strip()}
    remove = {str(t).strip().lower() for t in remove if str(t).strip()}
    with cat.transaction() as db:
        before = {r["id"]: r["tags"] for r in _rows(db, ids)}
        for i, tags in before.items():
            db.execute("UPDATE images SET tags = ? WHERE id = ?", [json.dumps(sorted((set(json.loads(tags)) | add) - remove)), i])
        summary = f"tags of {len(ids)} photo(s): " + ", ".join([f"+{t}" for t in sorted(add)] + [f"-{t}" for t in sorted(remove)])
        _record(db, "tag", summary, {"before": before})
    return summary


def delete(cat: Catalogue, image_ids) -> str:
    """Rows out of the index, files into ``trash/``, both kept for ``undo``."""
    ids = _ids(image_ids)
    moved = []
    try:
        with cat.transaction() as db:
            rows = _rows(db, ids)
            for r in rows:
                src, dst = cat.root / r["path"], cat.root / "trash" / f"{r['id']}-{Path(r['path']).name}"
                if src.exists():
                    os.replace(src, dst)
                    moved.append((src, dst))
                r["trash"] = str(dst.relative_to(cat.root))
                r["product"] = None if r["product_id"] is None else db.execute(
                    "SELECT name FROM products WHERE id = ?", [r["product_id"]]).fetchone()[0]
            db.execute(f"DELETE FROM images WHERE id IN ({','.join('?' * len(ids))})", ids)
            summary = f"deleted {len(ids)} photo(s)"
            _record(db, "delete", summary, {"rows": rows})
    except BaseException:
        for src, dst in moved:  # the rows are still there: their files go back
            os.replace(dst, src)
        raise
    return summary


def last_edit(cat: Catalogue) -> dict | None:
    db = cat.db
    _ensure_table(db)
    r = db.execute("SELECT id, kind, summary, payload FROM edits ORDER BY id DESC LIMIT 1").fetchone()
    return None if r is None else {"id": r[0], "kind": r[1], "summary": r[2], "payload": json.loads(r[3])}


def undo(cat: Catalogue) -> str:
    """Reverse the newest edit; returns what was undone."""
    edit = last_edit(cat)
    if edit is None:
        raise CatalogueError("nothing to undo")
    restored = []
    try:
        with cat.transaction() as db:
            column = {"move": "product_id", "split": "split", "tag": "tags"}.get(edit["kind"])
            if column:
                for i, value in edit["payload"]["before"].items():
                    db.execute(f"UPDATE images SET {column} = ? WHERE id = ?", [value, int(i)])
            else:
                for r in edit["payload"]["rows"]:
                    restored.append(_restore_row(cat, db, r))
            db.execute("DELETE FROM edits WHERE id = ?", [edit["id"]])
    except BaseException:
        for photo, trash in restored:  # the rows did not come back: their files return to the trash
            os.replace(photo, trash)
        raise
    return f"undone: {edit['summary']}"


def _restore_row(cat: Catalogue, db, r: dict):
    if r["product"] is not None:
        db.execute("INSERT OR IGNORE INTO products (name, created_at) VALUES (?, ?)", [r["product"], _now()])
        r["product_id"] = db.execute("SELECT id FROM products WHERE name = ?", [r["product"]]).fetchone()[0]
    if db.execute("SELECT 1 FROM images WHERE hash = ?", [r["hash"]]).fetchone():
        raise CatalogueError(f"photo {r['id']} is in the catalogue again (added anew since): nothing to restore")
    db.execute(f"INSERT INTO images ({', '.join(ROW_COLUMNS)}) VALUES ({','.join('?' * len(ROW_COLUMNS))})",
               [r[c] for c in ROW_COLUMNS])
    trash, photo = cat.root / r["trash"], cat.root / r["path"]
    photo.parent.mkdir(parents=True, exist_ok=True)
    os.replace(trash, photo)
    return photo, trash


def trash_in_use(cat: Catalogue) -> set[str]:
    """Trash files an undoable delete still refers to (relative paths)."""
    db = cat.db
    _ensure_table(db)
    return {r["trash"] for (payload,) in db.execute("SELECT payload FROM edits WHERE kind = 'delete'")
            for r in json.loads(payload)["rows"]}
