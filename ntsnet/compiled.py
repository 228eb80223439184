"""Compiled CPU inference: the model's two backbone passes exported to OpenVINO, cached on disk.

An NTS-Net frame is two backbone passes with a little PyTorch in between (hard NMS over the anchors, the
heads). The passes are exported as two graphs, ``whole`` (image -> whole-image feature and the Navigator's
anchor scores) and ``parts`` (part crops -> part features); NMS, the crops (crops.py, faster than
OpenVINO's ROIAlign) and the heads stay in ``NTSNet.forward``, so eager and compiled
inference share one code path (``forward(x, engine=...)``).

Why OpenVINO: on a 2-core AVX2 CPU in fp32 its Lite0 graphs ran 2.9x faster than eager PyTorch and 1.2-1.6x
faster than ONNX Runtime (``python benchmarks/inference_backends.py``); it converts a PyTorch module directly
(no ONNX step, no extra package), and picks bf16 by itself on CPUs with AVX512-BF16 or AMX.

The export is cached beside the checkpoint (``.NAME.openvino/``; in the user cache where that folder is not
writable), keyed by the checkpoint's SHA-256 and the runtime's version. A manifest records the SHA-256 of every
exported file, so a damaged, half-written or stale export is rebuilt, never run. Building takes seconds, so
``Predictor`` builds in a background thread and answers with eager PyTorch until the export is ready.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .runtime import isa_cap_allows_bf16, torch_threads

log = logging.getLogger("ntsnet")

BACKENDS = ("auto", "torch", "openvino")
MANIFEST = "manifest.json"
EXPORT_FORMAT = 2  # bump when the exported graphs' inputs or outputs change


class BackendUnavailable(RuntimeError):
    """The compiled runtime cannot be used here; callers fall back to eager PyTorch."""


def openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return getattr(openvino, "__version__", None) or openvino.get_version()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def user_cache_dir() -> Path:
    root = os.environ.get("NTSNET_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ntsnet")
    return Path(root) / "openvino"


def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK)


def export_dir_for(checkpoint: Path, key: str) -> Path:
    """Beside the checkpoint when its folder is writable (a run folder), else in the user cache (the Hub's
    read-only snapshots)."""
    checkpoint = Path(checkpoint)
    if _writable(checkpoint.parent):
        return checkpoint.parent / f".{checkpoint.stem}.openvino"
    return user_cache_dir() / key[:32]


# ------------------------------------------------------------------------------------------ graphs
class _Whole(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        whole, scores = self.model.whole_and_scores(x)
        return (whole,) if scores is None else (whole, scores)


class _Pooled(nn.Module):
    """Pooled backbone features: NTS-Net's part pass, and the instant embedder's only pass."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(x).float().mean((2, 3))


def quiet_converter() -> None:
    """OpenVINO's converter reports every conversion to Google Analytics, each report from a process forked by a
    thread pool; a fork while another thread was inside OpenBLAS deadlocked that thread (the app's label review hung
    for good). A store's machine has no business reporting either: the converter gets OpenVINO's own stand-in, the
    one it uses when the telemetry package is missing."""
    from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils, utils

    for module in (convert_impl, telemetry_utils, utils):
        module.tm = telemetry_stub


def _convert(module: nn.Module, size: int, path: Path):
    import warnings

    import openvino as ov

    quiet_converter()

    example = torch.zeros(1, 3, size, size)
    shapes = [(-1, 3, size, size)]  # any batch size
    with torch.no_grad(), warnings.catch_warnings():
        # the TF-same padding is computed from the traced (fixed) image size: a constant, as it should be
        warnings.simplefilter("ignore")
        graph = ov.convert_model(module.eval(), example_input=example, input=shapes)
    ov.save_model(graph, str(path), compress_to_fp16=False)


