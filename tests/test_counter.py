"""The empty counter (ntsnet/counter.py): what the light does is not an item; what is put down is, one box each."""
import numpy as np
import pytest

from ntsnet.counter import Counter, CounterError
from synthetic import counter_scene, packet, place, relit

SCENE = counter_scene(7)


@pytest.fixture(scope="module")
def counter():
    return Counter.learn([relit(SCENE, i) for i in range(8)])


def iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("light", [dict(gain=0.6), dict(gain=1.4), dict(balance=(1.12, 1.0, 0.88)), dict(ramp=0.3),
                                   dict(shadow=0.7), dict(gain=0.8, balance=(0.95, 1.0, 1.08), ramp=-0.2, shadow=0.8)])
def test_the_empty_counter_in_other_light_is_empty(counter, light):
    assert counter.is_empty(relit(SCENE, 100, **light))
    assert counter.regions(relit(SCENE, 101, **light)) == []


def test_an_item_put_down_is_found_with_its_box(counter):
    scene = relit(place(SCENE, packet(1), 100, 80), 5, gain=1.2)
    assert not counter.is_empty(scene)
    regions = counter.regions(scene)
    assert len(regions) == 1 and not regions[0].at_edge
    assert iou(regions[0].box, (100, 80, 144, 140)) > 0.8


def test_an_item_of_the_counters_own_colour_is_found_by_its_outline_and_print(counter):
    own = packet(2, colour=tuple(int(v) for v in SCENE[120, 160]))
    assert len(counter.regions(relit(place(SCENE, own, 200, 100), 6))) == 1


def test_separate_items_get_one_box_each_and_specks_and_arms_are_no_items(counter):
    scene = place(place(SCENE, packet(3), 30, 40), packet(4, colour=(200, 50, 40)), 200, 150)
    scene = place(scene, np.full((3, 3, 3), 20, np.uint8), 150, 30)             # a crumb
    scene = place(scene, np.full((40, 60, 3), (170, 120, 100), np.uint8), 260, 0)  # an arm reaching in at the edge
    regions = counter.regions(relit(scene, 7, gain=0.9))
    inside = [r for r in regions if not r.at_edge]
    assert len(inside) == 2 and {round(iou(r.box, b) > 0.8) for r in inside for b in [(30, 40, 74, 100)] if iou(r.box, b) > 0.1} == {1}
    assert any(r.at_edge for r in regions)


def test_two_touching_items_are_split_where_their_outlines_meet(counter):
    """Side by side, one put down half its height lower: a notch at each end of the line where they meet.
    (Two packets exactly aligned make one rectangle: no shape can tell, and they stay one region.)"""
    scene = place(place(SCENE, packet(5, colour=(40, 60, 200)), 100, 80), packet(6, colour=(40, 170, 60)), 144, 110)
    regions = [r for r in counter.regions(relit(scene, 8)) if not r.at_edge]
    assert len(regions) == 2
    assert max(iou(r.box, (100, 80, 144, 140)) for r in regions) > 0.7
    assert max(iou(r.box, (144, 110, 188, 170)) for r in regions) > 0.7
    assert len(counter.regions(relit(scene, 8), split_touching=False)) == 1  # what the split adds


def test_other_cameras_frames_and_bad_files_are_refused_with_a_reason(counter, tmp_path):
    with pytest.raises(CounterError, match="learnt at 320x240"):
        counter.is_empty(np.zeros((240, 240, 3), np.uint8))
    assert counter.is_empty(relit(np.asarray(__import__("cv2").resize(SCENE, (640, 480))), 9))  # same view, larger: scaled
    with pytest.raises(CounterError, match="needs a photo"):
        Counter.learn([])
    assert Counter.learn([SCENE]).is_empty(relit(SCENE, 12, gain=1.2))  # one photo of it will do
    counter.save(tmp_path / "counter.npz")
    again = Counter.load(tmp_path / "counter.npz")
    assert np.array_equal(again.mean, counter.mean) and again.frame_size == (320, 240)
    (tmp_path / "bad.npz").write_bytes(b"not a counter")
    with pytest.raises(CounterError, match="cannot read"):
        Counter.load(tmp_path / "bad.npz")
    knocked = np.roll(SCENE, 30, axis=0)  # the stand knocked: the counter's edge went up the frame
    assert not counter.moved(relit(SCENE, 10, gain=0.7)) and counter.moved(relit(knocked, 11))

COLOURS8 = [(40, 60, 200), (200, 50, 40), (40, 170, 60), (220, 190, 30), (130, 60, 160), (30, 30, 30), (240, 240, 235), (200, 120, 40)]


def test_a_counter_half_covered_with_items_is_not_a_moved_camera(counter):
    """The light is fitted to the counter that is still bare, however much of it the shopping covers."""
    scene, truth = SCENE, np.zeros(SCENE.shape[:2], bool)
    for k, colour in enumerate(COLOURS8):
        x, y = 16 + 76 * (k % 4), 20 + 95 * (k // 4)
        scene = place(scene, packet(20 + k, 75, 58, colour), x, y)
        truth[y:y + 75, x:x + 58] = True
    frame = relit(scene, 9, gain=0.8, balance=(0.95, 1.0, 1.08), ramp=0.2)
    mask = counter.foreground(frame)
    assert truth.mean() > 0.4 and not counter.moved(frame)
    assert abs(mask.mean() - truth.mean()) < 0.05
    assert len([r for r in counter.regions(frame) if not r.at_edge]) == 8
