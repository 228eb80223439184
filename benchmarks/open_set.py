"""How well each unknown-input score separates products nobody captured from the catalogue's own, on real photos.

    python benchmarks/open_set.py [--draws 5] [--run RUN_DIR ...] [--json out.json]

Builds the grocery catalogue (train and val lists as the splits). For each draw, ten products play "not in the
catalogue": eight siblings of products that stay (another apple, the same brand's other carton) and two with no
relative there. Known photos: the val photos of the other products; unknown photos: the val photos of the held-out
ones (their training photos were taken in the sessions of the other training photos, and look closer to the bank
than any new capture: as unknowns they read AUROC below 0.5).

- instant model: frozen Lite0 embeddings (224 px); bank = the known products' training photos;
- a trained model (``--run``: a Train job run with ``--exclude-products``, its held-out products read from its
  config.json): its logits and pooled features of the same photos.

Per score: AUROC and the share of unknown photos rejected at 95% of known photos kept; the known photos' top-1 (for
the instant model with plain and whitened prototypes); for a trained run, how a leave-products-out stand-in for
unknown photos compares with the real ones.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from common import DATA, ROOT, machine_line  # noqa: E402,F401  (ROOT: sys.path set up there)

# draw 0: the draw of the issue that asked for this (eight siblings, pineapple and asparagus)
FIRST_DRAW = ["Royal-Gala", "Conference", "Tropicana-Apple-Juice", "Arla-Standard-Milk", "Yoggi-Vanilla-Yoghurt",
              "Red-Bell-Pepper", "Vine-Tomato", "Honeydew-Melon", "Pineapple", "Asparagus"]


def coarse_of() -> dict[str, str]:
    rows = (DATA / "classes.csv").read_text().splitlines()[1:]
    return {r.split(",")[0]: r.split(",")[2] for r in rows if r.strip()}


def held_out(draw: int, coarse: dict[str, str], siblings: int = 8, loners: int = 2) -> list[str]:
    """Draw 0 is FIRST_DRAW; others: ``siblings`` products of coarse classes with several products (at most half of
    a class, so a relative stays) and ``loners`` from classes of one."""
    if draw == 0:
        return list(FIRST_DRAW)
    rng = np.random.default_rng(draw)
    by_class: dict[str, list[str]] = {}
    for fine, c in coarse.items():
        by_class.setdefault(c, []).append(fine)
    pool = [f for c, fs in by_class.items() if len(fs) > 1 for f in fs]
    chosen, taken = [], {}
    for f in rng.permutation(pool):
        c = coarse[f]
        if len(chosen) < siblings and taken.get(c, 0) < len(by_class[c]) // 2:
            chosen.append(str(f))
            taken[c] = taken.get(c, 0) + 1
    singles = [fs[0] for fs in by_class.values() if len(fs) == 1]
    return chosen + [str(f) for f in rng.choice(singles, loners, replace=False)]


def photo_table(db: Path):
    from dataset_tools import Catalogue

    cat = Catalogue(db)
    rows = cat.db.execute("SELECT i.path, p.name, i.split FROM images i JOIN products p ON p.id = i.product_id ORDER BY i.id").fetchall()
    return cat, [str(cat.image_path(p)) for p, _, _ in rows], np.array([n for _, n, _ in rows]), np.array([s for _, _, s in rows])


def instant_embeddings(paths, cache: Path) -> np.ndarray:
    from ntsnet.instant import Embedder

    if cache.exists():
        return np.load(cache)["e"]
    emb = Embedder("efficientnet_lite0", background=False)
    out = np.concatenate([emb(paths[i:i + 32]) for i in range(0, len(paths), 32)])
    np.savez(cache, e=out)
    return out


def feature_scores(bank, bank_labels, queries, ks=(1, 5, 10)) -> dict[str, np.ndarray]:
    from ntsnet.unknown import GaussianFit, knn_similarity, unit_rows
    from ntsnet.whitening import Whitening, whitened_prototypes

    b, q = unit_rows(bank), unit_rows(queries)
    out = {f"knn{k}": knn_similarity(q, b, k) for k in ks}
    classes = np.unique(bank_labels)
    protos = unit_rows(np.stack([b[bank_labels == c].mean(0) for c in classes]))
    out["prototype"] = (q @ protos.T).max(1)
    out["relative_mahalanobis"] = GaussianFit(b, bank_labels).score(q)
    whiten = Whitening(b)  # the instant model's ranking rule (ntsnet/whitening.py)
    out["whitened_prototype"] = (whiten(q) @ whitened_prototypes(whiten, b, bank_labels, classes).T).max(1)
    return out


def summarise(scores: dict[str, np.ndarray], is_known: np.ndarray) -> dict[str, dict]:
    from ntsnet.unknown import auroc, rejected_at_kept

    return {name: {"auroc": round(auroc(s[is_known], s[~is_known]), 4),
                   "rejected_at_95": round(rejected_at_kept(s[is_known], s[~is_known]), 4)} for name, s in scores.items()}


def instant_top1(emb, names, bank, questions) -> dict:
    """The instant model's top-1 on ``questions`` with prototypes of the ``bank`` photos: plain and whitened (its rule)."""
    from ntsnet.unknown import unit_rows
    from ntsnet.whitening import Whitening, whitened_prototypes

    classes = np.unique(names[bank])
    plain = unit_rows(np.stack([emb[bank][names[bank] == c].mean(0) for c in classes]))
    whiten = Whitening(emb[bank])
    ranked = whiten(emb[questions]) @ whitened_prototypes(whiten, emb[bank], names[bank], classes).T
    right = lambda sims: round(float((classes[sims.argmax(1)] == names[questions]).mean()), 4)  # noqa: E731
    return {"top1_plain": right(emb[questions] @ plain.T), "top1_whitened": right(ranked)}


