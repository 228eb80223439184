"""Every UI action, called as the plain function it is (no browser)."""
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthetic import draw_product, stable_seed
from webapp import Studio, StudioError
from webapp import actions as actions_mod
from webapp import common as webapp_common
from webapp import live as webapp_live


@pytest.fixture
def studio(tmp_path):
    return Studio(tmp_path / "cat")


def shot(seed, name="red-box", size=240):
    return draw_product(np.random.default_rng(seed), name, size=size)


def test_empty_catalogue_explains_what_to_do(studio):
    ok, why = studio.training_readiness()
    assert not ok and "at least 2 products" in why
    with pytest.raises(StudioError, match="at least 2 products"):
        studio.start_training()
    r = studio.recognise(shot(0))
    assert r.model == "none" and "No model yet" in r.label and not r.sure
    with pytest.raises(StudioError, match="No active model"):
        studio.evaluate()
    assert studio.describe_run(studio.current_run()) == "No training run yet."


def test_collect_photos_with_warnings_counts_and_duplicates(studio):
    assert "Created" in studio.create_product("red-box", "4001")
    with pytest.raises(StudioError, match="already exists"):
        studio.create_product("Red-Box")
    with pytest.raises(StudioError, match="product"):
        studio.save_photo(shot(1), None)
    with pytest.raises(StudioError, match="No photo"):
        studio.save_photo(None, "red-box")
    frame = shot(1)
    r = studio.save_photo(frame, "red-box", tags=["front"])
    assert r["count"] == 1 and "Saved photo" in r["message"]
    dup = studio.save_photo(frame, "red-box")
    assert dup["warnings"] == ["duplicate"] and dup["count"] == 1
    dark = studio.save_photo(np.full((300, 300, 3), 5, np.uint8), "red-box")
    assert "too dark" in dark["warnings"] and "too dark" in dark["message"]
    gallery = studio.gallery("red-box")
    assert len(gallery) == 2 and "#" in gallery[0][1]
    thumb = gallery[0][0]  # a thumbnail, not a path: the app serves no catalogue file
    assert isinstance(thumb, np.ndarray) and max(thumb.shape[:2]) <= actions_mod.THUMBNAIL_PX and thumb.shape[2] == 3
    img = studio.catalogue.images(product="red-box")[0]
    assert img["tags"] == ["front"] and img["source"] == "webcam" and img["split"] == "train"


def test_a_burst_saves_the_newest_frame_at_its_interval_within_the_servers_limits(studio, monkeypatch):
    """The burst loop is a plain function: it saves whatever frame is newest at each tick, reports after each, ends
    after its seconds, and clamps what a page sends (at most 60 s, at least 100 ms between photos)."""
    from webapp import capture

    clock = [0.0]
    monkeypatch.setattr(capture.time, "monotonic", lambda: clock[0])
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        clock[0] += seconds

    studio.create_product("red-box")
    frames = iter([shot(10), None, shot(11), shot(11), shot(12)])
    steps = list(studio.burst(lambda: next(frames, None), "red-box", ["front"], every_ms=500, seconds=2.2, sleep=sleep))
    assert [s["saved"] for s in steps] == [1, 2, 2, 3, 3] and steps[-1]["done"] and "3 photos saved" in steps[-1]["message"]
    assert len(slept) == 5 and set(slept) == {0.5}  # 2.2 s at 0.5 s: five ticks; the frameless tick saved nothing
    assert studio.photo_count("red-box") == 3
    clock[0], slept[:] = 0.0, []
    list(studio.burst(lambda: None, "red-box", every_ms=1, seconds=3600, sleep=sleep))
    assert set(slept) == {0.1} and len(slept) == 600  # 100 ms apart, for 60 s at most
    with pytest.raises(StudioError, match="product"):
        next(studio.burst(lambda: shot(1), None))


