"""A recognise-only app (what a Space with DEMO_MODEL runs) has no write path and serves no catalogue file."""
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthetic import draw_product
from dataset_tools import Catalogue
from webapp import Studio, StudioError

ROOT = Path(__file__).resolve().parents[1]
WRITE_ENDPOINTS = {"on_create", "on_upload", "on_delete", "on_move", "on_train", "on_activate", "on_snap", "on_burst", "on_cancel",
                   "on_confirm", "on_evaluate", "on_scan", "on_suggest", "label_view", "on_product", "on_frame", "train_view"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("demo")
    db = tmp / "catalogue"
    cat = Catalogue(db)
    rng = np.random.default_rng(0)
    for name in ("red-box", "blue-can"):
        for _ in range(3):
            cat.add_image(draw_product(rng, name), product=name, create_product=True)
    victim = cat.images(product="red-box")[0]
    # a file caught in the trash (a delete a crash interrupted): it must not be downloadable either
    (db / "trash" / f"{victim['id']}-photo.jpg").write_bytes(cat.image_path(victim).read_bytes())
    run = db / "runs" / "run-1"
    run.mkdir(parents=True)
    (run / "best.safetensors").write_bytes(Path(tiny_checkpoint).read_bytes())
    cat.close()
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "app.py", "--db", str(db), "--port", str(port), "--checkpoint", str(run / "best.safetensors"),
                             "--no-capture", "--no-training", "--backend", "torch"], cwd=ROOT, env=env,
                            stdout=open(tmp / "app.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/config", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("app did not start: " + (tmp / "app.log").read_text()[-2000:])
    yield {"url": url, "db": db, "tmp": tmp}
    proc.terminate()
    proc.wait(timeout=30)


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def test_recognise_only_app_exposes_no_write_endpoint_and_changes_nothing(demo, tmp_path):
    from gradio_client import Client, handle_file

    config = json.loads(_get(demo["url"] + "/config")[1])
    names = {d.get("api_name") for d in config["dependencies"]} - {None, False}
    assert names and not (names & WRITE_ENDPOINTS), names  # only what the page offers
    assert "catalogue" not in json.dumps(config)  # no catalogue path or product table in the page description
    before = _tree_digest(demo["db"])
    client = Client(demo["url"], verbose=False)
    good = tmp_path / "red.png"
    Image.fromarray(draw_product(np.random.default_rng(5), "red-box")).save(good)
    text = tmp_path / "notes.png"
    text.write_bytes(b"not an image at all" * 100)
    evil = tmp_path / "..%2F..%2Fcatalogue.db.png"
    evil.write_bytes(good.read_bytes())
    calls = 0
    for name in sorted(names):
        for arg in (handle_file(str(good)), handle_file(str(text)), handle_file(str(evil)), "../../catalogue.db", None, "Injected product"):
            try:
                client.predict(arg, api_name=f"/{name}")
            except Exception:
                pass  # refusing is fine; changing something is not
            calls += 1
    for write in ("on_create", "on_upload", "on_train", "on_activate", "on_delete"):
        with pytest.raises(Exception):
            client.predict("Injected product", "", api_name=f"/{write}")
    assert calls >= 6
    assert _tree_digest(demo["db"]) == before  # byte-identical catalogue
    assert not any((demo["db"] / "runs").glob("run-2*")) and not (demo["db"] / "runs" / "ACTIVE").exists()  # no job started


def test_file_route_serves_no_catalogue_file(demo):
    db = demo["db"].resolve()
    trash = next(p for p in db.rglob("*") if p.is_file() and "trash" in str(p).lower())
    targets = [db / "catalogue.db", db / "runs" / "run-1" / "best.safetensors", trash,
               Path(str(db) + "/../" + db.name + "/catalogue.db"), db / "active_model.json"]
    for target in targets:
        for form in (str(target), urllib.parse.quote(str(target))):
            status, body = _get(f"{demo['url']}/gradio_api/file={form}")
            assert status in (403, 404), (target, status)
            assert b"SQLite" not in body


def test_studio_refuses_every_write_when_turned_off(tmp_path, tiny_checkpoint):
    cat = Catalogue(tmp_path / "c")
    cat.add_image(draw_product(np.random.default_rng(1), "red-box"), product="red-box", create_product=True)
    cat.close()
    before = _tree_digest(tmp_path / "c")
    studio = Studio(tmp_path / "c", checkpoint=str(tiny_checkpoint), allow_capture=False, allow_training=False)
    after_start = _tree_digest(tmp_path / "c")
    writes = [lambda: studio.create_product("x"), lambda: studio.save_photo(draw_product(np.random.default_rng(2), "red-box"), "red-box"),
              lambda: studio.save_uploads([str(tiny_checkpoint)], "red-box"), lambda: studio.move_photos([1], "red-box"),
              lambda: studio.delete_photos([1]), lambda: studio.confirm_suggestion(1, "x"), lambda: studio.start_training(),
              lambda: studio.cancel_training(), lambda: studio.set_active_model(str(tiny_checkpoint)), lambda: studio.gallery("red-box"),
              lambda: studio.evaluate(), lambda: studio.suggestions(), lambda: studio.possible_mislabels()]
    for w in writes:
        with pytest.raises(StudioError, match="turned off"):
            w()
    assert _tree_digest(tmp_path / "c") == after_start
    assert set(after_start) - set(before) <= {"active_model.json"}  # the operator's --checkpoint, nothing else
    assert studio.recognise(draw_product(np.random.default_rng(3), "red-box"), wait=True).label == "red-box"


@pytest.mark.parametrize("argv,refused", [
    (["--host", "0.0.0.0"], True),
    (["--share"], True),
    (["--host", "0.0.0.0", "--auth", "a:b"], False),
    (["--host", "0.0.0.0", "--no-capture", "--no-training"], False),
    (["--host", "0.0.0.0", "--allow-public-writes"], False),
    (["--host", "127.0.0.1"], False),
])
def test_writes_on_a_public_address_need_a_login(argv, refused, monkeypatch):
    import app

    for var in ("APP_AUTH", "ALLOW_PUBLIC_WRITES", "DEMO_MODEL"):
        monkeypatch.delenv(var, raising=False)
    why = app.check_exposure(app.parse_args(argv))
    assert (why is not None) == refused
    if refused:
        assert "--auth" in why and "--no-capture --no-training" in why


def test_space_secret_gives_the_login(monkeypatch):
    import app

    monkeypatch.setenv("APP_AUTH", "staff:secret")
    args = app.parse_args(["--host", "0.0.0.0"])
    assert args.auth == "staff:secret" and app.check_exposure(args) is None


def test_uploads_are_bounded(tmp_path):
    from webapp import actions

    studio = Studio(tmp_path / "c")
    with pytest.raises(StudioError, match="at most"):
        studio.save_uploads([str(tmp_path / f"{i}.png") for i in range(actions.MAX_UPLOAD_FILES + 1)], None)
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (actions.MAX_UPLOAD_MB * 1024 * 1024 + 1))
    assert "larger than" in studio.save_uploads([str(big)], None)["message"]
    assert studio.catalogue.images(unlabelled=True) == []
