"""CutMix (Yun et al., 2019): each photo of a batch gets a box cut from another photo of the batch, and its
target becomes the two products weighted by their areas. A regulariser for stage 2, whose classifier learns
the training photos far better than it recognises new ones; stage 3 does not mix (benchmarks/RESULTS.md)."""
from __future__ import annotations

import numpy as np
import torch


def cutmix(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, alpha: float = 1.0):
    """(mixed photos, the partner labels, lam): lam is the share of each photo that is still its own, so the
    loss is lam * loss(y) + (1 - lam) * loss(partner labels). The box size follows Beta(alpha, alpha) as in
    the paper; a box that runs over the edge is clipped and lam recomputed from what was pasted."""
    b, _, h, w = x.shape
    perm = torch.as_tensor(rng.permutation(b), device=y.device)
    cut = float(np.sqrt(1.0 - rng.beta(alpha, alpha)))
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return mixed, y[perm], lam


def mixed_losses(loss_fn, out, y: torch.Tensor, partner: torch.Tensor, lam: float) -> dict[str, torch.Tensor]:
    """Every term of ``loss_fn`` weighted between the photo's own product and the pasted one."""
    own, other = loss_fn(out, y), loss_fn(out, partner)
    return {k: lam * own[k] + (1.0 - lam) * other[k] for k in own}
