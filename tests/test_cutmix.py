import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.cutmix import cutmix, mixed_losses


def _photos(b=6, h=20, w=30):
    """Photo i is filled with the value i, so every pixel says which photo it came from."""
    return torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w).contiguous()


@pytest.mark.parametrize("seed", range(20))
def test_the_pasted_box_is_the_partner_photo_and_lam_is_the_share_left(seed):
    x, y = _photos(), torch.arange(6) + 10
    mixed, partner, lam = cutmix(x, y, np.random.default_rng(seed))
    assert 0.0 <= lam <= 1.0 and mixed.shape == x.shape
    src = partner - 10  # photo index of each one's partner
    for i in range(6):
        own = (mixed[i] == i).float().mean().item()
        pasted = (mixed[i] == src[i]).float().mean().item()
        if src[i] != i:
            assert own == pytest.approx(lam) and pasted == pytest.approx(1 - lam)
        else:  # mixed with itself: unchanged
            assert own == 1.0
    assert torch.equal(x, _photos())  # the batch given is left alone


def test_box_sizes_follow_beta_one_one():
    rng = np.random.default_rng(0)
    lams = [cutmix(_photos(h=64, w=64), torch.arange(6), rng)[2] for _ in range(400)]
    # Beta(1, 1) areas, clipped at the edges (which only ever leaves more of the photo)
    assert 0.5 <= np.mean(lams) <= 0.75 and min(lams) < 0.2 and max(lams) > 0.9


def test_mixed_loss_weights_each_products_loss_by_its_area():
    logits = torch.randn(4, 3)
    y, partner = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 0])
    loss_fn = lambda out, t: {"total": F.cross_entropy(out, t)}  # noqa: E731
    got = mixed_losses(loss_fn, logits, y, partner, 0.3)["total"]
    assert got == pytest.approx(0.3 * F.cross_entropy(logits, y) + 0.7 * F.cross_entropy(logits, partner))
    assert mixed_losses(loss_fn, logits, y, partner, 1.0)["total"] == pytest.approx(F.cross_entropy(logits, y))
