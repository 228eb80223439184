"""The product catalogue: one directory = one SQLite index (WAL) + content-addressed image files.

    DIR/catalogue.db            products, images, meta (schema version)
    DIR/images/ab/<sha256>.jpg  photos, named by the hash of their pixels
    DIR/masks/ab/<sha256>.png   where the item lies in a photo, for photos cut out on the checkout counter
    DIR/tmp/                    files being written (renamed into images/ when complete)
    DIR/trash/                  files being deleted (removed once their row is gone)

Crash safety comes from ordering: a photo's file is complete (temp + fsync + rename) before its row is
inserted, and a deleted photo's file is moved to trash before its row goes. Whatever a crash interrupts,
``verify`` finds the leftovers and repairs them: an orphan file is re-registered as an unlabelled photo
(nothing is lost), a row whose file vanished is removed, temp and trash are emptied.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import re
import sqlite3
import threading
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sqlite_utils
from PIL import Image

from .imagefile import InvalidImage, prepare_image
from .quality import assess

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
SOURCES = ("webcam", "upload", "import", "recovered")
ENV_VAR = "NTS_CATALOGUE"


def default_dir() -> Path:
    return Path(os.environ.get(ENV_VAR, "data"))


class CatalogueError(ValueError):
    """A request the catalogue refuses; nothing was changed."""


class DuplicateImage(CatalogueError):
    def __init__(self, hash_: str, image_id: int, product: str | None):
        self.hash, self.image_id, self.product = hash_, image_id, product
        super().__init__(f"duplicate photo: already in the catalogue as image {image_id}" + (f" of {product!r}" if product else " (unlabelled)"))


@dataclass
class AddResult:
    image_id: int
    hash: str
    path: str
    width: int
    height: int
    warnings: list[str] = field(default_factory=list)


def _mask_png(mask, prepared) -> bytes:
    """The mask as a PNG of the stored photo's size; a mask of another shape than the photo is refused."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape != prepared.pixels.shape[:2]:
        raise CatalogueError(f"the item mask is {mask.shape}, the photo {prepared.pixels.shape[:2]}: they must match")
    buf = io.BytesIO()
    Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def clean_product_name(name: str) -> str:
    if not isinstance(name, str):
        raise CatalogueError("product name must be text")
    name = unicodedata.normalize("NFC", name).strip()
    name = re.sub(r"\s+", " ", name)
    if not name:
        raise CatalogueError("product name must not be empty")
    if len(name) > 200:
        raise CatalogueError("product name is longer than 200 characters")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise CatalogueError("product name contains control characters")
    return name


def safe_filename(name: str) -> str:
    """A folder/file name for free text: keeps letters of any script, replaces separators and specials."""
    name = unicodedata.normalize("NFC", name)
    name = re.sub(r'[\\/:*?"<>|\x00-\x1f]', "_", name).strip(" .")
    name = re.sub(r"_+", "_", name)
    if not name or name in (".", ".."):
        name = "_"
    return name[:120]


