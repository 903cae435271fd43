"""Conditional fidelity and synthetic-data utility: bootstrap, classifier, predictor cache, CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score
from typer.testing import CliRunner

from brainvae.cli import app
from brainvae.data.resize import read_resized
from brainvae.data.store import SliceStore
from brainvae.errors import BrainVAEError
from brainvae.evaluate import conditional as C
from brainvae.evaluate.classifier import Head, TrainSettings, predict, train_cnn
from brainvae.evaluate.utility import (UtilityConfig, age_band_classes, age_band_names, balanced_accuracy,
                                       parse_ratios, subject_bootstrap_ci)
from brainvae.models.registry import build

from conftest import make_store

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# --- labels and the bootstrap -----------------------------------------------------------------------------------

def test_balanced_accuracy_matches_sklearn():
    rng = np.random.default_rng(0)
    for k in (2, 3):
        y, p = rng.integers(0, k, 200), rng.integers(0, k, 200)
        assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p))
    y, p = np.zeros(10, int), np.r_[np.zeros(7, int), np.ones(3, int)]  # a predicted class absent from y
    with pytest.warns(UserWarning):
        ref = balanced_accuracy_score(y, p)
    assert balanced_accuracy(y, p) == pytest.approx(ref) == 0.7


def test_age_bands_and_ratios():
    assert age_band_classes(np.array([20, 39.9, 40, 59, 60, 80, np.nan]), (40, 60)).tolist() == [0, 0, 1, 1, 2, 2, -1]
    assert age_band_names((40.0, 60.0)) == ["<40", "40-60", ">=60"]
    assert parse_ratios("0.5, 1,2") == (0.5, 1.0, 2.0)
    with pytest.raises(BrainVAEError, match="ratios"):
        parse_ratios("a,b")
    with pytest.raises(BrainVAEError, match="positive"):
        UtilityConfig(ratios=(0.0,))


def _subject_data(n_subjects: int, per_subject: int = 5, seed: int = 0):
    """Binary labels; each subject's slices are all right (p = 0.7) or all wrong: strongly clustered."""
    rng = np.random.default_rng(seed)
    subjects = np.repeat(np.arange(n_subjects), per_subject)
    y = rng.integers(0, 2, len(subjects))
    right = np.repeat(rng.random(n_subjects) < 0.7, per_subject)
    return y, np.where(right, y, 1 - y), subjects


def test_bootstrap_ci_contains_point_and_narrows_with_more_subjects():
    widths = []
    for n in (10, 200):
        y, p, s = _subject_data(n)
        ci = subject_bootstrap_ci(y, p, s, n_boot=500, seed=1)
        assert ci["low"] <= ci["value"] <= ci["high"]
        assert ci["value"] == pytest.approx(balanced_accuracy_score(y, p))
        widths.append(ci["high"] - ci["low"])
    assert widths[1] < 0.5 * widths[0]
    # repeats: (R, N) predictions score the mean over repeats
    y, p, s = _subject_data(30)
    two = subject_bootstrap_ci(y, np.stack([p, y]), s, n_boot=200)
    assert two["value"] == pytest.approx((balanced_accuracy(y, p) + 1.0) / 2)


def test_bootstrap_resamples_subjects_not_slices():
    # one subject with 100 slices, all right; ten subjects with one slice each, all wrong
    subjects = np.r_[np.zeros(100, int), np.arange(1, 11)]
    y = np.ones(110, int)
    p = np.r_[np.ones(100, int), np.zeros(10, int)]
    acc = lambda a, b: float((a == b).mean())  # noqa: E731
    by_subject = subject_bootstrap_ci(y, p, subjects, acc, n_boot=1000)
    by_slice = subject_bootstrap_ci(y, p, np.arange(110), acc, n_boot=1000)  # every slice its own cluster
    assert by_subject["value"] == by_slice["value"] == pytest.approx(100 / 110)
    assert by_slice["low"] > 0.8  # slice resampling: falsely confident
    assert by_subject["low"] < 0.5  # ~35 % of resamples miss the big subject entirely


# --- the classifier and conditional fidelity --------------------------------------------------------------------

@pytest.fixture
def disc_store(tmp_path):
    """18 subjects (12 train, 3 val, 3 test) whose disc radius grows with age."""
    return make_store(tmp_path / "discs", n_subjects=18, slices=6, size=32)


