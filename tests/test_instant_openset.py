"""Instant prototype index (incremental, persistent, self-syncing) and unknown-product rejection."""
import numpy as np
import pytest

from synthetic import draw_product
from dataset_tools import Catalogue, assign_splits
from ntsnet.instant import INDEX_FILE, InstantIndex, InstantRecogniser
from training.openset import auroc, coverage_table, threshold_for


def unit(rng, n, d=16):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def assert_same_index(a: InstantIndex, b: InstantIndex, atol=1e-9):
    na, pa = a.prototypes()
    nb, pb = b.prototypes()
    assert na == nb and a.counts == b.counts
    np.testing.assert_allclose(pa, pb, atol=max(atol, 1e-6))
    for k in a.sums:
        np.testing.assert_allclose(a.sums[k], b.sums[k], atol=atol)


def test_incremental_updates_equal_a_rebuild():
    rng = np.random.default_rng(0)
    emb = unit(rng, 60)
    labels = rng.choice(["a", "b", "c"], size=60)
    inc = InstantIndex("x")
    for i in rng.permutation(60):
        inc.add(int(i), str(labels[i]), emb[i])
    for i in range(0, 60, 7):                   # deletions
        inc.remove(i)
    for i in range(1, 60, 9):                   # relabels (moves / merges)
        if i in inc.labels:
            inc.relabel(i, "d")
    final = [(i, inc.labels[i], emb[i]) for i in sorted(inc.labels)]
    assert_same_index(inc, InstantIndex.from_embeddings(final, "x"))


def test_hand_made_open_set_numbers():
    assert auroc([0.9, 0.8], [0.1, 0.85]) == 0.75
    assert auroc([0.5], [0.5]) == 0.5
    assert threshold_for(np.linspace(0, 1, 101), keep=0.95) == pytest.approx(0.05)
    rows = coverage_table([0.9, 0.8, 0.7, 0.6], [True, True, False, False], [0.65, 0.1], threshold=0.75)
    full, stored = rows[0], rows[-1]
    assert full["known_accepted"] == 1.0 and full["accuracy_on_accepted"] == 0.5 and full["unknown_rejected"] == 0.0
    assert stored["coverage"] == "stored" and stored["known_accepted"] == 0.5 and stored["accuracy_on_accepted"] == 1.0
    assert stored["unknown_rejected"] == 1.0


@pytest.fixture
def shop(tmp_path):
    cat = Catalogue(tmp_path / "c")
    rng = np.random.default_rng(1)
    for name in ("red-box", "blue-can"):
        for _ in range(8):
            cat.add_image(draw_product(rng, name, 160), product=name, create_product=True, source_kind="webcam")
    return cat


def test_recogniser_persists_syncs_and_rejects_unknown_products(shop):
    rec = InstantRecogniser(shop)
    assert rec.sync()["added"] == 16 and rec.ready()
    rng = np.random.default_rng(5)
    assert rec.predict(draw_product(rng, "blue-can", 160)).label == "blue-can"
    # a product the index has never seen is "unknown", not the closest product
    unknown = [rec.predict(draw_product(rng, "green-pack", 160)) for _ in range(10)]
    assert sum(p.unknown for p in unknown) >= 9 and unknown[0].label == "unknown" and unknown[0].best_guess
    known = [rec.predict(draw_product(rng, n, 160)) for n in ("red-box", "blue-can") * 5]
    assert sum(p.unknown for p in known) <= 2
    # restart: loaded from disk, nothing re-embedded, same answers
    again = InstantRecogniser(shop)
    assert again.sync()["added"] == 0 and len(again.index.labels) == 16
    img = draw_product(rng, "red-box", 160)
    assert again.predict(img).to_dict() == rec.predict(img).to_dict()


def test_incremental_capture_equals_rebuild_from_scratch(shop):
    rec = InstantRecogniser(shop)
    rec.sync()
    rng = np.random.default_rng(9)
    for _ in range(3):  # new captures: one forward pass each
        res = shop.add_image(draw_product(rng, "red-box", 160), product="red-box", source_kind="webcam")
        rec.add_photo(res.image_id, "red-box", shop.root / res.path)
    (shop.root / INDEX_FILE).unlink()
    rebuilt = InstantRecogniser(shop, embedder=rec.embedder)
    assert rebuilt.sync()["added"] == 19
    assert_same_index(rec.index, rebuilt.index, atol=1e-4)


