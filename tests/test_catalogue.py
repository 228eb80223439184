import io
import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_tools import Catalogue, CatalogueError, DuplicateImage, InvalidImage, assign_splits, export, import_path
from dataset_tools.catalogue import safe_filename
from synthetic import stable_seed

ROOT = Path(__file__).resolve().parents[1]


def photo(seed=0, size=(256, 256), fmt="JPEG", mode="RGB", **save):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def snapshot(cat: Catalogue):
    rows = cat.db.execute("SELECT * FROM images ORDER BY id").fetchall()
    prods = cat.db.execute("SELECT * FROM products ORDER BY id").fetchall()
    files = sorted(str(p.relative_to(cat.root)) for p in (cat.root / "images").rglob("*") if p.is_file())
    return rows, prods, files


@pytest.fixture
def cat(tmp_path):
    c = Catalogue(tmp_path / "cat")
    c.add_product("Red box")
    return c


def test_add_photo_records_everything(cat):
    res = cat.add_image(photo(1), product="Red box", source_kind="webcam", tags=["Front", "dark"])
    img = cat.images()[0]
    assert img["hash"] == res.hash and img["product"] == "Red box" and img["source"] == "webcam"
    assert (img["width"], img["height"]) == (256, 256) and img["tags"] == ["dark", "front"]
    assert cat.image_path(img).exists() and img["blur"] > 0 and img["brightness"] > 0
    assert cat.schema_version == 1
    assert cat.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


