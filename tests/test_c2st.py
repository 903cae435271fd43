"""The classifier two-sample test and the age-effect check, on cases with known answers, and in `evaluate_run`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from brainvae.compare import headline
from brainvae.evaluate import age_effect as A
from brainvae.evaluate.c2st import c2st, split_halves
from brainvae.evaluate.run_eval import evaluate_run

from conftest import make_store
from test_evaluate import train_tiny


def smooth_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """n random smooth images (Gaussian-filtered noise, each scaled to [0, 1]): (n, size, size) float32."""
    x = gaussian_filter(np.random.default_rng(seed).standard_normal((n, size, size)), (0, 2, 2))
    lo, hi = x.min((1, 2), keepdims=True), x.max((1, 2), keepdims=True)
    return ((x - lo) / (hi - lo)).astype(np.float32)


FAST = {"steps": 100, "batch_size": 64}


# ----------------------------------------------------------------------------- C2ST


@pytest.mark.parametrize("seed", [0, 1])
def test_c2st_near_chance_for_two_halves_of_one_set(seed):
    x = smooth_images(512, seed=seed)
    result = c2st(x[:256], x[256:], seed=seed, **FAST)
    assert abs(result["accuracy"] - 0.5) <= 0.15 and abs(result["auc"] - 0.5) <= 0.15
    assert result["n_train"] == 128 and result["n_test"] == 128
    assert result["split_by_group"] == {"a": False, "b": False}


def test_c2st_near_one_for_shifted_blurred_brightened_images():
    x = smooth_images(512, seed=2)
    changed = np.clip(1.25 * gaussian_filter(np.roll(x, 3, axis=(1, 2)), (0, 2, 2)), 0, 1)  # shift, blur, brighten
    result = c2st(x[:256], changed[256:], seed=0, **FAST)
    assert result["accuracy"] >= 0.9 and result["auc"] >= 0.9


def test_c2st_is_deterministic_balances_classes_and_leaves_the_global_rng_alone():
    x, y = smooth_images(100, seed=3), smooth_images(60, seed=4)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = c2st(x, y, seed=5, **FAST)
    np.testing.assert_array_equal(torch.rand(3), expected_next)  # the caller's stream is where it was
    assert c2st(x, y, seed=5, **FAST) == first
    assert first["n_train"] == first["n_test"] == 30  # min(100, 60) of each, split in halves
    assert first["steps"] == 50  # 100 steps capped at 50 epochs: 60 training slices, one batch of 60 per epoch
    with pytest.raises(ValueError, match="at least 4"):
        c2st(x[:3], y, **FAST)


def test_c2st_group_split_keeps_each_group_in_one_half():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(10), 5)  # 10 subjects x 5 slices
    first, second = split_halves(len(groups), rng, groups)
    assert len(first) + len(second) == 50 and len(first) >= 25
    assert not set(groups[first]) & set(groups[second])
    x = smooth_images(50, seed=6)
    result = c2st(x, smooth_images(50, seed=7), groups_a=groups, groups_b=groups, **FAST)
    assert result["split_by_group"] == {"a": True, "b": True}
    one = c2st(x, x, groups_a=np.zeros(50), **FAST)  # a single group: split by slice
    assert one["split_by_group"]["a"] is False


# ----------------------------------------------------------------------------- age effect


def aged_discs(ages: np.ndarray, size: int = 64, seed: int = 0) -> np.ndarray:
    """Bright discs ("brains") with a dark centre ("ventricles", intensity 0: a hole) whose area fraction is
    0.05 + 0.03 per decade above 20 years (plus noise): (n, size, size) float32."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    r2 = xx ** 2 + yy ** 2
    out = []
    for age in ages:
        dark = np.clip(0.05 + 0.03 * (age - 20) / 10 + rng.normal(0, 0.01), 0.01, 0.9)
        brain = 0.8 ** 2
        img = np.where(r2 < brain, 0.7 + 0.05 * rng.standard_normal((size, size)), 0.0)
        img[r2 < dark * brain] = 0.0  # inner disc of area fraction `dark`
        out.append(np.clip(img, 0, 1))
    return np.asarray(out, np.float32)


