"""Wall time and images/s of the paper recipe's training loop on a few grocery photos, on this machine's device.
For an A/B, run it from two checkouts (``git worktree add /tmp/old COMMIT``) on the same catalogue:

    python benchmarks/paper_loop.py [--photos 64 --epochs 3 --size 224 --workers 2 --batch-size 8] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from common import ROOT, machine_line  # noqa: E402

sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "datasets" / "grocerystore"))
    ap.add_argument("--work", default="/tmp/paper-loop")
    ap.add_argument("--photos", type=int, default=64, help="per split")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=224, help="input size (parts half of it)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    from gpu_check import build_catalogue
    from training.train import TrainConfig, train

    work = Path(args.work)
    db = work / f"catalogue-{args.photos}"
    if not (db / "catalogue.db").exists():  # shared between checkouts, so both train on the same photos
        db.parent.mkdir(parents=True, exist_ok=True)
        build_catalogue(Path(args.dataset), db, args.photos)
    out = work / f"run-{ROOT.name}"
    shutil.rmtree(out, ignore_errors=True)
    print(machine_line(), flush=True)
    t0 = time.perf_counter()
    train(TrainConfig(db=str(db), out=str(out), input_size=args.size, part_size=args.size // 2, epochs=args.epochs,
                      batch_size=args.batch_size, workers=args.workers, precision=args.precision), log=lambda *a: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"{ROOT}: {time.perf_counter() - t0:.1f} s; images/s by epoch {[r['images_per_s'] for r in rows]}; "
          f"loss {[r['total'] for r in rows]}")


if __name__ == "__main__":
    main()
