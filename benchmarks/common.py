"""What every benchmark shares: where the project and the grocery photos are, the machine line printed next to
each figure, and the one way a call is timed."""
from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "grocerystore"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def grocery_photos(split: str) -> list[tuple[str, str]]:
    """(path, product name) of each grocery photo of a split ("train" or "val"), in the list file's order."""
    names = {int(r.split(",")[1]): r.split(",")[0] for r in (DATA / "classes.csv").read_text().splitlines()[1:] if r.strip()}
    rows = [line.split(",") for line in (DATA / f"{split}.txt").read_text().splitlines() if line.strip()]
    return [(str(DATA / path.strip().lstrip("/")), names[int(label)]) for path, label, *_ in rows]


def cpu_line() -> str:
    """The CPU model and its vector flags (AVX, AMX, FMA, F16C), printed next to every CPU figure."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        flags = next(line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags"))
        keep = [f for f in flags if f.startswith(("avx", "amx", "fma")) or f in ("f16c",)]
        return f"{model}; flags: {' '.join(keep)}"
    except Exception:
        return platform.processor()


def machine_line() -> str:
    """CPU, torch, OpenVINO and the GPU if any: the header of a RESULTS.md table."""
    import torch

    try:
        import openvino

        ov = openvino.__version__.split("-")[0]
    except ImportError:
        ov = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_line()}; {gpu}; torch {torch.__version__}; OpenVINO {ov}"


def median_ms(fn, runs: int, warmup: int = 0) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``runs`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000
