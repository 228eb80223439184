"""The checkout counter: items found on the learnt counter, named in one batched call, counted into a steady basket;
the Studio actions and the CLI around it."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ntsnet.checkout import Basket, Checkout, Item, Scan, basket_of
from ntsnet.counter import Counter
from ntsnet.predictor import Box, Prediction
from synthetic import counter_photo, counter_scene, on_counter, relit

ROOT = Path(__file__).resolve().parents[1]
SCENE = counter_scene(3)
BLUE, GREEN, RED = (40, 60, 200), (40, 170, 60), (200, 50, 40)


class ColourNamer:
    """A stand-in recogniser: names a crop by the colour of its middle's rim area; red is not in the catalogue."""

    def __init__(self):
        self.calls = []

    def predict_batch(self, crops):
        self.calls.append(len(crops))
        out = []
        for c in crops:
            r, g, b = np.asarray(c, np.float32)[c.shape[0] // 5, c.shape[1] // 2]
            name = "blue-pack" if b > max(r, g) else "green-pack" if g > max(r, b) else "red-pack"
            unknown = name == "red-pack"
            out.append(Prediction("unknown" if unknown else name, 0.9, [(name, 0.9)], [Box(2, 2, 12, 12, 1.0)],
                                  unknown=unknown, best_guess=name))
        return out


@pytest.fixture(scope="module")
def counter():
    return Counter.learn([relit(SCENE, i) for i in range(6)])


def shopping(*placed, seed=0, **light):
    return on_counter(SCENE, *placed, seed=seed, **light)


def test_every_item_is_named_in_one_batched_call_with_its_parts_in_frame_pixels(counter):
    namer = ColourNamer()
    scan = Checkout(counter, namer).scan(shopping((BLUE, 40, 40), (GREEN, 200, 60), (RED, 120, 150), gain=0.85))
    assert namer.calls == [3]
    assert sorted((it.label, it.unknown) for it in scan.items) == [("blue-pack", False), ("green-pack", False), ("unknown", True)]
    assert basket_of(scan.items) == {"blue-pack": 1, "green-pack": 1, "unknown": 1}
    blue = next(it for it in scan.items if it.label == "blue-pack")
    x0, y0 = blue.box[:2]
    part = blue.parts[0]
    assert x0 - 10 <= part.x0 - 2 <= x0 and y0 - 10 <= part.y0 - 2 <= y0  # crop corner (box less margin) + (2, 2)
    assert json.dumps(blue.to_dict())


def test_an_empty_counter_and_a_moved_camera_give_no_items_and_say_why(counter):
    namer = ColourNamer()
    assert Checkout(counter, namer).scan(shopping(gain=1.3)).items == [] and namer.calls == []
    knocked = Checkout(counter, namer).scan(relit(np.roll(shopping((BLUE, 40, 40)), 30, axis=0), 1))
    assert knocked.items == [] and "learn the empty counter again" in knocked.problem


def test_items_put_down_one_by_one_keep_their_own_outlines_however_they_touch(counter):
    """Two packets side by side, exactly aligned, make one rectangle: no shape can split it in one frame. A live
    stream saw them put down one after the other, and that tells them apart."""
    from ntsnet.checkout import ItemLayers

    first, both = shopping((BLUE, 100, 80)), shopping((BLUE, 100, 80), (GREEN, 144, 80))
    namer = ColourNamer()
    assert len(Checkout(counter, namer).scan(both).items) == 1
    layers = ItemLayers(counter)
    for k in range(5):
        Checkout(counter, namer).scan(relit(first, 20 + k, gain=1.05), layers)
    for k in range(3):
        scan = Checkout(counter, namer).scan(relit(both, 30 + k, gain=1.05), layers)
        assert sorted(it.label for it in scan.items) == ["blue-pack", "green-pack"]
    for k in range(5):  # the blue one taken away: the green one is still one item with its own box
        scan = Checkout(counter, namer).scan(relit(shopping((GREEN, 144, 80)), 40 + k), layers)
    assert [it.label for it in scan.items] == ["green-pack"] and abs(scan.items[0].box[0] - 144) <= 4
    layers.clear()
    assert layers.settled is None


def item(label, box, unknown=False):
    return Item(box, label, 0.9, unknown, label)


def test_the_basket_counts_an_item_once_still_votes_its_name_and_drops_it_when_taken_away():
    clock = [0.0]
    basket = Basket(clock=lambda: clock[0])

    def frame(*items, dt=0.1):
        clock[0] += dt
        return basket.update(Scan(list(items)))

    assert frame(item("milk", (10, 10, 60, 90))) == {}  # just put down: not yet
    frame(item("milk", (10, 10, 60, 90)))
    for k in range(5):  # lying still, jittering by a pixel, once misnamed
        counts = frame(item("juice" if k == 2 else "milk", (10 + k % 2, 10, 60, 90)))
    assert counts == {"milk": 1}
    for _ in range(20):  # nothing moves: the count never flickers, a hand passing over hides it once
        assert frame(item("milk", (10, 10, 60, 90)), item("tea", (100, 10, 150, 90))) in ({"milk": 1}, {"milk": 1, "tea": 1})
    assert frame() == {"milk": 1, "tea": 1}  # one frame without them: still there
    assert frame(item("milk", (10, 10, 60, 90)), item("tea", (100, 10, 150, 90))) == {"milk": 1, "tea": 1}
    assert frame(item("milk", (10, 10, 60, 90)), dt=0.5) == {"milk": 1, "tea": 1}
    assert frame(item("milk", (10, 10, 60, 90)), dt=0.5) == {"milk": 1}  # the tea was taken away
    assert basket.update(Scan([], problem="moved")) == {"milk": 1}   # an unusable frame changes nothing
    moved = [frame(item("milk", (200, 100, 250, 180))) for _ in range(12)]  # picked up and put elsewhere: moved, not added
    assert moved == [{"milk": 1}] * 12 and len(basket.tracks) == 1
    basket.clear()
    assert basket.counts() == {} and basket.tracks == []


# ------------------------------------------------------------------------------ the Studio and the CLI

@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    from webapp.actions import Studio

    studio = Studio(tmp_path_factory.mktemp("shop") / "cat")
    for name, colour in (("blue-pack", BLUE), ("green-pack", GREEN)):
        studio.create_product(name)
        for i in range(8):
            studio.save_photo(counter_photo(SCENE, i, colour), name)
    return studio


def test_the_studio_learns_the_counter_and_counts_the_basket_of_a_live_session(shop, monkeypatch):
    from ntsnet import checkout as checkout_module
    from webapp.common import StudioError

    with pytest.raises(StudioError, match="No empty counter learnt"):
        shop.checkout_frame(shopping((BLUE, 40, 40)), "s")
    with pytest.raises(StudioError, match="No empty counter learnt"):
        shop.save_photo(shopping((BLUE, 40, 40)), "blue-pack", on_counter=True)
    frames = iter([relit(SCENE, 50 + i) for i in range(3)] + [None] * 30)
    steps = list(shop.learn_counter_live(lambda: next(frames), seconds=0.5, every_ms=50, sleep=lambda s: None))
    assert steps[-1].startswith("Learnt the empty counter from 3 frames") and shop.counter_path.exists()
    saved = shop.save_photo(shopping((GREEN, 150, 90), seed=9), "green-pack", on_counter=True)  # Collect "on the counter"
    stored = Image.open(shop.catalogue.image_path(shop.catalogue.images(product="green-pack")[-1]))
    assert "Saved" in saved["message"] and 44 <= stored.width <= 70 and 60 <= stored.height <= 90  # the packet and a margin
    mask = shop.catalogue.mask(shop.catalogue.images(product="green-pack")[-1])  # stored with it: where the packet lies
    assert mask.shape == (stored.height, stored.width) and 0.5 < mask.mean() < 0.85
    assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())  # the margin is counter
    assert shop.catalogue.mask(shop.catalogue.images(product="green-pack")[0]) is None  # a plain photo has none
    with pytest.raises(StudioError, match="Nothing on the counter"):
        shop.save_photo(shopping(seed=10), "green-pack", on_counter=True)
    clock = [0.0]
    monkeypatch.setattr(checkout_module.time, "monotonic", lambda: clock[0])
    scene = shopping((BLUE, 40, 40), (GREEN, 200, 100), seed=7)
    for _ in range(8):
        clock[0] += 0.1
        view = shop.checkout_frame(scene, "s")
    assert view.basket == [["blue-pack", 1], ["green-pack", 1]] and "2 items in the basket" in view.message
    assert view.annotated.shape == scene.shape and not np.array_equal(view.annotated, scene)
    assert shop.checkout_frame(scene, "other").basket == []  # another session has its own basket
    shop.new_customer("s")
    assert shop.checkout_frame(scene, "s").basket == []