def build_export(graphs: dict[str, tuple[nn.Module, int]], out_dir: Path, key: str, info: dict | None = None) -> Path:
    """Export each ``name -> (module, input size)`` to OpenVINO IR in ``out_dir``, replacing what was there.
    Written in a temporary folder and renamed, so a crash leaves the old export or none, never half of one."""
    version = openvino_version()
    if version is None:
        raise BackendUnavailable("OpenVINO is not installed (pip install openvino)")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", suffix=".tmp", dir=out_dir.parent))
    try:
        files = {}
        for name, (module, size) in graphs.items():
            _convert(module, size, tmp / f"{name}.xml")
            files[name] = {"size": size}
        digests = {p.name: _file_sha(p) for p in sorted(tmp.iterdir())}
        manifest = {"format": EXPORT_FORMAT, "key": key, "openvino": version, "graphs": files, "files": digests, **(info or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        old = out_dir.with_name(out_dir.name + ".old")
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_export(out_dir: Path, key: str) -> dict | None:
    """The manifest when ``out_dir`` holds a complete, undamaged export for ``key`` made by this OpenVINO; else None."""
    try:
        manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != EXPORT_FORMAT or manifest.get("key") != key or manifest.get("openvino") != openvino_version():
        return None
    try:
        if any(_file_sha(Path(out_dir) / name) != digest for name, digest in manifest["files"].items()):
            return None
    except (OSError, KeyError, AttributeError):
        return None
    return manifest


class OpenVINOGraphs:
    """Compiled graphs from an export folder; ``run(name, x)`` takes and returns float32 arrays or tensors."""

    def __init__(self, out_dir: Path, manifest: dict, threads: int | None = None, precision: str | dict = "auto"):
        """``precision``: 'auto' (the CPU's choice), 'fp32' or 'bf16', or a dict of those per graph name."""
        import openvino as ov

        core = ov.Core()
        threads = threads or int(os.environ.get("NTSNET_THREADS", "0")) or torch_threads()
        self.out_dir, self.manifest, self.threads, self.precision = Path(out_dir), manifest, int(threads), precision
        self.sizes = {name: g["size"] for name, g in manifest["graphs"].items()}
        self._compiled = {}
        for name in self.sizes:
            config = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY"}
            # OpenVINO picks bf16 by itself on CPUs with AVX512-BF16 or AMX: fp32 must be asked for, also where
            # oneDNN is capped below bf16 (OpenVINO reads the CPU's flags, not the cap)
            wanted = precision.get(name, "auto") if isinstance(precision, dict) else precision
            if wanted == "fp32" or (wanted == "auto" and not isa_cap_allows_bf16()):
                config["INFERENCE_PRECISION_HINT"] = "f32"
            self._compiled[name] = core.compile_model(str(Path(out_dir) / f"{name}.xml"), "CPU", config)
        self._local = threading.local()  # an infer request is not thread-safe: one per thread

    def run(self, name: str, *inputs) -> list[torch.Tensor]:
        requests = self._local.__dict__.setdefault("requests", {})
        if name not in requests:
            requests[name] = self._compiled[name].create_infer_request()
        arrays = {i: (x.detach().float().contiguous().numpy() if isinstance(x, torch.Tensor) else np.ascontiguousarray(x, np.float32))
                  for i, x in enumerate(inputs)}
        out = requests[name].infer(arrays, share_inputs=True)  # read in place: no copy of the 448 px frame
        return [torch.from_numpy(np.array(out[i])) for i in range(len(out))]


class CompiledNTS:
    """The engine ``NTSNet.forward(x, engine=...)`` calls instead of its own backbone passes."""

    name = "openvino"

    def __init__(self, graphs: OpenVINOGraphs):
        self.graphs = graphs
        self._variants: dict[int, CompiledNTS] = {}
        self._variants_lock = threading.Lock()

    def with_threads(self, threads: int) -> "CompiledNTS":
        """This engine on ``threads`` threads: the cached export compiled a second time, once, then kept (the live
        stream asks on every frame)."""
        threads = int(threads)
        if threads == self.graphs.threads:
            return self
        with self._variants_lock:
            if threads not in self._variants:
                g = self.graphs
                self._variants[threads] = CompiledNTS(OpenVINOGraphs(g.out_dir, g.manifest, threads=threads, precision=g.precision))
            return self._variants[threads]

    def whole_and_scores(self, x):
        out = self.graphs.run("whole", x)
        return out[0], (out[1] if len(out) > 1 else None)

    def part_features(self, crops):
        return self.graphs.run("parts", crops)[0]


def model_graphs(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    cfg = model.config
    graphs = {"whole": (_Whole(model), cfg.input_size)}
    if cfg.model == "ntsnet":
        graphs["parts"] = (_Pooled(model.backbone), cfg.part_size)
    return graphs


def _cached_export(out_dir: Path, key: str, make_graphs, build: bool = True, info: dict | None = None) -> dict | None:
    """The manifest of a verified export in ``out_dir`` for ``key``, building it from ``make_graphs()`` when it is
    missing, stale or damaged (None when it is and ``build`` is False)."""
    if openvino_version() is None:
        raise BackendUnavailable("OpenVINO is not installed (pip install openvino)")
    manifest = check_export(out_dir, key)
    if manifest is None and build:
        if out_dir.exists():
            log.info("ntsnet: the cached OpenVINO export in %s is stale or damaged; rebuilding it", out_dir)
        build_export(make_graphs(), out_dir, key, info=info)
        manifest = check_export(out_dir, key)
        if manifest is None:
            raise BackendUnavailable(f"the OpenVINO export in {out_dir} did not verify after building")
    return manifest


def load_or_build(model: nn.Module, checkpoint: Path | None, key: str, precision: str = "auto", build: bool = True) -> CompiledNTS | None:
    """The compiled engine for ``model`` (an eval-mode inference copy) from the cache, building it if asked.
    Returns None when nothing usable is cached and ``build`` is False."""
    out_dir = export_dir_for(checkpoint, key) if checkpoint else user_cache_dir() / key[:32]
    # tracing works on a copy: it must not race a forward pass on the live model
    manifest = _cached_export(out_dir, key, lambda: model_graphs(copy.deepcopy(model).eval()), build=build,
                              info={"model": model.config.to_dict()})
    return None if manifest is None else CompiledNTS(OpenVINOGraphs(out_dir, manifest, precision=graph_precisions(precision)))


def graph_precisions(precision: str) -> dict[str, str]:
    """'auto' keeps the ``whole`` graph in fp32 and lets the CPU choose for ``parts``. The Navigator ranks ~1,600
    anchor scores, many nearly tied: bf16's rounding there picks other boxes than fp32 on
    many photos, while the part features tolerate bf16. The
    parts graph is about half of a frame's work, so most of bf16's speed stays (benchmarks/inference_backends.py)."""
    if precision == "auto":
        return {"whole": "fp32", "parts": "auto"}
    return {"whole": precision, "parts": precision}


def embedder_graphs(backbone: nn.Module, size: int, key: str, precision: str = "auto") -> OpenVINOGraphs:
    """The instant embedder's pooled-feature graph, cached in the user cache under ``key``."""
    out_dir = user_cache_dir() / key[:32]
    manifest = _cached_export(out_dir, key, lambda: {"pooled": (_Pooled(copy.deepcopy(backbone).eval()), size)})
    return OpenVINOGraphs(out_dir, manifest, precision=precision)


def state_key(module: nn.Module, *parts) -> str:
    """A SHA-256 over a module's tensors and any extra strings: the cache key for weights that have no file hash."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for p in parts:
        h.update(str(p).encode())
    return h.hexdigest()


def resolve_backend(requested: str, device: torch.device) -> str:
    """'auto': OpenVINO on a CPU where it is installed, PyTorch elsewhere (GPUs keep PyTorch and bf16)."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {requested!r}")
    if requested == "auto":
        return "openvino" if device.type == "cpu" and openvino_version() is not None else "torch"
    if requested == "openvino" and device.type != "cpu":
        raise ValueError("the OpenVINO backend runs on the CPU; use --device cpu or --backend torch")
    return requested
