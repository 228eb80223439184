"""The class-agnostic item finder: its targets and boxes, its label map, its training on composites, its file."""
import numpy as np
import pytest
import torch

from synthetic import counter_scene, packet, place, relit
from ntsnet.checkout import Checkout, iou
from ntsnet.counter import Counter
from ntsnet.item_finder import STRIDE, FinderConfig, ItemFinder, decode, targets
from ntsnet.predictor import Prediction
from training.composites import compose, cut_out
from training.item_finder import CompositeMaker, FinderTrainConfig, train_item_finder

SMALL = FinderConfig(backbone="tiny", width=160, height=120)
LITE = FinderConfig(width=160, height=120)  # the real (offline) ImageNet backbone, at half the counter's analysis size
COLOURS = [(40, 60, 200), (200, 50, 40), (40, 160, 60), (220, 190, 30), (130, 60, 160)]


def _logits(t: torch.Tensor) -> torch.Tensor:
    """The head output that says exactly what a target says."""
    out = torch.full_like(t, -20.0)
    centre = t[0] >= 1
    out[0][centre] = 20.0
    off = t[1:3].clamp(1e-4, 1 - 1e-4)
    out[1:3] = torch.where(centre, torch.log(off / (1 - off)), torch.zeros_like(off))
    out[3:5] = torch.where(centre, t[3:5], torch.zeros_like(t[3:5]))
    return out


