import json
import pickle

import numpy as np
import torch
import pytest
from PIL import Image

from synthetic import draw_product
from ntsnet import CheckpointError, Predictor, load_checkpoint, save_checkpoint
from ntsnet.checkpoint import build_model
from ntsnet.images import to_input_tensor


def test_round_trip_gives_identical_predictions(tiny_checkpoint, tmp_path, rng):
    p1 = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32", backend="torch")
    copy = tmp_path / "copy.safetensors"
    save_checkpoint(copy, p1.model, p1.class_names, extra=p1.extra)
    p2 = Predictor.from_checkpoint(copy, precision="fp32", backend="torch")
    images = [draw_product(rng, name) for name in p1.class_names]
    for a, b in zip(p1.predict_batch(images), p2.predict_batch(images)):
        assert a.to_dict() == b.to_dict()
    ckpt = load_checkpoint(copy)
    assert ckpt.class_names == p1.class_names and ckpt.config.backbone == "tiny"
    assert ckpt.extra["train_accuracy"] >= 0.95


def test_predictor_recognises_the_synthetic_products(tiny_checkpoint):
    pred = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32", backend="torch")
    rng = np.random.default_rng(7)
    correct = sum(pred.predict(draw_product(rng, name)).label == name for name in pred.class_names for _ in range(10))
    assert correct >= 27  # of 30 unseen images


def test_bf16_fast_path_agrees_with_fp32_on_top1(tiny_checkpoint):
    fp32 = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32", backend="torch")
    bf16 = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", precision="bf16", backend="torch")
    rng = np.random.default_rng(11)
    images = [draw_product(rng, n) for n in fp32.class_names for _ in range(8)]
    a, b = fp32.predict_batch(images), bf16.predict_batch(images)
    agree = sum(x.label == y.label for x, y in zip(a, b))
    assert agree >= len(images) - 1
    assert max(abs(x.confidence - y.confidence) for x, y in zip(a, b)) < 0.1


def test_auto_on_a_bf16_cpu_keeps_the_navigators_pass_in_fp32_in_eager_pytorch_too(tiny_checkpoint, monkeypatch):
    """The eager twin of the compiled rule: same boxes as fp32, part features in bf16; 'bf16' forces both passes."""
    import ntsnet.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "cpu_supports_fast_bf16", lambda *a, **k: True)
    fp32 = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32", backend="torch")
    auto = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", backend="torch")
    forced = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", precision="bf16", backend="torch")
    assert auto.backend_name == "torch bf16 (parts)" and forced.backend_name == "torch bf16"
    rng = np.random.default_rng(12)
    images = [draw_product(rng, n) for n in fp32.class_names for _ in range(4)]
    for a, b in zip(fp32.predict_batch(images), auto.predict_batch(images)):
        assert [(q.x0, q.y0, q.x1, q.y1, q.score) for q in a.boxes] == [(q.x0, q.y0, q.x1, q.y1, q.score) for q in b.boxes]
    x = torch.randn(2, 3, auto.config.input_size, auto.config.input_size)
    with torch.inference_mode():
        ref = fp32.net(x, num_parts=auto.config.cat_num)
        mixed = auto.net(x, num_parts=auto.config.cat_num, engine=auto.eager_engine)
    assert torch.equal(ref.part_boxes, mixed.part_boxes)
    diff = (ref.part_features - mixed.part_features).abs().max().item()
    assert 0 < diff < 0.05 * ref.part_features.abs().max().item()  # rounded to bf16, not another computation


@pytest.mark.parametrize("shape", [(17, 300), (300, 17), (5, 5), (1, 1), (480, 640)])
def test_boxes_are_inside_the_original_image(tiny_checkpoint, shape):
    pred = Predictor.from_checkpoint(tiny_checkpoint)
    h, w = shape
    image = np.random.default_rng(0).integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    result = pred.predict(image)
    assert len(result.boxes) == pred.config.cat_num
    for b in result.boxes:
        assert 0 <= b.x0 <= b.x1 <= w and 0 <= b.y0 <= b.y1 <= h
    assert result.image_size == (w, h)
    assert len(result.top5) == min(5, pred.config.num_classes)
    assert result.confidence == pytest.approx(result.top5[0][1])