def instant_draw(emb, names, splits, held) -> dict:
    known_mask = ~np.isin(names, held)
    bank = known_mask & (splits == "train")
    queries = splits == "val"
    result = summarise(feature_scores(emb[bank], names[bank], emb[queries]), known_mask[queries])
    return {**result, **instant_top1(emb, names, bank, known_mask & queries)}


def small_catalogues(emb, names, splits, coarse, groups=("Milk", "Juice", "Yoghurt", "all"), per_product=14) -> dict:
    """The instant model's top-1 on train_click.py's small catalogues (the first ``per_product`` training photos of
    each product of a coarse class, its val photos as the questions): plain and whitened prototypes."""
    out = {}
    for group in groups:
        chosen = np.array([group == "all" or coarse[n] == group for n in names])
        bank, counts = [], {}
        for i in np.flatnonzero(chosen & (splits == "train")):
            if counts.get(names[i], 0) < per_product:
                bank.append(i)
                counts[names[i]] = counts.get(names[i], 0) + 1
        bank, q = np.array(bank), np.flatnonzero(chosen & (splits == "val"))
        out[group] = {"products": len(np.unique(names[bank])), "questions": len(q), **instant_top1(emb, names, bank, q)}
    return out


def model_outputs(checkpoint: Path, paths) -> dict[str, np.ndarray]:
    """Logits of each head and the pooled features the heads read (whole image; Scrutinizer's concatenation)."""
    import torch

    from ntsnet import load_checkpoint
    from ntsnet.checkpoint import build_model
    from ntsnet.images import read_in_batches, to_input_tensor

    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt).eval()
    seen: dict[str, list] = {"whole": [], "concat": []}
    model.raw_head.register_forward_pre_hook(lambda m, a: seen["whole"].append(a[0].detach()))
    if hasattr(model, "scrutinizer_head"):
        model.scrutinizer_head.register_forward_pre_hook(lambda m, a: seen["concat"].append(a[0].detach()))
    logits, raw, parts, names = [], [], [], ckpt.class_names
    with torch.inference_mode():
        for batch in read_in_batches(list(paths), 16):
            x = to_input_tensor([a for _, a in batch], model.config.input_size, model.mean, model.std)
            out = model(x, num_parts=model.config.cat_num if model.config.model == "ntsnet" else None)
            logits.append(out.concat_logits.float())
            raw.append(out.raw_logits.float())
            parts.append(out.part_logits.float().mean(1) if out.part_logits.shape[1] else out.raw_logits.float())
    out = {"logits": torch.cat(logits).numpy(), "raw_logits": torch.cat(raw).numpy(), "part_logits": torch.cat(parts).numpy(),
           "whole": torch.cat(seen["whole"]).numpy(), "answer": np.array(model.config.answer)}
    if seen["concat"]:
        out["concat"] = torch.cat(seen["concat"]).numpy()
    out["class_names"] = np.array(names)
    return out


def trained_run(run: Path, emb, names, splits, paths, work: Path) -> dict:
    from ntsnet.unknown import LOGIT_SCORES, logit_score, softmax

    config = json.loads((run / "config.json").read_text())
    held = [p.strip() for p in config.get("exclude_products", "").split(",") if p.strip()]
    checkpoint = run / "best.safetensors"
    cache = work / f"outputs-{run.name}.npz"
    outs = dict(np.load(cache)) if cache.exists() else model_outputs(checkpoint, paths)
    if not cache.exists():
        np.savez(cache, **outs)
    known_mask = ~np.isin(names, held)
    bank = known_mask & (splits == "train")
    queries = splits == "val"
    is_known = known_mask[queries]
    scores = {s: logit_score(outs["logits"][queries], s) for s in LOGIT_SCORES}
    scores.update({f"raw_{s}": logit_score(outs["raw_logits"][queries], s) for s in ("max_softmax", "energy")})
    heads = [outs[k][queries] for k in ("logits", "raw_logits", "part_logits")]
    probs = sum(softmax(h) for h in heads) / 3
    scores["all_heads_max_softmax"] = probs.max(1)
    scores["all_heads_energy"] = logit_score(sum(heads) / 3, "energy")
    for feat in ("whole", "concat"):
        if feat in outs:
            scores.update({f"{feat}_{k}": v for k, v in feature_scores(outs[feat][bank], names[bank], outs[feat][queries]).items()})
    inst = feature_scores(emb[bank], names[bank], emb[queries], ks=(1,))
    scores["instant_knn1"] = inst["knn1"]
    result = summarise(scores, is_known)
    result["leave_products_out"] = calibration_check(heads, probs, outs["class_names"], names[queries], is_known)
    answer = probs if str(outs["answer"]) == "all-heads" else outs["logits"][queries]
    pred = outs["class_names"][answer[is_known].argmax(1)]
    result["top1"] = float((pred == names[queries][is_known]).mean())
    result["held_out"] = held
    return result


