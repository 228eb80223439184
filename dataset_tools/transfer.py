"""Getting photos in (folder tree, zip, list file) and out (folder tree, zip, CSV manifest).

An import never stops at a bad file: it is counted under 'rejected' with its reason and the rest go on.
"""
from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from .catalogue import SPLITS, Catalogue, CatalogueError, DuplicateImage, atomic_replace, safe_filename
from .imagefile import InvalidImage

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


@dataclass
class ImportSummary:
    added: int = 0
    duplicates: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)
    products_created: int = 0
    warnings: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"added": self.added, "duplicates": self.duplicates, "rejected": len(self.rejected),
                "rejected_items": [{"item": i, "reason": r} for i, r in self.rejected],
                "products_created": self.products_created, "quality_warnings": self.warnings}

    def __str__(self) -> str:
        lines = [f"added {self.added}, duplicates {self.duplicates}, rejected {len(self.rejected)}, new products {self.products_created}"]
        lines += [f"  rejected {i}: {r}" for i, r in self.rejected[:20]]
        if len(self.rejected) > 20:
            lines.append(f"  ... and {len(self.rejected) - 20} more")
        if self.warnings:
            lines.append("  quality warnings: " + ", ".join(f"{k} {v}" for k, v in sorted(self.warnings.items())))
        return "\n".join(lines)


def _import_items(cat: Catalogue, items, split, desc, progress=True, groups=None) -> ImportSummary:
    """items: list of (label, product, read_bytes callable)."""
    if split is not None and split not in SPLITS:
        raise CatalogueError(f"split must be one of {SPLITS}")
    summary = ImportSummary()
    known = {p["name"].lower() for p in cat.products()}
    for label, product, read in tqdm(items, desc=desc, unit="img", disable=not progress):
        try:
            if product.lower() not in known:
                cat.add_product(product, group=(groups or {}).get(product), exist_ok=True)
                known.add(product.lower())
                summary.products_created += 1
            res = cat.add_image(read(), product=product, split=split, source_kind="import", original_name=PurePosixPath(label).name)
            summary.added += 1
            for w in res.warnings:
                summary.warnings[w] = summary.warnings.get(w, 0) + 1
        except DuplicateImage:
            summary.duplicates += 1
        except (InvalidImage, CatalogueError, OSError) as exc:
            summary.rejected.append((label, str(exc)))
    return summary


def import_folder(cat: Catalogue, folder, split=None, progress=True) -> ImportSummary:
    """One sub-folder per product; photos anywhere below it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CatalogueError(f"{folder} is not a folder")
    items = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(sub.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                items.append((str(f.relative_to(folder)), sub.name, f.read_bytes))
    if not items:
        raise CatalogueError(f"{folder} has no product sub-folders with files")
    return _import_items(cat, items, split, f"import {folder.name}", progress)


def import_zip(cat: Catalogue, zip_path, split=None, progress=True) -> ImportSummary:
    """A zip of a product-folder tree (optionally under one top folder). Members are read, never extracted."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CatalogueError(f"{zip_path}: not a readable zip ({exc})") from None
    with zf:
        names = [n for n in zf.namelist() if not n.endswith("/") and "__MACOSX" not in n and not PurePosixPath(n).name.startswith(".")]
        parts = [PurePosixPath(n).parts for n in names]
        # strip one shared top folder ("export/red-box/x.jpg" -> "red-box/x.jpg")
        if parts and all(len(p) >= 3 for p in parts) and len({p[0] for p in parts}) == 1:
            parts = [p[1:] for p in parts]
        items = []
        for name, p in zip(names, parts):
            if len(p) < 2:
                continue  # a loose file has no product folder
            items.append((name, p[0], (lambda n=name: zf.read(n))))
        if not items:
            raise CatalogueError(f"{zip_path} has no product folders")
        return _import_items(cat, items, split, f"import {Path(zip_path).name}", progress)


def read_classes_csv(path) -> dict[int, tuple[str, str | None]]:
    """classes.csv of the grocery-store format: fine class id -> (name, coarse name)."""
    out = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise CatalogueError(f"{path} is empty")
        for row in reader:
            if len(row) >= 2 and row[1].strip().lstrip("-").isdigit():
                out[int(row[1])] = (row[0].strip(), row[2].strip() if len(row) > 2 and row[2].strip() else None)
    if not out:
        raise CatalogueError(f"{path} has no class rows (expected: name, id, coarse name, ...)")
    return out