def test_boxes_follow_the_object_scale(tiny_checkpoint):
    """A box in resized-input pixels must land at the same relative place in the original frame, whatever the frame's
    size and shape. Checked against the Navigator's own boxes for each frame: comparing the boxes of two frames of
    different sizes also compared which of the tiny model's near-tied anchors came first, and that order differs
    between CPUs' fp32 kernels (a Sapphire Rapids ranked another anchor first)."""
    pred = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32", backend="torch")
    size = pred.config.input_size
    img = draw_product(np.random.default_rng(3), "red-box")
    for w, h in ((96, 96), (96 * 4, 96 * 2), (50, 300)):
        frame = np.array(Image.fromarray(img).resize((w, h), Image.NEAREST))
        x = to_input_tensor([frame], size, pred.model.mean, pred.model.std).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            raw = pred.net(x, num_parts=pred.config.cat_num, engine=pred.eager_engine).part_boxes[0].float()
        boxes = pred.predict(frame).boxes
        assert len(boxes) == len(raw) == pred.config.cat_num
        for (x0, y0, x1, y1), b in zip(raw.tolist(), boxes):
            expected = [min(max(v * scale, 0), side) for v, scale, side in
                        ((x0, w / size, w), (y0, h / size, h), (x1, w / size, w), (y1, h / size, h))]
            assert [b.x0, b.y0, b.x1, b.y1] == pytest.approx(expected, abs=1e-3)


def test_inputs_in_every_form(tiny_checkpoint, tmp_path):
    pred = Predictor.from_checkpoint(tiny_checkpoint)
    arr = draw_product(np.random.default_rng(5), "blue-can")
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    rgba = Image.fromarray(arr).convert("RGBA")
    gray = arr.mean(axis=2).astype(np.uint8)
    labels = {pred.predict(x).label for x in (arr, path, str(path), Image.fromarray(arr), rgba)}
    assert labels == {"blue-can"}
    pred.predict(gray)  # grayscale works too


def _tamper(src, dst, offset_from_end=100):
    data = bytearray(src.read_bytes())
    data[-offset_from_end] ^= 0xFF
    dst.write_bytes(bytes(data))


def test_tampered_truncated_and_foreign_files_are_rejected(tiny_checkpoint, tmp_path):
    bad = tmp_path / "tampered.safetensors"
    _tamper(tiny_checkpoint, bad)
    with pytest.raises(CheckpointError, match="integrity"):
        load_checkpoint(bad)
    trunc = tmp_path / "truncated.safetensors"
    trunc.write_bytes(tiny_checkpoint.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(trunc)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


class _Exploit:
    def __reduce__(self):
        return (open, ("/tmp/ntsnet-pwned", "w"))


def test_a_pickle_is_never_executed(tmp_path):
    import os

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"weights": _Exploit()}))
    if os.path.exists("/tmp/ntsnet-pwned"):
        os.remove("/tmp/ntsnet-pwned")
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)
    assert not os.path.exists("/tmp/ntsnet-pwned")


def test_wrong_architecture_is_a_clear_error(tiny_checkpoint, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_checkpoint), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    cfg = json.loads(meta["config"])
    cfg["backbone"] = "efficientnet_lite0"
    meta["config"] = json.dumps(cfg)
    wrong = tmp_path / "wrong.safetensors"
    save_file(tensors, str(wrong), metadata=meta)
    with pytest.raises(CheckpointError, match="do not fit"):
        build_model(load_checkpoint(wrong))
    meta.pop("format")
    save_file(tensors, str(wrong), metadata=meta)
    with pytest.raises(CheckpointError, match="not an NTS-Net checkpoint"):
        load_checkpoint(wrong)


