"""Catalogue throughput: import rate and query latency at scale (default 100k generated 64x64 photos).

    python benchmarks/catalogue_scale.py [--n 100000] [--products 200] [--dir /tmp/catalogue-bench]

Every photo goes through the full path (decode, validate, quality checks, hash, temp file + fsync + rename,
one transaction per row), as a webcam capture or an import would.
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset_tools import Catalogue, assign_splits  # noqa: E402
from common import median_ms  # noqa: E402


def make_photo(i: int) -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--products", type=int, default=200)
    ap.add_argument("--dir", default="/tmp/catalogue-bench")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    cat = Catalogue(root)
    names = [f"product {k:03d}" for k in range(args.products)]
    for name in names:
        cat.add_product(name)
    t0 = time.perf_counter()
    gen = 0.0
    for i in range(args.n):
        g0 = time.perf_counter()
        data = make_photo(i)
        gen += time.perf_counter() - g0
        cat.add_image(data, product=names[i % args.products], source_kind="import")
        if (i + 1) % 10_000 == 0:
            el = time.perf_counter() - t0 - gen
            print(f"  {i + 1} photos, {(i + 1) / el:.0f} photos/s", flush=True)
    elapsed = time.perf_counter() - t0 - gen
    print(f"import: {args.n} photos in {elapsed:.0f}s = {args.n / elapsed:.0f} photos/s (photo generation excluded)")
    t0 = time.perf_counter()
    assign_splits(cat)
    print(f"split of {args.n} photos: {time.perf_counter() - t0:.2f}s")
    print(f"products() with per-split counts: {median_ms(cat.products, 5):.0f} ms")
    print(f"stats(): {median_ms(cat.stats, 5):.0f} ms")
    print(f"images(product=...) ({args.n // args.products} rows): {median_ms(lambda: cat.images(product=names[7]), 5):.1f} ms")
    print(f"images(split='train') ({len(cat.images(split='train'))} rows): {median_ms(lambda: cat.images(split='train'), 3):.0f} ms")
    h = cat.images(limit=1, offset=args.n // 2)[0]["hash"]
    print(f"duplicate lookup by hash: {median_ms(lambda: cat.find_hash(h), 50):.3f} ms")
    print(f"verify (dry run): {median_ms(lambda: cat.verify(repair=False), 1):.0f} ms")
    size = sum(p.stat().st_size for p in root.rglob('*') if p.is_file())
    print(f"catalogue size on disk: {size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
