"""The one way benchmarks time a call: median wall time in milliseconds, after optional warm-up calls."""
from __future__ import annotations

import statistics
import time


def median_ms(fn, runs: int, warmup: int = 0) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000
