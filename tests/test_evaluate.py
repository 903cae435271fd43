"""Evaluation metrics against cases with known answers, the feature-net cache, and `brainvae evaluate` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from typer.testing import CliRunner

from brainvae.cli import app
from brainvae.data.dataset import SliceBatches
from brainvae.data.resize import read_resized, resize_masks
from brainvae.data.store import SliceStore
from brainvae.errors import BrainVAEError, InputFileError
from brainvae.evaluate import features as Fe
from brainvae.evaluate import realism as R
from brainvae.evaluate.reconstruction import PSNR_CAP, ms_ssim, ms_ssim_scales, reconstruction_metrics, ssim_batch, ssim_pairs
from brainvae.evaluate.run_eval import evaluate_run, load_sets

from conftest import make_store

runner = CliRunner()


def discs(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """n noisy discs of random radius and brightness, (n, size, size) in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    r = rng.uniform(0.4, 0.9, (n, 1, 1))
    level = rng.uniform(0.4, 0.8, (n, 1, 1))
    img = (xx ** 2 + yy ** 2 < r ** 2) * (level + 0.1 * rng.standard_normal((n, size, size)))
    return np.clip(img, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- feature-space distances


def test_frechet_and_kid_zero_for_same_distribution_larger_when_shifted():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    shifted = b + 1.0
    assert R.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert R.frechet_distance(a, shifted) > 10 * R.frechet_distance(a, b)
    assert R.frechet_distance(a, shifted) == pytest.approx(8.0, rel=0.3)  # ||mu||^2 = 8
    kid_same, kid_std = R.kernel_distance(a, b, subsets=20)
    kid_shift, _ = R.kernel_distance(a, shifted, subsets=20)
    assert abs(kid_same) < 0.05 and kid_std >= 0
    assert kid_shift > 10 * abs(kid_same)
    # the closed form of the reference implementation (scipy.linalg.sqrtm of S_a S_b) on a well-conditioned case
    from scipy import linalg
    s_a, s_b = np.cov(a, rowvar=False), np.cov(shifted, rowvar=False)
    reference = ((a.mean(0) - shifted.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real)
    assert R.frechet_distance(a, shifted) == pytest.approx(reference, rel=1e-8)
    # a rank-deficient covariance (fewer samples than dimensions) still gives a finite, non-negative FD
    assert np.isfinite(R.frechet_distance(a[:5], b[:5])) and R.frechet_distance(a[:5], a[:5]) >= 0


def test_prdc_identical_and_disjoint():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(100, 4))
    same = R.prdc(real, real.copy())
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    assert same["density"] >= 1.0
    far = R.prdc(real, rng.normal(size=(100, 4)) + 50.0)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    half = R.prdc(real, np.concatenate([real[:50], rng.normal(size=(50, 4)) + 50.0]))
    assert half["precision"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- SSIM, MS-SSIM, reconstructions


def test_ssim_batch_equals_skimage():
    a, b = discs(4, 32, seed=0), discs(4, 32, seed=1)
    expected = [structural_similarity(x.astype(np.float64), y.astype(np.float64), data_range=1.0)
                for x, y in zip(a, b)]
    np.testing.assert_allclose(ssim_batch(a, b), expected, atol=1e-6)
    pairs = np.array([[0, 3], [2, 1], [2, 2], [1, 0]])
    np.testing.assert_allclose(ssim_pairs(a, b, pairs), ssim_batch(a[pairs[:, 0]], b[pairs[:, 1]]), atol=1e-5)


@pytest.mark.parametrize("size,scales", [(16, 2), (32, 3), (64, 4), (128, 5)])
def test_ms_ssim_of_an_image_with_itself_is_one(size, scales):
    x = discs(3, size)
    assert ms_ssim_scales(size) == scales
    np.testing.assert_allclose(ms_ssim(x, x), 1.0, atol=1e-9)
    y = np.clip(x + 0.2 * np.random.default_rng(0).standard_normal(x.shape), 0, 1)
    assert (ms_ssim(x, y) < 0.99).all()
    mask = (x > 0).astype(float)
    np.testing.assert_allclose(ms_ssim(x, x, weight=mask), 1.0, atol=1e-9)


def test_diversity_of_identical_samples_is_one():
    same = np.repeat(discs(1), 10, axis=0)
    assert R.diversity(same, pairs=20) == pytest.approx(1.0)
    assert R.diversity(discs(10), pairs=20) < 0.9


def test_reconstruction_metrics_perfect_and_imperfect():
    x = discs(4)
    brain = x > 0
    perfect = reconstruction_metrics(x, x, brain)
    for region in ("brain", "background"):
        np.testing.assert_allclose(perfect[f"mse_{region}"], 0.0)
        np.testing.assert_allclose(perfect[f"psnr_{region}"], PSNR_CAP)
        np.testing.assert_allclose(perfect[f"ssim_{region}"], 1.0, atol=1e-9)
        np.testing.assert_allclose(perfect[f"ms_ssim_{region}"], 1.0, atol=1e-9)
    blurred = reconstruction_metrics(x, np.clip(x * 0.8, 0, 1), brain)
    assert (blurred["psnr_brain"] < 40).all() and (blurred["ssim_brain"] < 1).all()
    np.testing.assert_allclose(blurred["mse_background"], 0.0)  # background 0 in both


# ----------------------------------------------------------------------------- memorisation, histograms


def test_memorisation_flags_copies_not_noise():
    train, test = discs(60, seed=2), discs(30, seed=3)
    thumbs = R.thumbnails(train)
    def lookup(idx):
        return train[idx]
    copies = train[[3, 17, 42]]
    c_idx, c_ssim = R.nearest_by_ssim(copies, thumbs, lookup, k=10)
    assert list(c_idx) == [3, 17, 42]
    np.testing.assert_allclose(c_ssim, 1.0, atol=1e-9)
    noise = np.random.default_rng(4).uniform(0, 1, (5, 32, 32)).astype(np.float32)
    _, n_ssim = R.nearest_by_ssim(noise, thumbs, lookup, k=10)
    _, t_ssim = R.nearest_by_ssim(test, thumbs, lookup, k=10)
    assert R.memorisation(c_ssim, t_ssim)["share_above"] == 1.0
    result = R.memorisation(n_ssim, t_ssim)
    assert result["share_above"] == 0.0 and result["floor_share_above"] <= 0.05
    assert result["threshold_ssim"] < 1.0


def test_histogram_distance_zero_for_identical_positive_for_shifted():
    x = discs(10)
    h = R.intensity_histogram(x)
    same = R.histogram_distance(h, R.intensity_histogram(x.copy()))
    assert same["wasserstein"] == pytest.approx(0.0, abs=1e-12) and same["js"] == pytest.approx(0.0, abs=1e-6)
    assert same["intersection"] == pytest.approx(1.0)
    shifted = R.histogram_distance(h, R.intensity_histogram(np.clip(x * 0.7, 0, 1)))
    assert shifted["wasserstein"] > 0.05 and shifted["js"] > 0.1 and shifted["intersection"] < 0.9


# ----------------------------------------------------------------------------- features


def test_radiomics_finite_and_standardised():
    x = discs(12)
    f = Fe.radiomics(x)
    assert f.shape == (12, len(Fe.radiomics_names())) and np.isfinite(f).all()
    z = Fe.Standardiser.fit(f)(f)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-9)
    assert np.isfinite(Fe.radiomics(np.zeros((1, 32, 32)))).all()  # empty brain: zeros, no NaN


def test_torchscript_extractor_and_non_torchscript_file(tmp_path):
    class ThreeChannel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).mean((2, 3))

    path = tmp_path / "rgb.pt"
    torch.jit.script(ThreeChannel()).save(str(path))
    ext = Fe.TorchScriptExtractor(path)
    f = ext(discs(5))
    assert f.shape == (5, 4) and "3" in ext.input_note
    grey = tmp_path / "grey.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())).save(str(grey))
    g = Fe.TorchScriptExtractor(grey)
    assert g(discs(3)).shape == (3, 2 * 30 * 30) and g.channels == 1

    bad = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, bad)
    with pytest.raises(InputFileError, match="weights.pt: not a TorchScript model"):
        Fe.TorchScriptExtractor(bad)
    with pytest.raises(InputFileError, match="not found"):
        Fe.TorchScriptExtractor(tmp_path / "missing.pt")


