"""The paper's Tables 1 and 2 on your catalogue: baseline vs NTS-Net with K = 0, 2, 4 under one time budget."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .evaluate import evaluate
from .train import TrainConfig, train

PAPER = {"baseline": 0.896, 0: 0.915, 2: 0.973, 4: 0.978}


def ablate(base: TrainConfig, total_minutes: float, ks=(0, 2, 4), split: str = "val", log=print) -> dict:
    """Each of len(ks) + 1 runs gets an equal share of ``total_minutes`` of training time."""
    share = total_minutes / (len(ks) + 1)
    variants = [("baseline", replace(base, model="baseline", out=str(Path(base.out) / "baseline"), max_minutes=share))]
    for k in ks:
        variants.append((k, replace(base, model="ntsnet", cat_num=k, proposal_num=max(base.proposal_num, k),
                                     out=str(Path(base.out) / f"ntsnet-k{k}"), max_minutes=share)))
    results = {}
    for key, cfg in variants:
        log(f"--- {('baseline' if key == 'baseline' else f'NTS-Net K={key}')}: {share:.1f} min of training ---")
        summary = train(cfg, log=log)
        ckpt = Path(cfg.out) / "best.safetensors"
        report = evaluate(ckpt, cfg.db, split=split, conditions=("clean",), progress=False)
        results[key] = {"accuracy": report["accuracy"], "top5": report["top5"], "n": report["n"], "epochs": summary.get("epoch"),
                        "train_minutes": summary.get("train_minutes")}
    return results


def format_tables(results: dict, backbone: str) -> str:
    def row(name, key):
        r = results.get(key)
        ours = f"{r['accuracy']:.1%}" if r else "-"
        extra = f"{r['epochs']} ep, {r['train_minutes']:.1f} min" if r and r.get("epochs") is not None else ""
        return f"| {name:<18} | {PAPER[key]:.1%} | {ours:>8} | {extra} |"

    head = "| Algorithm          | paper  | measured | training |\n|---|---|---|---|"
    t1 = ["Table 1. Accuracy vs the plain backbone", head, row(f"{backbone} (baseline)", "baseline"), row("NTS-Net (K=4)", 4)]
    t2 = ["Table 2. Accuracy with various K", head] + [row(f"NTS-Net (K={k})", k) for k in (0, 2, 4) if k in results]
    return "\n".join(t1) + "\n\n" + "\n".join(t2)
