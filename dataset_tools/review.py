"""Label review: which photos of a catalogue look wrong, from their embeddings alone (numpy; no model code here).

A photo's own label must not vouch for itself, nor may the photos captured with it (a burst filed under the wrong
product agrees with itself). So every photo is judged *out of sample*, by two voters that never saw it or its session:
- its k nearest photos from other capture sessions, weighted by similarity;
- a ridge classifier fitted, five folds over sessions, on the photos of the other folds.
Their averaged probabilities give each photo a margin: how much more it looks like its best other product than its
own. That is confident learning's idea (Northcutt et al., 2021; cleanlab) with two cheap out-of-sample models.

From the same neighbours: capture sessions that as a whole look like another product, near-duplicates filed under
two products (or split between training and test photos), and outliers that look like no photo of the catalogue.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

K_NEIGHBOURS = 10
VOTE_TEMPERATURE = 0.05      # similarity differences that count: neighbours 0.05 closer weigh e times more
RIDGE_LAMBDA = 0.1
RIDGE_TEMPERATURE = 30.0
FOLDS = 5
KNN_SHARE = 0.7              # of the averaged probabilities; the ridge classifier has the rest
DUPLICATE_SIMILARITY = 0.97  # cosine similarity of two embeddings above which two photos show the same picture
OUTLIER_MADS = 8.0           # a photo this many median deviations less similar to its nearest photo than usual
MIN_MAD = 0.02               # a floor for that deviation: a catalogue of look-alike photos is not all outliers
MIN_EVIDENCE = 3             # photos of a product outside a photo's session needed to judge that photo
MIN_THRESHOLD = 0.05         # a floor for the per-product thresholds
MIN_SESSION = 3              # sessions smaller than this are judged photo by photo
SEARCH_DIMS = 256            # large catalogues search neighbours in this many directions (exact search)
PROJECT_ABOVE = 20000        # photos; below this the full embeddings are searched
BLOCK = 512                  # query rows per block of the similarity matrix


@dataclass
class ReviewReport:
    suspects: list = field(default_factory=list)     # {"id", "product", "suggested", "score", "kind", ...}, worst first
    duplicates: list = field(default_factory=list)   # [id, id, similarity] across products or across splits
    sessions: list = field(default_factory=list)     # {"ids", "product", "suggested", "score"}
    confusion: dict = field(default_factory=dict)    # product -> {other product: photos that look like it}
    probabilities: np.ndarray | None = None          # (N, C) out of sample, each product scaled by its threshold

    def to_dict(self) -> dict:
        return {"suspects": self.suspects, "duplicates": self.duplicates, "sessions": self.sessions, "confusion": self.confusion}


def find_sessions(rows: list[dict], gap_seconds: float = 60.0) -> np.ndarray:
    """A session id per row (rows in capture order: dicts with id, product, source, created_at as ISO text). A session
    is a run of webcam or upload photos of one product whose capture times are at most ``gap_seconds`` apart; an
    imported photo is a session of its own (its neighbours in an import are not one capture)."""
    from datetime import datetime

    out = np.zeros(len(rows), np.int64)
    session, last = -1, None
    for n, r in enumerate(rows):
        t = _seconds(r.get("created_at"), datetime)
        key = (r.get("product"), r.get("source"))
        same = (last is not None and r.get("source") in ("webcam", "upload") and key == last[0]
                and t is not None and last[1] is not None and 0 <= t - last[1] <= gap_seconds)
        session = session if same else session + 1
        out[n], last = session, (key, t)
    return out


def _seconds(text, datetime) -> float | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except (TypeError, ValueError):
        return None


def search_space(x: np.ndarray, dims: int = SEARCH_DIMS) -> np.ndarray:
    """Unit vectors to search neighbours in: the embeddings projected on the ``dims`` directions that keep their
    dot products best (the search then costs dims/D of the full one), renormalised."""
    x = np.asarray(x, np.float32)
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    if x.shape[1] > dims and len(x) > dims:  # not centred: the directions that keep dot products best
        _, vecs = np.linalg.eigh((x.T @ x).astype(np.float64))
        x = x @ vecs[:, -dims:].astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return x


def neighbours(x: np.ndarray, sessions: np.ndarray, k: int = K_NEIGHBOURS) -> tuple[np.ndarray, ...]:
    """For every row: its ``k`` most similar rows of other sessions (indices, similarities), and its most similar
    row of any session but itself (index, similarity). Exact search in blocks of rows."""
    n = len(x)
    k = max(1, min(k, n - 1))
    idx, sim = np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)
    near, near_sim = np.zeros(n, np.int64), np.zeros(n, np.float32)
    for start in range(0, n, BLOCK):
        rows = np.arange(start, min(start + BLOCK, n))
        s = x[rows] @ x.T
        s[np.arange(len(rows)), rows] = -np.inf
        near[rows] = s.argmax(1)
        near_sim[rows] = s[np.arange(len(rows)), near[rows]]
        s[sessions[rows][:, None] == sessions[None, :]] = -np.inf
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        idx[rows], sim[rows] = top, np.take_along_axis(s, top, 1)
    return idx, sim, near, near_sim


def knn_votes(idx: np.ndarray, sim: np.ndarray, labels: np.ndarray, n_classes: int, tau: float = VOTE_TEMPERATURE) -> np.ndarray:
    """(N, C) probabilities from the neighbours' labels, weighted by exp(similarity / tau); unlabelled ones abstain."""
    valid = np.isfinite(sim) & (labels[idx] >= 0)
    top = np.where(valid, sim, -np.inf).max(1, keepdims=True)
    w = np.where(valid, np.exp((sim - np.where(np.isfinite(top), top, 0)) / tau), 0.0)
    p = np.zeros((len(idx), n_classes), np.float32)
    np.add.at(p, (np.repeat(np.arange(len(idx)), idx.shape[1]), np.where(valid, labels[idx], 0).ravel()), w.ravel())
    total = p.sum(1, keepdims=True)
    return np.where(total > 0, p / np.where(total > 0, total, 1), 1.0 / n_classes)


