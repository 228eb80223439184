"""End-to-end frames/s of the app's live Recognise stream: real app, real model, headless Chromium webcam.

    python benchmarks/recognise_fps.py --checkpoint runs/r1/best.safetensors [--seconds 20]

Without --checkpoint a randomly initialised NTS-Net on the default backbone (Lite0, 448 px, K=4) is saved and
used: speed does not depend on the weights. Counts how often the annotated frame in the page changes.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint")
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from test_app_e2e import browser_with_camera, free_port, start_camera, write_y4m

    tmp = Path(tempfile.mkdtemp())
    ckpt = args.checkpoint
    if not ckpt:
        from ntsnet import NTSConfig, NTSNet, save_checkpoint

        model = NTSNet(NTSConfig(backbone="efficientnet_lite0", num_classes=10), pretrained=True)
        ckpt = str(tmp / "random.safetensors")
        save_checkpoint(ckpt, model, [f"product {i}" for i in range(10)])
    video = tmp / "cam.y4m"
    write_y4m(video, "red-box", w=640, h=480, frames=20)
    port = free_port()
    app = subprocess.Popen([sys.executable, "app.py", "--db", str(tmp / "cat"), "--port", str(port), "--checkpoint", ckpt],
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
            page.goto(f"http://127.0.0.1:{port}")
            page.get_by_role("tab", name="Recognise").click()
            start_camera(page)
            page.locator("h2").first.wait_for(timeout=120_000)
            time.sleep(3)  # warm-up
            page.evaluate("""() => { window.__frames = 0; const seen = new Set();
                new MutationObserver(() => { for (const img of document.querySelectorAll('img')) {
                    if (img.src && img.src.includes('gradio_api/file') && !seen.has(img.src)) { seen.add(img.src); window.__frames++; } } })
                .observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']}); }""")
            time.sleep(args.seconds)
            frames = page.evaluate("window.__frames")
            browser.close()
        print(f"{frames} annotated frames in {args.seconds:.0f} s = {frames / args.seconds:.1f} frames/s end to end (640x480 camera, {ckpt})")
    finally:
        app.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
