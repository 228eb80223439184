"""The compiled (OpenVINO) inference backend against eager PyTorch, and its on-disk cache."""
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from synthetic import draw_product
from ntsnet import NTSConfig, NTSNet, Predictor, compiled, save_checkpoint
from ntsnet.fuse import inference_copy

pytest.importorskip("openvino")


def _images(names, n=4, seed=5):
    rng = np.random.default_rng(seed)
    noise = [(rng.random((120, 160, 3)) * 255).astype(np.uint8) for _ in range(2)]  # random inputs too
    return [draw_product(rng, name) for name in names for _ in range(n)] + noise


def test_compiled_answers_match_eager(tiny_checkpoint):
    eager = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32", backend="torch")
    fast = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32", backend="openvino", background=False)
    assert fast.backend_name == "openvino" and eager.backend_name == "torch fp32"
    images = _images(eager.class_names)
    for a, b in zip(eager.predict_batch(images), fast.predict_batch(images)):
        assert a.label == b.label and abs(a.confidence - b.confidence) < 1e-4
        assert [(x.x0, x.y0, x.x1, x.y1) for x in a.boxes] == [(x.x0, x.y0, x.x1, x.y1) for x in b.boxes]
        assert np.allclose([x.score for x in a.boxes], [x.score for x in b.boxes], atol=1e-4)


def test_auto_precision_keeps_the_navigators_graph_in_fp32_on_every_cpu(tiny_checkpoint):
    """bf16 rounding reorders the Navigator's nearly tied anchor scores (other boxes than eager fp32 on 20% of the
    grocery photos on a Zen 4), so 'auto' asks for f32 on the whole-image graph; the parts graph is the CPU's choice."""
    import openvino as ov

    fast = Predictor.from_checkpoint(tiny_checkpoint, backend="openvino", background=False)  # precision 'auto'
    graphs = fast.engine.with_threads(1).graphs  # the live stream's second compilation keeps the rule
    assert graphs.precision == compiled.graph_precisions("auto") == {"whole": "fp32", "parts": "auto"}
    assert graphs._compiled["whole"].get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    parts_default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")  # bf16 on AVX512-BF16/AMX CPUs
    assert graphs._compiled["parts"].get_property("INFERENCE_PRECISION_HINT") == parts_default
    forced = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32", backend="openvino", background=False)
    assert forced.engine.graphs._compiled["parts"].get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    images = _images(fast.class_names, n=2)
    for a, b in zip(forced.predict_batch(images), fast.predict_batch(images)):
        assert [(x.x0, x.y0, x.x1, x.y1) for x in a.boxes] == [(x.x0, x.y0, x.x1, x.y1) for x in b.boxes]


def test_auto_precision_asks_openvino_for_fp32_where_onednn_is_capped_below_bf16(tiny_checkpoint, monkeypatch):
    """OpenVINO chooses bf16 from the CPU's flags, not from ONEDNN_MAX_CPU_ISA; under an AVX2 cap on a bf16 CPU
    that choice failed at the first frame, so 'auto' must ask for f32 on both graphs there."""
    import openvino as ov

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = Predictor.from_checkpoint(tiny_checkpoint, backend="openvino", background=False)  # precision 'auto'
    assert capped.precision == "fp32"
    for graphs in (capped.engine.graphs, capped.engine.with_threads(1).graphs):
        assert all(g.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32 for g in graphs._compiled.values())


def test_live_frames_run_on_the_live_thread_count_with_the_same_answers(tiny_checkpoint):
    """A browser on this machine gets a core: live frames use a second compilation on fewer threads."""
    fast = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32", backend="openvino", background=False)
    fast.engine = fast.engine.with_threads(2)
    assert fast.engine.with_threads(2) is fast.engine
    images = _images(fast.class_names, n=1)
    plain = fast.predict_batch(images)
    fast.live_threads = 1
    memory: dict = {}
    for image, a in zip(images, plain):
        memory.clear()
        b = fast.predict(image, memory=memory)
        assert a.label == b.label and abs(a.confidence - b.confidence) < 1e-4
        assert [(x.x0, x.y0, x.x1, x.y1) for x in a.boxes] == [(x.x0, x.y0, x.x1, x.y1) for x in b.boxes]
    live = memory["engine"]
    assert live is not fast.engine and live.graphs.threads == 1 and fast.engine.with_threads(1) is live
    assert fast.predict(images[0]).label == plain[0].label  # single photos keep every thread
    assert fast.engine.graphs.threads == 2


def test_exported_graphs_match_features_of_a_real_backbone(tmp_path):
    """Lite0 with its ImageNet weights (TF-same padding, folded BatchNorm), boxes partly outside the image."""
    torch.manual_seed(0)
    model = inference_copy(NTSNet(NTSConfig(backbone="efficientnet_lite0", num_classes=5, input_size=128, part_size=64), pretrained=True).eval())
    out = compiled.build_export(compiled.model_graphs(model), tmp_path / "export", "k")
    engine = compiled.CompiledNTS(compiled.OpenVINOGraphs(out, compiled.check_export(out, "k"), precision="fp32"))
    x = torch.randn(3, 3, 128, 128)
    rois = torch.tensor([[0, -20.0, -10, 60, 70], [1, 10, 10, 127, 127], [2, 64, 0, 140, 90]])
    with torch.inference_mode():
        whole, scores = model.whole_and_scores(x)
        crops = model.crop_parts(x, rois)
        parts = model.part_features(crops)
        got_whole, got_scores = engine.whole_and_scores(x)
        got_parts = engine.part_features(crops)
        ref, fast = model(x), model(x, engine=engine)
    for want, got in ((whole, got_whole), (scores, got_scores), (parts, got_parts), (ref.concat_logits, fast.concat_logits)):
        assert got.shape == want.shape
        assert (got - want).abs().max() < 1e-3 * want.abs().max().clamp_min(1)
    assert torch.equal(ref.part_boxes, fast.part_boxes)