def calibration_check(heads, probs, class_names, query_names, is_known) -> dict:
    """Leave-products-out on a trained model's logits: each known val photo scored with its own product's logit
    removed stands in for an unknown. How far that stand-in is from the real held-out products decides whether a
    threshold may be calibrated on it."""
    from ntsnet.unknown import auroc, choose_threshold, softmax, without_own_class

    col = {n: i for i, n in enumerate(class_names)}
    own = np.array([col[n] for n in query_names[is_known]])
    pseudo = (sum(softmax(without_own_class(h[is_known], own)) for h in heads) / 3).max(1)
    known, real = probs.max(1)[is_known], probs.max(1)[~is_known]
    t, kept, rejected = choose_threshold(known, pseudo)
    return {"auroc_stand_in": round(auroc(known, pseudo), 4), "auroc_real": round(auroc(known, real), 4), "threshold": round(t, 4),
            "known_kept": round(kept, 4), "stand_in_rejected": round(rejected, 4), "real_rejected": round(float((real < t).mean()), 4)}


def cost(photos: int, products: int):
    """What the instant model's rule costs at catalogue scale: one frame's answer and a refit, on random clustered
    unit vectors (the cost, not the quality)."""
    from ntsnet.instant import InstantIndex

    from common import median_ms

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((products, 1280)).astype(np.float32)
    labels = rng.integers(products, size=photos)
    emb = centres[labels] + 2.0 * rng.standard_normal((photos, 1280)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = InstantIndex.from_embeddings(zip(range(photos), [f"p{k}" for k in labels], emb))
    t0 = time.perf_counter()
    index.view()
    refit = time.perf_counter() - t0
    frame = emb[:1]
    ms = median_ms(lambda: index.classify(frame), runs=50, warmup=3)
    print(f"{photos} photos, {products} products: one frame's answer {ms:.2f} ms (ranking and the unknown rule), "
          f"refit after edits {refit:.1f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cost", default=None, metavar="PHOTOS,PRODUCTS", help="only time the rule at this catalogue size")
    ap.add_argument("--work", default="/tmp/open-set")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--run", action="append", default=[], help="a Train job's run dir (trained with --exclude-products)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.cost:
        return cost(*map(int, args.cost.split(",")))
    work = Path(args.work)
    db = work / "catalogue"
    if not db.exists():
        import train_click

        db.parent.mkdir(parents=True, exist_ok=True)
        train_click.build_catalogue(db, "all", 0)
    _, paths, names, splits = photo_table(db)
    print(machine_line(), flush=True)
    t0 = time.perf_counter()
    emb = instant_embeddings(paths, work / "instant-embeddings.npz")
    print(f"instant embeddings of {len(paths)} photos in {time.perf_counter() - t0:.0f} s", flush=True)
    coarse = coarse_of()
    report = {"machine": machine_line(), "instant": [], "trained": [], "small_catalogues": small_catalogues(emb, names, splits, coarse)}
    print("instant top-1 on small catalogues (14 photos a product):", json.dumps(report["small_catalogues"]), flush=True)
    for draw in range(args.draws):
        held = held_out(draw, coarse)
        r = instant_draw(emb, names, splits, held)
        report["instant"].append({"draw": draw, "held_out": held, **r})
        print("instant", draw, json.dumps(r), flush=True)
    for run in args.run:
        r = trained_run(Path(run), emb, names, splits, paths, work)
        report["trained"].append({"run": run, **r})
        print("trained", run, json.dumps(r), flush=True)
    names_ = [k for k in report["instant"][0] if isinstance(report["instant"][0][k], dict)]
    print("instant, mean over draws: top-1 plain prototypes %.3f, whitened (the instant model's rule) %.3f" % (
        np.mean([d["top1_plain"] for d in report["instant"]]), np.mean([d["top1_whitened"] for d in report["instant"]])))
    for n in names_:
        a = [d[n]["auroc"] for d in report["instant"]]
        rj = [d[n]["rejected_at_95"] for d in report["instant"]]
        print(f"  {n:22s} AUROC {np.mean(a):.3f} (min {min(a):.3f}, max {max(a):.3f})  rejected at 95% kept {np.mean(rj):.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
