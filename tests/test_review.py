"""The labelling helper: out-of-sample review, capture sessions, duplicates, outliers, selection, bulk edits, Undo."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthetic import draw_product, stable_seed

from dataset_tools import Catalogue, assign_splits, history
from dataset_tools.review import find_sessions, review
from dataset_tools.review_catalogue import review_catalogue
from webapp import Studio, StudioError
from webapp.labelling import Selection

ROOT = Path(__file__).resolve().parents[1]


def shot(name, i, size=128):
    return draw_product(np.random.default_rng(stable_seed(name, i)), name, size=size)


@pytest.fixture
def planted(tmp_path):
    """Three products, ten imported photos each, then the four mistakes the review must find: one red box filed as a
    blue can, a webcam burst of green packs captured with red-box chosen, the same picture (one pixel apart) under
    two products, and a photo of no product at all."""
    cat = Catalogue(tmp_path / "cat")
    for name in ("red-box", "blue-can", "green-pack"):
        for i in range(10):
            cat.add_image(shot(name, i), product=name, create_product=True, source_kind="import")
    wrong = cat.add_image(shot("red-box", 100), product="blue-can", source_kind="import").image_id
    burst = [cat.add_image(shot("green-pack", 200 + i), product="red-box", source_kind="webcam").image_id for i in range(4)]
    twin = shot("blue-can", 3).copy()
    twin[0, 0] = 255 - twin[0, 0]
    duplicate = cat.add_image(twin, product="green-pack", source_kind="import").image_id
    noise = np.random.default_rng(7).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    outlier = cat.add_image(noise, product="red-box", source_kind="import").image_id
    return cat, {"wrong": wrong, "burst": burst, "duplicate": duplicate, "outlier": outlier}


def test_the_review_finds_each_planted_mistake_with_its_kind_and_the_right_suggestion(planted):
    cat, ids = planted
    report, rows, _ = review_catalogue(cat)
    kinds = {}
    for s in report.suspects:
        kinds.setdefault(s["id"], s)
    assert kinds[ids["wrong"]]["kind"] == "wrong-label" and kinds[ids["wrong"]]["suggested"] == "red-box"
    assert [s["ids"] for s in report.sessions] == [ids["burst"]] and report.sessions[0]["suggested"] == "green-pack"
    assert all(kinds[i]["kind"] == "session" for i in ids["burst"])
    assert any({a, b} == {ids["duplicate"], next(r["id"] for r in rows if r["product"] == "blue-can")} or ids["duplicate"] in (a, b)
               for a, b, _ in report.duplicates)
    assert kinds[ids["duplicate"]]["suggested"] == "blue-can"
    assert kinds[ids["outlier"]]["kind"] == "outlier"
    planted_ids = {ids["wrong"], ids["duplicate"], ids["outlier"], *ids["burst"]}
    first = [s["id"] for s in report.suspects][: len(planted_ids)]
    assert set(first) == planted_ids  # the planted mistakes come first, nothing else among them


def test_a_photo_is_judged_out_of_sample_so_its_own_label_cannot_vouch_for_it():
    """Two clusters; one point of cluster A is labelled B. A classifier fitted on all labels (1-NN including itself)
    agrees with the wrong label; the review never lets a photo, or its session, vote for itself."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(64), rng.standard_normal(64)
    x = np.vstack([a + 0.3 * rng.standard_normal((12, 64)), b + 0.3 * rng.standard_normal((12, 64))]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = [0] * 12 + [1] * 12
    labels[3] = 1
    in_sample = np.argmax(x @ x.T, axis=1)  # each point's nearest point is itself: its label agrees with itself
    assert labels[in_sample[3]] == 1
    report = review(x, labels, list(range(24)), ["A", "B"], np.arange(24))
    top = report.suspects[0]
    assert (top["id"], top["kind"], top["product"], top["suggested"]) == (3, "wrong-label", "B", "A")
    # a session cannot vouch for itself either: points 0-4 labelled B together are still found, as one session
    labels = [1] * 5 + [0] * 7 + [1] * 12
    report = review(x, labels, list(range(24)), ["A", "B"], np.array([0] * 5 + list(range(1, 20))))
    assert report.sessions and report.sessions[0]["ids"] == [0, 1, 2, 3, 4] and report.sessions[0]["suggested"] == "A"


def test_a_product_captured_in_one_burst_is_not_judged_against_the_others(tmp_path):
    """Each product's only photos are one burst: nothing outside a burst vouches for its label, so nothing is flagged
    (every burst used to be 'suggested' the other product)."""
    cat = Catalogue(tmp_path / "cat")
    for name in ("red-box", "blue-can"):
        for i in range(8):
            cat.add_image(shot(name, i), product=name, create_product=True, source_kind="webcam")
    report, _, _ = review_catalogue(cat)
    assert [s for s in report.suspects if s["kind"] != "outlier"] == [] and report.sessions == []


def test_sessions_are_webcam_or_upload_runs_of_one_product_close_in_time():
    t = lambda s: f"2026-12-04T10:00:{s:02d}+00:00"  # noqa: E731
    rows = [{"product": "a", "source": "webcam", "created_at": t(0)}, {"product": "a", "source": "webcam", "created_at": t(1)},
            {"product": "b", "source": "webcam", "created_at": t(2)}, {"product": "b", "source": "import", "created_at": t(3)},
            {"product": "b", "source": "import", "created_at": t(3)}, {"product": "b", "source": "upload", "created_at": t(4)},
            {"product": "b", "source": "upload", "created_at": t(5)}]
    assert find_sessions(rows).tolist() == [0, 0, 1, 2, 3, 4, 4]


def test_the_gallery_selection_toggles_ranges_and_survives_a_filter_only_for_what_is_shown():
    sel = Selection().show([10, 11, 12, 13, 14])
    sel.click(1).click(3, shift=True)
    assert sel.ids() == [11, 12, 13]
    sel.click(2)
    assert sel.ids() == [11, 13]
    assert sel.all().ids() == [10, 11, 12, 13, 14]
    sel.show([12, 14, 99])
    assert sel.ids() == [12, 14]
    assert sel.clear().ids() == [] and sel.click(7).ids() == []  # an index outside the gallery changes nothing


def _state(cat: Catalogue):
    rows = {r["id"]: (r["product"], r["split"], tuple(r["tags"]), r["path"]) for r in cat.images()}
    files = sorted(str(p.relative_to(cat.root)) for p in (cat.root / "images").rglob("*") if p.is_file())
    return rows, files


def test_every_bulk_edit_is_undone_exactly(planted):
    cat, ids = planted
    before = _state(cat)
    some = [r["id"] for r in cat.images(product="red-box")][:3]
    history.move(cat, some, "Brand new", create=True)
    history.set_split(cat, some, "test")
    history.tag(cat, some, add=["side"], remove=["front"])
    history.delete(cat, some + [ids["outlier"]])
    assert not {ids["outlier"], *some} & {r["id"] for r in cat.images()}
    assert cat.verify(repair=True)["ok"]  # files kept in the trash for Undo are no inconsistency ...
    assert len(list((cat.root / "trash").iterdir())) == 4  # ... and a repair leaves them there
    for expected in ("deleted 4", "tags of 3", "set 3", "moved 3"):
        assert expected in history.undo(cat)
    assert _state(cat) == before
    assert not list((cat.root / "trash").iterdir())
    with pytest.raises(Exception, match="nothing to undo"):
        history.undo(cat)


def test_studio_actions_keep_the_instant_index_in_step_and_answers_are_remembered(planted, tmp_path):
    cat, ids = planted
    studio = Studio(cat.root)
    studio.instant.sync()
    queue = studio.review_queue(refresh=True)
    wrong = next(s for s in queue if s["id"] == ids["wrong"])
    assert "Moved 1" in studio.answer(wrong, "accept")
    assert studio.instant.index.labels[ids["wrong"]] == "red-box"  # the instant model learnt the fix at once
    assert ids["wrong"] not in {s["id"] for s in studio.review_queue()}
    session = next(s for s in studio.review_queue() if s["kind"] == "session")
    studio.answer(session, "keep")
    assert not {s["id"] for s in studio.review_queue(refresh=True)} & set(ids["burst"])  # not asked again
    outlier = next(s for s in studio.review_queue() if s["id"] == ids["outlier"])
    assert "Undo" in studio.answer(outlier, "delete") and ids["outlier"] not in studio.instant.index.labels
    assert "Undone: deleted 1" in studio.undo() and studio.instant.index.labels[ids["outlier"]] == "red-box"
    with pytest.raises(StudioError, match="Choose the product"):
        studio.move_selected([ids["duplicate"]], "  ")
    assert "“Mystery”" in studio.move_selected([ids["duplicate"]], "Mystery") and "Mystery" in studio.product_names()
    similar = studio.more_like_this(ids["burst"][0], k=3)
    # a green pack filed as red-box: the photos most like it are green packs (or its own burst)
    assert len(similar) == 3 and all(p["product"] == "green-pack" or p["id"] in ids["burst"] for p in similar)
    assert [p["similarity"] for p in similar] == sorted((p["similarity"] for p in similar), reverse=True)
    table, hints = studio.coverage()
    assert {row[0] for row in table} >= {"red-box", "blue-can", "green-pack"}
    points = studio.embedding_map()
    assert len(points) == len(cat.images()) and any(p["suspect"] for p in points)
    xs = sorted(p["x"] for p in points)
    region = studio.map_region([xs[0], xs[len(xs) // 2]])
    assert {r["id"] for r in region} == {p["id"] for p in points if p["x"] <= xs[len(xs) // 2]}


def test_near_duplicates_of_one_product_are_kept_out_of_the_evaluation_photos(planted):
    cat, _ = planted
    original = cat.images(product="red-box")[0]
    twin = np.asarray(Image.open(cat.image_path(original)).convert("RGB")).copy()
    twin[0, 0] = 255 - twin[0, 0]
    copy = cat.add_image(twin, product="red-box", source_kind="import").image_id
    assign_splits(cat)
    cat.set_splits({original["id"]: "train", copy: "test"})
    studio = Studio(cat.root)
    assert [original["id"], copy, pytest.approx(1.0, abs=0.03)] in [list(d) for d in studio.review(refresh=True)[0].duplicates]
    assert "photo(s) to train" in studio.join_duplicate_splits()
    assert {r["id"]: r["split"] for r in cat.images()}[copy] == "train"
    assert "No near-duplicates" in studio.join_duplicate_splits()


def test_unlabelled_uploads_are_grouped_by_the_product_they_look_like(planted):
    cat, _ = planted
    new = [cat.add_image(shot("blue-can", 300 + i), source_kind="upload").image_id for i in range(3)]
    studio = Studio(cat.root)
    groups = studio.unlabelled_groups()
    assert groups["blue-can"] == new
    assert "Moved 3" in studio.confirm_group(groups["blue-can"], "blue-can")
    assert cat.images(unlabelled=True) == []


def test_gallery_thumbnails_are_files_written_once_and_marked_when_selected(planted, tmp_path):
    cat, ids = planted
    studio = Studio(cat.root)
    photo = cat.images(product="red-box")[0]
    plain = Path(studio.thumbnail_file(photo))
    mtime = plain.stat().st_mtime_ns
    assert Path(studio.thumbnail_file(photo)).stat().st_mtime_ns == mtime  # never rewritten while it may be served
    marked = Path(studio.thumbnail_file(photo, selected=True))
    assert marked != plain and marked.read_bytes() != plain.read_bytes()
    assert cat.root not in plain.parents  # the catalogue folder is never served
    items = studio.gallery_items([photo], Selection().show([photo["id"]]).all())
    assert items[0][0] == str(marked)
    pixels = studio.photo_pixels(photo["id"])
    assert pixels.shape == (photo["height"], photo["width"], 3) and studio.photo_pixels(10 ** 6) is None


def test_the_review_command_prints_one_json_object_and_the_catalogue_api_needs_no_torch(planted):
    cat, ids = planted
    out = subprocess.run([sys.executable, "-m", "dataset_tools", "--db", str(cat.root), "review", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert set(data) >= {"suspects", "duplicates", "sessions"}
    first = data["suspects"][0]
    assert set(first) >= {"id", "product", "suggested", "score", "kind"}
    assert [s["score"] for s in data["suspects"]] == sorted((s["score"] for s in data["suspects"]), reverse=True)
    assert data["sessions"][0]["ids"] == ids["burst"]
    bad = subprocess.run([sys.executable, "-m", "dataset_tools", "--db", str(cat.root), "review", "--with-model", "missing.safetensors"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --with-model missing.safetensors") and "Traceback" not in bad.stderr
    no_torch = "import sys; sys.modules['torch'] = None; import dataset_tools, dataset_tools.review, dataset_tools.history, dataset_tools.review_catalogue"
    assert subprocess.run([sys.executable, "-c", no_torch], cwd=ROOT).returncode == 0