def atomic_replace(path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``, so nobody ever sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Catalogue:
    """Thread-safe handle to one catalogue directory (each thread gets its own SQLite connection)."""

    def __init__(self, root=None, create: bool = True):
        self.root = Path(root) if root is not None else default_dir()
        self.db_path = self.root / "catalogue.db"
        if not self.db_path.exists():
            if not create:
                raise CatalogueError(f"no catalogue at {self.root} (run: python -m dataset_tools --db {self.root} init)")
            self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("images", "tmp", "trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._ensure_schema()

    # ------------------------------------------------------------------ connections and transactions
    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.db_path, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA foreign_keys = ON")
            db = sqlite_utils.Database(conn)
            self._local.db = db
        return db

    def close(self):
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None

    @contextlib.contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE takes the write lock up front, so a writer waits (busy_timeout) instead of
        failing with 'database is locked' when it tries to upgrade a read lock mid-transaction."""
        conn = self.db.conn
        for attempt in range(20):
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                time.sleep(0.05 * (attempt + 1))
        else:
            raise CatalogueError("the catalogue is busy (another program is writing); try again")
        try:
            yield self.db
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def _ensure_schema(self):
        db = self.db
        db.conn.execute("PRAGMA journal_mode = WAL")
        with self.transaction():
            if "meta" not in db.table_names():
                db["meta"].create({"key": str, "value": str}, pk="key")
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise CatalogueError(f"catalogue {self.root} has schema {version}, newer than this program ({SCHEMA_VERSION}); upgrade")
            if version < 1:
                self._migrate_to_1(db)
            db["meta"].upsert({"key": "schema_version", "value": str(SCHEMA_VERSION)}, pk="key")

    @staticmethod
    def _migrate_to_1(db):
        db.execute("""
            CREATE TABLE IF NOT EXISTS products (
                id INTEGER PRIMARY KEY,
                name TEXT NOT NULL UNIQUE COLLATE NOCASE,
                sku TEXT,
                description TEXT,
                group_name TEXT,
                created_at TEXT NOT NULL
            )""")
        db.execute("""
            CREATE TABLE IF NOT EXISTS images (
                id INTEGER PRIMARY KEY,
                hash TEXT NOT NULL UNIQUE,
                path TEXT NOT NULL,
                product_id INTEGER REFERENCES products(id),
                split TEXT CHECK (split IN ('train', 'val', 'test')),
                source TEXT NOT NULL,
                width INTEGER NOT NULL,
                height INTEGER NOT NULL,
                tags TEXT NOT NULL DEFAULT '[]',
                blur REAL,
                brightness REAL,
                warnings TEXT NOT NULL DEFAULT '[]',
                original_name TEXT,
                created_at TEXT NOT NULL
            )""")
        db.execute("CREATE INDEX IF NOT EXISTS images_product ON images(product_id, split)")

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    # ------------------------------------------------------------------------------------- products
    def add_product(self, name: str, sku: str | None = None, description: str | None = None, group: str | None = None, exist_ok: bool = False) -> int:
        name = clean_product_name(name)
        existing = self.product_id(name, missing_ok=True)
        if existing is not None:
            if exist_ok:
                return existing
            raise CatalogueError(f"product {name!r} already exists")
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO products (name, sku, description, group_name, created_at) VALUES (?, ?, ?, ?, ?)",
                    [name, sku or None, description or None, group or None, _now()],
                )
                return db.execute("SELECT id FROM products WHERE name = ?", [name]).fetchone()[0]
        except sqlite3.IntegrityError:
            if exist_ok:  # another writer created it meanwhile
                return self.product_id(name)
            raise CatalogueError(f"product {name!r} already exists") from None

    def product_id(self, name: str, missing_ok: bool = False) -> int | None:
        row = self.db.execute("SELECT id FROM products WHERE name = ?", [clean_product_name(name)]).fetchone()
        if row is None:
            if missing_ok:
                return None
            raise CatalogueError(f"no product named {name!r}")
        return row[0]

    def products(self) -> list[dict]:
        """Every product with its photo counts per split, in name order."""
        rows = self.db.execute("""
            SELECT p.id, p.name, p.sku, p.description, p.group_name, p.created_at,
                   COUNT(i.id),
                   SUM(i.split = 'train'), SUM(i.split = 'val'), SUM(i.split = 'test'), SUM(i.split IS NULL AND i.id IS NOT NULL)
            FROM products p LEFT JOIN images i ON i.product_id = p.id
            GROUP BY p.id ORDER BY p.name COLLATE NOCASE""").fetchall()
        keys = ("id", "name", "sku", "description", "group", "created_at", "images", "train", "val", "test", "unassigned")
        return [{k: (v or 0) if k in keys[6:] else v for k, v in zip(keys, r)} for r in rows]

    def rename_product(self, old: str, new: str) -> None:
        pid = self.product_id(old)
        new = clean_product_name(new)
        other = self.product_id(new, missing_ok=True)
        if other is not None and other != pid:
            raise CatalogueError(f"product {new!r} already exists (use merge to combine them)")
        with self.transaction() as db:
            db.execute("UPDATE products SET name = ? WHERE id = ?", [new, pid])

    def update_product(self, name: str, sku: str | None = None, description: str | None = None, group: str | None = None) -> None:
        pid = self.product_id(name)
        with self.transaction() as db:
            for col, val in (("sku", sku), ("description", description), ("group_name", group)):
                if val is not None:
                    db.execute(f"UPDATE products SET {col} = ? WHERE id = ?", [val or None, pid])

    def merge_products(self, source: str, target: str) -> int:
        """Move every photo of ``source`` to ``target`` and remove ``source``; returns photos moved."""
        sid, tid = self.product_id(source), self.product_id(target)
        if sid == tid:
            raise CatalogueError("cannot merge a product into itself")
        with self.transaction() as db:
            moved = db.execute("UPDATE images SET product_id = ? WHERE product_id = ?", [tid, sid]).rowcount
            db.execute("DELETE FROM products WHERE id = ?", [sid])
        return moved

    def delete_product(self, name: str, confirm: bool = False) -> int:
        """Delete a product and its photos. Requires ``confirm=True``: photos cannot be brought back."""
        pid = self.product_id(name)
        ids = [r[0] for r in self.db.execute("SELECT id FROM images WHERE product_id = ?", [pid])]
        if not confirm:
            raise CatalogueError(f"deleting {name!r} removes {len(ids)} photos; confirm to proceed")
        self.delete_images(ids, _also_product=pid)
        return len(ids)

    # --------------------------------------------------------------------------------------- images
    def _file_for(self, hash_: str, ext: str) -> Path:
        return Path("images") / hash_[:2] / f"{hash_}{ext}"

    @staticmethod
    def _mask_for(hash_: str) -> Path:
        return Path("masks") / hash_[:2] / f"{hash_}.png"

    def mask(self, image: dict) -> np.ndarray | None:
        """The photo's item mask (bool, the photo's size), or None where the photo has none."""
        path = self.root / self._mask_for(image["hash"])
        if not path.exists():
            return None
        with Image.open(path) as im:
            return np.asarray(im.convert("L")) > 127

    def _write_file(self, rel: Path, data: bytes) -> None:
        final = self.root / rel
        if final.exists() and final.stat().st_size == len(data):
            return  # same content, already complete (content-addressed)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "tmp" / f"{uuid.uuid4().hex}.part"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)

    def find_hash(self, hash_: str) -> dict | None:
        row = self.db.execute(
            "SELECT i.id, p.name FROM images i LEFT JOIN products p ON p.id = i.product_id WHERE i.hash = ?", [hash_]
        ).fetchone()
        return None if row is None else {"id": row[0], "product": row[1]}

    def add_image(self, source, product: str | None = None, split: str | None = None, source_kind: str = "upload",
                  tags=(), original_name: str | None = None, create_product: bool = False, mask=None) -> AddResult:
        """Validate, normalise, store and index one photo. Raises InvalidImage / DuplicateImage / CatalogueError.
        ``mask``: an H x W array, true where the item lies (a checkout-counter cut-out), stored beside the photo."""
        if split is not None and split not in SPLITS:
            raise CatalogueError(f"split must be one of {SPLITS}, not {split!r}")
        if source_kind not in SOURCES:
            raise CatalogueError(f"source must be one of {SOURCES}")
        tags = sorted({str(t).strip().lower() for t in tags if str(t).strip()})
        pid = None
        if product is not None:
            pid = self.add_product(product, exist_ok=True) if create_product else self.product_id(product)
        prepared = prepare_image(source)
        dup = self.find_hash(prepared.hash)
        if dup:
            raise DuplicateImage(prepared.hash, dup["id"], dup["product"])
        quality = assess(prepared.pixels)
        mask_png = None if mask is None else _mask_png(mask, prepared)
        rel = self._file_for(prepared.hash, prepared.ext)
        if mask_png is not None:
            self._write_file(self._mask_for(prepared.hash), mask_png)
        self._write_file(rel, prepared.data)  # 1) the file is complete on disk ...
        try:
            image_id = self._insert_image_row(prepared, rel, pid, split, source_kind, tags, quality, original_name)  # 2) ... then the row
        except sqlite3.IntegrityError:
            dup = self.find_hash(prepared.hash)  # a concurrent writer stored the same photo first
            raise DuplicateImage(prepared.hash, dup["id"] if dup else -1, dup["product"] if dup else None) from None
        return AddResult(image_id, prepared.hash, str(rel), prepared.width, prepared.height, quality.warnings)

    def _insert_image_row(self, prepared, rel, pid, split, source_kind, tags, quality, original_name) -> int:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO images (hash, path, product_id, split, source, width, height, tags, blur, brightness, warnings, original_name, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [prepared.hash, str(rel), pid, split, source_kind, prepared.width, prepared.height, json.dumps(tags),
                 quality.blur, quality.brightness, json.dumps(quality.warnings), original_name, _now()],
            )
            return cur.lastrowid

    def images(self, product: str | None = None, split: str | None = None, unlabelled: bool = False, limit: int | None = None, offset: int = 0) -> list[dict]:
        sql = ["SELECT i.id, i.hash, i.path, p.name, i.split, i.source, i.width, i.height, i.tags, i.blur, i.brightness, i.warnings, i.original_name, i.created_at, p.group_name",
               "FROM images i LEFT JOIN products p ON p.id = i.product_id WHERE 1=1"]
        args: list = []
        if product is not None:
            sql.append("AND i.product_id = ?")
            args.append(self.product_id(product))
        if unlabelled:
            sql.append("AND i.product_id IS NULL")
        if split is not None:
            if split not in SPLITS:
                raise CatalogueError(f"split must be one of {SPLITS}")
            sql.append("AND i.split = ?")
            args.append(split)
        sql.append("ORDER BY i.id")
        if limit is not None:
            sql.append("LIMIT ? OFFSET ?")
            args += [int(limit), int(offset)]
        keys = ("id", "hash", "path", "product", "split", "source", "width", "height", "tags", "blur", "brightness", "warnings", "original_name", "created_at", "group")
        out = []
        for r in self.db.execute(" ".join(sql), args):
            d = dict(zip(keys, r))
            d["tags"] = json.loads(d["tags"])
            d["warnings"] = json.loads(d["warnings"])
            out.append(d)
        return out

    def image_path(self, image: dict | str) -> Path:
        return self.root / (image["path"] if isinstance(image, dict) else image)

    def move_images(self, image_ids, product: str | None) -> int:
        """Relabel photos (``product=None`` makes them unlabelled)."""
        pid = self.product_id(product) if product is not None else None
        ids = [int(i) for i in image_ids]
        with self.transaction() as db:
            return sum(db.execute("UPDATE images SET product_id = ? WHERE id = ?", [pid, i]).rowcount for i in ids)

    def set_tags(self, image_ids, tags) -> None:
        tags = json.dumps(sorted({str(t).strip().lower() for t in tags if str(t).strip()}))
        with self.transaction() as db:
            for i in image_ids:
                db.execute("UPDATE images SET tags = ? WHERE id = ?", [tags, int(i)])

    def delete_images(self, image_ids, _also_product: int | None = None) -> int:
        ids = [int(i) for i in image_ids]
        rows = []
        for i in ids:
            r = self.db.execute("SELECT id, path FROM images WHERE id = ?", [i]).fetchone()
            if r is None:
                raise CatalogueError(f"no image with id {i}")
            rows.append(r)
        moved = []
        try:
            for image_id, rel in rows:  # 1) files to trash (a crash now leaves rows without files: verify drops them)
                src = self.root / rel
                if src.exists():
                    dst = self.root / "trash" / f"{image_id}-{Path(rel).name}"
                    os.replace(src, dst)
                    moved.append((dst, src))
            with self.transaction() as db:  # 2) rows
                for image_id, _ in rows:
                    db.execute("DELETE FROM images WHERE id = ?", [image_id])
                if _also_product is not None:
                    db.execute("DELETE FROM products WHERE id = ?", [_also_product])
        except BaseException:
            for dst, src in moved:  # the rows are still there: put their files back
                os.replace(dst, src)
            raise
        for dst, _ in moved:  # 3) forget the files
            dst.unlink(missing_ok=True)
        return len(rows)

    def set_splits(self, assignments: dict[int, str | None]) -> None:
        with self.transaction() as db:
            for image_id, split in assignments.items():
                db.execute("UPDATE images SET split = ? WHERE id = ?", [split, int(image_id)])

    # ------------------------------------------------------------------------------ stats and verify
    def stats(self) -> dict:
        products = self.products()
        per_split = {s: 0 for s in SPLITS}
        per_split["unassigned"] = 0
        for p in products:
            for s in per_split:
                per_split[s] += p[s]
        unlabelled = self.db.execute("SELECT COUNT(*) FROM images WHERE product_id IS NULL").fetchone()[0]
        warn_counts = dict(self.db.execute(
            "SELECT j.value, COUNT(*) FROM images, json_each(images.warnings) AS j GROUP BY j.value ORDER BY j.value").fetchall())
        flagged = [{"id": i, "product": p, "warnings": json.loads(w)} for i, p, w in self.db.execute(
            "SELECT i.id, p.name, i.warnings FROM images i LEFT JOIN products p ON p.id = i.product_id"
            " WHERE i.warnings != '[]' ORDER BY i.id DESC LIMIT 200")]
        return {
            "root": str(self.root),
            "schema_version": self.schema_version,
            "products": len(products),
            "images": self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0],
            "unlabelled": unlabelled,
            "per_split": per_split,
            "per_product": {p["name"]: {k: p[k] for k in ("images", "train", "val", "test", "unassigned")} for p in products},
            "quality_warnings": warn_counts,
            "flagged_images": flagged,  # the 200 most recent
        }

    def verify(self, repair: bool = True) -> dict:
        """Find (and by default repair) inconsistencies between the index and the files."""
        report = {"missing_files": [], "orphan_files": [], "temp_files": 0, "trash_files": 0}
        known = {}
        for image_id, rel in self.db.execute("SELECT id, path FROM images"):
            known[rel] = image_id
            if not (self.root / rel).exists():
                report["missing_files"].append({"id": image_id, "path": rel})
        on_disk = [p for p in (self.root / "images").rglob("*") if p.is_file()]
        for p in on_disk:
            rel = str(p.relative_to(self.root))
            if rel not in known:
                report["orphan_files"].append(rel)
        from .history import trash_in_use  # files an undoable delete still needs

        keep = trash_in_use(self)
        tmp_files = list((self.root / "tmp").iterdir())
        trash_files = [p for p in (self.root / "trash").iterdir() if str(p.relative_to(self.root)) not in keep]
        report["temp_files"], report["trash_files"] = len(tmp_files), len(trash_files)
        hashes = {h for (h,) in self.db.execute("SELECT hash FROM images")}
        hashes |= {Path(t).stem.split("-", 1)[-1] for t in keep}  # an undone delete brings its mask back
        masks = [p for p in (self.root / "masks").rglob("*.png") if p.stem not in hashes]  # none: no folder yet
        report["orphan_masks"] = len(masks)
        if repair:
            if report["missing_files"]:
                with self.transaction() as db:
                    for m in report["missing_files"]:
                        db.execute("DELETE FROM images WHERE id = ?", [m["id"]])
            recovered = []
            for rel in report["orphan_files"]:
                path = self.root / rel
                try:  # a complete file whose row never got written: keep the photo, unlabelled
                    res = self.add_image(path.read_bytes(), source_kind="recovered", original_name=path.name)
                    if res.path != rel:
                        path.unlink(missing_ok=True)
                    recovered.append(res.image_id)
                except DuplicateImage:
                    path.unlink(missing_ok=True)
                except InvalidImage:
                    path.unlink(missing_ok=True)
            report["recovered_image_ids"] = recovered
            for p in tmp_files + trash_files + masks:
                p.unlink(missing_ok=True)
        report["ok"] = not any(report[k] for k in ("missing_files", "orphan_files", "temp_files", "trash_files", "orphan_masks"))
        report["repaired"] = repair
        return report
