"""10 products x 20 photos, as store staff would capture them: how fast is a usable recogniser?

    python benchmarks/ten_products.py [--epochs 8] [--work /tmp/ten-products]

Photos come from ../shared/datasets/grocerystore (the first 20 training photos of 10 fine-grained classes),
"captured" one by one through the app's own save_photo (which also updates the instant index). Held-out
photos are those classes' val-split photos, never in the catalogue. Measures:
  - instant model: time from the last capture to a usable recogniser, and a cold rebuild of the index;
  - NTS-Net: time from clicking Train (the app's start_training, default settings) to the first usable
    checkpoint and to the finished run;
  - accuracy of both on the held-out photos, and how often each says "unknown" there.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATASET = ROOT.parent / "shared" / "datasets" / "grocerystore"
CLASSES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # apples, avocado, bananas, kiwi ...: close look-alikes


def read_list(name):
    names = {}
    for line in (DATASET / "classes.csv").read_text().splitlines()[1:]:
        f = line.split(",")
        names[int(f[1])] = f[0]
    rows = []
    for line in (DATASET / name).read_text().splitlines():
        path, fine, _ = [x.strip() for x in line.split(",")]
        rows.append((DATASET / path, names[int(fine)], int(fine)))
    return rows


def accuracy(predict_batch, rows):
    preds = predict_batch([str(p) for p, _, _ in rows])
    correct = sum(p.best_guess == n or (not p.best_guess and p.label == n) for p, (_, n, _) in zip(preds, rows))
    unknown = sum(p.unknown for p in preds)
    return correct / len(rows), unknown / len(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--work", default="/tmp/ten-products")
    args = ap.parse_args()
    from webapp import Studio

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    train_rows = [r for r in read_list("train.txt") if r[2] in CLASSES]
    held_out = [r for r in read_list("val.txt") if r[2] in CLASSES]
    studio = Studio(work / "catalogue")
    per_class: dict[str, int] = {}
    _ = studio.instant  # load the embedder once, as the running app has it
    t_first = time.perf_counter()
    capture_times = []
    for path, name, _ in train_rows:
        if per_class.get(name, 0) >= 20:
            continue
        if name not in studio.product_names():
            studio.create_product(name)
        t0 = time.perf_counter()
        studio.save_photo(path.read_bytes(), name, source="webcam")
        capture_times.append(time.perf_counter() - t0)
        per_class[name] = per_class.get(name, 0) + 1
    t_last = time.perf_counter()
    # the instant index is already up to date after the last capture; check that it answers
    t0 = time.perf_counter()
    studio.instant.predict(str(held_out[0][0]))
    instant_ready = time.perf_counter() - t0
    inst_acc, inst_unknown = accuracy(lambda ps: [studio.instant.predict(p) for p in ps], held_out)
    # a cold rebuild from scratch (e.g. after a backbone change)
    from ntsnet.instant import INDEX_FILE, InstantRecogniser

    (studio.catalogue.root / INDEX_FILE).unlink()
    t0 = time.perf_counter()
    InstantRecogniser(studio.catalogue).sync()
    cold = time.perf_counter() - t0

    t_click = time.perf_counter()
    run = studio.start_training(epochs=args.epochs)  # the app's defaults: Lite0, 448 px, K=4, lr 0.001
    run_dir = Path(run["run_dir"])
    first_usable = None
    while True:
        st = studio.current_run()
        if first_usable is None and (run_dir / "best.safetensors").exists():
            first_usable = time.perf_counter() - t_click
        if not st["alive"]:
            break
        time.sleep(1)
    finished = time.perf_counter() - t_click
    studio.set_active_model(run["name"])
    nts_acc, nts_unknown = accuracy(studio.predictor().predict_batch, held_out)
    result = {
        "photos": sum(per_class.values()), "products": len(per_class), "held_out_photos": len(held_out),
        "capture_seconds_per_photo_median": round(sorted(capture_times)[len(capture_times) // 2], 3),
        "capture_wall_seconds": round(t_last - t_first, 1),
        "instant_ready_after_last_capture_seconds": round(instant_ready, 3),
        "instant_cold_rebuild_seconds": round(cold, 1),
        "instant_accuracy": round(inst_acc, 4), "instant_unknown_rate_on_known": round(inst_unknown, 4),
        "train_click_to_first_usable_model_seconds": round(first_usable or float("nan"), 1),
        "train_click_to_finished_seconds": round(finished, 1), "epochs": args.epochs,
        "ntsnet_accuracy": round(nts_acc, 4), "ntsnet_unknown_rate_on_known": round(nts_unknown, 4),
        "final_state": studio.current_run()["state"],
    }
    print(json.dumps(result, indent=1))
    (work / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
