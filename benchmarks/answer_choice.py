"""How much does choosing the answering size and heads on the validation photos flatter the reported accuracy?

    python benchmarks/answer_choice.py --checkpoint RUN/stage3-ntsnet.safetensors --db CATALOGUE [--splits 2000]

The job (training/progressive.py: choose_test_size) tries each candidate input size and, for NTS-Net, the Scrutinizer
alone and all heads, on the same validation photos it then reports. This benchmark makes the same choice on one
random half of those photos and reads clean accuracy on the other half, both ways, over many splits: the gap to the
full-set figure is what the choice itself adds. Each photo is run once per (size, condition); the splits only
re-count. The checkpoint is evaluated at the sizes a model trained at its input size is offered.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def per_photo_correct(model, arrays, labels) -> dict[tuple[int, str], dict[str, np.ndarray]]:
    """{(size, answer): {condition: whether each photo's answer was right}} for every choice the job weighs."""
    from training.evaluate import CONDITIONS, apply_condition
    from training.progressive import answer_predictions, at_input_size, candidate_sizes

    truth, out = np.asarray(labels), {}
    conditioned = {c: [apply_condition(a, c) for a in arrays] for c in CONDITIONS}
    for size in candidate_sizes(model.config.input_size):
        m = at_input_size(model, size)
        for cond, photos in conditioned.items():
            for answer, (preds, _) in answer_predictions(m, photos).items():
                out.setdefault((size, answer), {})[cond] = np.asarray(preds) == truth
    return out


def choose(correct, idx) -> tuple[int, str]:
    from training.progressive import best_answer

    return best_answer({k: {c: float(v[idx].mean()) for c, v in conds.items()} for k, conds in correct.items()})


def main():
    from train_click import cpu_line
    from ntsnet import load_checkpoint
    from ntsnet.checkpoint import build_model
    from training.evaluate import _eval_items
    from training.progressive import _load_arrays

    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--db", required=True, help="the catalogue folder whose validation photos the job used")
    ap.add_argument("--split", default="val")
    ap.add_argument("--splits", type=int, default=2000, help="random halvings of the photos")
    args = ap.parse_args()

    print("CPU:", cpu_line())
    ckpt = load_checkpoint(args.checkpoint)
    model = build_model(ckpt).to(memory_format=torch.channels_last).eval()
    items, _ = _eval_items(args.db, ckpt.class_names, args.split)
    arrays, labels = _load_arrays(items)
    t0 = time.time()
    correct = per_photo_correct(model, arrays, labels)
    print(f"{len(arrays)} photos ({args.split}), {len(correct)} choices, {time.time() - t0:.0f} s")
    for (size, answer), conds in correct.items():
        print(f"  {size} px {answer:<11}" + "".join(f"  {c} {v.mean():.1%}" for c, v in conds.items()))
    everyone = np.arange(len(labels))
    full = choose(correct, everyone)
    print(f"chosen on all photos: {full[0]} px {full[1]}, clean {correct[full]['clean'].mean():.1%} (the job's figure)")
    rng, reads, same = np.random.default_rng(0), [], 0
    for _ in range(args.splits):
        order = rng.permutation(len(labels))
        halves = order[: len(order) // 2], order[len(order) // 2:]
        for pick, read in (halves, halves[::-1]):
            k = choose(correct, pick)
            reads.append(correct[k]["clean"][read].mean())
            same += k == full
    print(f"chosen on one half, clean read on the other ({2 * args.splits} halves): {np.mean(reads):.1%} "
          f"(s.d. {np.std(reads):.1%}); the full set's choice in {same / len(reads):.0%} of the halves")


if __name__ == "__main__":
    main()