def test_export_is_cached_beside_the_checkpoint_and_rebuilt_when_the_weights_change(tiny_checkpoint, tmp_path):
    from ntsnet import load_checkpoint
    from ntsnet.checkpoint import build_model

    ckpt = tmp_path / "best.safetensors"
    ckpt.write_bytes(Path(tiny_checkpoint).read_bytes())
    first = Predictor.from_checkpoint(ckpt, backend="openvino", background=False)
    folder = tmp_path / ".best.openvino"
    manifest = compiled.check_export(folder, f"{load_checkpoint(ckpt).sha256}-fold1")
    assert first.engine is not None and manifest is not None
    built = (folder / "whole.bin").stat().st_mtime_ns
    again = Predictor.from_checkpoint(ckpt, backend="openvino", background=True)
    assert again.engine is not None and again._build_thread is None  # straight from the cache, nothing rebuilt
    assert (folder / "whole.bin").stat().st_mtime_ns == built
    # new weights under the same file name (a training stage that improved): the old export must not answer
    model = build_model(load_checkpoint(ckpt))
    with torch.no_grad():
        model.scrutinizer_head.bias.add_(torch.linspace(-3, 3, model.config.num_classes))
    save_checkpoint(ckpt, model, first.class_names)
    changed = Predictor.from_checkpoint(ckpt, backend="openvino", background=False)
    eager = Predictor.from_checkpoint(ckpt, backend="torch", precision="fp32")
    assert compiled.check_export(folder, f"{load_checkpoint(ckpt).sha256}-fold1") is not None
    img = _images(first.class_names, n=1)[0]
    assert abs(changed.predict(img).confidence - eager.predict(img).confidence) < 1e-4


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "stale key", "no manifest"])
def test_a_damaged_or_stale_export_is_rebuilt_never_used(tiny_checkpoint, tmp_path, damage):
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(Path(tiny_checkpoint).read_bytes())
    Predictor.from_checkpoint(ckpt, backend="openvino", background=False)
    folder = tmp_path / ".m.openvino"
    weights = folder / "parts.bin"
    if damage == "flip a byte":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "stale key":
        manifest = (folder / "manifest.json").read_text()
        (folder / "manifest.json").write_text(manifest.replace('"key": "', '"key": "old-'))
    else:
        (folder / "manifest.json").unlink()
    reloaded = Predictor.from_checkpoint(ckpt, backend="openvino", background=True)
    assert reloaded.engine is None  # the damaged export was not loaded ...
    assert reloaded.wait_for_engine(120)  # ... but rebuilt in the background
    eager = Predictor.from_checkpoint(ckpt, backend="torch", precision="fp32")
    img = _images(eager.class_names, n=1)[0]
    assert abs(reloaded.predict(img).confidence - eager.predict(img).confidence) < 1e-4


def test_runtime_missing_falls_back_to_eager_with_one_clear_line(tiny_checkpoint, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(compiled, "openvino_version", lambda: None)
    assert compiled.resolve_backend("auto", torch.device("cpu")) == "torch"
    with caplog.at_level(logging.WARNING, logger="ntsnet"):
        pred = Predictor.from_checkpoint(tiny_checkpoint, backend="openvino", background=True)
    assert pred.engine is None and pred.backend_name.startswith("torch")
    lines = [r.getMessage() for r in caplog.records if r.name == "ntsnet"]
    assert len(lines) == 1 and "OpenVINO is not installed" in lines[0] and "eager PyTorch" in lines[0]
    assert pred.predict(_images(pred.class_names, n=1)[0]).label in pred.class_names


def test_gpu_keeps_pytorch():
    assert compiled.resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="runs on the CPU"):
        compiled.resolve_backend("openvino", torch.device("cuda"))
    with pytest.raises(ValueError, match="backend must be one of"):
        compiled.resolve_backend("tensorrt", torch.device("cpu"))


def test_instant_embedder_compiled_matches_eager(monkeypatch, tmp_path):
    monkeypatch.setenv("NTSNET_CACHE", str(tmp_path / "cache"))
    from ntsnet.instant import Embedder

    eager = Embedder(backend="torch")
    fast = Embedder(background=False)
    assert fast.backend_name == "openvino" and any((tmp_path / "cache").rglob("manifest.json"))
    images = _images(["red-box", "blue-can"], n=2)
    assert np.abs(eager(images) - fast(images)).max() < 1e-4


def test_a_conversion_reports_nothing_to_openvinos_telemetry(monkeypatch, tmp_path):
    # its reports fork processes from a thread pool; one forked mid-OpenBLAS call hung the label review for good
    telemetry = pytest.importorskip("openvino_telemetry")
    reports = []
    for name in ("send_event", "start_session", "end_session", "send_error"):
        monkeypatch.setattr(telemetry.Telemetry, name, lambda self, *a, _n=name, **k: reports.append(_n), raising=False)
    compiled._convert(torch.nn.Conv2d(3, 4, 3), 32, tmp_path / "conv.xml")
    assert (tmp_path / "conv.xml").exists() and reports == []
