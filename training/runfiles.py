"""What a training run writes for the job runner and the UI, shared by both recipes.

RUN_DIR/progress.json (live status), RUN_DIR/metrics.jsonl (one row per evaluation) and RUN_DIR/config.json, each
written atomically so a reader never sees half a file; RUN_DIR/CANCEL (or SIGTERM) asks the run to stop.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

from ntsnet.checkpoint import atomic_write


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def write_json_lines(path: Path, rows) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))


class CancelFlag:
    """True once the run was asked to stop: a CANCEL file in the run directory (the job runner) or SIGTERM."""

    def __init__(self, run_dir: Path):
        self.file, self.signalled = Path(run_dir) / "CANCEL", False
        with contextlib.suppress(ValueError):  # only possible in the main thread
            signal.signal(signal.SIGTERM, lambda *_: setattr(self, "signalled", True))

    def __bool__(self):
        return self.signalled or self.file.exists()


class RunFiles:
    """progress.json and metrics.jsonl of one run; ``enabled`` False (a DDP process other than 0) writes nothing."""

    def __init__(self, run_dir: Path, enabled: bool = True, clock_start: float | None = None):
        self.dir, self.enabled = Path(run_dir), enabled
        self.progress: dict = {}
        self.metrics: list[dict] = []
        self.t0 = time.perf_counter() if clock_start is None else clock_start

    def update(self, **kw) -> None:
        """Merge ``kw`` into progress.json, stamped with the time, the pid and the seconds since the run started."""
        if not self.enabled:
            return
        self.progress.update(kw, updated=time.time(), pid=os.getpid(), elapsed_seconds=round(time.perf_counter() - self.t0, 1))
        write_json(self.dir / "progress.json", self.progress)

    def set_metrics(self, rows: list[dict]) -> None:
        """Replace metrics.jsonl (a resumed run drops the rows of epochs a crash lost)."""
        self.metrics = list(rows)
        if self.enabled:
            write_json_lines(self.dir / "metrics.jsonl", self.metrics)

    def add_metrics(self, rows: list[dict]) -> None:
        """Append rows, numbered in order of writing (the UI's curves count them)."""
        self.set_metrics(self.metrics + [{**r, "epoch": len(self.metrics) + i + 1} for i, r in enumerate(rows)])

    def write_config(self, config: dict) -> None:
        if self.enabled:
            write_json(self.dir / "config.json", config)