def test_classifier_learns_age_from_disc_radius(disc_store):
    store = SliceStore(disc_store)
    m = store.manifest
    tr, te = store.indices("train"), store.indices("test")
    x_tr, x_te = read_resized(store.images, tr, 32), read_resized(store.images, te, 32)
    assert x_tr.shape == (len(tr), 32, 32) and x_tr.dtype == np.float32
    bands = age_band_classes(m["age"].to_numpy(), (40, 60))
    heads = (Head("age"), Head("band", 3))
    settings = TrainSettings(steps=60, batch_size=16, lr=3e-3, seed=0)
    net, info = train_cnn(x_tr, {"age": m["age"].to_numpy()[tr], "band": bands[tr]}, heads, settings, width=8)
    assert info["steps"] == 60
    pred = predict(net, x_te)
    assert pred["age"].shape == (len(te),) and pred["band"].shape == (len(te), 3)
    assert np.corrcoef(pred["age"], m["age"].to_numpy()[te])[0, 1] > 0.25  # held-out subjects (radius also varies with position: r ~ 0.4)
    assert balanced_accuracy(bands[te], pred["band"].argmax(1)) > 1 / 3
    # the same seed gives the same network
    again, _ = train_cnn(x_tr, {"age": m["age"].to_numpy()[tr], "band": bands[tr]}, heads, settings, width=8)
    np.testing.assert_allclose(predict(again, x_te)["age"], pred["age"], rtol=1e-5)


def test_ceiling_tests_count_subjects_not_slices():
    rng = np.random.default_rng(0)

    def tests(n_subjects, per_subject=10):
        subjects = np.repeat(np.arange(n_subjects), per_subject)
        age = np.repeat(rng.uniform(20, 80, n_subjects), per_subject)
        sex = np.repeat(np.arange(n_subjects) % 2, per_subject)
        probs = np.eye(2)[sex] * 0.8 + 0.1  # every slice read right
        pred = {"age": age + rng.normal(0, 5, len(age)), "sex": probs}
        return C.ceiling_tests(pred, {"age": age, "sex": sex}, subjects)

    few, many = tests(3), tests(12)
    assert few["sex_accuracy"]["subject_value"] == 1.0 and few["sex_accuracy"]["p"] == 0.125  # 3 of 3: 1 / 8
    assert not few["sex_accuracy"]["above_chance"]
    assert many["sex_accuracy"]["above_chance"] and many["age_r"]["above_chance"] and many["age_r"]["n_subjects"] == 12
    assert not tests(2)["age_r"]["above_chance"]  # a correlation over 2 subjects says nothing


def _cvae(conditions=("age", "sex", "position")):
    return build("cvae", {"image_size": 32, "channels": [8, 16], "latent_dim": 8, "conditions": list(conditions)}).eval()


def test_conditional_fidelity_ceiling_and_predictor_cache(disc_store, monkeypatch):
    cfg = C.PredictorConfig(image_size=32, steps=60, batch_size=16, lr=3e-3, eval_every=20, width=8)
    result = C.conditional_fidelity(_cvae(), disc_store, n=12, seed=0, progress=False, predictor=cfg)
    json.dumps(result)  # JSON-able
    assert result["real"]["age_r"] > 0 and result["real"]["n_subjects"] == 3
    assert result["samples"]["n_slices"] == 12 and "age_mae" in result["samples"]
    assert set(result["ratio"]) == {"age_r", "sex_accuracy"} and result["goal"] == 0.9
    # 3 test subjects: a sex accuracy cannot be significantly above chance (3 of 3 right: p = 1/8), so no verdict
    tests = result["ceiling_test"]
    assert tests["sex_accuracy"]["n_subjects"] == 3 and not tests["sex_accuracy"]["above_chance"]
    assert result["meets_goal"]["sex_accuracy"] is None
    assert "not significantly above chance over 3 test subjects" in result["not_measurable"]["sex_accuracy"]
    assert (result["meets_goal"]["age_r"] is None) == (not tests["age_r"]["above_chance"])
    assert result["predictor"]["cached"] is False
    path = disc_store / "features" / C.predictor_name(SliceStore(disc_store), cfg)
    assert path.exists()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached predictor should have been reused")

    monkeypatch.setattr(C, "train_cnn", no_training)
    again = C.conditional_fidelity(_cvae(), disc_store, n=12, seed=0, progress=False, predictor=cfg)
    assert again["predictor"]["cached"] is True and again["real"] == result["real"]
    read = []
    monkeypatch.setattr(C, "read_resized",
                        lambda images, rows, size: read.append(rows) or np.zeros((len(rows), size, size), np.float32))
    C.conditional_fidelity(_cvae(), disc_store, n=12, seed=0, progress=False, predictor=cfg, split="val")
    m = SliceStore(disc_store).manifest  # tuning reads the validation subjects, never the test ones
    assert set(m["split"].iloc[read[0]]) == {"val"}