def test_uploads_labelled_and_unlabelled(studio, tmp_path):
    studio.create_product("blue-can")
    files = []
    for i in range(3):
        p = tmp_path / f"u{i}.png"
        Image.fromarray(shot(10 + i, "blue-can")).save(p)
        files.append(str(p))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a photo")
    r = studio.save_uploads(files[:2] + [str(bad)], "blue-can")
    assert r["saved"] == 2 and "bad.png" in r["message"] and "not an image" in r["message"]
    r = studio.save_uploads(files[2:], None)
    assert r["saved"] == 1 and len(studio.gallery(unlabelled=True)) == 1


def test_label_move_delete_and_counts(studio):
    for name in ("red-box", "blue-can"):
        studio.create_product(name)
    ids = [studio.save_photo(shot(20 + i), "red-box")["image_id"] for i in range(3)]
    assert "Moved 1" in studio.move_photos([ids[0]], "blue-can")
    table = {row[0]: row for row in studio.product_table()}
    assert table["red-box"][2] == 2 and table["blue-can"][2] == 1
    with pytest.raises(StudioError, match="Select"):
        studio.delete_photos([])
    assert "Deleted 1" in studio.delete_photos([ids[1]])
    assert {row[0]: row[2] for row in studio.product_table()} == {"blue-can": 1, "red-box": 1}
    with pytest.raises(StudioError, match="no product"):
        studio.move_photos([ids[2]], "nope")


def fill(studio, n=8):
    for name in ("red-box", "blue-can", "green-pack"):
        studio.create_product(name)
        for i in range(n):
            studio.save_photo(shot(stable_seed(name, i), name), name)


@pytest.mark.slow
def test_train_through_the_job_runner_then_recognise_and_evaluate(studio):
    fill(studio)
    ok, _ = studio.training_readiness()
    assert ok
    run = studio.start_training("tiny", recipe="paper", epochs=12, cat_num=2, input_size=96, lr=0.05, batch_size=8)
    with pytest.raises(StudioError, match="already running"):
        studio.start_training("tiny", recipe="paper", epochs=1, input_size=96)
    deadline = time.time() + 240
    while time.time() < deadline and studio.current_run()["alive"]:
        time.sleep(0.5)
    cur = studio.current_run()
    assert cur["state"] == "finished", cur["log_tail"]
    assert "finished" in studio.describe_run(cur) and len(cur["metrics"]) == 12
    assert "Active model" in studio.set_active_model(run["name"])
    # survives a restart: a new Studio on the same catalogue finds the active model and the run
    again = Studio(studio.db)
    assert again.active_checkpoint() and again.runs()[0]["name"] == run["name"]
    r = again.recognise(shot(999, "blue-can"), wait=True)
    assert r.label == "blue-can" and r.sure and len(r.top5) == 3
    assert r.annotated.shape == (240, 240, 3) and (r.annotated != shot(999, "blue-can")).any()
    rep = again.evaluate("train")
    assert rep["accuracy"] > 0.8 and Path(rep["confusion_png"]).exists() and "dark" in rep["conditions"]
    # review helpers: relabel one photo wrongly, it is listed first as a possible mislabel
    # the photo the model is surest is red-box: a borderline one (a 12-epoch tiny model has some) would make the
    # expected answer a coin toss between near-equal products
    reds = again.catalogue.images(product="red-box")
    preds = again.predictor().predict_batch([again.catalogue.image_path(i) for i in reds])
    wrong = max(zip(reds, preds), key=lambda rp: dict(rp[1].top5).get("red-box", 0.0))[0]["id"]
    again.move_photos([wrong], "green-pack")
    mis = again.possible_mislabels()
    flagged = {m["id"]: m for m in mis}
    assert wrong in flagged and flagged[wrong]["predicted"] == "red-box" and flagged[wrong]["label"] == "green-pack"
    assert [m["confidence"] for m in mis] == sorted((m["confidence"] for m in mis), reverse=True)  # most confident first
    # unlabelled upload gets a suggestion, one click confirms it
    again.catalogue.add_image(shot(4242, "green-pack"), source_kind="upload")
    sug = again.suggestions()
    assert sug[0]["suggested"] == "green-pack"
    again.confirm_suggestion(sug[0]["id"], sug[0]["suggested"])
    assert again.catalogue.images(unlabelled=True) == []