def test_a_target_decodes_back_to_its_boxes():
    boxes = [(10.0, 12.0, 50.0, 70.0), (60.0, 20.0, 110.0, 50.0)]
    t = targets(boxes, (120 // STRIDE, 160 // STRIDE))
    assert int((t[0] >= 1).sum()) == 2 and float(t[0].max()) == 1.0
    found = sorted(b for b, _ in decode(_logits(t), 0.3))
    for got, want in zip(found, sorted(boxes)):
        assert np.allclose(got, want, atol=0.5)
    assert decode(torch.full_like(t, -20.0), 0.3) == []


@pytest.fixture(scope="module")
def counter_and_scene():
    scene = counter_scene(7)
    return Counter.learn([relit(scene, s) for s in range(6)]), scene


def test_each_found_item_gets_its_own_region_and_a_missed_blob_stays_one_item(counter_and_scene, monkeypatch):
    counter, scene = counter_and_scene
    frame = place(place(place(scene, packet(1, 60, 44, COLOURS[0]), 60, 60), packet(2, 60, 44, COLOURS[1]), 104, 62),
                  packet(3, 50, 40, COLOURS[2]), 230, 120)
    frame = relit(frame, 9)
    finder = ItemFinder(SMALL, pretrained=False)
    truth = [(60, 60, 104, 120), (104, 62, 148, 122)]  # the touching pair; the third packet is never "found"
    monkeypatch.setattr(finder, "find", lambda f, m: [(b, 0.9) for b in truth])
    labels = finder.label_items(frame, counter.foreground(frame))
    regions = counter.boxes(labels, frame.shape)
    assert len(regions) == 3
    for want in truth:
        assert max(iou(r.box, want) for r in regions) > 0.75
    assert max(iou(r.box, (230, 120, 270, 170)) for r in regions) > 0.75


def test_a_photo_cut_out_on_the_counter_is_put_down_by_its_own_outline(counter_and_scene):
    """A red disc photographed on green: with its stored mask only the disc reaches the composite; without, the
    photo's middle brings the green with it."""
    counter, scene = counter_and_scene
    yy, xx = np.mgrid[:80, :80]
    disc = (yy - 40) ** 2 + (xx - 40) ** 2 < 30 ** 2
    photo = np.where(disc[..., None], np.uint8([200, 40, 40]), np.uint8([30, 220, 30])).astype(np.uint8)
    cfg = FinderTrainConfig(frame_width=scene.shape[1], item_size=(0.2, 0.3), max_items=3, seed=2)

    def green(photos) -> int:
        maker, rng, total = CompositeMaker(photos, [(scene, counter)], cfg), np.random.default_rng(0), 0
        for _ in range(5):
            f = maker.make(rng)[0].astype(int)
            total += int(((f[..., 1] > f[..., 0] + 80) & (f[..., 1] > f[..., 2] + 80)).sum())
        return total

    assert 10 * green([(photo, disc)]) < green([photo])


def test_trained_on_composites_it_finds_the_items_of_a_new_scene_touching_ones_too(counter_and_scene, tmp_path):
    counter, scene = counter_and_scene
    photos = [packet(s, 80, 60, COLOURS[s % len(COLOURS)]) for s in range(20)]
    cfg = FinderTrainConfig(composites=200, epochs=25, frame_width=320, item_size=(0.15, 0.3), max_items=4, seed=1)
    torch.manual_seed(0)
    untrained = ItemFinder(LITE)
    rng = np.random.default_rng(5)
    items = [cut_out(packet(s, 80, 60, COLOURS[s % 5]), rng, (60, 60), 0) for s in (31, 32, 33, 34)]
    w = items[1][1].shape[1]
    frame, truth = compose(scene, items, [(30, 40), (120, 150), (122, 150 + w - 3), (40, 230)])  # two touching
    frame = relit(frame, 3)
    assert untrained.find(frame, counter.foreground(frame)) == []
    assert len(Checkout(counter, None).regions(frame)[0]) == 3  # the outline alone: the touching pair is one item

    finder = train_item_finder(photos, [(scene, counter)], cfg, LITE, finder=untrained)
    assert finder.extra["held_out_recall"] >= 0.85 and finder.extra["held_out_precision"] >= 0.85, finder.extra
    path = tmp_path / "finder.safetensors"
    finder.save(path, finder.extra)
    again = ItemFinder.load(path)
    assert again.find(frame, counter.foreground(frame)) == finder.find(frame, counter.foreground(frame))
    assert again.extra == finder.extra

    class Namer:
        def predict_batch(self, crops):
            return [Prediction("packet", 0.9, [("packet", 0.9)]) for _ in crops]

    boxes = [b for b, _ in again.find(frame, counter.foreground(frame))]
    assert all(max(iou(b, t) for b in boxes) >= 0.5 for t in truth), (boxes, truth)
    assert len(Checkout(counter, Namer(), finder=again).scan(frame).items) == 4  # the touching pair: two items


def test_a_file_that_is_not_an_item_finder_is_refused(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(ValueError, match="cannot read the item finder"):
        ItemFinder.load(bad)


def test_the_cli_trains_the_finder_for_a_catalogues_counter_and_checkout_uses_it(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from webapp.actions import Studio

    root = Path(__file__).resolve().parents[1]
    studio = Studio(tmp_path / "cat")
    for name, colour in (("blue-pack", COLOURS[0]), ("red-pack", COLOURS[1])):
        studio.create_product(name)
        for i in range(3):
            studio.save_photo(packet(10 * i + len(name), 80, 60, colour), name)
    cmd = [sys.executable, "-m", "training", "item-finder", "--db", str(studio.db), "--composites", "24", "--epochs", "2"]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "learn it in the Checkout tab first" in r.stderr
    assert studio.item_finder() is None and studio.checkout_status() == ""

    scene = counter_scene(11)
    studio.learn_counter([relit(scene, s) for s in range(4)])
    assert "also teaches the item finder" in studio.checkout_status()
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "item finder:" in r.stdout and "held-out composites" in r.stdout
    finder = studio.item_finder()
    assert finder is not None and finder.extra["composites"] == 24 and finder.extra["photos"] == 6
    assert "told apart by the item finder" in studio.checkout_status()
    frame = relit(place(scene, packet(5, 60, 44, COLOURS[0]), 120, 90), 2)
    assert len(studio.checkout_scan(frame).items) == 1  # one packet, one item, with the finder in the loop


def test_a_finished_train_click_teaches_the_finder_only_where_a_counter_is_learnt(tmp_path, monkeypatch):
    import training.__main__ as cli
    from training import progressive

    monkeypatch.setattr(progressive, "train_progressive", lambda cfg: {"state": "finished"})
    taught = []
    monkeypatch.setattr(cli, "cmd_item_finder", lambda args: taught.append(args.db) or 0)
    db = tmp_path / "cat"
    db.mkdir()
    assert cli.main(["train", "--db", str(db), "--out", str(tmp_path / "run")]) == 0 and taught == []
    Counter.learn([relit(counter_scene(2), 0)]).save(db / "counter.npz")
    assert cli.main(["train", "--db", str(db), "--out", str(tmp_path / "run")]) == 0 and taught == [str(db)]
    assert cli.main(["train", "--db", str(db), "--out", str(tmp_path / "run"), "--item-finder", "off"]) == 0 and len(taught) == 1
