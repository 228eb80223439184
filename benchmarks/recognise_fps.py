"""End-to-end frames/s of the app's live Recognise stream: real app, real model, headless Chromium webcam.

    python benchmarks/recognise_fps.py --checkpoint runs/r1/best.safetensors [--seconds 20] [--windows 5]

Without --checkpoint a randomly initialised NTS-Net on the default backbone (Lite0, 448 px, K=4) is saved and
used: speed does not depend on the weights. Counts how often the annotated frame in the page changes, over
several windows of --seconds (this shared VM drifts, so one window is not a measurement), and how the two
cores were shared between the app and Chromium, which run on the same machine here.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def cpu_seconds() -> dict[str, float]:
    """CPU time used so far by the app and by Chromium, from /proc (empty where there is none)."""
    out = {"app": 0.0, "chromium": 0.0}
    if not os.path.isdir("/proc"):
        return {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if "app.py" in cmd and "--checkpoint" in cmd:
            out["app"] += used
        elif "chrom" in cmd:
            out["chromium"] += used
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--live-fps", type=float, help="the app's --live-fps: how often the page sends a frame (default: the app's)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="the app's --precision (fp32: a bf16 CPU measured as one without bf16 hardware)")
    ap.add_argument("--live-threads", type=int, help="the app's --live-threads (default: the app's rule)")
    ap.add_argument("--camera-fps", type=int, default=30, help="the fake webcam's frame rate (a real webcam: 30)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from test_app_e2e import browser_with_camera, free_port, start_camera, write_y4m

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import cpu_line

    print(f"CPU: {cpu_line()}; app --precision {args.precision}", flush=True)
    tmp = Path(tempfile.mkdtemp())
    ckpt = args.checkpoint
    if not ckpt:
        from ntsnet import NTSConfig, NTSNet, save_checkpoint

        model = NTSNet(NTSConfig(backbone="efficientnet_lite0", num_classes=10), pretrained=True)
        ckpt = str(tmp / "random.safetensors")
        save_checkpoint(ckpt, model, [f"product {i}" for i in range(10)])
    video = tmp / "cam.y4m"
    write_y4m(video, "red-box", w=640, h=480, frames=2 * args.camera_fps, fps=args.camera_fps)
    port = free_port()
    app = subprocess.Popen([sys.executable, "app.py", "--db", str(tmp / "cat"), "--port", str(port), "--checkpoint", ckpt,
                            "--precision", args.precision]
                           + (["--live-threads", str(args.live_threads)] if args.live_threads else [])
                           + (["--live-fps", str(args.live_fps)] if args.live_fps else []),
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = browser_with_camera(pw, video)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            fetches = [0]  # the browser downloading an annotated frame: a second witness of frames received
            page.on("request", lambda r: fetches.__setitem__(0, fetches[0] + ("gradio_api/file=" in r.url)))
            page.goto(f"http://127.0.0.1:{port}")
            page.get_by_role("tab", name="Recognise").click()
            start_camera(page)
            page.locator("h2").first.wait_for(timeout=120_000)
            time.sleep(15)  # warm-up; the compiled export builds in the background meanwhile
            # a frame counts when the output image's src changes; not "a URL never seen before": Gradio names
            # files by content, and a looping test video makes identical frames recur
            page.evaluate("""() => { window.__frames = 0; const last = new WeakMap();
                const root = document.getElementById('recognised-frame');
                const check = img => { if (img.src && img.src.includes('gradio_api/file') && last.get(img) !== img.src) {
                    last.set(img, img.src); window.__frames++; } };
                new MutationObserver(muts => { for (const m of muts) {
                    if (m.type === 'attributes' && m.target.tagName === 'IMG') check(m.target);
                    for (const n of m.addedNodes) { if (n.tagName === 'IMG') check(n); else if (n.querySelectorAll) n.querySelectorAll('img').forEach(check); } } })
                .observe(root, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']}); }""")
            rates, answers = [], []
            for w in range(args.windows):
                before, fetched, cpu0, t0 = page.evaluate("window.__frames"), fetches[0], cpu_seconds(), time.perf_counter()
                time.sleep(args.seconds)
                frames, cpu1, dt = page.evaluate("window.__frames") - before, cpu_seconds(), time.perf_counter() - t0
                rates.append(frames / dt)
                split = ", ".join(f"{k} {(cpu1[k] - cpu0[k]) / dt:.2f} cores" for k in cpu1)
                # the app's own count of fresh model answers (frames in between show the newest frame with the last boxes)
                said = re.search(r"· ([\w .()]+) · ([\d.]+) answers/s", page.inner_text("body"))
                answers.append(float(said.group(2)) if said else float("nan"))
                print(f"window {w + 1}: {frames} annotated frames shown in {dt:.1f} s = {rates[-1]:.1f} frames/s; "
                      f"model answers {answers[-1]:.1f}/s ({said.group(1) if said else '?'}); "
                      f"{(fetches[0] - fetched) / dt:.1f} frame downloads/s ({split})", flush=True)
            browser.close()
        print(f"model answers: median {statistics.median(answers):.1f}/s (fresh boxes and label)")
        print(f"median {statistics.median(rates):.1f} frames/s end to end, range {min(rates):.1f}-{max(rates):.1f} "
              f"({args.windows} windows of {args.seconds:.0f} s; 640x480 camera at {args.camera_fps} frames/s, page sends up to {args.live_fps or 'the app default'}/s, live threads {args.live_threads or 'the app default'}; {ckpt})")
    finally:
        app.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
