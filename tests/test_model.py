import itertools

import pytest
import torch

from conftest import TINY, fit_tiny
from ntsnet import NTSConfig, NTSNet, nts_loss, ranking_loss


def eq3_by_hand(scores, confidences):
    """Paper eq. 3 transcribed literally: sum over pairs (i, s) with C_i < C_s of max(1 - (I_s - I_i), 0)."""
    total = 0.0
    for i, s in itertools.product(range(len(scores)), repeat=2):
        if confidences[i] < confidences[s]:
            total += max(1 - (scores[s] - scores[i]), 0.0)
    return total


def test_ranking_loss_is_paper_eq3():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 6, generator=g)
    ce = torch.rand(4, 6, generator=g)  # Teacher cross-entropy: confidence C = exp(-ce), so lower ce = higher C
    expected = sum(eq3_by_hand(scores[b].tolist(), (-ce[b]).tolist()) for b in range(4)) / 4
    assert ranking_loss(scores, ce).item() == pytest.approx(expected, rel=1e-5)


def test_ranking_loss_is_zero_when_order_agrees_with_margin():
    ce = torch.tensor([[0.1, 0.5, 0.9]])       # part 0 most confident
    scores = torch.tensor([[5.0, 3.0, 1.0]])   # and most informative, by a margin > 1
    assert ranking_loss(scores, ce).item() == 0.0
    assert ranking_loss(scores.flip(1), ce).item() > 0


@pytest.mark.parametrize("k", [0, 2, 4])
def test_output_shapes_for_each_k(k):
    cfg = NTSConfig(**{**TINY, "proposal_num": 6, "cat_num": k, "num_classes": 5})
    model = NTSNet(cfg, pretrained=False)
    x = torch.randn(2, 3, 96, 96)
    model.train()
    out = model(x)
    assert out.concat_logits.shape == (2, 5) and out.raw_logits.shape == (2, 5)
    assert out.part_logits.shape == (2, 6, 5) and out.part_boxes.shape == (2, 6, 4)
    assert model.scrutinizer_head.in_features == model.backbone.out_channels * (k + 1)
    losses = nts_loss(out, torch.tensor([0, 3]), cfg)
    assert set(losses) >= {"total", "L_I", "L_S", "L_C"}
    losses["total"].backward()
    assert model.navigator.tidy[0].weight.grad is not None  # L_I reaches the Navigator
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.part_boxes.shape == (2, k, 4)  # inference crops only the K parts it uses


def test_total_loss_is_the_weighted_sum():
    cfg = NTSConfig(**{**TINY, "num_classes": 3, "lambda_s": 2.0, "mu_c": 0.5})
    model = NTSNet(cfg, pretrained=False).train()
    out = model(torch.randn(2, 3, 96, 96))
    losses = nts_loss(out, torch.tensor([0, 1]), cfg)
    assert losses["total"].item() == pytest.approx((losses["L_I"] + 2 * losses["L_S"] + 0.5 * losses["L_C"]).item(), rel=1e-5)


def test_navigator_does_not_backpropagate_into_the_backbone():
    cfg = NTSConfig(**{**TINY, "num_classes": 3})
    model = NTSNet(cfg, pretrained=False).train()
    out = model(torch.randn(2, 3, 96, 96))
    out.part_scores.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())


def test_config_rejects_k_above_m():
    with pytest.raises(ValueError, match="cat_num"):
        NTSConfig(proposal_num=2, cat_num=4)


def test_tiny_synthetic_task_is_fitted_in_seconds():
    _, _, acc = fit_tiny(seed=1)
    assert acc >= 0.95
