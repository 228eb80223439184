"""Inference: which product is in an image, and which regions the Navigator looked at.

``Predictor.from_checkpoint(path).predict(image)`` returns a ``Prediction`` whose boxes are in the original
image's pixels, so an overlay drawn on the caller's frame lines up. Only the K parts the Scrutinizer uses
are cropped and encoded: the Teacher's other M-K parts cost time during training only.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import compiled
from .checkpoint import build_model, load_checkpoint
from .fuse import inference_copy
from .device import gpu_has_bf16, inference_batch, resolve_device
from .images import to_input_tensor, to_rgb_array
from .model import answer_probabilities
from .runtime import background_work, isa_cap_allows_bf16, keep_freed_memory, single_torch_thread

log = logging.getLogger("ntsnet")

@dataclass
class Box:
    x0: float
    y0: float
    x1: float
    y1: float
    score: float


# the product a catalogue keeps for its camera's empty scene (Collect: "Capture the empty scene"): a model names it like
# any product, and the answer means "nothing to recognise" (Prediction.nothing), never a product
EMPTY_SCENE = "(empty scene)"


@dataclass
class Prediction:
    label: str
    confidence: float
    top5: list[tuple[str, float]]
    boxes: list[Box] = field(default_factory=list)
    index: int = -1
    image_size: tuple[int, int] = (0, 0)  # (width, height) of the original image
    unknown: bool = False        # the evidence was too weak: label is "unknown", best_guess holds the top class
    best_guess: str = ""
    score: float = 0.0           # the score the unknown threshold applies to (max softmax, or cosine similarity)
    nothing: bool = False        # the best answer is the empty scene: nothing to recognise (label is EMPTY_SCENE)

    def __post_init__(self):
        if self.best_guess == EMPTY_SCENE or (not self.best_guess and self.label == EMPTY_SCENE):
            self.nothing, self.unknown, self.label = True, False, EMPTY_SCENE  # an empty scene is never "unknown"

    def without_empty_scene(self) -> "Prediction":
        """The answer when the empty scene is ruled out (something is in view): the best product, at its own
        (low) confidence; the empty scene alone ranked: "unknown"."""
        top = [(n, p) for n, p in self.top5 if n != EMPTY_SCENE]
        if not top:
            return replace(self, label="unknown", unknown=True, nothing=False, best_guess="", top5=[], confidence=0.0)
        return replace(self, label=top[0][0], confidence=top[0][1], top5=top, best_guess=top[0][0], nothing=False,
                       unknown=False, score=top[0][1])

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "unknown": self.unknown,
            "nothing": self.nothing,
            "top5": [{"label": n, "confidence": round(p, 6)} for n, p in self.top5],
            "boxes": [{k: round(v, 2) for k, v in asdict(b).items()} for b in self.boxes],
        }


def cpu_supports_fast_bf16(cpuinfo: str | None = None, training: bool = False) -> bool:
    """True where bf16 runs faster than fp32 on this CPU. Inference: AVX512-BF16 or AMX (elsewhere oneDNN
    emulates bf16 and it is slower than fp32, so a plain AVX-512 CPU must not count). Training: AMX only; without
    AMX bf16 autocast trained slower than fp32 while inference ran faster."""
    if not isa_cap_allows_bf16(training):
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    if cpuinfo:
        flags = set(cpuinfo.split())
        return bool(flags & ({"amx_bf16"} if training else {"avx512_bf16", "amx_bf16"}))
    try:  # no /proc (macOS, Windows): torch's own view, which names AMX only when it is there
        return "AMX" in torch.backends.cpu.get_cpu_capability().upper()
    except Exception:
        return False


def inference_precision(device: torch.device, requested: str = "auto") -> tuple[str, bool]:
    """(precision, parts only) a Predictor answers with on ``device``: one rule for every batch size, so a live frame,
    an evaluation and the unknown threshold's calibration see the same scores. 'auto': on a CPU with bf16 hardware
    the part pass in bf16 and the whole-image pass, whose near-tied anchor scores the Navigator ranks, in fp32; fp32
    everywhere else, a GPU included (as the Train job evaluates and calibrates there). 'bf16' asked for: the whole
    model in bf16, except on a GPU without bf16 hardware, where it would be emulated (fp32 then, with a warning)."""
    if requested not in ("auto", "fp32", "bf16"):
        raise ValueError("precision must be 'auto', 'fp32' or 'bf16'")
    if requested == "auto":
        return ("bf16", True) if device.type == "cpu" and cpu_supports_fast_bf16() else ("fp32", False)
    if requested == "bf16" and device.type == "cuda" and not gpu_has_bf16(device):
        log.warning("ntsnet: this GPU has no bf16 hardware (compute capability below 8.0): answering in fp32")
        return "fp32", False
    return requested, False


class _Bf16Parts:
    """Eager twin of ``compiled.graph_precisions('auto')`` on a CPU with bf16 hardware: the whole-image pass, whose
    anchor scores the Navigator ranks, in fp32 (bf16 reordered its near ties: other boxes on 20% of the grocery
    photos), the part pass in bf16."""

    def __init__(self, net):
        self.net = net

    def whole_and_scores(self, x):
        return self.net.whole_and_scores(x)

    def part_features(self, crops):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net.part_features(crops)


class Predictor:
    """``backend``: 'auto' (OpenVINO on a CPU where it is installed, else PyTorch), 'torch' or 'openvino'.
    The compiled export is built in a background thread when it is not cached yet (``background=False`` waits
    for it); until it is ready, and whenever it cannot be had, eager PyTorch answers: same code, same model."""

    def __init__(self, model, class_names, device="auto", precision: str = "auto", fold_batchnorm: bool = True,
                 backend: str = "auto", checkpoint_path=None, weights_key: str | None = None, background: bool = True):
        self.device = resolve_device(device)
        self.precision, parts_only = inference_precision(self.device, precision)
        self.eager_engine = None
        if self.device.type == "cpu":
            keep_freed_memory()
        self.model = model.eval().to(self.device)  # as trained: what save_checkpoint writes
        # what runs: the same function with BatchNorm folded into the convolutions (see fuse.py)
        self.net = inference_copy(self.model) if fold_batchnorm else self.model
        if self.device.type == "cpu":
            # oneDNN's convolutions are faster in NHWC, in fp32 too (1.2x for Lite0 on AVX2; benchmarks/inference_backends.py)
            self.net = self.net.to(memory_format=torch.channels_last)
        self.config = model.config
        if parts_only and hasattr(self.net, "part_features"):
            self.eager_engine = _Bf16Parts(self.net)
        self.class_names = list(class_names)
        self.extra: dict = {}
        self.unknown_threshold: float | None = None  # max-softmax below this -> "unknown" (calibrated on val)
        self.engine = None                            # a compiled engine once ready (compiled.CompiledNTS)
        # threads of the compiled engine for live video (None: all); see Studio's live_threads
        self.live_threads: int | None = None
        self.backend = compiled.resolve_backend(backend, self.device)
        self.build_error: str | None = None
        self._build_thread: threading.Thread | None = None
        if self.backend == "openvino":
            key = weights_key or compiled.state_key(self.model, "fold" if fold_batchnorm else "")
            self._start_engine(checkpoint_path, key, precision, background)

    def _start_engine(self, checkpoint_path, key, precision, background):
        def build():
            try:
                self.engine = compiled.load_or_build(self.net, checkpoint_path, key, precision=precision)
            except Exception as exc:  # any failure leaves eager PyTorch answering
                self.build_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("ntsnet: compiled inference unavailable (%s); answering with eager PyTorch", self.build_error)

        try:
            self.engine = compiled.load_or_build(self.net, checkpoint_path, key, precision=precision, build=False)
        except compiled.BackendUnavailable as exc:
            self.build_error = str(exc)
            log.warning("ntsnet: %s; answering with eager PyTorch", exc)
            return
        except Exception as exc:
            self.build_error = str(exc)
        if self.engine is None:
            if background:
                self._build_thread = background_work(build, "ntsnet-openvino-export")
            else:
                build()

    def wait_for_engine(self, timeout: float | None = None) -> bool:
        """Block until a background export finished; True when the compiled engine answers."""
        if self._build_thread is not None:
            self._build_thread.join(timeout)
        return self.engine is not None

    @property
    def backend_name(self) -> str:
        """What answers right now, for people: 'openvino', 'torch fp32 (openvino building)', 'torch bf16' ..."""
        if self.engine is not None:
            return self.engine.name
        name = f"torch {self.precision}" + (" (parts)" if self.eager_engine is not None else "")
        if self._build_thread is not None and self._build_thread.is_alive():
            return name + " (openvino building)"
        return name

    @classmethod
    def from_checkpoint(cls, path, device="auto", precision="auto", fold_batchnorm: bool = True, backend: str = "auto",
                        background: bool = True, export_beside: bool = True) -> "Predictor":
        """``export_beside``: cache the compiled export beside the checkpoint (False: in the user cache)."""
        ckpt = load_checkpoint(path)
        predictor = cls(build_model(ckpt), ckpt.class_names, device=device, precision=precision, fold_batchnorm=fold_batchnorm,
                        backend=backend, checkpoint_path=Path(path) if export_beside else None,
                        weights_key=f"{ckpt.sha256}-fold{int(fold_batchnorm)}", background=background)
        predictor.extra = ckpt.extra
        predictor.unknown_threshold = (ckpt.extra.get("unknown_threshold") or {}).get("value")
        return predictor

    @classmethod
    def from_pretrained(cls, repo_id: str, revision: str | None = None, cache_dir=None, token=None, device="auto", precision="auto",
                        backend: str = "auto") -> "Predictor":
        """Load a model pushed with ``python -m ntsnet push`` ('user/name', optionally 'user/name@revision')."""
        from .hub import download, parse_hub_ref

        repo, rev = parse_hub_ref(repo_id)
        path = download(repo, revision or rev, cache_dir=cache_dir, token=token)
        # the export goes to the user cache, not into the Hub's snapshot folder
        return cls.from_checkpoint(path, device=device, precision=precision, backend=backend, export_beside=False)

    def _autocast(self):
        if self.precision == "bf16" and self.eager_engine is None:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def preferred_batch(self) -> int:
        """Photos per call for a folder, an evaluation or a review: a GPU is fed in large batches, a CPU frame by frame
        as fast (the compiled engine runs one frame at a time)."""
        return inference_batch(self.device)

    def predict_batch(self, images, top_k: int = 5, memory: dict | None = None, refresh_every: int = 4) -> list[Prediction]:
        """``memory`` (live video, one image at a time): a dict kept by the caller between frames. When the
        Navigator picks the same K anchors as on the previous frame, that frame's part features are reused (the
        second backbone pass is skipped), at most ``refresh_every - 1`` times in a row."""
        # one frame through the compiled graphs: PyTorch's share is small work, best done without its thread pool
        single = self.engine is not None and len(images) == 1
        with single_torch_thread() if single else contextlib.nullcontext():
            return self._predict_batch(images, top_k, memory, refresh_every)

    @torch.inference_mode()
    def _predict_batch(self, images, top_k, memory, refresh_every) -> list[Prediction]:
        arrays = [to_rgb_array(im) for im in images]
        if not arrays:
            return []
        size = self.config.input_size
        x = to_input_tensor(arrays, size, self.model.mean, self.model.std, device=self.device)
        engine = self.engine  # read once: a background build may swap it in between frames
        if engine is not None and memory is not None and self.live_threads:
            engine = engine.with_threads(self.live_threads)
        reuse = None
        if memory is not None and len(arrays) == 1 and memory.get("age", refresh_every) < refresh_every - 1 \
                and memory.get("engine") is engine and memory.get("size") == arrays[0].shape:
            reuse = memory.get("parts")
        if engine is not None:
            out = self.net(x, num_parts=self.config.cat_num, engine=engine, reuse=reuse)
        else:
            if self.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                out = self.net(x, num_parts=self.config.cat_num, engine=self.eager_engine, reuse=reuse)
        if memory is not None and out.part_features is not None:
            reused = reuse is not None and out.part_features is reuse[1]
            memory.update(parts=(out.part_index, out.part_features), engine=engine, size=arrays[0].shape,
                          age=memory.get("age", 0) + 1 if reused else 0, reused=memory.get("reused", 0) + reused,
                          frames=memory.get("frames", 0) + 1)
        probs = answer_probabilities(out, self.config.answer).cpu()
        boxes = out.part_boxes.float().cpu()
        scores = out.part_scores.float().cpu()
        k = min(top_k, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=1)
        results = []
        for n, arr in enumerate(arrays):
            h, w = arr.shape[:2]
            sx, sy = w / size, h / size
            pred_boxes = []
            for (x0, y0, x1, y1), s in zip(boxes[n].tolist(), scores[n].tolist()):
                pred_boxes.append(Box(
                    float(np.clip(x0 * sx, 0, w)), float(np.clip(y0 * sy, 0, h)),
                    float(np.clip(x1 * sx, 0, w)), float(np.clip(y1 * sy, 0, h)), float(s),
                ))
            top5 = [(self.class_names[i], float(p)) for p, i in zip(top_p[n].tolist(), top_i[n].tolist())]
            unknown = self.unknown_threshold is not None and top5[0][1] < self.unknown_threshold
            results.append(Prediction("unknown" if unknown else top5[0][0], top5[0][1], top5, pred_boxes, int(top_i[n, 0]), (w, h),
                                      unknown=unknown, best_guess=top5[0][0], score=top5[0][1]))
        return results

    def predict(self, image, top_k: int = 5, memory: dict | None = None) -> Prediction:
        return self.predict_batch([image], top_k=top_k, memory=memory)[0]