def test_csf_fraction_counts_dark_holes_inside_the_brain():
    ages = np.array([20.0, 50.0, 80.0])
    f = A.csf_fraction(aged_discs(ages, size=128, seed=0))
    np.testing.assert_allclose(f, 0.05 + 0.03 * (ages - 20) / 10, atol=0.025)  # noise 0.01 + pixelation
    assert np.isnan(A.csf_fraction(np.zeros((1, 16, 16), np.float32))[0])  # no brain


def test_age_effect_recovers_a_known_slope_and_its_interval():
    rng = np.random.default_rng(1)
    subject_age = rng.uniform(20, 85, 24)  # 24 real subjects, 3 slices each
    real_age, subject = np.repeat(subject_age, 3), np.repeat(np.arange(24), 3)
    real_csf = A.csf_fraction(aged_discs(real_age, seed=2))
    slope, _ = A.line_fit(real_age, real_csf)
    assert slope == pytest.approx(0.03, abs=0.005)  # per decade
    lo, hi = A.bootstrap_slope(real_age, real_csf, subject, n_boot=300, seed=0)
    assert lo < slope < hi and lo < 0.03 < hi and hi - lo < 0.02

    sample_age = np.repeat(np.asarray(A.AGES, float), 8)
    good = A.compare_age_effect(sample_age, A.csf_fraction(aged_discs(sample_age, seed=3)), real_age, real_csf,
                                subject, n_boot=300)
    assert good["within_ci"] and good["n_real_subjects"] == 24 and good["real_slope"] == pytest.approx(slope)
    assert good["sample_slope"] == pytest.approx(0.03, abs=0.005)
    ageless = A.csf_fraction(aged_discs(np.full(len(sample_age), 50.0), seed=4))  # samples that ignore age
    flat = A.compare_age_effect(sample_age, ageless, real_age, real_csf, subject, n_boot=300)
    assert not flat["within_ci"] and abs(flat["sample_slope"]) < 0.005


# ----------------------------------------------------------------------------- in evaluate_run


def test_evaluate_run_reports_c2st_and_age_effect(tmp_path, monkeypatch):
    import brainvae.evaluate.conditional as conditional

    # 12 subjects (2 val, 2 test), 9 slices each: positions 0, 1/8, ..., so one slice per subject at 0.5
    store = make_store(tmp_path / "store", n_subjects=12, slices=9)
    run = train_tiny(tmp_path, store, arch="cvae")
    monkeypatch.setattr(conditional, "conditional_fidelity", lambda *a, **k: {"stub": True})
    metrics = evaluate_run(run, store, n=12, seed=0, progress=False, featnet_steps=2, c2st_steps=5)

    two = metrics["c2st"]
    for key in ("accuracy", "auc"):
        assert set(two[key]) == {"value", "floor", "ratio"} and 0 <= two[key]["value"] <= 1
        assert 0 <= two[key]["floor"] <= 1
    assert two["steps"] == 5 and two["n_test"] >= 1 and two["floor_n_test"] >= 1
    assert two["split_by_subject"] == {"real_test": True, "real_train": True}
    rows = {r["metric"]: r for r in metrics["summary"]}
    assert rows["c2st accuracy"]["model"] == two["accuracy"]["value"]
    assert headline({}, metrics)["c2st_acc"] == two["accuracy"]["value"]

    age = metrics["age_effect"]
    assert {"sample_slope", "real_slope", "real_ci", "within_ci", "n_real_subjects"} <= set(age)
    assert age["n_real_subjects"] == 4 and age["n_samples"] == len(A.AGES) * A.PER_AGE
    assert np.isfinite(age["real_slope"]) and age["real_ci"][0] <= age["real_ci"][1]
    assert "age CSF slope/decade (floor=real)" in rows
    assert "age_effect.png" in metrics["figures"] and (run / "eval" / "age_effect.png").stat().st_size > 0
