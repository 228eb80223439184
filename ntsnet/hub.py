"""Share models and the demo on the Hugging Face Hub.

Loading goes through ``hf_hub_download``, so the local Hub cache is used and ``HF_HUB_OFFLINE=1`` works
once a model is cached. The token comes from ``huggingface-cli login`` or ``HF_TOKEN`` and is handed to
huggingface_hub only: it is never printed, logged or written into a file that is uploaded.
"""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import load_checkpoint

MODEL_FILE = "model.safetensors"
ROOT = Path(__file__).resolve().parents[1]
# what a Space needs to run the app; tests, data and runs stay home
SPACE_FILES = ["app.py", "requirements.txt", "README.md", "LICENSE"]
SPACE_DIRS = ["ntsnet", "dataset_tools", "training", "webapp", "assets"]


class HubError(RuntimeError):
    pass


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """'hf://user/name@rev' or 'user/name@rev' -> ('user/name', 'rev')."""
    ref = ref[5:] if ref.startswith("hf://") else ref
    repo, _, rev = ref.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise HubError(f"{ref!r} is not a Hub model id (expected user/name, optionally @revision)")
    return repo, rev or None


def download(repo_id: str, revision: str | None = None, cache_dir=None, token=None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hub_errors

    try:
        return Path(hf_hub_download(repo_id, MODEL_FILE, revision=revision, cache_dir=cache_dir, token=token))
    except hub_errors.RepositoryNotFoundError:
        raise HubError(f"Hub model {repo_id!r} not found (or private: log in with `huggingface-cli login` or set HF_TOKEN)") from None
    except hub_errors.RevisionNotFoundError:
        raise HubError(f"Hub model {repo_id!r} has no revision {revision!r}") from None
    except hub_errors.LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
        raise HubError(f"cannot reach the Hub and {repo_id!r}" + (f"@{revision}" if revision else "")
                       + " is not in the local cache; connect once to download it (HF_HUB_OFFLINE=1 needs a cached copy)") from None
    except hub_errors.EntryNotFoundError:
        raise HubError(f"{repo_id!r} exists but has no {MODEL_FILE}: it is not an NTS-Net model pushed by this tool") from None
    except (hub_errors.HfHubHTTPError, OSError) as exc:
        raise HubError(f"could not download {repo_id!r}: {str(exc).splitlines()[0]}") from None


def _interval(evaluation: dict) -> str:
    """' (95% interval 78.4-86.9%)' when the evaluation has one: what the number of test photos allows one to claim."""
    low_high = evaluation.get("accuracy_interval")
    return f" (95% interval {low_high[0]:.1%}-{low_high[1]:.1%})" if low_high else ""


def model_card(checkpoint, repo_id: str, evaluation: dict | None = None, export: str | None = None) -> str:
    ckpt = load_checkpoint(checkpoint)
    cfg, extra = ckpt.config, ckpt.extra
    evaluation = evaluation or _evaluation_beside(Path(checkpoint))
    lines = [
        "---", "library_name: ntsnet", "license: mit", "pipeline_tag: image-classification",
        "tags:", "- fine-grained-classification", "- retail", "- nts-net", f"- {cfg.backbone}", "---", "",
        f"# {repo_id.split('/')[-1]}: NTS-Net product recogniser", "",
        f"A Navigator-Teacher-Scrutinizer network on a **{cfg.backbone}** backbone that recognises "
        f"**{len(ckpt.class_names)} products** from a photo and shows the {cfg.cat_num} regions it looked at.", "",
        "| setting | value |", "|---|---|",
        f"| model | {cfg.model} |", f"| backbone | {cfg.backbone} |", f"| input size | {cfg.input_size} px |",
        f"| parts (M proposed, K used) | M={cfg.proposal_num}, K={cfg.cat_num} |",
    ]
    if extra.get("train_images"):
        lines.append(f"| training photos | {extra['train_images']} |")
    metrics = extra.get("metrics") or {}
    if metrics.get("val_acc") is not None:
        lines.append(f"| validation accuracy (during training) | {metrics['val_acc']:.1%} |")
    lines.append("")
    if evaluation:
        lines += [f"## Measured accuracy ({evaluation.get('split', 'test')} split, {evaluation['n']} photos)", "",
                  f"Top-1 **{evaluation['accuracy']:.1%}**{_interval(evaluation)}, top-5 {evaluation['top5']:.1%}.", "",
                  "| condition | accuracy | photos |", "|---|---|---|"]
        for name, r in evaluation.get("conditions", {}).items():
            lines.append(f"| {name} | {r['accuracy']:.1%} | {r['n']} |")
        for name, r in evaluation.get("tags", {}).items():
            lines.append(f"| tag: {name} | {r['accuracy']:.1%} | {r['n']} |")
        lines.append("")
    else:
        lines += ["No held-out evaluation was attached: run `python -m training evaluate` before pushing to add one.", ""]
    lines += ["## Products", "", ", ".join(ckpt.class_names), "",
              "## How to use", "", "```python", "from ntsnet import Predictor", "",
              f'predictor = Predictor.from_pretrained("{repo_id}")',
              'result = predictor.predict("photo.jpg")', "print(result.label, result.confidence, result.boxes)", "```", "",
              f"or live: `python app.py --checkpoint hf://{repo_id}`.", ""]
    if export:
        runtime = "onnxruntime" if export == "onnx" else "openvino"
        lines += ["## Without PyTorch", "", f"`export/` holds the model as {export} graphs and a `predict.py` that needs only "
                  f"numpy, Pillow and {runtime}; it answers as the Predictor does (label, confidence, the K boxes).", "",
                  "```bash", f"pip install numpy pillow {runtime}", "python export/predict.py photo.jpg photos/ --json", "```", ""]
    return "\n".join(lines)


def _evaluation_beside(checkpoint: Path) -> dict | None:
    for split in ("test", "val"):
        p = checkpoint.parent / f"evaluation-{split}" / "evaluation.json"
        if p.exists():
            return json.loads(p.read_text())
    return None


def model_operations(checkpoint, repo_id: str, evaluation: dict | None = None, export: str | None = None) -> list:
    """The files one push uploads: weights, a readable config and the model card (and the export, if asked)."""
    from huggingface_hub import CommitOperationAdd

    ckpt = load_checkpoint(checkpoint)  # refuses a damaged file before anything is sent
    config = {"config": ckpt.config.to_dict(), "class_names": ckpt.class_names}
    ops = [
        CommitOperationAdd(MODEL_FILE, str(checkpoint)),
        CommitOperationAdd("config.json", json.dumps(config, indent=1, ensure_ascii=False).encode()),
        CommitOperationAdd("README.md", model_card(checkpoint, repo_id, evaluation, export).encode()),
    ]
    if export:
        import tempfile

        from .export import export_model

        with tempfile.TemporaryDirectory() as tmp:
            folder = export_model(checkpoint, Path(tmp) / "export", export)
            ops += [CommitOperationAdd(f"export/{f.name}", f.read_bytes()) for f in sorted(folder.iterdir()) if f.is_file()]
    return ops


def push_model(checkpoint, repo_id: str, private: bool = False, token=None, api=None, export: str | None = None) -> str:
    """``export``: "onnx" or "openvino" also uploads the model exported that way (export/, with its predict.py)."""
    from huggingface_hub import HfApi

    parse_hub_ref(repo_id)
    api = api or HfApi(token=token)
    ops = model_operations(checkpoint, repo_id, export=export)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations=ops, commit_message="Upload NTS-Net product recogniser", repo_type="model")
    except Exception as exc:  # auth and network failures come as several types; say which without any secret
        raise HubError(f"push to {repo_id!r} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"


def space_operations(root: Path = ROOT) -> list:
    from huggingface_hub import CommitOperationAdd

    ops = []
    for name in SPACE_FILES:
        if (root / name).exists():
            ops.append(CommitOperationAdd(name, str(root / name)))
    for d in SPACE_DIRS:
        for path in sorted((root / d).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                ops.append(CommitOperationAdd(str(path.relative_to(root)), str(path)))
    return ops


def push_space(repo_id: str, demo_model: str | None = None, private: bool = False, token=None, api=None) -> str:
    """Push the app as a Gradio Space; with ``demo_model`` it starts as a recognise-only demo of that model."""
    from huggingface_hub import HfApi

    parse_hub_ref(repo_id)
    if demo_model:
        parse_hub_ref(demo_model)
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="space", space_sdk="gradio")
        if demo_model:
            api.add_space_variable(repo_id, "DEMO_MODEL", demo_model)
        api.create_commit(repo_id, operations=space_operations(), commit_message="Deploy product recogniser app", repo_type="space")
    except Exception as exc:
        raise HubError(f"push of Space {repo_id!r} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    return f"https://huggingface.co/spaces/{repo_id}"