BAD_INPUTS = {
    "zero-byte": (b"", "empty"),
    "not an image": (b"hello, I am text" * 10, "not an image"),
    "truncated": (photo(2)[:2000], "truncated"),
    "too small": (photo(3, size=(4, 4), fmt="PNG"), "too small"),
    "absurd aspect": (photo(4, size=(2000, 20), fmt="PNG"), "aspect"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_rejected_and_changes_nothing(cat, name):
    data, message = BAD_INPUTS[name]
    cat.add_image(photo(9), product="Red box")
    before = snapshot(cat)
    with pytest.raises(InvalidImage, match=message):
        cat.add_image(data, product="Red box")
    assert snapshot(cat) == before
    assert not any((cat.root / "tmp").iterdir())


def test_decompression_bomb_is_refused(cat, monkeypatch):
    import dataset_tools.imagefile as imf

    monkeypatch.setattr(imf, "MAX_PIXELS", 100 * 100)
    before = snapshot(cat)
    with pytest.raises(InvalidImage, match="decompression bomb"):
        cat.add_image(photo(5, size=(200, 200)), product="Red box")
    assert snapshot(cat) == before


def test_unknown_product_and_bad_split_change_nothing(cat):
    before = snapshot(cat)
    with pytest.raises(CatalogueError, match="no product"):
        cat.add_image(photo(6), product="Nope")
    with pytest.raises(CatalogueError, match="split"):
        cat.add_image(photo(6), product="Red box", split="holdout")
    assert snapshot(cat) == before


def test_normalisation_exif_alpha_16bit_cmyk(cat):
    # EXIF orientation 6 (rotate 90) on a 300x200 JPEG gives a 200x300 photo
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    r = cat.add_image(buf.getvalue(), product="Red box")
    assert (r.width, r.height) == (200, 300) and r.path.endswith(".png")
    # RGBA is flattened on white
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    buf = io.BytesIO(); rgba.save(buf, format="PNG")
    r = cat.add_image(buf.getvalue(), product="Red box")
    assert np.array(Image.open(cat.root / r.path)).reshape(-1, 3)[0].tolist() == [255, 255, 255]
    # 16-bit grayscale
    arr16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    buf = io.BytesIO(); Image.fromarray(arr16).save(buf, format="PNG")
    r = cat.add_image(buf.getvalue(), product="Red box")
    assert Image.open(cat.root / r.path).mode == "RGB"
    # CMYK JPEG
    r = cat.add_image(photo(7, mode="CMYK"), product="Red box")
    assert Image.open(cat.root / r.path).mode == "RGB"


def test_duplicates_are_reported_not_stored(cat):
    data = photo(8)
    first = cat.add_image(data, product="Red box")
    before = snapshot(cat)
    with pytest.raises(DuplicateImage) as err:
        cat.add_image(data, product="Red box")
    assert err.value.image_id == first.image_id and "Red box" in str(err.value)
    assert snapshot(cat) == before


def test_quality_warnings(cat):
    dark = np.full((300, 300, 3), 10, np.uint8)
    dark[100:200, 100:200] = 30
    r = cat.add_image(dark, product="Red box", source_kind="webcam")
    assert "too dark" in r.warnings and "blurry" in r.warnings
    small = cat.add_image(photo(10, size=(100, 120)), product="Red box")
    assert "too small" in small.warnings and "blurry" not in small.warnings
    stats = cat.stats()
    assert stats["quality_warnings"]["too dark"] == 1 and stats["quality_warnings"]["too small"] >= 1


def test_products_rename_merge_delete(cat):
    cat.add_product("Blue can", sku="4001", description="330 ml")
    cat.add_image(photo(11), product="Red box")
    cat.add_image(photo(12), product="Blue can")
    with pytest.raises(CatalogueError, match="already exists"):
        cat.add_product("red BOX")
    cat.rename_product("Blue can", "Blue can / 330ml ü")
    with pytest.raises(CatalogueError, match="already exists"):
        cat.rename_product("Red box", "blue can / 330ml ü")
    assert cat.merge_products("Blue can / 330ml ü", "Red box") == 1
    assert [p["name"] for p in cat.products()] == ["Red box"] and cat.products()[0]["images"] == 2
    with pytest.raises(CatalogueError, match="confirm"):
        cat.delete_product("Red box")
    assert len(cat.images()) == 2
    assert cat.delete_product("Red box", confirm=True) == 2
    assert cat.images() == [] and cat.products() == []
    assert not any(p.is_file() for p in (cat.root / "images").rglob("*"))
    for bad in ("", "   ", "a\x00b", "x" * 201):
        with pytest.raises(CatalogueError):
            cat.add_product(bad)


def test_unsafe_names_never_become_paths():
    for name in ("../../etc/passwd", "a/b\\c", ".", "..", "con:tent?*", "Äpfel / Birnen"):
        s = safe_filename(name)
        assert "/" not in s and "\\" not in s and s not in (".", "..") and not s.startswith(".")
    assert safe_filename("Äpfel / Birnen") == "Äpfel _ Birnen"


def test_simulated_crash_between_file_and_row_is_repaired_by_verify(cat):
    """A real process death (os._exit) after the file is written, before the row is inserted."""
    code = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from dataset_tools.catalogue import Catalogue
cat = Catalogue({str(cat.root)!r})
Catalogue._insert_image_row = lambda *a, **k: os._exit(9)
cat.add_image({photo(13)!r}, product="Red box")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == 9
    assert cat.images() == []
    orphans = [p for p in (cat.root / "images").rglob("*") if p.is_file()]
    assert len(orphans) == 1
    (cat.root / "tmp" / "half.part").write_bytes(b"partial")  # a crash during the write leaves a temp file
    report = cat.verify(repair=False)
    assert len(report["orphan_files"]) == 1 and report["temp_files"] == 1 and not report["ok"]
    report = cat.verify()
    assert len(report["recovered_image_ids"]) == 1
    recovered = cat.images(unlabelled=True)
    assert len(recovered) == 1 and recovered[0]["source"] == "recovered"  # the photo is kept, unlabelled
    assert cat.verify()["ok"]


def test_row_without_file_is_repaired(cat):
    r = cat.add_image(photo(14), product="Red box")
    (cat.root / r.path).unlink()
    report = cat.verify()
    assert report["missing_files"][0]["id"] == r.image_id
    assert cat.images() == [] and cat.verify()["ok"]


def test_interrupted_delete_leaves_a_consistent_catalogue(cat, monkeypatch):
    r = cat.add_image(photo(15), product="Red box")
    before = snapshot(cat)

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Catalogue, "transaction", boom)
    with pytest.raises(RuntimeError):
        cat.delete_images([r.image_id])
    monkeypatch.undo()
    assert snapshot(cat) == before  # the file was moved back


def test_concurrent_writer_and_readers_lose_nothing(tmp_path):
    cat = Catalogue(tmp_path / "c")
    cat.add_product("p")
    errors, counts = [], []

    def writer(offset):
        try:
            for i in range(25):
                cat.add_image(photo(1000 + offset + i, size=(64, 64)), product="p", source_kind="webcam")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def reader():
        try:
            other = Catalogue(tmp_path / "c")  # a separate handle, like the training process
            for _ in range(60):
                counts.append(len(other.images()))
                other.stats()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k * 100,)) for k in range(2)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(cat.images()) == 50 and cat.verify(repair=False)["ok"]
    assert counts == sorted(counts) or max(counts) <= 50


