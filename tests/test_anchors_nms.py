import math

import pytest
import torch

from ntsnet.anchors import DEFAULT_LEVELS, anchor_count, generate_anchors, level_shapes, select_proposals, suppression_table
from ntsnet.model import Navigator


def test_448_gives_1614_anchors_of_the_reference_design():
    a = generate_anchors(448)
    assert a.shape == (1614, 4) and anchor_count(448) == 1614
    assert level_shapes(448) == [(14, 14), (7, 7), (4, 4)]
    # first anchor: level stride 32, size 48, scale 2^(1/3), ratio 0.667, centred on the first cell (16, 16)
    h = 48 * 2 ** (1 / 3) / math.sqrt(0.667)
    w = 48 * 2 ** (1 / 3) * math.sqrt(0.667)
    torch.testing.assert_close(a[0], torch.tensor([16 - w / 2, 16 - h / 2, 16 + w / 2, 16 + h / 2]))
    # next anchor is the next column of the same (scale, ratio) map
    torch.testing.assert_close(a[1] - a[0], torch.tensor([32.0, 0, 32, 0]))
    # last anchor: coarsest level (stride 128, size 192), largest scale, ratio 1.5, last cell (448, 448)
    s = 192 * 2 ** (2 / 3)
    h, w = s / math.sqrt(1.5), s * math.sqrt(1.5)
    torch.testing.assert_close(a[-1], torch.tensor([448 - w / 2, 448 - h / 2, 448 + w / 2, 448 + h / 2]))


def test_every_anchor_has_the_designed_areas_and_ratios():
    a = generate_anchors(448)
    widths, heights = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    ratios = torch.unique(torch.round(widths / heights * 1000) / 1000)
    assert ratios.tolist() == pytest.approx([0.667, 1.0, 1.5], abs=2e-3)
    expected_sides = sorted({round(lv.size * s, 3) for lv in DEFAULT_LEVELS for s in lv.scales})
    sides = torch.unique(torch.round(torch.sqrt(widths * heights) * 1000) / 1000).tolist()
    assert sides == pytest.approx(expected_sides, rel=1e-3)


@pytest.mark.parametrize("size,expected", [(224, 7 * 7 * 6 + 4 * 4 * 6 + 2 * 2 * 9), ((300, 200), 10 * 7 * 6 + 5 * 4 * 6 + 3 * 2 * 9), (96, 3 * 3 * 6 + 2 * 2 * 6 + 1 * 9)])
def test_other_input_sizes_match_the_navigator_output(size, expected):
    assert generate_anchors(size).shape[0] == expected == anchor_count(size)
    h, w = (size, size) if isinstance(size, int) else size
    fmap = torch.zeros(1, 8, math.ceil(h / 32), math.ceil(w / 32))
    assert Navigator(8)(fmap).shape == (1, expected)


def brute_force_nms(boxes, scores, top_n, iou_thr):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    kept = []
    for i in order:
        ok = True
        for j in kept:
            x0 = max(boxes[i][0], boxes[j][0]); y0 = max(boxes[i][1], boxes[j][1])
            x1 = min(boxes[i][2], boxes[j][2]); y1 = min(boxes[i][3], boxes[j][3])
            inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])
            if inter / (area(boxes[i]) + area(boxes[j]) - inter) > iou_thr:
                ok = False
                break
        if ok:
            kept.append(i)
            if len(kept) == top_n:
                break
    return kept


@pytest.mark.parametrize("with_table", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_hard_nms_matches_a_brute_force_reference(seed, with_table):
    g = torch.Generator().manual_seed(seed)
    anchors = generate_anchors(224)
    scores = torch.randn(3, anchors.shape[0], generator=g)
    table = suppression_table(anchors, 0.25) if with_table else None
    got = select_proposals(scores, anchors, top_n=6, iou_threshold=0.25, table=table)
    boxes = anchors.tolist()
    for b in range(3):
        assert got[b].tolist() == brute_force_nms(boxes, scores[b].tolist(), 6, 0.25)


@pytest.mark.parametrize("size", [448, 224, 96, 32])
def test_the_table_picks_what_torchvision_picks(size):
    """The precomputed-table NMS repeats torchvision's kernel arithmetic: the same picks, also for IoUs that sit on
    the threshold and for tiny inputs where suppressed anchors fill up; per image of a batch as for one image."""
    g = torch.Generator().manual_seed(size)
    anchors = generate_anchors(size)
    for thr in (0.25, 0.3, 0.7, 0.05, 1.0):
        table = suppression_table(anchors, thr)
        for scale in (0.01, 1.0, 100.0):
            scores = torch.randn(4, anchors.shape[0], generator=g) * scale
            for top_n in (1, 4, 6):
                got = select_proposals(scores, anchors, top_n, thr, table=table)
                for b in range(4):
                    assert torch.equal(got[b], select_proposals(scores[b:b + 1], anchors, top_n, thr)[0]), (thr, scale, top_n, b)
    # thresholds equal to IoUs that occur between the anchors: "> threshold" must hold exactly where the kernel's does
    from torchvision.ops import box_iou

    ious = box_iou(anchors, anchors).flatten()
    ious = ious[(ious > 0.05) & (ious < 0.95)]
    for thr in ious[torch.randint(len(ious), (3,), generator=g)].tolist():
        table = suppression_table(anchors, thr)
        scores = torch.randn(2, anchors.shape[0], generator=g)
        assert torch.equal(select_proposals(scores, anchors, 6, thr, table=table), select_proposals(scores, anchors, 6, thr))


@pytest.mark.parametrize("with_table", [False, True])
def test_nms_fills_up_when_too_few_anchors_survive(with_table):
    anchors = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10.5], [1, 1, 10, 10]], dtype=torch.float)
    table = suppression_table(anchors, 0.25) if with_table else None
    idx = select_proposals(torch.tensor([[0.1, 0.9, 0.5]]), anchors, top_n=3, table=table)
    assert idx.tolist() == [[1, 2, 0]]  # 1 survives NMS; the suppressed ones follow by score


