"""Unknown-input scores: how much a photo looks like one of the catalogue's products (higher: more like a known one).

Numpy only, so the instant model, the Predictor, the evaluation and the benchmarks share one definition. Each score
is cheap on top of what a model computes anyway: its logits (max softmax, max logit, energy) or its pooled features
(cosine to the k-th nearest catalogue photo, after Sun et al. 2022; relative Mahalanobis, after Ren et al. 2021).
"""
from __future__ import annotations

import numpy as np

LOGIT_SCORES = ("max_softmax", "max_logit", "energy")


def unit_rows(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def softmax(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def logit_score(logits, name: str) -> np.ndarray:
    """(N,) score of each row of (N, C) logits: max softmax probability, max logit, or energy (log-sum-exp)."""
    z = np.asarray(logits, np.float64)
    top = z.max(axis=1)
    if name == "max_logit":
        return top
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    if name == "energy":
        return lse
    if name == "max_softmax":
        return np.exp(top - lse)
    raise ValueError(f"unknown logit score {name!r}: one of {', '.join(LOGIT_SCORES)}")


def knn_similarity(queries, bank, k: int = 1, chunk: int = 4096) -> np.ndarray:
    """(N,) cosine similarity of each query to its k-th nearest row of ``bank`` (both L2-normalised rows)."""
    q, b = np.asarray(queries, np.float32), np.asarray(bank, np.float32)
    if len(b) == 0:
        return np.full(len(q), -1.0)
    k = max(1, min(k, len(b)))
    out = np.empty(len(q), np.float64)
    for start in range(0, len(q), chunk):
        sims = q[start:start + chunk] @ b.T
        out[start:start + chunk] = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    return out


class GaussianFit:
    """Relative Mahalanobis (Ren et al. 2021, "A simple fix to Mahalanobis distance for near-OOD detection"):
    per-class means with one shared covariance, minus the distance under one Gaussian of all photos. Features are
    L2-normalised first; the covariances are shrunk towards their mean variance (few photos per product)."""

    def __init__(self, feats, labels, shrink: float = 0.1):
        x = unit_rows(feats).astype(np.float64)
        labels = np.asarray(labels)
        self.classes = np.unique(labels)
        self.means = np.stack([x[labels == c].mean(0) for c in self.classes])
        within = x - self.means[np.searchsorted(self.classes, labels)]
        self.precision = self._inverse(within, shrink)
        self.mean0 = x.mean(0)
        self.precision0 = self._inverse(x - self.mean0, shrink)

    @staticmethod
    def _inverse(centred, shrink):
        cov = centred.T @ centred / max(1, len(centred) - 1)
        cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
        return np.linalg.inv(cov)

    def score(self, feats) -> np.ndarray:
        x = unit_rows(feats).astype(np.float64)
        xp, mp = x @ self.precision, self.means @ self.precision   # (x - m)P(x - m) = xPx - 2 xPm + mPm
        per_class = (xp * x).sum(1)[:, None] - 2 * xp @ self.means.T + (mp * self.means).sum(1)[None, :]
        d0 = x - self.mean0
        background = ((d0 @ self.precision0) * d0).sum(1)
        return -(per_class - background[:, None]).min(axis=1)


def auroc(known_scores, unknown_scores) -> float:
    """P(a known photo scores higher than an unknown one), ties counting half (Mann-Whitney U), by ranks."""
    k, u = np.asarray(known_scores, np.float64), np.asarray(unknown_scores, np.float64)
    if not len(k) or not len(u):
        return float("nan")
    both = np.concatenate([k, u])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    sorted_vals = both[order]  # average the ranks of ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_vals)) + 1]
    ends = np.r_[starts[1:], len(both)]
    for s, e in zip(starts, ends):
        if e - s > 1:
            ranks[order[s:e]] = (s + 1 + e) / 2
    return float((ranks[: len(k)].sum() - len(k) * (len(k) + 1) / 2) / (len(k) * len(u)))


def rejected_at_kept(known_scores, unknown_scores, keep: float = 0.95) -> float:
    """Share of unknown photos below the threshold that keeps ``keep`` of the known ones."""
    k, u = np.asarray(known_scores, np.float64), np.asarray(unknown_scores, np.float64)
    if not len(k) or not len(u):
        return float("nan")
    return float((u < np.quantile(k, 1 - keep)).mean())


def without_own_class(logits, labels) -> np.ndarray:
    """(N, C-1) logits with each row's own class removed: a known photo as the model would see it if its product
    were not in the catalogue (its closest relatives still are)."""
    z = np.asarray(logits, np.float64)
    keep = np.ones(z.shape, bool)
    keep[np.arange(len(z)), np.asarray(labels)] = False
    return z[keep].reshape(len(z), z.shape[1] - 1)


def choose_threshold(known_scores, unknown_scores, keep: float = 0.95) -> tuple[float, float, float]:
    """(threshold, known kept, unknown rejected): the threshold that best separates the two (Youden's J), but never
    one that keeps fewer than ``keep`` of the known photos."""
    k, u = np.sort(np.asarray(known_scores, np.float64)), np.asarray(unknown_scores, np.float64)
    cap = float(np.quantile(k, 1 - keep))
    best, best_j = cap, -np.inf
    for t in np.unique(np.concatenate([k, u])):
        if t > cap:
            break
        j = (k >= t).mean() - (u >= t).mean()
        if j > best_j + 1e-12:
            best, best_j = float(t), j
    return best, float((k >= best).mean()), float((u < best).mean()) if len(u) else float("nan")
