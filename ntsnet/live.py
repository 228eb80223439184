"""Desktop live mode for a checkout station: OpenCV frames in, annotated frames out (window and/or video file)."""
from __future__ import annotations

import os
import sys
import time

import cv2

from .draw import draw_prediction
from .predictor import Predictor


def has_display() -> bool:
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def open_source(source: str) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(int(source)) if source.isdigit() else cv2.VideoCapture(source)
    if not cap.isOpened():
        raise RuntimeError(f"cannot open video source {source!r} (camera index or video file)")
    return cap


def run_live(predictor: Predictor, source: str, out_path: str | None = None, show: bool | None = None,
             max_frames: int | None = None, log=print) -> dict:
    """Recognise every frame of ``source``; returns counts and the mean frames/s."""
    show = has_display() if show is None else show
    if not show and not out_path:
        raise RuntimeError("no display available: pass --out annotated.mp4 to write the annotated video instead")
    cap = open_source(source)
    writer = None
    frames, fps, started = 0, None, time.perf_counter()
    try:
        while max_frames is None or frames < max_frames:
            ok, bgr = cap.read()
            if not ok:
                break
            t0 = time.perf_counter()
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            pred = predictor.predict(rgb)
            inst = 1.0 / max(time.perf_counter() - t0, 1e-6)
            fps = inst if fps is None else 0.9 * fps + 0.1 * inst  # smoothed, so the number is readable
            annotated = cv2.cvtColor(draw_prediction(rgb, pred, fps=fps), cv2.COLOR_RGB2BGR)
            if out_path:
                if writer is None:
                    h, w = annotated.shape[:2]
                    src_fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
                    writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*"mp4v"), src_fps, (w, h))
                    if not writer.isOpened():
                        raise RuntimeError(f"cannot write video {out_path}")
                writer.write(annotated)
            if show:
                cv2.imshow("NTS-Net live (q to quit)", annotated)
                if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                    break
            frames += 1
    finally:
        cap.release()
        if writer is not None:
            writer.release()
        if show:
            cv2.destroyAllWindows()
    elapsed = time.perf_counter() - started
    result = {"frames": frames, "seconds": round(elapsed, 3), "fps": round(frames / elapsed, 2) if elapsed else 0.0}
    log(f"{frames} frames in {elapsed:.1f}s ({result['fps']} frames/s end to end)")
    return result