def test_unsure_frames_say_so(studio, tiny_checkpoint, monkeypatch):
    studio.set_active_model(str(tiny_checkpoint))
    monkeypatch.setattr(webapp_common, "UNSURE_BELOW", 1.01)  # nothing is ever sure enough
    r = studio.recognise(shot(1), wait=True)
    assert not r.sure and r.label.startswith("Not sure")


def _until_answered(studio, frame, session, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = studio.recognise(frame, session=session)
        if r is not None and r.fresh:
            return r
        time.sleep(0.05)
    raise AssertionError("no answer")


def test_live_frames_never_wait_for_the_model(studio, tiny_checkpoint):
    studio.set_active_model(str(tiny_checkpoint))
    first = _until_answered(studio, shot(2), "a")
    assert first.backend and first.label == "red-box"
    newest = shot(3)
    with studio._busy:  # the model is busy: frames come back at once, with session a's last boxes
        studio.recognise(newest, session="a")  # takes any answer that landed since (polling above sent frames too)
        t0 = time.perf_counter()
        stale = studio.recognise(newest, session="a")
        assert time.perf_counter() - t0 < 1.0
        assert studio.recognise(newest, session="b") is None  # another visitor never sees a's answer
        for _ in range(5):
            studio.recognise(shot(4), session="a")  # replaces a's waiting frame: nothing queues
        assert studio._worker().pending() <= 2
    assert not stale.fresh and stale.label == first.label
    assert stale.annotated.shape == np.asarray(newest).shape
    assert not np.array_equal(stale.annotated, first.annotated)  # drawn on the new frame
    deadline = time.time() + 60  # b's earlier red frame may be answered first; then its newest, blue one
    while _until_answered(studio, shot(5, "blue-can"), "b").label != "blue-can":
        assert time.time() < deadline


def test_the_least_recently_answered_visitor_goes_first(studio, tiny_checkpoint):
    studio.set_active_model(str(tiny_checkpoint))
    _until_answered(studio, shot(6), "slow")
    _until_answered(studio, shot(7), "fast")  # fast was answered more recently than slow
    served = []
    original = studio._answer
    studio._answer = lambda rgb, session, live: (served.append(session), original(rgb, session, live))[1]
    with studio._busy:
        studio.recognise(shot(8), session="fast")
        time.sleep(0.2)  # the worker takes fast's frame and waits for the model
        for _ in range(3):
            studio.recognise(shot(9), session="fast")
        studio.recognise(shot(10), session="slow")
    deadline = time.time() + 30
    while served.count("slow") < 1 or served[-1] != "fast" and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    # fast's frame already taken first; then slow (answered longer ago) before fast's newest frame, which waited
    assert served[-2:] == ["slow", "fast"] and served.count("slow") == 1


def test_live_answers_forget_idle_sessions(monkeypatch):
    live = actions_mod.LiveAnswers(keep_seconds=60, max_sessions=3)
    clock = [1000.0]
    monkeypatch.setattr(webapp_live.time, "monotonic", lambda: clock[0])
    for i in range(5):
        live.answered(f"s{i}", ("answer", i), 0.01)
        clock[0] += 1
    assert live.sessions() == 3 and live.last("s0") is None and live.last("s4") == ("answer", 4)
    clock[0] += 120
    assert live.last("s4") is None
    live.answered("new", ("answer", 9), 0.01)
    assert live.sessions() == 1


@pytest.mark.slow
def test_cancel_from_the_app(studio):
    fill(studio, n=6)
    studio.start_training("tiny", recipe="paper", epochs=500, input_size=96, lr=0.05)
    deadline = time.time() + 120
    while time.time() < deadline and studio.current_run()["progress"].get("state") != "running":
        time.sleep(0.2)
    assert "cancelled" in studio.cancel_training()
    assert studio.current_run()["state"] == "cancelled"
    assert studio.cancel_training() == "No training is running."


def test_bad_model_file_is_a_clear_error(studio, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    with pytest.raises(StudioError, match="Cannot load model"):
        studio.set_active_model(str(bad))
    assert studio.active_checkpoint() is None


def test_app_builds_and_parses_its_flags(studio):
    import app

    demo = app.build_app(studio)
    labels = [b.label for b in demo.blocks.values() if b.__class__.__name__ == "Tab"]
    assert labels == ["Collect", "Label", "Review", "Train", "Recognise", "Checkout", "Evaluate"]
    args = app.parse_args(["--db", "x", "--port", "9999", "--auth", "a:b", "--no-capture"])
    assert args.port == 9999 and args.auth == "a:b" and args.no_capture


def test_live_model_leaves_a_core_to_a_browser_on_this_machine(tmp_path):
    import app

    assert app.live_threads(app.parse_args([]), cores=2) == 1          # serving loopback: the browser is here
    assert app.live_threads(app.parse_args([]), cores=8) == 7
    assert app.live_threads(app.parse_args([]), cores=1) is None
    assert app.live_threads(app.parse_args(["--host", "0.0.0.0"]), cores=2) is None  # a Space: browsers elsewhere
    assert app.live_threads(app.parse_args(["--share"]), cores=2) is None
    assert app.live_threads(app.parse_args(["--live-threads", "2"]), cores=2) == 2
    with pytest.raises(SystemExit, match="at least 1"):
        app.live_threads(app.parse_args(["--live-threads", "0"]), cores=2)
    with pytest.raises(SystemExit, match="more than 0"):
        app.main(["--live-fps", "0", "--db", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()  # refused before anything was created


def test_live_stream_sends_frames_at_the_asked_rate(studio):
    import app

    def stream_every(demo):
        return [d["stream_every"] for d in demo.config["dependencies"] if d.get("stream_every")]

    assert 1 / 12 in stream_every(app.build_app(studio)) and app.parse_args([]).live_fps == app.LIVE_FPS == 12
    assert 0.05 in stream_every(app.build_app(studio, live_fps=20))


def test_webcams_ask_for_modest_frames_not_gradios_1920x1440(studio):
    import app

    demo = app.build_app(studio)
    cams = {b.label: b.webcam_options.constraints for b in demo.blocks.values()
            if b.__class__.__name__ == "Image" and "webcam" in (b.sources or [])}
    assert cams["Live camera"]["video"]["width"]["ideal"] == 640  # the model sees 448x448: more is wasted work
    assert cams["Camera"]["video"]["width"]["ideal"] <= 1280


def test_the_train_tab_shows_a_refit_against_the_stage_it_refitted_on_the_test_photos():
    from webapp import Studio

    run = {"name": "run-1", "state": "finished", "progress": {
        "recipe": "progressive", "stage": "done", "stages": ["linear", "finetune", "refit"], "instant_val_acc": 0.7, "val_images": 10,
        "results": [
            {"stage": "finetune", "val_acc": 0.9, "active": True, "input_size": 256},
            {"stage": "refit", "refit_of": "finetune", "val_acc": None, "test_acc": 0.95, "test_n": 20,
             "compared_with": {"stage": "finetune", "test_acc": 0.85}, "active": True, "input_size": 256},
            {"stage": "ntsnet", "val_acc": 0.96, "active": True, "input_size": 256, "answer": "all-heads"}]}}
    text = Studio.describe_run(run)
    assert "finetune: 90.0% at 256 px — became the active model" in text
    assert "refit of finetune on training + validation photos: 95.0% on 20 test photos (finetune: 85.0%) at 256 px" in text
    assert "ntsnet: 96.0% at 256 px, all heads answering — became the active model" in text


def test_the_apps_precision_reaches_the_model_that_answers(tmp_path, tiny_checkpoint, monkeypatch):
    """--precision fp32 measures a bf16 CPU as an ordinary one; auto there runs only the part pass in bf16."""
    import app
    import ntsnet.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "cpu_supports_fast_bf16", lambda *a, **k: True)
    assert app.parse_args([]).precision == "auto" and app.parse_args(["--precision", "fp32"]).precision == "fp32"
    monkeypatch.setenv("NTSNET_PRECISION", "bf16")
    assert app.parse_args([]).precision == "bf16"
    with pytest.raises(SystemExit):
        app.parse_args(["--precision", "fp16"])
    names = {}
    for precision in ("auto", "fp32"):
        studio = Studio(tmp_path / precision, backend="torch", precision=precision)
        studio.set_active_model(str(tiny_checkpoint))
        names[precision] = studio._answerer()[2]
    assert names == {"auto": "torch bf16 (parts)", "fp32": "torch fp32"}


def test_an_unknown_product_is_added_from_the_frame_that_was_not_recognised(studio, monkeypatch):
    """"Not in the catalogue — closest: A, B", then one click makes it a product with that frame as its first photo."""
    from ntsnet.predictor import Prediction

    with pytest.raises(StudioError, match="No frame"):
        studio.add_unknown_as_product("s1", "yellow-jar")
    fill(studio, n=3)
    frame = shot(77, "green-pack")
    unknown = Prediction("unknown", 0.4, [("blue-can", 0.4), ("red-box", 0.35)], unknown=True, best_guess="blue-can")
    monkeypatch.setattr(studio, "_answer", lambda rgb, session, live: (unknown, "instant", "torch"))
    r = studio.recognise(frame, session="s1", wait=True)
    assert r.label == "Not in the catalogue — closest: blue-can, red-box" and not r.sure
    with pytest.raises(StudioError, match="No frame"):
        studio.add_unknown_as_product("another visitor", "yellow-jar")
    with pytest.raises(StudioError, match="already exists"):
        studio.add_unknown_as_product("s1", "Red-Box")
    added = studio.add_unknown_as_product("s1", "yellow-jar")
    assert "Added" in added["message"] and studio.photo_count("yellow-jar") == 1
    stored = studio.catalogue.images(product="yellow-jar")[0]
    pixels = np.asarray(Image.open(studio.catalogue.image_path(stored["path"])).convert("RGB"), np.float32)
    blocks = lambda a: np.asarray(a, np.float32).reshape(30, 8, 30, 8, 3).mean((1, 3))  # noqa: E731  JPEG keeps 8x8 means
    assert pixels.shape == frame.shape and np.abs(blocks(pixels) - blocks(frame)).mean() < 3  # that frame, as stored
    with pytest.raises(StudioError, match="Nothing added: duplicate"):  # the same frame again: no empty product left
        studio.add_unknown_as_product("s1", "purple-tin")
    assert "purple-tin" not in studio.product_names()


def test_the_empty_scene_is_answered_as_nothing_to_recognise(studio, monkeypatch):
    """An empty counter, later in other light, must not be named as a product: Collect captures the camera's empty
    scene, and the instant model then answers "no product" for it while still naming the products."""
    from ntsnet.predictor import EMPTY_SCENE

    fill(studio, n=6)

    def empty(seed, gain=1.0):
        shelf = np.random.default_rng(seed).integers(90, 160, size=(240, 240, 3)).astype(np.float32)
        return np.clip(shelf * gain, 0, 255).astype(np.uint8)

    from webapp import capture

    clock = [0.0]
    monkeypatch.setattr(capture.time, "monotonic", lambda: clock[0])
    frames = iter([empty(stable_seed("empty", i)) for i in range(8)])
    steps = list(studio.capture_empty_scene(lambda: next(frames, None), sleep=lambda s: clock.__setitem__(0, clock[0] + s)))
    assert steps[-1]["done"] and "Empty scene" in steps[0]["message"]
    assert studio.photo_count(EMPTY_SCENE) == 8 and EMPTY_SCENE in studio.product_names()  # 3 s at 250 ms: 12 ticks
    later = [empty(stable_seed("later", i), gain) for i, gain in enumerate([0.7, 0.85, 1.0, 1.15, 1.3] * 6)]
    answers = [studio.recognise(f, wait=True) for f in later]
    nothing = [r for r in answers if r.label.startswith("Nothing to recognise")]
    assert len(nothing) == len(later) and not any(r.sure for r in answers)  # 30 of 30
    named = [studio.recognise(shot(stable_seed("check", i), name), wait=True).label for i, name in enumerate(["red-box", "blue-can"] * 3)]
    assert named == ["red-box", "blue-can"] * 3 or sum(a == b for a, b in zip(named, ["red-box", "blue-can"] * 3)) >= 5
    assert not any(label.startswith("Nothing") for label in named)


def test_a_trained_model_that_knows_the_empty_scene_answers_nothing(tiny_checkpoint):
    from ntsnet import Predictor, load_checkpoint
    from ntsnet.checkpoint import build_model
    from ntsnet.predictor import EMPTY_SCENE

    ckpt = load_checkpoint(tiny_checkpoint)
    names = [EMPTY_SCENE if n == "red-box" else n for n in ckpt.class_names]  # the red class plays the empty scene
    predictor = Predictor(build_model(ckpt), names, device="cpu", backend="torch")
    predictor.unknown_threshold = 1.01  # even a threshold that rejects everything never makes it "unknown"
    p = predictor.predict(shot(3, "red-box"))
    assert p.nothing and not p.unknown and p.label == EMPTY_SCENE and p.to_dict()["nothing"]
    other = predictor.predict(shot(4, "blue-can"))
    assert not other.nothing and other.unknown


def test_the_captured_empty_scene_answers_nothing_before_any_model_runs(studio, monkeypatch):
    """The camera's empty scene in other light is "nothing to recognise" from the frame alone (the model is never
    asked); a product put into that scene is still the model's to name; another camera's frame is not "empty"."""
    from synthetic import counter_scene, packet, place, relit

    from ntsnet.predictor import EMPTY_SCENE
    from webapp import capture, empty_scene

    fill(studio, n=6)
    scene = counter_scene(11)
    clock = [0.0]
    monkeypatch.setattr(capture.time, "monotonic", lambda: clock[0])
    frames = iter([relit(scene, i) for i in range(12)])
    list(studio.capture_empty_scene(lambda: next(frames, None), sleep=lambda s: clock.__setitem__(0, clock[0] + s)))
    assert studio.photo_count(EMPTY_SCENE) >= 2
    monkeypatch.setattr(empty_scene, "RECHECK_S", 0.0)
    asked = []
    real = studio.instant.predict
    monkeypatch.setattr(studio.instant, "predict", lambda image: asked.append(1) or real(image))
    for i, light in enumerate([dict(gain=0.7), dict(gain=1.3, ramp=0.2), dict(balance=(1.1, 1.0, 0.9), shadow=0.75)]):
        r = studio.recognise(relit(scene, 100 + i, **light), wait=True)
        assert r.label.startswith("Nothing to recognise"), r.label
    assert asked == []
    r = studio.recognise(relit(place(scene, packet(1, colour=(220, 40, 40)), 120, 80), 200), wait=True)
    assert asked == [1] and not r.label.startswith("Nothing to recognise")
    from ntsnet.predictor import Prediction  # a model that takes a small product for the scene is overruled
    took_for_scene = Prediction(EMPTY_SCENE, 0.7, [(EMPTY_SCENE, 0.7), ("red-box", 0.2)], best_guess=EMPTY_SCENE)
    monkeypatch.setattr(studio.instant, "predict", lambda image: asked.append(1) or took_for_scene)
    r = studio.recognise(relit(place(scene, packet(2, colour=(220, 40, 40)), 20, 20), 201), wait=True)
    assert r.label.startswith("Not sure (best guess red-box") and not r.sure
    r = studio.recognise(np.full((300, 300, 3), 128, np.uint8), wait=True)  # another camera's frame: the model decides
    assert asked == [1, 1, 1] and r.label.startswith("Nothing to recognise")