def ridge_out_of_fold(x: np.ndarray, labels: np.ndarray, sessions: np.ndarray, n_classes: int, folds: int = FOLDS,
                      lam: float = RIDGE_LAMBDA, temperature: float = RIDGE_TEMPERATURE, seed: int = 0) -> np.ndarray:
    """(N, C) probabilities of a ridge classifier (least squares on one-hot targets, closed form) that never saw the
    row's session: the sessions are dealt into ``folds`` folds, each predicted by a fit on the others."""
    fold_of_session = np.random.default_rng(seed).integers(0, folds, sessions.max() + 1 if len(sessions) else 1)
    fold = fold_of_session[sessions]
    xb = np.hstack([x, np.ones((len(x), 1), np.float32)])
    labelled = labels >= 0
    out = np.full((len(x), n_classes), 1.0 / n_classes, np.float32)
    for f in range(folds):
        train, test = np.flatnonzero((fold != f) & labelled), np.flatnonzero(fold == f)
        if not len(train) or not len(test):
            continue
        a = (xb[train].T @ xb[train]).astype(np.float64) + lam * np.eye(xb.shape[1])
        rhs = np.zeros((n_classes, xb.shape[1]), np.float64)  # X^T Y without the one-hot matrix
        np.add.at(rhs, labels[train], xb[train])
        w = np.linalg.solve(a, rhs.T).astype(np.float32)
        for start in range(0, len(test), 4 * BLOCK):
            rows = test[start:start + 4 * BLOCK]
            z = xb[rows] @ w * temperature
            z -= z.max(1, keepdims=True)
            e = np.exp(z)
            out[rows] = e / e.sum(1, keepdims=True)
    return out


