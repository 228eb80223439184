"""Many visitors at once: 8 simulated viewers stream frames to Recognise while one person uses Collect.

    python benchmarks/public_load.py [--visitors 8] [--seconds 60] [--checkpoint CKPT]

Bounded in time, in one process, at the level of the app's actions (webapp.actions.Studio, what each Gradio
event calls): each visitor is a thread with its own session that sends a 640x480 frame to the live
``recognise`` and the next one when the answer came back, at most 10 a second (a browser's stream_every=0.1);
the Collect user saves a photo every 2 s. Not measured here: Gradio's HTTP layer (gradio_client 2.7 cannot
drive a stream event: it does not know the server's "process_streaming" message) and the browsers' own CPU.
Reports errors, fresh answers and frames per visitor, Collect latency percentiles and memory growth.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--visitors", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--checkpoint")
    args = ap.parse_args()
    from synthetic import draw_product
    from common import cpu_line
    from webapp import Studio

    tmp = Path(tempfile.mkdtemp())
    ckpt = args.checkpoint
    if not ckpt:
        from ntsnet import NTSConfig, NTSNet, save_checkpoint

        ckpt = str(tmp / "random.safetensors")
        save_checkpoint(ckpt, NTSNet(NTSConfig(backbone="efficientnet_lite0", num_classes=10), pretrained=True),
                        [f"product {i}" for i in range(10)])
    rng = np.random.default_rng(0)
    frames = [np.asarray(Image.fromarray(draw_product(rng, ["red-box", "blue-can"][i % 2], size=240)).resize((640, 480)))
              for i in range(4)]
    print(f"CPU: {cpu_line()}")
    studio = Studio(tmp / "cat", checkpoint=ckpt)
    studio.create_product("Oat milk")
    studio.predictor().wait_for_engine()
    studio.recognise(frames[0], wait=True)  # warm
    mem0 = rss_mb()
    stop = time.time() + args.seconds
    stats = {i: {"fresh": 0, "frames": 0, "none": 0, "errors": []} for i in range(args.visitors)}
    collect_ms, collect_errors = [], []

    def visitor(i):
        n = 0
        while time.time() < stop:
            t0 = time.time()
            try:
                r = studio.recognise(frames[(n + i) % len(frames)], session=f"visitor-{i}")
                if r is None:
                    stats[i]["none"] += 1
                else:
                    stats[i]["frames"] += 1
                    stats[i]["fresh"] += r.fresh
            except Exception as exc:
                stats[i]["errors"].append(repr(exc)[:200])
            n += 1
            time.sleep(max(0.0, 0.1 - (time.time() - t0)))

    def collector():
        k = 0
        while time.time() < stop:
            photo = draw_product(np.random.default_rng(1000 + k), "green-pack")
            t0 = time.time()
            try:
                studio.save_photo(photo, "Oat milk", ["front"])
                studio.gallery("Oat milk")  # what the page shows after a capture
                collect_ms.append((time.time() - t0) * 1000)
            except Exception as exc:
                collect_errors.append(repr(exc)[:200])
            k += 1
            time.sleep(2.0)

    threads = [threading.Thread(target=visitor, args=(i,)) for i in range(args.visitors)] + [threading.Thread(target=collector)]
    t_start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.time() - t_start
    mem1 = rss_mb()
    errors = sum(len(s["errors"]) for s in stats.values()) + len(collect_errors)
    print(f"{args.visitors} visitors x {dt:.0f} s + 1 Collect user; errors: {errors}")
    for i, s in stats.items():
        print(f"  visitor {i}: {s['frames'] / dt:.1f} frames/s shown, {s['fresh'] / dt:.2f} fresh answers/s"
              + (f", errors: {s['errors'][:2]}" if s["errors"] else ""))
    fresh = [s["fresh"] / dt for s in stats.values()]
    shown = [s["frames"] / dt for s in stats.values()]
    print(f"per visitor: frames shown median {statistics.median(shown):.1f}/s; fresh answers median {statistics.median(fresh):.2f}/s, "
          f"min {min(fresh):.2f}/s, max {max(fresh):.2f}/s, all visitors together {sum(fresh):.2f}/s; every visitor answered: {min(fresh) > 0}")
    if collect_ms:
        q = np.percentile(collect_ms, [50, 95])
        print(f"Collect (save a photo + refresh the gallery): {len(collect_ms)} saves, median {q[0]:.0f} ms, p95 {q[1]:.0f} ms"
              + (f"; errors {collect_errors[:2]}" if collect_errors else ""))
    print(f"memory {mem0:.0f} MB -> {mem1:.0f} MB (growth {mem1 - mem0:+.0f} MB)", flush=True)
    os._exit(0)  # the live worker is a daemon thread inside OpenVINO calls: skip interpreter teardown


if __name__ == "__main__":
    main()
