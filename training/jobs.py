"""Background training jobs: a separate process per run, one at a time per catalogue.

The job's truth lives in files, not in the web server's memory: RUN_DIR/job.json (pid, command) and the
trainer's RUN_DIR/progress.json. So a job keeps running when the UI closes or restarts, and any process can
read its status, cancel it, or list past runs. Runs live under CATALOGUE/runs/ by default.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ntsnet.checkpoint import atomic_write

ROOT = Path(__file__).resolve().parents[1]
_children: dict[int, subprocess.Popen] = {}  # processes this process started, so they can be reaped


class JobError(RuntimeError):
    pass


def runs_root(db) -> Path:
    return Path(db) / "runs"


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None  # also reaps it, so it does not linger as a zombie
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie (exited, not yet reaped by its parent) still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _tail(path: Path, size: int = 3000) -> str:
    """The end of a log without reading it all: the UI asks every 2 s and logs grow with every step."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - size))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def status(run_dir) -> dict:
    run_dir = Path(run_dir)
    job = _read_json(run_dir / "job.json")
    prog = _read_json(run_dir / "progress.json")
    alive = _pid_alive(job.get("pid"))
    state = prog.get("state", "starting" if alive else "unknown")
    if state in ("running", "starting") and not alive:
        state = "interrupted"  # killed or crashed: starting it again resumes from the last epoch
    if alive and state not in ("running", "starting"):
        state = "running" if state != "cancelled" else "cancelling"
    metrics = []
    with_metrics = run_dir / "metrics.jsonl"
    if with_metrics.exists():
        metrics = [json.loads(line) for line in with_metrics.read_text().splitlines() if line.strip()]
    log_tail = _tail(run_dir / "train.log")
    best = max((m["val_acc"] for m in metrics if m.get("val_acc") is not None), default=None)
    return {"run_dir": str(run_dir), "name": run_dir.name, "state": state, "alive": alive, "pid": job.get("pid"),
            "started_at": job.get("started_at"), "config": _read_json(run_dir / "config.json"), "progress": prog,
            "metrics": metrics, "best_val_acc": best, "log_tail": log_tail,
            "checkpoint": str(run_dir / "best.safetensors") if (run_dir / "best.safetensors").exists() else None}


def active_job(db) -> dict | None:
    marker = runs_root(db) / "ACTIVE"
    if not marker.exists():
        return None
    st = status(marker.read_text().strip())
    return st if st["alive"] else None


def start(db, out=None, **train_args) -> dict:
    """Start ``python -m training train`` detached; refuses while another job trains this catalogue."""
    db = Path(db)
    if not (db / "catalogue.db").exists():
        raise JobError(f"no catalogue at {db}")
    running = active_job(db)
    if running:
        raise JobError(f"a training job is already running for this catalogue ({running['name']}); cancel it or wait")
    run_dir = Path(out) if out else runs_root(db) / _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "CANCEL").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "training", "train", "--db", str(db.resolve()), "--out", str(run_dir.resolve())]
    for key, value in train_args.items():
        if key == "pretrained":
            if not value:
                cmd.append("--no-pretrained")
            continue
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    log = open(run_dir / "train.log", "ab")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # its own session: closing the UI's terminal or restarting the UI does not take the job down with it
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    log.close()
    _children[proc.pid] = proc
    job = {"pid": proc.pid, "command": cmd, "started_at": _dt.datetime.now().isoformat(timespec="seconds")}
    atomic_write(run_dir / "job.json", lambda tmp: Path(tmp).write_text(json.dumps(job, indent=1)))
    runs_root(db).mkdir(parents=True, exist_ok=True)
    atomic_write(runs_root(db) / "ACTIVE", lambda tmp: Path(tmp).write_text(str(run_dir.resolve())))
    return status(run_dir)


def cancel(run_dir, timeout: float = 60.0) -> dict:
    """Ask the trainer to stop (flag file + SIGTERM); it stops at the next step, keeping its last saved epoch."""
    run_dir = Path(run_dir)
    st = status(run_dir)
    if not st["alive"]:
        return st
    (run_dir / "CANCEL").write_text("cancel requested\n")
    try:
        os.kill(st["pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + timeout
    while time.time() < deadline and _pid_alive(st["pid"]):
        time.sleep(0.2)
    if _pid_alive(st["pid"]):
        os.kill(st["pid"], signal.SIGKILL)  # did not stop in time; its last saved epoch is still intact
        time.sleep(0.2)
        _pid_alive(st["pid"])
    prog = _read_json(run_dir / "progress.json")
    if prog.get("state") != "cancelled":
        prog.update(state="cancelled", stop_reason="cancelled")
        atomic_write(run_dir / "progress.json", lambda tmp: Path(tmp).write_text(json.dumps(prog, indent=1)))
    return status(run_dir)


def list_runs(db) -> list[dict]:
    root = runs_root(db)
    if not root.exists():
        return []
    runs = [status(p) for p in sorted(root.iterdir()) if p.is_dir() and ((p / "job.json").exists() or (p / "progress.json").exists())]
    return sorted(runs, key=lambda r: r.get("started_at") or "", reverse=True)


def wait(run_dir, timeout: float = 600.0, poll: float = 0.5) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = status(run_dir)
        if not st["alive"]:
            return st
        time.sleep(poll)
    raise JobError(f"job {run_dir} still running after {timeout:.0f}s")
