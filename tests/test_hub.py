"""Sharing on the Hub without a network: the real huggingface_hub resolution runs against a cache this test
lays out in the Hub's own format, and pushes are captured at the request they would send."""
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synthetic import draw_product
from ntsnet import Predictor
from ntsnet.hub import HubError, model_card, parse_hub_ref, push_model, push_space

ROOT = Path(__file__).resolve().parents[1]


def populate_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, ref: str = "main"):
    """models--{user}--{name}/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/<ref>}, as the Hub client writes it."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)


COMMIT = "a" * 40


@pytest.fixture
def hub_cache(tmp_path, tiny_checkpoint):
    cache = tmp_path / "hub"
    populate_cache(cache, "shop/shelf", {"model.safetensors": tiny_checkpoint.read_bytes()}, COMMIT)
    return cache


def test_from_pretrained_offline_from_the_cache(hub_cache, tiny_checkpoint):
    import huggingface_hub.constants as c

    assert c.HF_HUB_OFFLINE  # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported
    local = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32", backend="torch")
    hub = Predictor.from_pretrained("shop/shelf", cache_dir=hub_cache, precision="fp32", backend="torch")
    img = draw_product(np.random.default_rng(0), "green-pack")
    assert hub.predict(img).to_dict() == local.predict(img).to_dict()
    pinned = Predictor.from_pretrained(f"shop/shelf@{COMMIT}", cache_dir=hub_cache)  # revision pinning
    assert pinned.class_names == local.class_names


def test_missing_repo_or_revision_is_a_clear_error(hub_cache):
    with pytest.raises(HubError, match="not in the local cache"):
        Predictor.from_pretrained("shop/unknown", cache_dir=hub_cache)
    with pytest.raises(HubError, match="not in the local cache"):
        Predictor.from_pretrained("shop/shelf", revision="b" * 40, cache_dir=hub_cache)
    with pytest.raises(HubError, match="not a Hub model id"):
        parse_hub_ref("no-slash")


def test_cli_and_app_accept_hf_refs(hub_cache, tmp_path):
    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(draw_product(np.random.default_rng(1), "red-box")).save(img)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    r = subprocess.run([sys.executable, "-m", "ntsnet", "predict", "--checkpoint", "hf://shop/shelf", str(img), "--json"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '"label": "red-box"' in r.stdout
    r = subprocess.run([sys.executable, "-m", "ntsnet", "predict", "--checkpoint", "hf://shop/nothing", str(img)],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "not in the local cache" in r.stderr and "Traceback" not in r.stderr


class RecordingApi:
    """Stands in for HfApi at the request boundary: records what would be sent."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_commit(self, repo_id, operations, **kw):
        self.calls.append(("create_commit", repo_id, list(operations), kw))

    def add_space_variable(self, repo_id, key, value):
        self.calls.append(("add_space_variable", repo_id, key, value))


def _op_bytes(op):
    src = op.path_or_fileobj
    return Path(src).read_bytes() if isinstance(src, str) else src


def test_push_sends_weights_config_and_card_without_the_token(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_never_shown_123")
    api = RecordingApi()
    push_model(tiny_checkpoint, "shop/shelf", private=True, api=api)
    (_, repo, kw), (_, _, ops, _) = api.calls
    assert repo == "shop/shelf" and kw["private"] is True
    files = {op.path_in_repo: _op_bytes(op) for op in ops}
    assert set(files) == {"model.safetensors", "config.json", "README.md"}
    assert files["model.safetensors"] == tiny_checkpoint.read_bytes()
    card = files["README.md"].decode()
    assert "tiny" in card and "red-box" in card and 'Predictor.from_pretrained("shop/shelf")' in card
    assert "library_name: ntsnet" in card
    everything = b"".join(files.values()).decode("utf-8", "replace") + "".join(capsys.readouterr())
    assert "hf_SECRET" not in everything


def test_push_can_include_the_export_and_the_card_says_how_to_run_it(tiny_checkpoint):
    pytest.importorskip("onnx")
    api = RecordingApi()
    push_model(tiny_checkpoint, "shop/shelf", api=api, export="onnx")
    files = {op.path_in_repo: _op_bytes(op) for op in api.calls[-1][2]}
    assert {"export/predict.py", "export/export.json", "export/whole.onnx", "export/parts.onnx", "export/arrays.npz"} <= set(files)
    assert "python export/predict.py" in files["README.md"].decode()


def test_card_includes_the_measured_condition_table(tiny_checkpoint):
    ev = {"split": "test", "n": 30, "accuracy": 0.9, "top5": 1.0,
          "conditions": {"clean": {"n": 30, "accuracy": 0.9}, "dark": {"n": 30, "accuracy": 0.5}},
          "tags": {"side": {"n": 10, "accuracy": 0.7}}}
    card = model_card(tiny_checkpoint, "shop/shelf", ev)
    assert "| dark | 50.0% | 30 |" in card and "| tag: side | 70.0% | 10 |" in card and "Top-1 **90.0%**" in card
    assert "interval" not in card  # an evaluation from before intervals were recorded
    card = model_card(tiny_checkpoint, "shop/shelf", {**ev, "accuracy_interval": [0.7438, 0.9654]})
    assert "Top-1 **90.0%** (95% interval 74.4%-96.5%)" in card


def test_a_damaged_checkpoint_is_never_pushed(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    api = RecordingApi()
    from ntsnet import CheckpointError

    with pytest.raises(CheckpointError):
        push_model(bad, "shop/shelf", api=api)
    assert api.calls == []


def test_space_push_uploads_the_app_and_sets_the_demo_model():
    api = RecordingApi()
    push_space("shop/demo", demo_model="shop/shelf", api=api)
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "add_space_variable", "create_commit"]
    assert api.calls[0][2]["repo_type"] == "space" and api.calls[0][2]["space_sdk"] == "gradio"
    assert api.calls[1][2:] == ("DEMO_MODEL", "shop/shelf")
    paths = {op.path_in_repo for op in api.calls[2][2]}
    assert {"app.py", "requirements.txt", "README.md", "ntsnet/model.py", "webapp/actions.py"} <= paths
    assert not any(p.startswith(("tests/", "data/", "runs/", ".git")) for p in paths)


def test_readme_is_a_valid_space_config():
    from packaging.requirements import Requirement

    text = (ROOT / "README.md").read_text()
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, "README must start with YAML front matter"
    meta = dict(line.split(": ", 1) for line in m.group(1).splitlines() if ": " in line)
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["license"] and meta["title"]
    reqs = {Requirement(l).name: Requirement(l) for l in (ROOT / "requirements.txt").read_text().splitlines() if l and not l.startswith("#")}
    assert reqs["gradio"].specifier.contains(meta["sdk_version"]), "sdk_version must satisfy requirements.txt"
    assert (ROOT / "LICENSE").exists()


def test_demo_mode_on_a_space():
    import app

    args = app.apply_demo_mode(app.parse_args([]), {"DEMO_MODEL": "shop/shelf"})
    assert args.checkpoint == "hf://shop/shelf" and args.no_capture and args.no_training
    args = app.apply_demo_mode(app.parse_args([]), {"DEMO_MODEL": "shop/shelf", "ALLOW_CAPTURE": "1"})
    assert not args.no_capture