def judgeable(labels: np.ndarray, sessions: np.ndarray) -> np.ndarray:
    """Rows whose product has at least MIN_EVIDENCE photos in other capture sessions: only those can be judged out
    of sample (a product captured in one burst has nothing outside the burst to vouch for it, or against it)."""
    total: dict = {}
    per_session: dict = {}
    for lab, ses in zip(labels.tolist(), sessions.tolist()):
        if lab >= 0:
            total[lab] = total.get(lab, 0) + 1
            per_session[(ses, lab)] = per_session.get((ses, lab), 0) + 1
    return np.array([lab >= 0 and total[lab] - per_session[(ses, lab)] >= MIN_EVIDENCE
                     for lab, ses in zip(labels.tolist(), sessions.tolist())], bool)


def normalised(p: np.ndarray, labels: np.ndarray, judged: np.ndarray | None = None) -> np.ndarray:
    """Every product's probability divided by its threshold, the mean probability its own (judgeable) photos get
    (confident learning's per-class thresholds): a product the models find hard is not flagged wholesale."""
    judged = labels >= 0 if judged is None else judged
    thresholds = np.array([p[(labels == c) & judged, c].mean() if ((labels == c) & judged).any() else 1.0
                           for c in range(p.shape[1])])
    return (p / np.maximum(thresholds, MIN_THRESHOLD)).astype(np.float32)


