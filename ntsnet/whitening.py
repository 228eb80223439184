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
        x = np.asarray(embeddings, np.float64)
        n, d = x.shape
        self.mean = x.mean(0) if n else np.zeros(d)
        centred = x - self.mean
        if n < 2:
            self.alpha, self.vectors, self.gains = 1.0, np.zeros((d, 0)), np.zeros(0)
            return
        if n < d:  # eigenpairs of the covariance from those of the Gram matrix
            lam, u = np.linalg.eigh(centred @ centred.T / (n - 1))
            keep = lam > lam.max() * 1e-10
            lam, u = lam[keep], u[:, keep]
            vectors = centred.T @ u / np.sqrt(lam * (n - 1))
        else:
            lam, vectors = np.linalg.eigh(centred.T @ centred / (n - 1))
            lam = np.clip(lam, 0, None)
        # the mean variance of the directions the photos span: with fewer photos than dimensions, the rest would
        # otherwise drag it down and the directions no photo varies in would swamp the ones they do
        mean_var = lam.sum() / max(1, int((lam > lam.max() * 1e-10).sum()))
        self.alpha = shrink * mean_var if mean_var > 0 else 1.0
        self.vectors = vectors
        # (C + aI)^(-1/2) = a^(-1/2) I + V (diag((lam + a)^(-1/2)) - a^(-1/2)) V^T
        self.gains = 1 / np.sqrt(lam + self.alpha) - 1 / np.sqrt(self.alpha)

    def __call__(self, embeddings) -> np.ndarray:
        x = np.asarray(embeddings, np.float64) - self.mean
        w = x / np.sqrt(self.alpha) + ((x @ self.vectors) * self.gains) @ self.vectors.T
        return (w / (np.linalg.norm(w, axis=1, keepdims=True) + 1e-12)).astype(np.float32)


def whitened_prototypes(whiten: Whitening, embeddings, labels, classes) -> np.ndarray:
    """(len(classes), D) unit prototypes: each class's mean of its whitened unit embeddings, normalised again."""
    w = whiten(embeddings)
    labels = np.asarray(labels)
    protos = np.stack([w[labels == c].mean(0) if (labels == c).any() else np.zeros(w.shape[1]) for c in classes])
    return (protos / (np.linalg.norm(protos, axis=1, keepdims=True) + 1e-12)).astype(np.float32)