def make_tree(root: Path, products=("red box", "blue can"), n=4):
    for k, name in enumerate(products):
        d = root / name / "nested"
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"{i}.jpg").write_bytes(photo(100 * k + i))
    (root / products[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / products[0] / "notes.txt").write_text("not a photo")


def test_import_folder_tree_with_summary(tmp_path):
    cat = Catalogue(tmp_path / "c")
    make_tree(tmp_path / "tree")
    s = import_path(cat, tmp_path / "tree", split="train", progress=False)
    assert (s.added, s.duplicates, len(s.rejected), s.products_created) == (8, 0, 2, 2)
    assert {r[0].split("/")[-1] for r in s.rejected} == {"broken.jpg", "notes.txt"}
    s2 = import_path(cat, tmp_path / "tree", progress=False)
    assert (s2.added, s2.duplicates) == (0, 8)
    assert {i["split"] for i in cat.images()} == {"train"}


def test_import_zip_and_list_file(tmp_path):
    cat = Catalogue(tmp_path / "c")
    zpath = tmp_path / "photos.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for i in range(3):
            zf.writestr(f"export/milk/{i}.jpg", photo(200 + i))
        zf.writestr("export/../../evil/x.jpg", photo(210))  # zip-slip name: only ever read, never extracted
    s = import_path(cat, zpath, progress=False)
    assert s.added == 4 and {p["name"] for p in cat.products()} == {"milk", ".."}
    assert not (tmp_path / "evil").exists()
    # grocery-store list format
    base = tmp_path / "ds"
    (base / "train" / "Fruit").mkdir(parents=True)
    lines = []
    for i in range(3):
        (base / "train" / "Fruit" / f"a{i}.jpg").write_bytes(photo(300 + i))
        lines.append(f"train/Fruit/a{i}.jpg, {i % 2}, 0")
    lines.append("train/Fruit/missing.jpg, 0, 0")
    lines.append("garbage line")
    (base / "train.txt").write_text("\n".join(lines) + "\n")
    (base / "classes.csv").write_text("Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int)\nGolden,0,Apple,0\nGranny,1,Apple,0\n")
    s = import_path(cat, base / "train.txt", progress=False)
    assert s.added == 3 and len(s.rejected) == 2
    prods = {p["name"]: p for p in cat.products()}
    assert prods["Golden"]["group"] == "Apple" and prods["Golden"]["train"] == 2 and prods["Granny"]["train"] == 1


def test_split_is_stratified_deterministic_and_stable(tmp_path):
    cat = Catalogue(tmp_path / "c")
    for p, n in (("big", 20), ("tiny", 2), ("three", 3)):
        cat.add_product(p)
        for i in range(n):
            cat.add_image(photo(stable_seed(p, i), size=(32, 32)), product=p)
    res = assign_splits(cat, val=0.2, test=0.2, seed=1)
    per = {p["name"]: p for p in cat.products()}
    assert (per["big"]["train"], per["big"]["val"], per["big"]["test"]) == (12, 4, 4)
    assert per["tiny"]["train"] == 2  # too few photos: all go to training
    assert per["three"]["train"] >= 1
    first = {i["id"]: i["split"] for i in cat.images()}
    assert res["changed"] == len(first)
    # same seed from scratch gives the same assignment
    assert assign_splits(cat, val=0.2, test=0.2, seed=1, reset=True)["changed"] == 0
    # new captures do not move earlier photos
    for i in range(5):
        cat.add_image(photo(5000 + i, size=(32, 32)), product="big")
    assign_splits(cat, val=0.2, test=0.2, seed=1)
    after = {i["id"]: i["split"] for i in cat.images()}
    assert all(after[k] == v for k, v in first.items())
    assert all(v is not None for v in after.values())


def test_export_import_round_trip(tmp_path):
    cat = Catalogue(tmp_path / "a")
    make_tree(tmp_path / "tree", products=("Äpfel / Birnen", "milk"))
    import_path(cat, tmp_path / "tree", progress=False)
    assign_splits(cat)
    for fmt, out in (("folder", tmp_path / "out"), ("zip", tmp_path / "out.zip")):
        res = export(cat, out, fmt=fmt, progress=False)
        assert res["exported"] == 8
        other = Catalogue(tmp_path / f"b-{fmt}")
        s = import_path(other, out, progress=False)
        assert s.added == 8 and s.rejected == [] or all("manifest" in r[0] for r in s.rejected)
        assert {(i["hash"], i["product"]) for i in other.images()} == {(i["hash"], i["product"]) for i in cat.images()}
    manifest = (tmp_path / "out" / "manifest.csv").read_text(encoding="utf-8").splitlines()
    assert manifest[0].startswith("file,product") and len(manifest) == 9


def run_cli(db, *args, input_=None):
    return subprocess.run([sys.executable, "-m", "dataset_tools", "--db", str(db), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, input=input_)


def test_cli(tmp_path):
    db = tmp_path / "cli"
    assert run_cli(db, "stats").returncode == 2  # no catalogue yet: clear error
    assert run_cli(db, "init").returncode == 0
    assert run_cli(db, "add-product", "Red box", "--sku", "123").returncode == 0
    assert "already exists" in run_cli(db, "add-product", "Red box").stderr
    make_tree(tmp_path / "tree")
    r = run_cli(db, "import", tmp_path / "tree", "--json", "--quiet")
    assert json.loads(r.stdout)["added"] == 8
    assert run_cli(db, "split", "--seed", "3").returncode == 0
    stats = json.loads(run_cli(db, "stats", "--json").stdout)
    assert stats["products"] == 2 and stats["images"] == 8 and set(stats["per_product"]["Red box"]) >= {"train", "val", "test"}
    assert "quality_warnings" in stats
    assert len(json.loads(run_cli(db, "list", "images", "--product", "red box", "--json").stdout)) == 4
    assert run_cli(db, "verify").returncode == 0
    r = run_cli(db, "delete-product", "red box")
    assert r.returncode == 2 and "--yes" in r.stderr
    assert run_cli(db, "delete-product", "red box", "--yes").returncode == 0
    assert run_cli(db, "export", tmp_path / "exp", "--quiet").returncode == 0
    for cmd in ("init", "import", "export", "split", "stats", "verify", "list", "add-product", "merge", "rename", "delete-product", "add"):
        assert run_cli(db, cmd, "--help").returncode == 0
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    r = run_cli(db, "add", bad, "--product", "milk")
    assert r.returncode == 1 and "empty" in r.stderr


def test_split_for_one_product_matches_the_global_assignment(tmp_path):
    a, b = Catalogue(tmp_path / "a"), Catalogue(tmp_path / "b")
    for cat in (a, b):
        for p in ("x", "y"):
            cat.add_product(p)
            for i in range(10):
                cat.add_image(photo(stable_seed(p, i), size=(32, 32)), product=p)
    assign_splits(a, seed=2)
    assign_splits(b, seed=2, product="x")  # what a capture of "x" does
    split_a = {i["hash"]: i["split"] for i in a.images(product="x")}
    split_b = {i["hash"]: i["split"] for i in b.images(product="x")}
    assert split_a == split_b and all(i["split"] is None for i in b.images(product="y"))


def test_an_item_mask_is_stored_with_its_photo_and_outlives_an_undoable_delete(cat):
    from dataset_tools import history

    pixels = np.asarray(Image.open(io.BytesIO(photo(30, size=(60, 40)))))
    mask = np.zeros((40, 60), bool)
    mask[5:30, 10:50] = True
    before = snapshot(cat)
    with pytest.raises(CatalogueError, match="mask is"):
        cat.add_image(pixels, product="Red box", mask=mask.T)  # another shape than the photo: nothing stored
    assert snapshot(cat) == before and not (cat.root / "masks").exists()
    cat.add_image(pixels, product="Red box", mask=mask)
    kept = cat.images()[0]
    plain = cat.add_image(photo(31), product="Red box")
    assert np.array_equal(cat.mask(kept), mask) and cat.mask(cat.images()[1]) is None
    history.delete(cat, [kept["id"]])
    assert cat.verify()["orphan_masks"] == 0  # undo may still bring the photo back
    history.undo(cat)
    assert np.array_equal(cat.mask(cat.images()[0]), mask)
    cat.delete_images([kept["id"], plain.image_id])
    report = cat.verify()
    assert report["orphan_masks"] == 1 and not list((cat.root / "masks").rglob("*.png")) and cat.verify()["ok"]