def test_checkout_cli_answers_each_scene_in_order_and_reports_a_bad_one(shop, tmp_path):
    empty = tmp_path / "empty.png"
    Image.fromarray(relit(SCENE, 60)).save(empty)
    two = tmp_path / "two.png"
    Image.fromarray(shopping((GREEN, 30, 30), (BLUE, 220, 120), seed=61)).save(two)
    one = tmp_path / "one.png"
    Image.fromarray(shopping((BLUE, 150, 80), seed=62)).save(one)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a photo")
    square = tmp_path / "square.png"  # another camera's frame: refused with its reason, the rest answered
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(square)
    r = subprocess.run([sys.executable, "-m", "ntsnet", "checkout", "--db", shop.db, "--background", empty, "--json",
                        str(two), str(bad), str(square), str(one)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "bad.jpg" in r.stderr
    answers = json.loads(r.stdout)
    assert [a["path"] for a in answers] == [str(two), str(bad), str(square), str(one)] and "error" in answers[1]
    assert "learn the empty counter again" in answers[2]["error"]
    assert answers[0]["basket"] == {"blue-pack": 1, "green-pack": 1} and answers[3]["basket"] == {"blue-pack": 1}
    first = answers[0]["items"][0]
    assert set(first) == {"box", "label", "confidence", "unknown", "best_guess", "parts"} and len(first["box"]) == 4


def test_checkout_scenes_say_what_is_missing_once_and_leave_the_apps_counter_alone(tmp_path):
    from webapp.actions import Studio
    from webapp.common import StudioError

    studio = Studio(tmp_path / "cat")
    scene = tmp_path / "scene.png"
    Image.fromarray(shopping((BLUE, 40, 40))).save(scene)
    with pytest.raises(StudioError, match="No empty counter learnt"):
        studio.checkout_scenes([scene])
    empty = tmp_path / "empty.png"
    Image.fromarray(relit(SCENE, 70)).save(empty)
    with pytest.raises(StudioError, match="No model yet"):
        studio.checkout_scenes([scene], background=empty)
    assert studio.counter() is None and not studio.counter_path.exists()  # the CLI's background is its own
