"""The instant model's view of its embeddings: centred on the catalogue's mean and whitened by its own covariance.

ImageNet features spend most of their variance on what every product photo shares (a shelf, a hand, light); whitened
by the catalogue's statistics, the directions that tell its products apart count as much as those. The covariance is
shrunk towards the mean variance of the directions the photos vary in (``SHRINK``), which also weighs directions no
photo varies in yet (a new catalogue has fewer photos than dimensions) like a direction of average variance. The
prototype rule on whitened embeddings named the right grocery product more often and separated products nobody
captured better than on raw ones (benchmarks/open_set.py, RESULTS.md).
"""
from __future__ import annotations

import numpy as np

SHRINK = 0.3  # added to every variance, as a share of the mean variance


class Whitening:
    """x -> (C + a I)^(-1/2) (x - mean), rows L2-normalised; fitted on (N, D) embeddings. Uses the N x N Gram matrix
    when N < D (a new catalogue), the D x D covariance otherwise: the same transform either way."""

    def __init__(self, embeddings, shrink: float = SHRINK):
        x = np.asarray(embeddings, np.float32)  # products of float32 unit vectors: float32 sums suffice, 4x faster
        n, d = x.shape
        self.mean = x.mean(0, dtype=np.float64) if n else np.zeros(d)
        centred = x - self.mean.astype(np.float32)
        if n < 2:  # nothing varies yet: centring alone
            lam, vectors = np.zeros(0), np.zeros((d, 0))
        elif n < d:  # eigenpairs of the covariance from those of the Gram matrix
            lam, u = np.linalg.eigh((centred @ centred.T).astype(np.float64) / (n - 1))
            keep = lam > lam.max() * 1e-6
            lam, u = lam[keep], u[:, keep]
            vectors = centred.astype(np.float64).T @ u / np.sqrt(lam * (n - 1))
        else:
            lam, vectors = np.linalg.eigh((centred.T @ centred).astype(np.float64) / (n - 1))
            lam = np.clip(lam, 0, None)
        # the mean variance of the directions the photos span: with fewer photos than dimensions, the rest would
        # otherwise drag it down and the directions no photo varies in would swamp the ones they do
        mean_var = lam.sum() / max(1, int((lam > lam.max() * 1e-10).sum())) if len(lam) else 0.0
        self.alpha = shrink * mean_var if mean_var > 0 else 1.0
        self.vectors = vectors
        # (C + aI)^(-1/2) = a^(-1/2) I + V (diag((lam + a)^(-1/2)) - a^(-1/2)) V^T
        self.gains = 1 / np.sqrt(lam + self.alpha) - 1 / np.sqrt(self.alpha)
        self._mean32, self._scale = self.mean.astype(np.float32), np.float32(1 / np.sqrt(self.alpha))
        self._vectors32, self._gains32, self._matrix = self.vectors.astype(np.float32), self.gains.astype(np.float32), None
        if self.vectors.shape[1] > d // 2:  # one D x D product is cheaper than two thin ones
            self._matrix = (np.eye(d) / np.sqrt(self.alpha) + (self.vectors * self.gains) @ self.vectors.T).astype(np.float32)

    def __call__(self, embeddings) -> np.ndarray:
        x = np.asarray(embeddings, np.float32) - self._mean32
        if self._matrix is not None:
            w = x @ self._matrix
        else:
            w = x * self._scale + ((x @ self._vectors32) * self._gains32) @ self._vectors32.T
        return w / (np.linalg.norm(w, axis=1, keepdims=True) + 1e-12)


def whitened_prototypes(whiten: Whitening, embeddings, labels, classes) -> np.ndarray:
    """(len(classes), D) unit prototypes: each class's mean of its whitened unit embeddings, normalised again."""
    w = whiten(embeddings)
    row = {c: k for k, c in enumerate(classes)}
    which = np.array([row.get(label, -1) for label in labels])
    order = np.argsort(which, kind="stable")
    order = order[which[order] >= 0]
    present, starts, counts = np.unique(which[order], return_index=True, return_counts=True)
    protos = np.zeros((len(classes), w.shape[1]), np.float64)
    if len(order):  # each class's rows summed in one pass over the rows sorted by class
        protos[present] = np.add.reduceat(w[order], starts, axis=0) / counts[:, None]
    return (protos / (np.linalg.norm(protos, axis=1, keepdims=True) + 1e-12)).astype(np.float32)