def test_rebuilt_after_merge_delete_and_backbone_change(shop):
    rec = InstantRecogniser(shop)
    rec.sync()
    shop.add_product("cans")
    shop.merge_products("blue-can", "cans")
    victim = shop.images(product="red-box")[0]["id"]
    shop.delete_images([victim])
    change = InstantRecogniser(shop).sync()
    assert change["relabelled"] == 8 and change["removed"] == 1 and change["added"] == 0
    idx = InstantIndex.load(shop.root / INDEX_FILE)
    assert idx.counts == {"cans": 8, "red-box": 7}
    other = InstantRecogniser(shop, backbone="efficientnet_lite1")  # a different backbone: rebuilt from scratch
    assert other.sync()["added"] == 15


def test_embeddings_of_an_older_preprocessing_are_recomputed(shop, monkeypatch):
    import ntsnet.instant as instant

    InstantRecogniser(shop).sync()
    assert InstantIndex.load(shop.root / INDEX_FILE) is not None
    monkeypatch.setattr(instant, "PREPROCESSING", "a later preprocessing")
    assert InstantIndex.load(shop.root / INDEX_FILE) is None
    assert InstantRecogniser(shop).sync()["added"] == 16


def test_ntsnet_stores_a_threshold_and_reports_open_set(tmp_path, monkeypatch):
    """Train on two products with the third held out; the checkpoint carries a calibrated threshold and
    evaluate --unknown-products reports AUROC and the coverage trade-off."""
    from ntsnet import Predictor, load_checkpoint
    from training import openset

    monkeypatch.setattr(openset, "MIN_CALIBRATION_PHOTOS", 5)  # 6 validation photos here; the rule has its own test
    from training.evaluate import evaluate
    from training.train import TrainConfig, train

    cat = Catalogue(tmp_path / "c")
    rng = np.random.default_rng(3)
    for name in ("red-box", "blue-can", "green-pack"):
        for _ in range(15):
            cat.add_image(draw_product(rng, name), product=name, create_product=True)
    assign_splits(cat, val=0.2, test=0.2)
    cfg = TrainConfig(db=str(cat.root), out=str(tmp_path / "run"), backbone="tiny", pretrained=False, input_size=96, part_size=48,
                      proposal_num=4, cat_num=2, batch_size=8, lr=0.05, workers=0, precision="fp32", epochs=8,
                      exclude_products="green-pack")
    train(cfg, log=lambda *a: None)
    ckpt = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert ckpt.class_names == ["blue-can", "red-box"]
    thr = ckpt.extra["unknown_threshold"]
    assert thr["score"] == "max_softmax" and 0.5 <= thr["value"] <= 1.0 and thr["n"] == 6
    pred = Predictor.from_checkpoint(tmp_path / "run" / "best.safetensors")
    assert pred.unknown_threshold == thr["value"]
    pred.unknown_threshold = 1.01  # nothing passes: every answer must be "unknown"
    p = pred.predict(draw_product(rng, "red-box"))
    assert p.unknown and p.label == "unknown" and p.best_guess in ("red-box", "blue-can")
    rep = evaluate(tmp_path / "run" / "best.safetensors", cat.root, split="test", conditions=("clean",), progress=False,
                   unknown_products=["green-pack"], out_dir=tmp_path / "ev")
    o = rep["open_set"]
    assert o["n_unknown"] == 15 and o["n_known"] == rep["n"] and 0.0 <= o["auroc"] <= 1.0
    assert [r["coverage"] for r in o["coverage"]][-1] == "stored"
    assert len(o["known_scores"]) == o["n_known"] and len(o["unknown_scores"]) == 15
    from webapp.tabs.evaluate import report_tables  # the Evaluate tab's picture of the two score distributions

    picture = report_tables({**rep, "confusion_png": str(tmp_path / "ev" / "confusion.png")}, "test")[-1]
    assert picture.ndim == 3 and picture.shape[0] > 100 and (tmp_path / "ev" / "open_set.png").exists()
    with pytest.raises(ValueError, match="one of the model's products"):
        evaluate(tmp_path / "run" / "best.safetensors", cat.root, split="test", progress=False, unknown_products=["red-box"])