def margins(q: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each labelled row's most likely other product and how far it is above the row's own (-inf if unlabelled)."""
    labelled = np.flatnonzero(labels >= 0)
    own = np.zeros(len(q))
    own[labelled] = q[labelled, labels[labelled]]
    other = q.copy()
    other[labelled, labels[labelled]] = -np.inf
    return other.argmax(1), np.where(labels >= 0, other.max(1) - own, -np.inf)


def review(embeddings: np.ndarray, labels: list, ids: list, products: list[str], sessions: np.ndarray,
           splits: list | None = None, skip: set | None = None) -> ReviewReport:
    """The review of a catalogue. ``labels[i]``: an index into ``products`` or -1 (unlabelled); ``skip``: (id, kind)
    pairs a person already answered "keep" to. Unlabelled photos vote for nothing and are not suspects."""
    labels, sessions = np.asarray(labels, np.int64), np.asarray(sessions, np.int64)
    ids, skip = list(ids), skip or set()
    report = ReviewReport()
    if len(ids) < 3 or len(products) < 2:
        return report
    dims = SEARCH_DIMS if len(ids) > PROJECT_ABOVE else embeddings.shape[1]
    x = search_space(embeddings, dims)
    idx, sim, near, near_sim = neighbours(x, sessions)
    p = KNN_SHARE * knn_votes(idx, sim, labels, len(products)) + (1 - KNN_SHARE) * ridge_out_of_fold(x, labels, sessions, len(products))
    judged = judgeable(labels, sessions)
    report.probabilities = q = normalised(p, labels, judged)
    suggested, margin = margins(q, labels)
    margin[~judged] = -np.inf
    taken = _session_suspects(report, ids, labels, products, sessions, q, skip, judged)
    for i in np.flatnonzero(margin > 0):
        if i not in taken and (ids[i], "wrong-label") not in skip:
            report.suspects.append({"id": ids[i], "product": products[labels[i]], "suggested": products[suggested[i]],
                                    "score": round(float(margin[i]), 4), "kind": "wrong-label"})
            taken.add(i)
    _duplicates(report, ids, labels, products, splits, near, near_sim, margin, taken, skip)
    _outliers(report, ids, labels, products, near_sim, skip)
    report.suspects.sort(key=lambda s: -s["score"])
    report.confusion = _confusion(labels, suggested, margin, products)
    return report


def _session_suspects(report, ids, labels, products, sessions, q, skip, judged) -> set:
    """Sessions whose photos, averaged, look more like another product than their own; returns their rows."""
    rows_of: dict[int, list[int]] = {}
    for i, s in enumerate(sessions):
        if labels[i] >= 0:
            rows_of.setdefault(int(s), []).append(i)
    taken = set()
    for rows in rows_of.values():
        if len(rows) < MIN_SESSION or not judged[rows[0]] or all((ids[i], "session") in skip for i in rows):
            continue
        rival, score = margins(q[rows].mean(0, keepdims=True), labels[rows[:1]])
        if score[0] <= 0:
            continue
        own, rival = int(labels[rows[0]]), int(rival[0])
        report.sessions.append({"ids": [ids[i] for i in rows], "product": products[own], "suggested": products[rival],
                                "score": round(float(score[0]), 4)})
        for i in rows:
            report.suspects.append({"id": ids[i], "product": products[own], "suggested": products[rival],
                                    "score": round(float(score[0]), 4), "kind": "session", "session": len(report.sessions) - 1})
        taken.update(rows)
    report.sessions.sort(key=lambda s: -s["score"])
    return taken


def _duplicates(report, ids, labels, products, splits, near, near_sim, margin, taken, skip):
    """Near-identical pairs filed under two products (the one that looks more wrong becomes a suspect unless it is
    one already) or split between training and evaluation photos (reported, not suspects)."""
    seen = set()
    for i, j in enumerate(near):
        pair = (min(i, j), max(i, j))
        if near_sim[i] < DUPLICATE_SIMILARITY or pair in seen:
            continue
        seen.add(pair)
        across_products = labels[i] >= 0 and labels[j] >= 0 and labels[i] != labels[j]
        across_splits = bool(splits) and splits[i] != splits[j] and "train" in (splits[i], splits[j])
        if not (across_products or across_splits):
            continue
        report.duplicates.append([ids[i], ids[j], round(float(near_sim[i]), 4)])
        worse, other = (i, j) if margin[i] >= margin[j] else (j, i)
        if not across_products or (ids[worse], "duplicate") in skip:
            continue
        flagged = next((s for s in report.suspects if s["id"] == ids[worse] and s["kind"] == "wrong-label"), None)
        if flagged is not None:  # the same picture under another product says more than "looks like"
            flagged.update(kind="duplicate", other=ids[other], suggested=products[labels[other]])
        elif worse not in taken and other not in taken:
            report.suspects.append({"id": ids[worse], "product": products[labels[worse]], "suggested": products[labels[other]],
                                    "score": round(float(max(margin[worse], 0.0)), 4), "kind": "duplicate", "other": ids[other]})
            taken.add(worse)


def _outliers(report, ids, labels, products, near_sim, skip):
    """Photos much less similar to their nearest photo than photos usually are: pictures of no product."""
    best = near_sim
    finite = np.isfinite(best)
    if finite.sum() < 8:
        return
    med = float(np.median(best[finite]))
    mad = max(float(np.median(np.abs(best[finite] - med))), MIN_MAD)
    for i in np.flatnonzero(finite & (best < med - OUTLIER_MADS * mad)):
        if (ids[i], "outlier") not in skip:
            report.suspects.append({"id": ids[i], "product": products[labels[i]] if labels[i] >= 0 else None, "suggested": None,
                                    "score": round(float((med - best[i]) / (OUTLIER_MADS * mad)), 4), "kind": "outlier"})


def _confusion(labels, suggested, margin, products) -> dict:
    """Per product, how many of its photos look more like which other product (out of sample)."""
    out: dict = {}
    for i in np.flatnonzero((labels >= 0) & (margin > 0)):
        row = out.setdefault(products[labels[i]], {})
        row[products[suggested[i]]] = row.get(products[suggested[i]], 0) + 1
    return out


def coverage_hints(counts: dict, tags: dict, confusion: dict, min_photos: int = 10, views=("front", "side", "back")) -> list[str]:
    """'Capture next' hints per product from its photo count, its view tags and the products it is confused with.
    ``counts``: product -> photos; ``tags``: product -> {tag: photos}."""
    hints = []
    for product, n in sorted(counts.items()):
        bits = [f"fewer than {min_photos} photos"] if n < min_photos else []
        missing = [v for v in views if not tags.get(product, {}).get(v)]
        if tags.get(product) and missing:
            bits.append("no " + "/".join(missing) + " views")
        worst = max(confusion.get(product, {}).items(), key=lambda kv: kv[1], default=None)
        if worst and worst[1] >= max(1, math.ceil(0.1 * n)):
            bits.append(f"confused with {worst[0]} on {worst[1]} of {n}")
        if bits:
            hints.append(f"{product}: {n} photos, " + ", ".join(bits))
    return hints
