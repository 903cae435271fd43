"""Anomaly scores, post-processing, metrics, synthetic anomalies and `brainvae anomaly` (tiny, seconds)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from typer.testing import CliRunner

from brainvae.cli import app
from brainvae.config import RunConfig, check
from brainvae.data.store import SliceStore
from brainvae.data.synthetic_anomalies import KINDS, add_anomaly, anomalies_store, make_anomalies
from brainvae.errors import BrainVAEError
from brainvae.evaluate import anomaly_metrics as M
from brainvae.evaluate import anomaly_scores as S
from brainvae.evaluate.anomaly import AnomalyConfig, evaluate_anomaly, feature_net, overlay_figure, split_cases
from brainvae.models import registry
from brainvae.models import scoring as SC
from brainvae.models.base import BaseConfig, BrainModel, DiagonalGaussian
from brainvae.train.checkpoint import save_weights

from conftest import make_store, pixel_features

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# -- a stub model whose reconstruction is the healthy image -------------------------------------------
class OracleModel(BrainModel):
    """Follows the contract; decodes to a fixed healthy image whatever z is.

    Its posterior mean is the 4x4-pooled difference to the healthy image, so the KL (and its
    gradient) lives exactly where the input departs from health.
    """

    arch = "oracle"

    def __init__(self, healthy: torch.Tensor, stochastic: bool = True):
        super().__init__(BaseConfig(image_size=healthy.shape[-1]))
        self.register_buffer("healthy", healthy)  # (1, 1, H, W)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so .device works
        self.stochastic = stochastic

    def encode(self, x, cond=None):
        mean = F.avg_pool2d(x - self.healthy, 4)  # (B, 1, H/4, W/4)
        return DiagonalGaussian(mean, torch.zeros_like(mean))

    def decode(self, z, cond=None):
        return self.healthy.expand(len(z), -1, -1, -1)


def disc(size=32, value=0.6):
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    return ((xx ** 2 + yy ** 2) < 0.8 ** 2) * value


@pytest.mark.parametrize("stochastic", [True, False])
def test_scores_higher_inside_a_synthetic_lesion(stochastic):
    healthy = torch.tensor(disc(), dtype=torch.float32)[None, None]
    x = healthy.clone().repeat(2, 1, 1, 1)
    lesion = torch.zeros_like(x, dtype=torch.bool)
    lesion[0, :, 10:16, 12:18] = True  # darker lesion in image 0
    lesion[1, :, 18:22, 8:14] = True  # brighter lesion in image 1
    x[0][lesion[0]] = 0.2
    x[1][lesion[1]] = 0.95
    model = OracleModel(healthy, stochastic).eval()
    scores = model.scores()
    if stochastic:
        assert list(scores) == [*SC.RECONSTRUCTION_SCORES, *SC.KL_SCORES] and not model.unavailable_scores()
    else:
        assert list(scores) == list(SC.RECONSTRUCTION_SCORES)
        assert set(model.unavailable_scores()) == set(SC.KL_SCORES)
        assert "deterministic" in model.unavailable_scores()["kl_additive"]
    batch = SC.ScoreBatch(model, x, None, n_samples=3, generator=torch.Generator().manual_seed(0),
                          features=pixel_features)
    assert torch.equal(batch.x_hat, healthy.expand_as(x))
    for name, score in scores.items():
        m = score.compute(batch)
        assert m.shape == (2, max(1, len(score.terms)), 32, 32)
        m = m.sum(1, keepdim=True)  # an additive score's terms, unscaled
        signed = {"residual_pos": [1], "residual_neg": [0], "residual_neg_smooth": [0]}.get(name, [0, 1])
        for b in signed:  # each sign sees its own lesion (residual_local, the perceptual scores: both)
            if name == "residual_neg_smooth" or score.needs_features:  # a spread edge: compare means and the peak
                assert m[b][lesion[b]].mean() > 5 * m[b][~lesion[b]].mean() and lesion[b].flatten()[m[b].argmax()]
            else:
                assert m[b][lesion[b]].min() > m[b][~lesion[b]].max(), (name, b)
    assert torch.allclose(SC.residual_pos(batch) + SC.residual_neg(batch), SC.residual(batch))
    assert {n for n, s in scores.items() if s.needs_features} == {"perceptual", "perceptual_neg"}
    with pytest.raises(ValueError, match="features"):  # a perceptual score without a feature net
        scores["perceptual"].compute(SC.ScoreBatch(model, x))
    # brightness baselines
    brain = torch.from_numpy(disc() > 0)[None, None]
    assert torch.equal(S.brightness_hyper(x), x)
    assert (S.brightness_hypo(x, brain)[:, :, 0, 0] == 0).all()


def test_local_residual_ignores_a_slow_drift_and_keeps_a_lesion():
    """A residual that drifts across the head (another scanner's contrast or bias field) is removed: an offset
    entirely, a ramp across the head largely; a lesion's is kept, darker parts in full, brighter parts at
    BRIGHT_WEIGHT; nothing outside the head."""
    head = torch.tensor(disc(128), dtype=torch.float32)[None, None] > 0
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 128), torch.linspace(-1, 1, 128), indexing="ij")
    restored = torch.where(head, torch.full_like(head, 0.5, dtype=torch.float32), torch.zeros(()))
    dark, bright = torch.zeros_like(head), torch.zeros_like(head)
    dark[..., 40:52, 40:52] = True
    bright[..., 72:84, 72:84] = True
    healthy = head & ~dark & ~bright
    offset = restored - 0.1 * head  # a darker scanner, redrawn brighter
    assert SC.local_residual(restored, offset)[head].abs().max() < 1e-5
    x = torch.where(head, 0.5 + 0.1 * xx[None, None], torch.zeros(())) - 0.3 * dark + 0.3 * bright
    plain, local = (restored - x).abs(), SC.local_residual(restored, x)
    assert local[~head].abs().max() == 0
    assert local[healthy].mean() < 0.5 * plain[healthy].mean()  # the ramp's residual, mostly removed
    assert local[dark].min() > 0.25  # the lesion's, kept
    assert 0.2 * 0.3 < local[bright].mean() < 0.3 * 0.3 and local[bright].mean() > 3 * local[healthy].mean()


def test_every_registered_architecture_gets_its_scores():
    tiny = {"vae": {"channels": (8, 16), "latent_dim": 8}, "cvae": {"channels": (8, 16), "latent_dim": 8},
            "cevae": {"channels": (8, 16), "latent_dim": 8}, "ae": {"channels": (8, 16), "latent_dim": 8},
            "resvae": {"channels": (8, 16, 16), "latent_dim": 16},
            "vqvae": {"channels": (8, 16, 16), "res_blocks": 1, "codebook_size": 32, "code_dim": 8,
                      "prior_layers": 1, "prior_width": 32, "prior_heads": 2}}
    for arch in registry.architectures():
        model = registry.build(arch, {"image_size": 32, **tiny.get(arch, {})}).eval()
        scores = model.scores()  # their shapes are checked for every architecture in test_models
        deterministic = arch in ("ae", "vqvae", "dae", "fae")
        assert ("kl_combined" in scores) != deterministic, arch
        assert ("kl_additive" in model.unavailable_scores()) == deterministic, arch
        assert ("prior_nll" in scores) == (arch == "vqvae"), arch
        assert (("restoration" in scores) and ("restoration_neg_smooth" in scores)) == (arch == "ldm"), arch
        if arch == "dae":  # no latent: the residuals, no reconstruction probability
            assert set(scores) == set(SC.RECONSTRUCTION_SCORES) - {"recon_prob"} | {"restoration_local",
                                                                                    "restoration_perceptual"}
            assert "no latent" in model.unavailable_scores()["recon_prob"]
            continue
        if arch == "fae":  # features, not pixels: its own score only
            assert set(scores) == {"feature_ssim"} and set(model.unavailable_scores()) >= set(SC.RECONSTRUCTION_SCORES)
            continue
        assert set(SC.RECONSTRUCTION_SCORES) <= set(scores), arch
        if arch == "resvae":
            assert model.likelihood() == "learned per-pixel sigma (decode_params)"
        else:  # the config's sigma (the ldm's config has none: 0.1)
            assert model.likelihood() == f"fixed sigma = {model.config.sigma if arch != 'ldm' else 0.1:g}", arch


def test_postprocessing():
    brain = np.zeros((1, 20, 20), bool)
    brain[0, 2:18, 2:18] = True
    assert S.eroded_mask(brain, 2).sum() == 12 * 12
    score = np.zeros((1, 20, 20), np.float32)
    score[0, 5, 5] = 9.0  # salt noise: removed by the median filter
    score[0, 8:14, 8:14] = 1.0
    score[0, 0, 0] = 5.0  # outside the eroded brain
    out = S.postprocess(score, S.eroded_mask(brain, 2), median=5)
    assert out[0, 5, 5] == 0 and out[0, 0, 0] == 0 and out[0, 11, 11] == 1
    binary = np.zeros((2, 10, 10), bool)
    binary[0, 1:3, 1:3] = True  # 4 px: dropped
    binary[0, 5:9, 5:9] = True  # 16 px: kept
    binary[1, 0:2, 0:3] = True  # 6 px, on the next slice: not connected to slice 0
    kept = S.remove_small_components(binary, 5)
    assert kept.sum() == 16 + 6 and not kept[0, 1, 1]
    assert S.segment(np.array([[0.1, 0.5]]), 0.5, 0).tolist() == [[False, True]]


def test_through_plane_mean_stays_inside_each_volume():
    """A lesion spans neighbouring slices, noise does not: the mean over ``across`` slices keeps the one and
    dims the other, and never reaches from one case's slices into another's (or across a gap)."""
    cases = np.array(["a"] * 5 + ["b"] * 3 + ["b"] * 2)
    index = np.array([10, 11, 12, 13, 14, 3, 4, 5, 9, 10])  # b: two runs (a gap between slices 5 and 9)
    runs = S.slice_runs(cases, index)
    assert runs.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]
    score = np.zeros((10, 4, 4), np.float32)
    score[1:4] = 1.0  # a lesion on three slices of a
    score[4, 0, 0] = 9.0  # a's last slice: must not leak into b's first
    score[6, 2, 2] = 3.0  # noise on one slice of b
    region = np.ones_like(score, bool)
    out = S.postprocess(score, region, median=1, across=3, runs=runs)
    assert out[2, 1, 1] == pytest.approx(1.0) and out[1, 1, 1] == pytest.approx(2 / 3)
    assert out[5, 0, 0] == 0 and out[4, 0, 0] == pytest.approx((1 + 9 + 9) / 3)  # the edge slice repeated
    assert out[6, 2, 2] == pytest.approx(1.0) and out[7, 2, 2] == pytest.approx(1.0) and out[8, 2, 2] == 0
    assert np.array_equal(S.postprocess(score, region, median=1, across=1), score)  # off
    with pytest.raises(BrainVAEError, match="--across must be >= 1"):
        S.PostProcess(across=0)
    with pytest.raises(ValueError, match="runs"):
        S.postprocess(score, region, across=3)


def test_healthy_slices_come_in_windows_of_one_subject(tmp_path):
    from brainvae.evaluate.anomaly import healthy_picks

    store = SliceStore(make_store(tmp_path / "healthy"))
    m = store.manifest.iloc[store.indices("val")]
    picks = healthy_picks(store, "val", 6, 3)  # 8 slices of one subject: two windows, cut at the volume's ends
    assert 4 <= len(picks) <= 6 and np.array_equal(picks, np.unique(picks))
    runs = S.slice_runs(m["subject"].astype(str).to_numpy(), m["slice_index"].to_numpy())
    for j in picks:  # every pick has a neighbour of its run among the picks (windows of 3, not single slices)
        assert any(k in picks and runs[k] == runs[j] for k in (j - 1, j + 1))
    assert len(healthy_picks(store, "val", 12, 1)) == min(12, len(m))  # no mean: evenly spaced single slices


def test_metric_helpers_hand_computed():
    assert M.dice([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5
    assert M.dice([0, 0], [0, 0]) is None
    s, y = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    assert M.pixel_auroc(s, y) == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ordered
    assert M.pixel_auprc(s, y) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert M.pixel_auroc(s, [0, 0, 0, 0]) is None
    d, t = M.best_dice(s, y)  # >= 0.35: P = 2/3, R = 1 -> Dice 0.8
    assert d == pytest.approx(0.8) and t == pytest.approx(0.35)
    rng = np.random.default_rng(0)  # the PR-curve Dice equals brute force at every threshold
    s, y = rng.random(500), rng.random(500) < 0.2
    thresholds, dc = M.dice_curve(s, y)
    for i in rng.choice(len(thresholds), 20, replace=False):
        assert dc[i] == pytest.approx(M.dice(s >= thresholds[i], y))
    score = np.zeros((2, 10, 10), np.float32)
    score[0, 0, :] = np.arange(10)
    brain = np.ones_like(score, bool)
    assert M.slice_scores(score, brain).tolist() == [9.0, 0.0]  # top 1 % of 100 px = the maximum
    assert M.slice_scores(score, brain, top=0.05).tolist() == pytest.approx([(9 + 8 + 7 + 6 + 5) / 5, 0.0])
    ci = M.case_mean_ci([0.5, 0.5, None, 0.5])
    assert ci == {"mean": 0.5, "ci95": [0.5, 0.5], "n": 3}
    assert M.case_mean_ci([0.0, 1.0] * 10, seed=1)["ci95"][0] < 0.5 < M.case_mean_ci([0.0, 1.0] * 10)["ci95"][1]


def _toy_case_data(seed=0, n_cases=6, per_case=5, size=16):
    rng = np.random.default_rng(seed)
    n = n_cases * per_case
    lesion = np.zeros((n, size, size), bool)
    for i in range(n):
        r, c = rng.integers(2, size - 6, 2)
        lesion[i, r:r + 4, c:c + 4] = True
    score = rng.random((n, size, size)).astype(np.float32) + 0.8 * lesion
    brain = np.ones_like(lesion)
    cases = np.repeat([f"C{k}" for k in range(n_cases)], per_case)
    return score, lesion, brain, cases


def test_validation_threshold_never_sees_test_cases():
    score, lesion, brain, cases = _toy_case_data()
    val, test = ["C0", "C1"], ["C2", "C3", "C4", "C5"]
    ref = M.evaluate_score(score, lesion, brain, cases, val, test, min_area=0)
    is_test = np.isin(cases, test)
    perturbed = score.copy()
    perturbed[is_test] = np.random.default_rng(1).random(perturbed[is_test].shape) * 3  # scores of test cases
    relabelled = lesion.copy()
    relabelled[is_test] = ~relabelled[is_test]  # and their labels
    for s, les in ((perturbed, lesion), (score, relabelled), (perturbed, relabelled)):
        other = M.evaluate_score(s, les, brain, cases, val, test, min_area=0)
        assert other["threshold"] == ref["threshold"] and other["val_dice"] == ref["val_dice"]
        assert other["dice"] != ref["dice"]  # the perturbation did reach the test numbers
    # and it does depend on the validation cases
    shifted = score.copy()
    shifted[~is_test] *= 2
    assert M.evaluate_score(shifted, lesion, brain, cases, val, test)["threshold"] != ref["threshold"]
    assert ref["best_dice_upper_bound"] >= ref["dice_before_component_removal"]
    p = lesion[is_test].mean()
    assert ref["dice_all_brain"] == pytest.approx(2 * p / (1 + p), abs=1e-4)
    assert set(ref["per_case"]) == set(test) and ref["per_case_mean"]["dice"]["n"] == 4
    with pytest.raises(ValueError, match="both"):
        M.evaluate_score(score, lesion, brain, cases, ["C0"], ["C0", "C1"])


def test_overlay_has_a_score_colour_bar_and_orientation_letters():
    rng = np.random.default_rng(0)
    images = rng.random((3, 16, 16))
    lesion = np.zeros((3, 16, 16), bool)
    lesion[:, 4:8, 4:8] = True
    fig = overlay_figure("S01", images, images, images, lesion, lesion, np.ones((3, 16, 16)), [1, 2, 3], "residual",
                         axis="axial")
    assert len(fig.axes) == 4 * 3 + 1  # the panels and one colour bar, for the score row
    assert {t.get_text() for t in fig.axes[0].texts} == {"A", "P", "R", "L"}


def test_split_cases():
    cases = [f"S{i}" for i in range(10)]
    val, test = split_cases(cases, val_fraction=0.3, seed=0)
    assert len(val) == 3 and not set(val) & set(test) and sorted(val + test) == sorted(cases)
    assert split_cases(cases, val_fraction=0.3, seed=0) == (val, test)
    assert split_cases(cases, ["S1", "S2"]) == (["S1", "S2"], [c for c in cases if c not in ("S1", "S2")])
    with pytest.raises(BrainVAEError, match="not in the store"):
        split_cases(cases, ["X"])
    with pytest.raises(BrainVAEError, match="every case"):
        split_cases(cases, cases)


def test_synthetic_anomalies_change_exactly_their_masks(tmp_path):
    store = SliceStore(make_store(tmp_path / "s", n_subjects=3, slices=6))
    images, brain = np.asarray(store.images), np.asarray(store.array("brain"))
    rng = np.random.default_rng(0)
    for kind in KINDS:
        for i in range(len(images)):
            new, mask = add_anomaly(images[i], brain[i], kind, rng, donor=images[(i + 7) % len(images)])
            assert np.array_equal(new != images[i], mask), kind  # changed <=> masked
            assert not (mask & (brain[i] == 0)).any()  # inside the brain only
            assert new.min() >= 0 and new.max() <= 1
        assert mask.any(), kind
    new, masks, labels = make_anomalies(images, brain, store.manifest["position"].to_numpy(),
                                        store.manifest["subject"].to_numpy(), fraction=0.5, seed=3)
    assert np.array_equal(new != images, masks.astype(bool))
    touched = np.array([lab != "" for lab in labels])
    assert touched.sum() == 9 and not masks[~touched].any() and np.array_equal(new[~touched], images[~touched])
    again = make_anomalies(images, brain, store.manifest["position"].to_numpy(),
                           store.manifest["subject"].to_numpy(), fraction=0.5, seed=3)
    assert np.array_equal(again[0], new)  # seeded

    out = anomalies_store(store, tmp_path / "anom", split=None, fraction=0.5, seed=3)
    assert out.has_lesions and np.array_equal(np.asarray(out.array("lesion")), masks)
    assert np.allclose(out.manifest["lesion_fraction"], masks.reshape(len(masks), -1).mean(1))
    assert list(out.manifest.columns[:len(store.manifest.columns)]) == list(store.manifest.columns)
    with pytest.raises(BrainVAEError, match="already exists"):
        anomalies_store(store, tmp_path / "anom", split=None)
    with pytest.raises(BrainVAEError, match="split 'test' has no slices"):  # 3 subjects: all in train
        anomalies_store(store, tmp_path / "anom_test", split="test")
    train_only = anomalies_store(make_store(tmp_path / "s6"), tmp_path / "anom_train", split="train")
    assert set(train_only.manifest["split"]) == {"train"} and len(train_only) == 4 * 8


def test_help():
    for cmd in (["anomaly"], ["data", "anomalies"]):
        r = invoke(*cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.output


def test_store_without_lesions_is_a_clear_error(tmp_path):
    store = make_store(tmp_path / "healthy")
    with pytest.raises(BrainVAEError, match="no lesion masks") as err:
        evaluate_anomaly(tmp_path / "no-run", store)
    assert str(store) in str(err.value) and "brainvae data anomalies" in str(err.value)
    r = invoke("anomaly", tmp_path / "no-run", "--data", store)
    assert r.exit_code == 1 and "brainvae data anomalies" in r.output and "Traceback" not in r.output


def test_anomaly_command_end_to_end(tmp_path):
    store = make_store(tmp_path / "healthy")
    r = invoke("data", "anomalies", store, "--out", tmp_path / "anom", "--split", "all", "--fraction", 0.6,
               "--seed", 1)
    assert r.exit_code == 0, r.output
    anom = SliceStore(tmp_path / "anom")
    assert anom.has_lesions and len(anom) == len(SliceStore(store))

    cfg = tmp_path / "cevae.toml"
    cfg.write_text('[model]\narch = "cevae"\nimage_size = 32\nchannels = [8, 16]\nlatent_dim = 8\n\n'
                   '[train]\nbatch_size = 8\nval_batches = 1\nprecision = "fp32"\n')
    run = tmp_path / "run"
    r = invoke("train", cfg, "--data", store, "--out", run, "--steps", 2, "--quiet")
    assert r.exit_code == 0, r.output

    r = invoke("anomaly", run, "--data", tmp_path / "anom", "--baseline", run, "--score", "kl_combined",
               "--samples", 2, "--val-fraction", 0.34, "--device", "cpu", "--quiet", "--log-file", tmp_path / "a.log")
    assert r.exit_code == 0, r.output
    log = (tmp_path / "a.log").read_text()
    assert "score" in log and "\r" not in log
    assert log.splitlines()[0].startswith(f"anomaly {run} on {tmp_path / 'anom'} -> ")  # the start line
    assert "validation cases -> " in log.splitlines()[-1]  # and the summary, as on the console
    out = run / "anomaly"
    metrics = json.loads((out / "metrics.json").read_text())
    val, test = metrics["cases"]["validation"], metrics["cases"]["test"]
    assert len(val) == 2 and len(test) == 4 and not set(val) & set(test)
    keys = set(metrics["scores"])
    perceptual = {n for n, s in SC.RECONSTRUCTION_SCORES.items() if s.needs_features}
    for n in [*SC.RECONSTRUCTION_SCORES, *SC.KL_SCORES]:
        if n in perceptual:  # no --features: reported as not computed, and why
            assert f"model/{n}" not in keys and "--features" in metrics["unavailable"][f"baseline/{n}"]
        else:
            assert f"model/{n}" in keys and f"baseline/{n}" in keys
    assert {"brightness/hyper", "brightness/hypo"} <= keys
    assert metrics["scores"]["model/kl_additive"]["term_scales"].keys() == {"residual", "kl_gradient"}
    assert metrics["scores"]["model/recon_prob"]["samples"] == 2
    for entry in metrics["scores"].values():
        for k in ("pixel_auroc", "pixel_auprc", "threshold", "dice", "best_dice_upper_bound", "slice_auroc"):
            assert k in entry
        assert set(entry["per_case"]) == set(test)
        assert {"mean", "ci95", "n"} <= set(entry["per_case_mean"]["auroc"])
    assert metrics["primary_score"] == "model/kl_combined"
    assert metrics["postprocess"]["median"] == 5 and "versions" in metrics["provenance"]
    assert sorted(p.name for p in out.glob("overlay_*.png")) == sorted(f"overlay_{c}.png" for c in test)
    assert (out / "slice_scores.csv").exists()

    r = invoke("anomaly", run, "--data", tmp_path / "anom", "--quiet")
    assert r.exit_code == 1 and "already exists; pass --force" in r.output
    r = invoke("anomaly", run, "--data", tmp_path / "anom", "--val-cases", "S00,S03", "--samples", 1,
               "--device", "cpu", "--force", "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "metrics.json").read_text())["cases"]["validation"] == ["S00", "S03"]
    r = invoke("anomaly", run, "--data", tmp_path / "anom", "--score", "prior_nll", "--out", tmp_path / "x")
    assert r.exit_code == 1 and "not available" in r.output

    # the recommended score chosen on validation cases, an ensemble, label-free thresholds from a healthy store
    r = invoke("anomaly", run, "--data", tmp_path / "anom", "--healthy", store, "--fpr", 0.05, "--samples", 1,
               "--val-fraction", 0.34, "--device", "cpu", "--out", tmp_path / "auto", "--quiet",
               "--baseline", run, "--baseline", run)  # several baselines: named by their folders
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert set(metrics["baseline_runs"]) == {"baseline-run", "baseline-run'"}
    assert {"baseline-run/residual", "baseline-run'/residual"} <= set(metrics["scores"])
    model_keys = [k for k in metrics["scores"] if not k.startswith("brightness/")]
    best = max(model_keys, key=lambda k: metrics["scores"][k]["val_dice"])
    assert metrics["primary_score"] == best and "validation" in metrics["primary_selection"]
    ens = metrics["scores"]["ensemble/rank_mean"]
    assert len(ens["members"]) == 3 and all(m in metrics["scores"] for m in ens["members"])
    maps = sorted(p.name for p in (tmp_path / "auto" / "maps").iterdir())
    assert metrics["nifti"]["skipped"] and not maps  # a store made in memory has no source scans to map onto
    assert metrics["healthy"]["subjects"] == {"val": 1, "test": 1}
    for k in model_keys:
        free, det = metrics["scores"][k]["label_free"], metrics["scores"][k]["case_detection"]
        assert free["fpr_healthy_val"] == 0.05 and 0 <= (free["dice"] or 0) <= 1
        assert det["healthy_test_subjects"] == 1 and det["test_cases"] == len(metrics["cases"]["test"])
    r = invoke("anomaly", run, "--data", tmp_path / "anom", "--healthy", tmp_path / "anom", "--out", tmp_path / "y")
    assert r.exit_code == 1 and "has lesion masks" in r.output

    # the perceptual scores, with a fae's in-domain encoder; label-free thresholds for them too
    fae_cfg = tmp_path / "fae.toml"
    fae_cfg.write_text('[model]\narch = "fae"\nimage_size = 32\nchannels = [8, 8, 16]\nae_channels = [16, 8]\n\n'
                       '[train]\nbatch_size = 8\nval_batches = 1\nprecision = "fp32"\n')
    fae = tmp_path / "fae"
    r = invoke("train", fae_cfg, "--data", store, "--out", fae, "--steps", 2, "--quiet")
    assert r.exit_code == 0, r.output
    r = invoke("anomaly", run, "--data", tmp_path / "anom", "--features", fae, "--healthy", store, "--samples", 1,
               "--device", "cpu", "--out", tmp_path / "perceptual", "--quiet")
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "perceptual" / "metrics.json").read_text())
    assert metrics["features"] == str(fae) and not any("perceptual" in k for k in metrics["unavailable"])
    for n in perceptual:
        entry = metrics["scores"][f"model/{n}"]
        assert 0 <= entry["pixel_auroc"] <= 1 and "dice" in entry["label_free"]
    assert metrics["scores"]["model/perceptual_neg"]["term_scales"].keys() == {"perceptual", "residual_neg"}
    r = invoke("anomaly", run, "--data", tmp_path / "anom", "--features", run, "--out", tmp_path / "z")
    assert r.exit_code == 1 and "need a fae run" in r.output and "Traceback" not in r.output
    with pytest.raises(BrainVAEError, match="trained on 32 px slices; the scored model sees 64 px"):
        feature_net(fae, "cpu", 64)


# -- an architecture registered from outside the package: its own config class and its own score -----
@dataclass(frozen=True)
class FlatConfig(BaseConfig):
    level: float = 0.0  # the intensity the model expects everywhere

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.level <= 1, f"level must be in [0, 1], got {self.level}")


class FlatModel(BrainModel):
    """Reconstructs every image as a flat image at ``level``; offers one more score, the distance from it."""

    stochastic = False

    def __init__(self, config: FlatConfig):
        super().__init__(config)
        self.level = torch.nn.Parameter(torch.tensor(config.level))

    def encode(self, x, cond=None):
        mean = F.avg_pool2d(x, 4)  # (B, 1, H/4, W/4)
        return DiagonalGaussian(mean, torch.zeros_like(mean))

    def decode(self, z, cond=None):
        size = self.config.image_size
        return self.level.expand(len(z), 1, size, size)

    def scores(self):
        off_level = SC.Score(lambda b: (b.x - b.model.level).abs(), "distance from the expected level")
        return {**super().scores(), "off_level": off_level}


def test_an_architecture_registered_outside_the_package(tmp_path, monkeypatch):
    registry.architectures()  # the package's own register first, into the dict that is replaced next
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # forgets "flat" after the test
    registry.register("flat", FlatConfig)(FlatModel)
    assert RunConfig(model={"arch": "flat", "image_size": 32}).model_config() == FlatConfig(image_size=32)
    with pytest.raises(BrainVAEError, match="level must be in"):
        RunConfig(model={"arch": "flat", "level": 2.0})

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_weights(run / "checkpoints" / "best.safetensors", registry.build("flat", {"image_size": 32}), None)
    anomalies_store(make_store(tmp_path / "healthy"), tmp_path / "anom", split=None, fraction=0.6, seed=1)
    summary = evaluate_anomaly(run, tmp_path / "anom", tmp_path / "out",
                               AnomalyConfig(primary="off_level", val_fraction=0.34, n_samples=1), progress=False)
    scores = summary["scores"]
    plain = [n for n, s in SC.RECONSTRUCTION_SCORES.items() if not s.needs_features]  # no --features
    assert list(scores) == [*(f"model/{n}" for n in [*plain, "off_level"]),
                            "brightness/hyper", "brightness/hypo", "ensemble/rank_mean"]
    assert set(summary["unavailable"]) == {"model/kl_combined", "model/kl_additive", "model/perceptual",
                                           "model/perceptual_neg"}
    mine, bright = scores["model/off_level"], scores["brightness/hyper"]
    assert mine["description"] == "distance from the expected level" and summary["primary_score"] == "model/off_level"
    for key in ("pixel_auroc", "pixel_auprc", "threshold", "dice", "slice_auroc"):  # |x - 0| is the intensity
        assert mine[key] == bright[key], key
    table = (tmp_path / "out" / "slice_scores.csv").read_text().splitlines()
    assert "model/off_level" in table[0].split(",")
    assert sorted(p.name for p in (tmp_path / "out").glob("overlay_*.png")) == \
        sorted(f"overlay_{c}.png" for c in summary["cases"]["test"])


def test_label_free_threshold_and_case_scores():
    rng = np.random.default_rng(0)
    healthy = rng.random((4, 16, 16)).astype(np.float32)
    brain = np.ones_like(healthy, bool)
    brain[:, :2] = False
    healthy[~brain] = 99.0  # outside the brain: never counted
    t = M.label_free_threshold(healthy, brain, 0.05)
    assert (healthy[brain] >= t).mean() == pytest.approx(0.05, abs=0.01)
    # it takes no lesion mask; applied to cases, it reports Dice and the share of normal tissue it flags
    score, lesion, brain2, cases = _toy_case_data()
    out = M.dice_at(score, lesion, brain2, cases, ["C2", "C3"], threshold=0.9)
    test = np.isin(cases, ["C2", "C3"])
    pred, truth = score[test] >= 0.9, lesion[test]
    assert out["dice"] == pytest.approx(M.dice(pred, truth), abs=1e-4)
    assert out["fpr_normal_tissue"] == pytest.approx(pred[~truth].mean(), abs=1e-4)
    cs = M.case_scores(score, brain2, cases, top=0.01)
    k = int(np.ceil(0.01 * (cases == "C0").sum() * 16 * 16))
    assert cs["C0"] == pytest.approx(np.sort(score[cases == "C0"].ravel())[-k:].mean())


def test_primary_score_is_chosen_on_validation_dice_only():
    from brainvae.evaluate.anomaly import Scored, choose_primary

    scored = Scored()
    scored.results = {"model/a": {"val_dice": 0.3, "dice": 0.9}, "model/b": {"val_dice": 0.5, "dice": 0.1},
                      "brightness/hypo": {"val_dice": 0.9, "dice": 0.9}, "baseline/a": {"val_dice": 0.8}}
    assert choose_primary(scored, AnomalyConfig()) == "baseline/a"  # the best on validation, brightness aside
    scored.results["baseline/a"]["dice"] = 0.0  # test numbers change nothing
    scored.results["model/b"]["dice"] = 1.0
    assert choose_primary(scored, AnomalyConfig()) == "baseline/a"
    assert choose_primary(scored, AnomalyConfig(primary="a")) == "model/a"
    with pytest.raises(BrainVAEError, match="not computed"):
        choose_primary(scored, AnomalyConfig(primary="ensemble"))


def test_ensemble_averages_rank_normalised_maps():
    from brainvae.evaluate.anomaly import Ensemble

    rng = np.random.default_rng(0)
    a = rng.random((3, 8, 8)).astype(np.float32)
    maps = {"a": a, "b": 100 * a ** 3}  # the same ranking in other units
    region = np.ones_like(a, bool)
    region[:, 0] = False
    ens = Ensemble.fit(["a", "b"], maps, region)  # (keys "source/score" in a run)
    out = ens(maps, region)
    assert (out[~region] == 0).all() and out.max() == pytest.approx(1 - 0.5 / region.sum())  # mid-rank of the top
    ranks = np.argsort(np.argsort(a[region]))
    assert np.array_equal(np.argsort(np.argsort(out[region])), ranks)  # rank order kept