def test_whitening_finds_the_products_under_what_every_photo_shares():
    """A strong nuisance every photo varies in (light, a hand) and a weak direction per product: plain prototypes are
    near chance, whitened ones by the catalogue's own statistics are not; the job's bar uses the same rule."""
    import torch

    from ntsnet.whitening import Whitening
    from training.features import prototype_predictions

    rng = np.random.default_rng(0)
    d, per, classes = 24, 12, 4
    nuisance = rng.normal(size=(3, d)) * 4.0
    centres = rng.normal(size=(classes, d)) * 0.6

    def photos(n):
        y = np.repeat(np.arange(classes), n)
        x = centres[y] + rng.normal(size=(len(y), 3)) @ nuisance + rng.normal(size=(len(y), d)) * 0.3 + 5.0
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y

    bank, y_bank = photos(per)
    queries, y_q = photos(25)
    index = InstantIndex.from_embeddings([(i, f"p{c}", e) for i, (c, e) in enumerate(zip(y_bank, bank))])
    names, plain_protos = index.prototypes()
    plain = (np.array(names)[(queries @ plain_protos.T).argmax(1)] == np.array([f"p{c}" for c in y_q])).mean()
    answers = [p.label if not p.unknown else p.best_guess for p in index.classify(queries)]
    whitened = (np.array(answers) == np.array([f"p{c}" for c in y_q])).mean()
    assert plain < 0.4 and whitened > 0.7, (plain, whitened)
    bar = prototype_predictions(torch.from_numpy(bank), torch.from_numpy(y_bank), torch.from_numpy(queries), classes)
    assert [f"p{c}" for c in bar.tolist()] == answers  # the Train job's instant bar is the instant model's rule
    few = Whitening(bank[:10])  # fewer photos than dimensions: the same transform as the full eigendecomposition
    centred = bank[:10].astype(np.float64) - bank[:10].mean(0)
    lam, vec = np.linalg.eigh(np.cov(centred.T))
    alpha = 0.3 * lam[lam > lam.max() * 1e-10].mean()
    w = (queries - bank[:10].mean(0)) @ vec @ np.diag(1 / np.sqrt(np.clip(lam, 0, None) + alpha)) @ vec.T
    np.testing.assert_allclose(few(queries), w / np.linalg.norm(w, axis=1, keepdims=True), atol=1e-5)


def test_a_large_index_refits_beside_the_answers_and_edits_never_break_a_query(monkeypatch):
    """Above BACKGROUND_REFIT_ABOVE photos a refit takes seconds: the previous fit keeps answering while a thread
    makes the new one from a snapshot; captures adding photos while the live worker classifies never break it."""
    import threading

    from ntsnet import instant

    monkeypatch.setattr(instant, "BACKGROUND_REFIT_ABOVE", 20)
    monkeypatch.setattr(instant, "REFIT_EVERY_S", 0.0)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 32))
    unit = lambda v: (v / np.linalg.norm(v)).astype(np.float32)  # noqa: E731
    index = instant.InstantIndex.from_embeddings((i, f"p{i % 3}", unit(centres[i % 3] + rng.standard_normal(32))) for i in range(30))
    first = index.view()
    index.add(100, "p3", unit(rng.standard_normal(32)))
    assert index.view() is first  # answered at once by the fit it had
    index._refitting.join(10)
    assert index.view().version == index.version and "p3" in index.view().names
    errors = []

    def capture():
        try:
            for i in range(200, 400):
                index.add(i, f"p{i % 4}", unit(rng.standard_normal(32)))
        except Exception as exc:  # pragma: no cover - what the test is for
            errors.append(exc)

    t = threading.Thread(target=capture)
    t.start()
    for _ in range(200):
        index.classify(unit(rng.standard_normal(32))[None])
    t.join()
    assert not errors


def test_an_index_of_one_photo_or_of_identical_photos_still_answers():
    """The first capture makes a one-photo index (nothing varies yet), a burst of a still frame identical photos:
    the whitening then only centres, and the index answers instead of failing."""
    from ntsnet.instant import InstantIndex

    e = np.ones(8, np.float32) / np.sqrt(8)
    one = InstantIndex.from_embeddings([(1, "a", e)])
    assert one.classify(e[None])[0].best_guess == "a"
    same = InstantIndex.from_embeddings([(1, "a", e), (2, "a", e), (3, "b", -e)])
    assert same.classify(-e[None])[0].best_guess == "b"