def test_the_model_keeps_one_table_per_size_and_device():
    from ntsnet import NTSConfig, create_model

    net = create_model(NTSConfig(backbone="tiny", num_classes=2, input_size=64, part_size=32, proposal_num=3, cat_num=2), pretrained=False)
    table = net.suppression_table(torch.device("cpu"))
    assert table.shape == (net.num_anchors, net.num_anchors) and table is net.suppression_table(torch.device("cpu"))
    on_device = net.suppression_table(torch.device("meta"))  # what a GPU gets: a bool tensor there
    assert isinstance(on_device, torch.Tensor) and on_device.device.type == "meta" and on_device.dtype == torch.bool
    assert on_device.shape == table.shape


@pytest.mark.parametrize("size,top_n", [(448, 6), (448, 4), (224, 6), (96, 6), (32, 6)])
@pytest.mark.parametrize("seed", range(4))
def test_the_batched_device_nms_picks_what_the_cpu_walk_picks(size, top_n, seed):
    """select_on_device (a GPU's NMS: the whole batch at once) against the per-image walk: the same picks, in the same
    order, also for tied scores (odd seeds) and for tiny inputs where suppressed anchors fill the gap."""
    anchors = generate_anchors(size)
    table = suppression_table(anchors, 0.25)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(7, anchors.shape[0], generator=g)
    if seed % 2:
        scores = scores.round(decimals=1)
    n = min(top_n, anchors.shape[0])
    walked = select_proposals(scores, anchors, n, 0.25, table=table)
    batched = select_proposals(scores, anchors, n, 0.25, table=torch.from_numpy(table))
    assert torch.equal(walked, batched)


def test_a_training_step_reads_nothing_back_from_its_device():
    """A value read back to the host inside the step stalls a GPU's queue (the old NMS did it per image). On the meta
    device any read-back raises, so the whole step (forward with M proposals, the three losses, backward) running
    there shows there is none."""
    from ntsnet import NTSConfig, NTSNet, nts_loss

    cfg = NTSConfig(backbone="tiny", num_classes=3, input_size=96, part_size=48, proposal_num=4, cat_num=2)
    net = NTSNet(cfg, pretrained=False).to("meta").train()
    out = net(torch.randn(4, 3, 96, 96, device="meta"))
    nts_loss(out, torch.zeros(4, dtype=torch.long, device="meta"), cfg)["total"].backward()
    assert out.part_index.shape == (4, 4) and out.part_boxes.device.type == "meta"


def test_a_gpus_training_step_is_one_graph_for_torch_compile(monkeypatch):
    """With the NMS over the whole batch and roi_align for the crops (what a GPU runs), the step from photos to the
    loss traces as a single graph: torch.compile and CUDA graphs can take it whole."""
    from torchvision.ops import roi_align

    import ntsnet.model as model_module
    from ntsnet import NTSConfig, NTSNet, nts_loss

    cfg = NTSConfig(backbone="tiny", num_classes=3, input_size=96, part_size=48, proposal_num=4, cat_num=2)
    net = NTSNet(cfg, pretrained=False).train()
    table = torch.from_numpy(net.suppression_table(torch.device("cpu")))
    net.suppression_table = lambda device: table  # the tensor table a GPU gets
    monkeypatch.setattr(model_module, "crop_boxes", lambda x, rois, size: roi_align(
        x, rois.to(x.dtype), output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True))
    labels = torch.zeros(4, dtype=torch.long)
    explained = torch._dynamo.explain(lambda x: nts_loss(net(x), labels, cfg)["total"])(torch.randn(4, 3, 96, 96))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