def test_save_is_atomic_and_checks_class_count(tiny_checkpoint, tmp_path):
    pred = Predictor.from_checkpoint(tiny_checkpoint)
    target = tmp_path / "model.safetensors"
    save_checkpoint(target, pred.model, pred.class_names)
    before = target.read_bytes()
    with pytest.raises(ValueError, match="class names"):
        save_checkpoint(target, pred.model, ["only-one"])
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left behind


def test_bf16_is_chosen_only_where_the_cpu_does_bf16_in_hardware():
    from ntsnet.predictor import cpu_supports_fast_bf16

    assert not cpu_supports_fast_bf16("flags : fpu sse avx2 avx512f avx512bw avx512vl")  # emulated: slower than fp32
    assert cpu_supports_fast_bf16("flags : fpu avx512f avx512_bf16")
    assert cpu_supports_fast_bf16("flags : fpu amx_bf16 amx_tile")
    # training: AMX only (a Zen 4's AVX512-BF16 trained slower in bf16 than in fp32)
    assert not cpu_supports_fast_bf16("flags : fpu avx512f avx512_bf16", training=True)
    assert cpu_supports_fast_bf16("flags : fpu avx512f avx512_bf16 amx_bf16 amx_tile", training=True)


def test_bf16_is_not_chosen_when_onednn_is_capped_below_it(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes a bf16 CPU behave as an ordinary AVX2 one (tests/test_compiled.py: OpenVINO too)."""
    from ntsnet.predictor import cpu_supports_fast_bf16

    amx = "flags : fpu avx512f avx512_bf16 amx_bf16 amx_tile"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_supports_fast_bf16(amx) and not cpu_supports_fast_bf16(amx, training=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert cpu_supports_fast_bf16(amx) and not cpu_supports_fast_bf16(amx, training=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_supports_fast_bf16(amx, training=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert cpu_supports_fast_bf16(amx)


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_live_memory_reuses_parts_only_when_the_navigator_picks_the_same_anchors(tiny_checkpoint, backend):
    pytest.importorskip("openvino") if backend == "openvino" else None
    pred = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32", backend=backend, background=False)
    rng = np.random.default_rng(21)
    still = draw_product(rng, "red-box")
    noisy = [np.clip(still.astype(int) + rng.integers(-3, 4, still.shape), 0, 255).astype(np.uint8) for _ in range(8)]
    memory = {}
    for frame in noisy:  # a product held still in front of a camera: sensor noise only
        live, fresh = pred.predict(frame, memory=memory), pred.predict(frame)
        assert live.label == fresh.label and abs(live.confidence - fresh.confidence) < 0.02
        assert [(b.x0, b.y0) for b in live.boxes] == [(b.x0, b.y0) for b in fresh.boxes]
    assert memory["frames"] == 8 and 0 < memory["reused"] <= 6  # reused, but a full pass at least every 4th frame
    other = draw_product(rng, "blue-can")
    before = memory["reused"]
    assert pred.predict(other, memory=memory).label == pred.predict(other).label
    if memory["reused"] > before:  # only possible when the Navigator chose the very same anchors
        assert torch.equal(memory["parts"][0], pred.net(to_tensor(pred, other), num_parts=pred.config.cat_num).part_index)


def to_tensor(pred, image):
    from ntsnet.images import to_input_tensor

    return to_input_tensor([image], pred.config.input_size, pred.model.mean, pred.model.std)


@pytest.mark.parametrize("size", [64, 224])
def test_model_input_is_the_training_photos_resize(size):
    """Inference resizes like training (PIL bilinear, training/data.py): within one grey level, normalised."""
    from ntsnet.images import to_input_tensor
    from training.data import to_tensor as training_tensor

    rng = np.random.default_rng(3)
    frame = draw_product(rng, "red-box", size=320, height=240)
    x = to_input_tensor([frame, np.ascontiguousarray(frame[::-1])], size, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert x.shape == (2, 3, size, size) and x.dtype == torch.float32
    ref = training_tensor(Image.fromarray(frame), size, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    grey_levels = ((x[0] - ref) * torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1) * 255).abs()
    assert grey_levels.max() <= 1.01 and grey_levels.mean() < 0.5


def test_an_underexposed_photo_is_brightened_back_and_a_normal_one_is_left_alone():
    """Exposure normalisation (ntsnet/images.py): the evaluation's dark condition (25% brightness) comes back to
    within a few grey levels of the photo it was made from, in training's and inference's preprocessing alike; a
    normally exposed photo passes bit for bit; the gain is capped, so a black frame stays dark."""
    from ntsnet.images import EXPOSURE_MAX_GAIN, exposure_gain, normalise_exposure, to_input_tensor
    from training.data import to_tensor as training_tensor
    from training.evaluate import apply_condition

    rng = np.random.default_rng(5)
    frame = draw_product(rng, "red-box", size=320, height=240)
    frame = np.clip(frame.astype(np.float32) * 0.9 + 20, 0, 255).astype(np.uint8)  # brightest 1% at ~250 grey levels
    dark = apply_condition(frame, "dark")
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    clean_x, dark_x = to_input_tensor([frame, dark], 224, mean, std)
    raw = torch.from_numpy(frame).permute(2, 0, 1).float().unsqueeze(0) / 255
    assert exposure_gain(raw).item() == 1.0
    assert torch.equal(normalise_exposure(raw), raw)
    # brought back to the same exposure (the 99th percentile at the target), so within a few grey levels of the original
    # scaled to that target: 25% brightness keeps 2 bits fewer, so the mean error stays under 3 grey levels
    target = clean_x * (dark_x.quantile(0.99) / clean_x.quantile(0.99))
    assert (dark_x - target).abs().mean() * 255 < 3
    assert dark_x.mean() > 3 * torch.from_numpy(dark).float().mean() / 255
    train_dark = training_tensor(Image.fromarray(dark), 224, mean=mean, std=std)
    assert (train_dark - dark_x).abs().mean() * 255 < 1.5
    # a mixed batch: only the dark photo changes
    both = torch.stack([raw[0], raw[0] * 0.25])
    out = normalise_exposure(both.clone())
    assert torch.equal(out[0], raw[0]) and not torch.equal(out[1], both[1])
    black = torch.full((1, 3, 64, 64), 2 / 255)
    assert exposure_gain(black).item() == EXPOSURE_MAX_GAIN
    assert normalise_exposure(black).max() <= 8 / 255 + 1e-6


def test_the_checkpoint_says_which_heads_answer_and_an_older_one_answers_with_the_scrutinizer(tiny_checkpoint, tmp_path, rng):
    from safetensors.torch import load_file, save_file

    from ntsnet import answer_probabilities
    from ntsnet.checkpoint import _read_metadata
    from ntsnet.images import to_input_tensor

    base = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32", backend="torch")
    model = build_model(load_checkpoint(tiny_checkpoint)).eval()
    model.config.answer = "all-heads"
    path = save_checkpoint(tmp_path / "heads.safetensors", model, base.class_names, extra=base.extra)
    heads = Predictor.from_checkpoint(path, precision="fp32", backend="torch")
    assert heads.config.answer == "all-heads"
    images = [draw_product(rng, name) for name in base.class_names for _ in range(3)]
    with torch.no_grad():
        out = model(to_input_tensor(images, model.config.input_size, model.mean, model.std), num_parts=model.config.cat_num)
    for answer, predictor in (("all-heads", heads), ("scrutinizer", base)):
        want = answer_probabilities(out, answer).max(1)
        got = predictor.predict_batch(images)
        assert [p.index for p in got] == want.indices.tolist()
        assert [p.score for p in got] == pytest.approx(want.values.tolist(), abs=1e-4)
    # a checkpoint written before the setting existed has no "answer" in its config: the paper's Scrutinizer answers
    meta = _read_metadata(path)
    config = json.loads(meta["config"])
    del config["answer"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={**meta, "config": json.dumps(config)})
    assert load_checkpoint(old).config.answer == "scrutinizer"