def test_predictor_cache_falls_back_to_home_and_position_only_models(disc_store, tmp_path, monkeypatch):
    import brainvae.evaluate.features as Fe

    monkeypatch.setenv("BRAINVAE_CACHE", str(tmp_path / "home"))
    monkeypatch.setattr(Fe.os, "access", lambda path, mode: False)  # the store folder is read-only
    cfg = C.PredictorConfig(image_size=32, steps=4, batch_size=8, eval_every=2, width=4)
    result = C.conditional_fidelity(_cvae(("position",)), disc_store, n=4, progress=False, predictor=cfg)
    assert result["predictor"]["path"].startswith(str(tmp_path / "home" / "features"))
    # a model that does not take age / sex: no sample scores for them, no ratio
    assert "age_r" not in result["samples"] and result["ratio"] == {"age_r": None, "sex_accuracy": None}


# --- utility end to end -----------------------------------------------------------------------------------------

def _train(tmp_path, store, arch):
    cfg = tmp_path / f"{arch}.toml"
    cfg.write_text(f'[model]\narch = "{arch}"\nimage_size = 32\nchannels = [8, 16]\nlatent_dim = 8\n\n'
                   '[train]\nbatch_size = 8\nval_batches = 1\nprecision = "fp32"\n')
    run = tmp_path / f"run-{arch}"
    r = invoke("train", cfg, "--data", store, "--out", run, "--steps", 2, "--quiet")
    assert r.exit_code == 0, r.output
    return run


def test_utility_cli_end_to_end(tmp_path):
    store = make_store(tmp_path / "store", n_subjects=12, slices=4, size=32)
    run = _train(tmp_path, store, "cvae")
    assert invoke("utility", "--help").exit_code == 0
    r = invoke("utility", run, "--data", store, "--ratios", "0.5,2", "--steps", 2, "--repeats", 2, "--quiet")
    assert r.exit_code == 0, r.output
    assert "real+syn2" in r.output and "age_band" in r.output
    out = run / "utility"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "utility.png").stat().st_size > 0
    assert list(metrics["arms"]) == ["real", "real+syn0.5", "real+syn2", "syn"]
    n_real = metrics["config"]["n_real_train"]
    assert n_real == 8 * 4 and metrics["config"]["n_synthetic"] == 2 * n_real
    assert metrics["config"]["seeds"] == [0, 1] and metrics["config"]["steps"] == 2
    assert metrics["arms"]["syn"]["n_real"] == 0 and metrics["arms"]["real+syn0.5"]["n_synthetic"] == n_real // 2
    for arm in metrics["arms"].values():
        for task in ("sex", "age_band"):
            row = arm[task]
            assert row["ci_low"] <= row["balanced_accuracy"] <= row["ci_high"]
            assert len(row["per_seed"]) == 2 and "delta_vs_real" in row
    assert metrics["arms"]["real"]["sex"]["delta_vs_real"] == 0
    assert metrics["tasks"]["age_band"]["classes"] == ["<40", "40-60", ">=60"]
    assert "versions" in metrics["provenance"]

    r = invoke("utility", run, "--data", store, "--steps", 2, "--quiet")
    assert r.exit_code == 1 and "already exists" in r.output and "Traceback" not in r.output


def test_utility_refuses_unconditional_models(tmp_path):
    store = make_store(tmp_path / "store", n_subjects=6, slices=4, size=32)
    run = _train(tmp_path, store, "vae")
    r = invoke("utility", run, "--data", store, "--steps", 2, "--quiet")
    assert r.exit_code == 1 and "needs a model conditioned on age and sex" in r.output
    assert "Traceback" not in r.output and not (run / "utility").exists()
