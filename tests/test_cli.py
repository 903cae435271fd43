"""The command line, end to end on tiny volumes made here."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from brainvae.cli import app
from brainvae.data.store import SliceStore

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_help_on_every_command():
    for cmd in ([], ["data"], ["data", "describe"], ["data", "simulate"], ["data", "prepare"],
                ["data", "download"], ["data", "show"], ["train"], ["tune"], ["sample"], ["reconstruct"],
                ["interpolate"], ["demo"], ["compare"], ["evaluate"], ["utility"], ["anomaly"],
                ["data", "anomalies"], ["report"], ["quiz", "make"], ["quiz", "score"], ["configs"]):
        result = invoke(*cmd, "--help")
        assert result.exit_code == 0, (cmd, result.output)
        assert "Usage" in result.output


def test_simulate_describe_prepare_end_to_end(tmp_path):
    sim = tmp_path / "sim"
    r = invoke("data", "simulate", "--out", sim, "-n", 6, "--spacing", 6, "--quiet")
    assert r.exit_code == 0, r.output
    assert "NOT real data" in r.output

    r = invoke("data", "describe", sim, "--out", tmp_path / "describe", "--quiet")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "describe" / "summary.json").read_text())
    assert "6" in json.dumps(summary)

    store_dir = tmp_path / "store"
    r = invoke("data", "prepare", sim, "--out", store_dir, "--size", 16, "--spacing", 12, "--axis", "coronal",
               "--positions", 0.1, 0.9, "--no-n4", "--split", 0.5, 0.25, 0.25, "--quiet")
    assert r.exit_code == 0, r.output
    store = SliceStore(store_dir)
    assert store.images.shape[1:] == (16, 16)
    assert store.config.axis == "coronal" and store.config.position_range == (0.1, 0.9)
    assert store.manifest.subject.str.startswith("SIM").all()
    assert (store.manifest.groupby("subject").split.nunique() == 1).all()
    assert set(store.manifest.split) == {"train", "val", "test"}
    assert np.isfinite(store.manifest.age).all()

    # an existing store is refused without --force, with a clear one-line error and no traceback
    r = invoke("data", "prepare", sim, "--out", store_dir, "--size", 16, "--quiet")
    assert r.exit_code == 1
    assert "already exists; pass --force" in r.output and "Traceback" not in r.output


def test_user_errors_exit_1_without_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    r = invoke("data", "prepare", tmp_path / "empty", "--out", tmp_path / "s", "--quiet")
    assert r.exit_code == 1 and "no T1 NIfTI volumes found" in r.output and "Traceback" not in r.output
    r = invoke("data", "prepare", tmp_path / "empty", "--out", tmp_path / "s", "--axis", "oblique")
    assert r.exit_code == 1 and "axis must be one of" in r.output
    r = invoke("data", "download", "brats")
    assert r.exit_code == 1 and "only 'ixi'" in r.output


def test_train_sample_reconstruct_interpolate(tiny_store, tmp_path):
    import nibabel as nib

    cfg = tmp_path / "cvae.toml"
    cfg.write_text('[model]\narch = "cvae"\nimage_size = 32\nchannels = [8, 16]\nlatent_dim = 8\n\n'
                   '[train]\nbatch_size = 8\nval_batches = 1\nprecision = "fp32"\n')
    run = tmp_path / "run"
    r = invoke("train", cfg, "--data", tiny_store, "--out", run, "--steps", 3, "--quiet")
    assert r.exit_code == 0, r.output
    assert "trained cvae: 3 steps" in r.output

    r = invoke("sample", run, "-n", 5, "--age", 70, "--sex", "F", "--position", 0.5)
    assert r.exit_code == 0, r.output
    samples = run / "samples"
    assert (samples / "grid.png").exists() and len(list((samples / "png").glob("*.png"))) == 5
    assert np.load(samples / "slices.npy").shape == (5, 32, 32)
    assert nib.load(samples / "slices.nii.gz").shape == (32, 32, 1, 5)  # samples along axis 4
    r = invoke("sample", run, "-n", 5)
    assert r.exit_code == 1 and "already exists" in r.output  # never overwritten without --force

    r = invoke("reconstruct", run, "--data", tiny_store, "-n", 4)
    assert r.exit_code == 0, r.output
    assert np.load(run / "reconstructions" / "slices.npy").shape == (8, 32, 32)
    r = invoke("interpolate", run, 0, 20, "--data", tiny_store, "--steps", 5)
    assert r.exit_code == 0, r.output
    strip = np.load(run / "interpolation-0-20" / "slices.npy")
    assert strip.shape == (5, 32, 32)
    r = invoke("interpolate", run, 0, 10_000, "--data", tiny_store)
    assert r.exit_code == 1 and "is not in" in r.output

    r = invoke("train", cfg, "--data", tiny_store, "--out", run, "--resume", "--steps", 5, "--quiet")
    assert r.exit_code == 1 and "train.steps was 3, now 5" in r.output  # --resume never changes the run
    r = invoke("train", cfg, "--data", tiny_store, "--out", run, "--resume", "--steps", 3, "--quiet")
    assert r.exit_code == 0 and "trained cvae: 3 steps" in r.output, r.output

    # The design's end-to-end chain continues: evaluate -> report.
    r = invoke("evaluate", run, "--data", tiny_store, "-n", 16, "--featnet-steps", 2, "--predictor-steps", 2, "--quiet")
    assert r.exit_code == 0, r.output
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["realism"]["featnet"]["fd"]["floor"] is not None and "conditional" in metrics
    r = invoke("report", run, "--out", tmp_path / "report.html")
    assert r.exit_code == 0, r.output
    html = (tmp_path / "report.html").read_text()
    assert "Evaluation" in html and html.count("data:image/png") >= 6  # curves + the eval figures, embedded


def test_sampling_refuses_conditions_the_model_lacks(tiny_store, tmp_path):
    cfg = tmp_path / "vae.toml"
    cfg.write_text('[model]\narch = "vae"\nimage_size = 32\nchannels = [8, 16]\nlatent_dim = 8\n\n'
                   '[train]\nbatch_size = 8\nval_batches = 1\nprecision = "fp32"\n')
    assert invoke("train", cfg, "--data", tiny_store, "--out", tmp_path / "run", "--steps", 2, "--quiet").exit_code == 0
    r = invoke("sample", tmp_path / "run", "--age", 40)
    assert r.exit_code == 1 and "not conditioned on ['age']" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\narch = "vqvae2"\n')
    r = invoke("train", bad, "--data", tiny_store, "--out", tmp_path / "r2")
    assert r.exit_code == 1 and "unknown architecture 'vqvae2'" in r.output