def test_feature_net_is_cached_and_reused(tiny_store, monkeypatch):
    store = SliceStore(tiny_store)
    cfg = Fe.FeatNetConfig(steps=3, batch_size=8)
    net, info = Fe.load_or_train_featnet(store, cfg, progress=False)
    assert info["trained_now"] and info["path"].startswith(str(tiny_store / "features"))
    x = np.asarray(store.images[:4])
    f1, p1 = Fe.featnet_features(net, x)
    assert f1.shape == (4, 128) and ((p1 >= 0) & (p1 <= 1)).all()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached feature net should have been reused")

    monkeypatch.setattr(Fe, "train_featnet", no_training)
    net2, info2 = Fe.load_or_train_featnet(store, cfg, progress=False)
    assert not info2["trained_now"] and info2["path"] == info["path"]
    np.testing.assert_allclose(Fe.featnet_features(net2, x)[0], f1, atol=1e-6)


def test_feature_net_cache_falls_back_to_home_when_store_not_writable(tiny_store, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINVAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(Fe.os, "access", lambda path, mode: False)
    assert Fe.cache_dir(SliceStore(tiny_store)) == tmp_path / "cache" / "features"


# ----------------------------------------------------------------------------- resizing


def test_training_and_evaluation_resize_store_slices_alike(tmp_path):
    store = SliceStore(make_store(tmp_path / "s64", size=64))
    rows = np.array([9, 2, 30])
    x, _ = SliceBatches(store, None, 32).batch(rows)  # the model's input: rows in sorted order
    evaluated = read_resized(store.images, rows, 32)  # evaluation's real slices: rows in the given order
    assert torch.equal(x[:, 0], torch.from_numpy(evaluated[np.argsort(rows)]))
    block_means = np.asarray(store.images)[rows].reshape(3, 32, 2, 32, 2).mean((2, 4))  # area averaging
    np.testing.assert_allclose(evaluated, block_means, atol=1e-6)
    masks = np.zeros((1, 4, 4), np.uint8)
    masks[0, 0, :2] = 1  # half of the top-left 2 x 2 block
    masks[0, 3, 3] = 1  # a quarter of the bottom-right one
    assert resize_masks(masks, 2)[0].tolist() == [[True, False], [False, False]]


# ----------------------------------------------------------------------------- end to end


def train_tiny(tmp_path, store, arch: str = "vae", name: str = "run"):
    cfg = tmp_path / f"{arch}.toml"
    cfg.write_text(f'[model]\narch = "{arch}"\nimage_size = 32\nchannels = [8, 16]\nlatent_dim = 8\n\n'
                   '[train]\nbatch_size = 8\nval_batches = 1\nprecision = "fp32"\n')
    r = runner.invoke(app, ["train", str(cfg), "--data", str(store), "--out", str(tmp_path / name), "--steps", "2",
                            "--quiet"])
    assert r.exit_code == 0, r.output
    return tmp_path / name


def test_evaluate_cli_end_to_end(tiny_store, tmp_path):
    assert runner.invoke(app, ["evaluate", "--help"]).exit_code == 0
    run = train_tiny(tmp_path, tiny_store)
    log = tmp_path / "evaluate.log"
    args = ["evaluate", str(run), "--data", str(tiny_store), "-n", "8", "--featnet-steps", "2", "--quiet",
            "--log-file", str(log)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "featnet fd" in r.output and "floor" in r.output
    lines = log.read_text().splitlines()  # progress reaches the log file even with --quiet, as whole lines
    assert any(line.startswith("evaluate") for line in lines) and "\r" not in log.read_text()
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    for key in ("realism", "histogram", "diversity", "memorisation", "reconstruction", "feature_net", "summary",
                "provenance", "figures", "n", "seed"):
        assert key in metrics, key
    assert metrics["n"] == 8 and metrics["seed"] == 0 and "conditional" not in metrics
    assert set(metrics["realism"]) == {"featnet", "radiomics", "pca64"}
    for space in metrics["realism"].values():
        assert set(space) == {"fd", "kid", "precision", "recall", "density", "coverage"}
        assert space["fd"]["floor"] is not None and space["fd"]["value"] >= 0
    assert metrics["memorisation"]["share_above"]["floor"] is not None
    assert metrics["reconstruction"]["brain"]["psnr"]["mean"] > 0
    assert metrics["provenance"]["feature_net"] == metrics["feature_net"]["path"]
    for fig in ("real_vs_sample.png", "reconstructions.png", "closest_pairs.png", "histograms.png", "interpolation.png"):
        assert (run / "eval" / fig).stat().st_size > 0 and fig in metrics["figures"]
    assert not (run / "eval" / "age_sex_grid.png").exists()
    assert (run / "eval" / "reconstruction.csv").exists()

    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "already exists; pass --force" in r.output and "Traceback" not in r.output


def test_evaluate_conditional_model_on_a_store_of_another_size(tiny_store, tmp_path, monkeypatch):
    import brainvae.evaluate.conditional as conditional

    run = train_tiny(tmp_path, tiny_store, arch="cvae")
    big = make_store(tmp_path / "store64", size=64)  # same content at 64 px: resized to the model's 32 px
    calls = []
    monkeypatch.setattr(conditional, "conditional_fidelity",
                        lambda model, store, *, n, seed, progress, predictor, split: calls.append(n) or {"stub": True})
    ext = tmp_path / "ext.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten())).save(str(ext))
    metrics = evaluate_run(run, big, n=6, seed=0, extractor=ext, progress=False, featnet_steps=2)
    assert metrics["image_size"] == 32 and metrics["n"] == 6
    assert metrics["conditional"] == {"stub": True} and calls == [6]
    assert "extractor" in metrics["realism"] and metrics["extractor"]["dim"] == 64
    assert {"age_sex_grid.png", "interpolation.png"} <= set(metrics["figures"])
    assert (run / "eval" / "age_sex_grid.png").exists()
    assert "test slice i" in metrics["sampling"]


def test_evaluate_clear_errors(tiny_store, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BrainVAEError, match="no best checkpoint"):
        evaluate_run(tmp_path / "empty", tiny_store, progress=False)
    no_test = make_store(tmp_path / "no_test", n_subjects=5)  # splits train x4, val: no test subject
    with pytest.raises(BrainVAEError, match="test split has 0 slices"):
        evaluate_run(tmp_path / "empty", no_test, progress=False)
    with pytest.raises(BrainVAEError, match="test or val split, not 'train'"):
        evaluate_run(tmp_path / "empty", tiny_store, split="train", progress=False)
    run = train_tiny(tmp_path, tiny_store)
    bad = tmp_path / "bad.pt"
    bad.write_text("not a model")
    r = runner.invoke(app, ["evaluate", str(run), "--data", str(tiny_store), "--extractor", str(bad), "--quiet"])
    assert r.exit_code == 1 and "bad.pt: not a TorchScript model" in r.output and "Traceback" not in r.output
    assert not (run / "eval").exists()


def test_evaluation_sets_come_from_the_requested_split(tiny_store):
    store = SliceStore(tiny_store)
    for split in ("test", "val"):
        sets = load_sets(store, split, n=5, seed=0, size=16)
        assert set(store.manifest["split"].iloc[sets.eval_sel]) == {split}
        assert set(store.manifest["split"].iloc[sets.train_sel]) == {"train"}
        assert sets.real.shape == (len(sets.eval_sel), 16, 16) and sets.brain.dtype == bool


def test_a_metric_registered_outside_the_package(tiny_store, tmp_path, monkeypatch):
    """CONTRIBUTING.md's "Adding a metric", done from a test: a pure function of (samples, real, floor slices),
    registered by name, computed by `evaluate` for the samples and for the real-vs-real floor."""
    from brainvae.evaluate import run_eval

    monkeypatch.setattr(run_eval, "METRICS", {})  # the registration stays in this test

    def brightness_gap(samples, real, floor, seed):
        def gap(a):
            return float(abs(a[a > 0].mean() - real[real > 0].mean()))
        return {"model": gap(samples), "floor": gap(floor), "n": len(samples)}

    run_eval.register_metric("brightness_gap", brightness_gap)
    with pytest.raises(ValueError, match="twice"):
        run_eval.register_metric("brightness_gap", brightness_gap)
    run = train_tiny(tmp_path, tiny_store)
    metrics = evaluate_run(run, tiny_store, n=8, seed=0, progress=False, featnet_steps=2)
    gap = metrics["brightness_gap"]
    assert gap["n"] == 8 and gap["model"] >= 0 and 0 <= gap["floor"] < 0.1  # the real sets share their brightness
    assert json.loads((run / "eval" / "metrics.json").read_text())["brightness_gap"] == gap
    run_eval.register_metric("realism", brightness_gap)  # a name evaluate uses itself: refused, not overwritten
    with pytest.raises(BrainVAEError, match="would replace"):
        evaluate_run(run, tiny_store, n=8, seed=0, progress=False, featnet_steps=2, force=True)
