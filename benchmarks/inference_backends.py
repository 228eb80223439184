"""Eager PyTorch vs the compiled OpenVINO backend: latency, agreement on real photos, evaluation time.

    python benchmarks/inference_backends.py [--photos 296] [--eval-photos 75] [--runs 15] [--rounds 5] [--checkpoint RUN/best.safetensors]

NTS-Net on Lite0 (ImageNet weights, seeded heads, 81 products), 448/224 px, K=4, one 640x480 frame at a time;
the instant embedder (Lite0 at 224); agreement of the two backends on the grocery val photos (top-1 and the
K boxes); and training/evaluate.py's 4 conditions on --eval-photos photos. Prints the CPU model and flags.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import median_ms  # noqa: E402
from common import DATA, cpu_line  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=296)
    ap.add_argument("--eval-photos", type=int, default=75)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the frame breakdown")
    ap.add_argument("--checkpoint", help="a trained NTS-Net instead of the seeded random heads (their near-uniform logits flip under any rounding)")
    args = ap.parse_args()
    from ntsnet import NTSConfig, NTSNet, Predictor, save_checkpoint
    from ntsnet.instant import Embedder
    from training.evaluate import CONDITIONS, apply_condition

    print(f"CPU: {cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    model = NTSNet(NTSConfig(backbone="efficientnet_lite0", num_classes=81), pretrained=True)
    tmp = Path(tempfile.mkdtemp())
    ckpt = tmp / "nts.safetensors"
    save_checkpoint(ckpt, model, [f"product {i}" for i in range(81)])
    ckpt = Path(args.checkpoint) if args.checkpoint else ckpt
    frame = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    from ntsnet.predictor import cpu_supports_fast_bf16

    # OpenVINO in fp32 (forced), and where the CPU does bf16 in hardware also 'auto' (the Navigator's whole-image
    # graph in fp32, the parts in bf16: compiled.graph_precisions) and bf16 for both graphs
    precisions = ["fp32", "auto", "bf16"] if cpu_supports_fast_bf16() else ["fp32"]
    t0 = time.perf_counter()
    openvino = {prec: Predictor.from_checkpoint(ckpt, backend="openvino", precision=prec, background=False) for prec in precisions}
    print(f"OpenVINO export built and compiled in {time.perf_counter() - t0:.1f} s (cached afterwards)")
    t0 = time.perf_counter()
    Predictor.from_checkpoint(ckpt, backend="openvino")
    print(f"loading the cached export: {time.perf_counter() - t0:.2f} s")
    ov = openvino["fp32"]
    eager = Predictor.from_checkpoint(ckpt, backend="torch", precision="fp32")
    nchw = Predictor.from_checkpoint(ckpt, backend="torch", precision="fp32")
    nchw.net = nchw.net.to(memory_format=torch.contiguous_format)  # what the predictor ran before this change
    rows = []
    runs = [("eager fp32 NCHW (before)", nchw), ("eager fp32 channels_last", eager)] + [(f"openvino {prec}", p) for prec, p in openvino.items()]
    for name, p in runs:
        rows.append((name, median_ms(lambda: p.predict(frame), args.runs, warmup=3)))
    e_eager = Embedder(backend="torch")
    embedders = {prec: Embedder(background=False) for prec in precisions if prec != "auto"}
    for prec, e in embedders.items():  # the embedder's compiled graph takes the CPU's own choice: set it per row
        e.graphs = type(e.graphs)(e.graphs.out_dir, e.graphs.manifest, precision=prec)
    rows.append(("instant embedder, eager fp32 CL", median_ms(lambda: e_eager([frame]), args.runs * 2, warmup=3)))
    for prec, e in embedders.items():
        rows.append((f"instant embedder, openvino {prec}", median_ms(lambda: e([frame]), args.runs * 2, warmup=3)))
    print("\n| what (640x480 frame) | ms |\n|---|---|")
    for name, ms in rows:
        c = eager.config
        print(f"| NTS-Net {c.backbone} {c.input_size}/{c.part_size} K={c.cat_num}, {name} | {ms:.1f} |" if "embedder" not in name else f"| {name} | {ms:.1f} |")
    print_breakdown(ov, frame, args.runs, args.rounds)

    if DATA.exists():
        from PIL import Image

        lines = [l for l in (DATA / "val.txt").read_text().splitlines() if l.strip()][: args.photos]
        photos = [np.array(Image.open(DATA / l.split(",")[0]).convert("RGB")) for l in lines]
        for prec, p in openvino.items():
            same_top1 = same_boxes = 0
            for start in range(0, len(photos), 16):
                a, b = eager.predict_batch(photos[start:start + 16]), p.predict_batch(photos[start:start + 16])
                for x, y in zip(a, b):
                    same_top1 += x.label == y.label
                    same_boxes += [(q.x0, q.y0, q.x1, q.y1) for q in x.boxes] == [(q.x0, q.y0, q.x1, q.y1) for q in y.boxes]
            n = len(photos)
            print(f"\ngrocery val photos, openvino {prec} vs eager fp32: top-1 agreement {same_top1}/{n} = {same_top1 / n:.1%}; "
                  f"identical K boxes {same_boxes}/{n} = {same_boxes / n:.1%}")
        sub = photos[: args.eval_photos]
        for name, p in [("eager fp32 NCHW (before)", nchw)] + [(f"openvino {prec}", p) for prec, p in openvino.items()]:
            t0 = time.perf_counter()
            for cond in CONDITIONS:
                arrays = [apply_condition(a, cond) for a in sub]
                for start in range(0, len(arrays), 16):
                    p.predict_batch(arrays[start:start + 16])
            dt = time.perf_counter() - t0
            print(f"evaluation, {len(sub)} photos x {len(CONDITIONS)} conditions, {name}: {dt:.1f} s "
                  f"(= {dt * 300 / len(sub):.0f} s for 300 photos)")


def predictor_as_before(predictor):
    """The predictor with the part pass exported as before ntsnet/crops.py: OpenVINO's ROIAlign inside graph 2,
    on the whole 448 px frame (kept here only to measure the change)."""
    import copy
    import warnings

    import openvino as ov

    from ntsnet import compiled
    from torchvision.ops import roi_align

    net, size = predictor.net, predictor.net.config.input_size
    part = net.config.part_size

    class Boxes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = copy.deepcopy(net).eval()

        def forward(self, x, rois):
            return self.net.part_features(roi_align(x, rois, (part, part), 1.0, 2, True))

    example = (torch.zeros(1, 3, size, size), torch.tensor([[0.0, -8, -8, size / 2, size / 2], [0, 4, 4, size - 1, size - 1]]))
    compiled.quiet_converter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = ov.convert_model(Boxes(), example_input=example, input=[(-1, 3, size, size), (-1, 5)])
    threads = predictor.engine.graphs.threads
    request = ov.Core().compile_model(graph, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                    "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    # the old graph takes the frame and the boxes: NTSNet.forward hands them over in place of the crops
    engine = copy.copy(predictor.engine)
    engine.part_features = lambda frame_and_rois: torch.from_numpy(np.array(request.infer([t.detach().numpy() for t in frame_and_rois])[0]))
    before = copy.copy(predictor)
    before.net = copy.copy(net)
    before.net.crop_parts = lambda x, rois: (x, rois)
    before.engine = engine
    return before


def print_breakdown(predictor, frame, runs: int, rounds: int):
    """Where one OpenVINO frame's time goes, and the frame as before ntsnet/crops.py. All rows are measured in
    interleaved rounds (median of the rounds' medians): this VM's speed drifts by 20-40% within minutes."""
    import copy
    import statistics

    from ntsnet.anchors import select_proposals
    from ntsnet.crops import crop_boxes
    from ntsnet.images import to_input_tensor, to_rgb_array
    from torchvision.ops import roi_align

    net, engine = predictor.net, predictor.engine
    before = predictor_as_before(predictor)
    old = before.engine
    torchvision_nms = copy.copy(predictor)
    torchvision_nms.net = copy.copy(net)
    torchvision_nms.net.suppression_table = lambda device: None
    x = to_input_tensor([frame], net.config.input_size, net.mean, net.std)
    _, scores = engine.whole_and_scores(x)
    table = net.suppression_table(x.device)
    index = select_proposals(scores, net.anchors, net.config.cat_num, net.config.nms_iou, table=table)
    rois = net.rois(net.anchors[index])
    size = net.config.part_size
    crops = crop_boxes(x, rois, size)
    parts = {
        "preprocessing (resize, normalise)": lambda: to_input_tensor([to_rgb_array(frame)], net.config.input_size, net.mean, net.std),
        "graph 1: backbone 448 + Navigator": lambda: engine.whole_and_scores(x),
        "NMS over the anchors (suppression table)": lambda: select_proposals(scores, net.anchors, net.config.cat_num, net.config.nms_iou, table=table),
        "NMS, torchvision batched_nms": lambda: select_proposals(scores, net.anchors, net.config.cat_num, net.config.nms_iou),
        "K crops (ntsnet/crops.py)": lambda: crop_boxes(x, rois, size),
        "K crops, torchvision roi_align": lambda: roi_align(x, rois, (size, size), 1.0, 2, True),
        f"graph 2: backbone {size} on the K crops": lambda: engine.graphs.run("parts", crops),
        "K crops + graph 2": lambda: engine.part_features(crop_boxes(x, rois, size)),
        "before: graph 2 with OpenVINO's ROIAlign inside": lambda: old.part_features((x, rois)),
        "both graphs with the crops, one after the other": lambda: (engine.whole_and_scores(x), engine.part_features(crop_boxes(x, rois, size))),
        "whole predict()": lambda: predictor.predict(frame),
        "before: whole predict() with torchvision's NMS": lambda: torchvision_nms.predict(frame),
        "before: whole predict() with ROIAlign in graph 2": lambda: before.predict(frame),
    }
    times = {name: [] for name in parts}
    for _ in range(rounds):
        for name, fn in parts.items():
            times[name].append(median_ms(fn, runs, warmup=3))
    print(f"\n| OpenVINO frame, part | ms (median of {rounds} interleaved rounds) | rounds |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f} |")


if __name__ == "__main__":
    main()