def import_list(cat: Catalogue, list_path, classes_csv=None, split=None, progress=True) -> ImportSummary:
    """Lines 'relative/path.jpg, fine_label, coarse_label'; names from classes.csv (found beside the list by default)."""
    list_path = Path(list_path)
    base = list_path.parent
    classes_csv = Path(classes_csv) if classes_csv else base / "classes.csv"
    classes = read_classes_csv(classes_csv) if classes_csv.exists() else {}
    if split is None and list_path.stem in SPLITS:
        split = list_path.stem  # train.txt -> train
    items, groups, bad = [], {}, []
    for n, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 2 or not fields[1].lstrip("-").isdigit():
            bad.append((f"{list_path.name}:{n}", "malformed line (expected: path, fine_label[, coarse_label])"))
            continue
        fine = int(fields[1])
        name, coarse = classes.get(fine, (f"class-{fine}", None))
        if coarse:
            groups[name] = coarse
        path = base / fields[0]
        items.append((fields[0], name, path.read_bytes))
    summary = _import_items(cat, items, split, f"import {list_path.name}", progress, groups=groups)
    summary.rejected = bad + summary.rejected
    return summary


def import_path(cat: Catalogue, path, split=None, classes_csv=None, progress=True) -> ImportSummary:
    path = Path(path)
    if path.is_dir():
        return import_folder(cat, path, split, progress)
    if path.suffix.lower() == ".zip":
        return import_zip(cat, path, split, progress)
    if path.suffix.lower() in (".txt", ".lst", ".list"):
        return import_list(cat, path, classes_csv, split, progress)
    if not path.exists():
        raise CatalogueError(f"{path}: no such file or folder")
    raise CatalogueError(f"{path}: import takes a folder, a .zip or a list file (.txt)")


# ------------------------------------------------------------------------------------------- export
MANIFEST_FIELDS = ["file", "product", "sku", "group", "split", "hash", "source", "width", "height", "tags", "warnings"]


def _export_rows(cat: Catalogue, split=None):
    products = {p["name"]: p for p in cat.products()}
    folders: dict[str, str] = {}
    used: set[str] = set()
    for img in cat.images(split=split):
        if img["product"] is None:
            continue  # unlabelled photos have no class folder
        name = img["product"]
        if name not in folders:
            folder = safe_filename(name)
            if folder.lower() in used:
                folder = f"{folder}-{products[name]['id']}"
            used.add(folder.lower())
            folders[name] = folder
        rel = f"{folders[name]}/{img['hash'][:16]}{Path(img['path']).suffix}"
        yield rel, img, products[name]


def _manifest_row(rel, img, prod) -> dict:
    return {"file": rel, "product": img["product"], "sku": prod["sku"] or "", "group": prod["group"] or "", "split": img["split"] or "",
            "hash": img["hash"], "source": img["source"], "width": img["width"], "height": img["height"],
            "tags": ";".join(img["tags"]), "warnings": ";".join(img["warnings"])}


def export(cat: Catalogue, out, fmt: str = "folder", split=None, progress=True) -> dict:
    """Write class sub-folders (or a zip of them) plus manifest.csv; returns counts."""
    out = Path(out)
    rows = list(_export_rows(cat, split))
    if fmt == "zip":
        def write_zip(tmp):
            buf = io.StringIO()
            writer = csv.DictWriter(buf, MANIFEST_FIELDS)
            writer.writeheader()
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                for rel, img, prod in tqdm(rows, desc="export", unit="img", disable=not progress):
                    zf.write(cat.image_path(img), rel)
                    writer.writerow(_manifest_row(rel, img, prod))
                zf.writestr("manifest.csv", buf.getvalue())
        atomic_replace(out, write_zip)
    elif fmt == "folder":
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, MANIFEST_FIELDS)
            writer.writeheader()
            for rel, img, prod in tqdm(rows, desc="export", unit="img", disable=not progress):
                dst = out / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                atomic_replace(dst, lambda tmp, src=cat.image_path(img): Path(tmp).write_bytes(src.read_bytes()))
                writer.writerow(_manifest_row(rel, img, prod))
    else:
        raise CatalogueError("format must be 'folder' or 'zip'")
    return {"exported": len(rows), "out": str(out), "format": fmt}
