"""RunDir resolves run folders, checkpoint files and shipped model names; export_model packages a run."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from brainvae import rundir
from brainvae.cli import app
from brainvae.config import RunConfig, TrainConfig
from brainvae.data.store import SliceStore
from brainvae.errors import BrainVAEError, OutputExistsError
from brainvae.export import export_model
from brainvae.generate import load, sample_images
from brainvae.rundir import RunDir
from brainvae.train.engine import train


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def tiny_run(tiny_store, tmp_path):
    cfg = RunConfig(model={"arch": "cvae", "image_size": 32, "channels": [8, 16, 16], "latent_dim": 4},
                    train=TrainConfig(steps=4, batch_size=8, val_batches=1, precision="fp32"))
    run = tmp_path / "run"
    train(run, tiny_store, cfg, progress=False)
    return run


def test_resolve_folder_file_and_errors(tiny_run, tmp_path):
    rd = RunDir.resolve(tiny_run)
    assert rd.checkpoint("best") == tiny_run / "checkpoints" / "best.safetensors" and not rd.shipped
    assert rd.output("eval") == tiny_run / "eval"
    by_file = RunDir.resolve(tiny_run / "checkpoints" / "last.safetensors")
    assert by_file.path == tiny_run and by_file.checkpoint("best").name == "last.safetensors"
    with pytest.raises(BrainVAEError, match="no such run folder"):
        RunDir.resolve(tmp_path / "missing")
    with pytest.raises(BrainVAEError, match="no best checkpoint"):
        RunDir.resolve(tmp_path).checkpoint("best")


def test_export_then_load_by_shipped_name(tiny_run, tmp_path, monkeypatch):
    root = tmp_path / "pretrained"
    export_model(tiny_run, root / "tiny-model")
    with pytest.raises(OutputExistsError):
        export_model(tiny_run, root / "tiny-model")
    files = {p.relative_to(root / "tiny-model").as_posix() for p in (root / "tiny-model").rglob("*") if p.is_file()}
    assert {"checkpoints/best.safetensors", "config.toml", "provenance.json", "summary.json", "MODEL_CARD.md"} <= files
    card = (root / "tiny-model" / "MODEL_CARD.md").read_text()
    assert "# tiny-model" in card and "4 optimiser steps" in card and "Not evaluated" in card

    monkeypatch.setattr(rundir, "pretrained_root", lambda: root)
    assert list(rundir.shipped_models()) == ["tiny-model"]
    rd = RunDir.resolve("tiny-model")
    assert rd.shipped
    with pytest.raises(BrainVAEError, match="read-only"):
        rd.output("samples")
    shipped, original = load("tiny-model"), load(tiny_run)
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in shipped.state_dict().items())  # EMA weights
    a = sample_images(shipped, 3, {"age": 70.0, "sex": -1.0, "position": 0.5}, seed=0)
    b = sample_images(original, 3, {"age": 70.0, "sex": -1.0, "position": 0.5}, seed=0)
    assert a.shape == (3, 32, 32) and (a == b).all()
    with pytest.raises(BrainVAEError, match="shipped models: tiny-model"):
        RunDir.resolve("no-such-model")


def test_half_export_stores_float16_and_loads_as_float32(tiny_run, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    export_model(tiny_run, full)
    assert invoke("export", tiny_run, "--out", half, "--half").exit_code == 0
    weights = lambda folder: folder / "checkpoints" / "best.safetensors"  # noqa: E731
    assert weights(half).stat().st_size < 0.6 * weights(full).stat().st_size
    assert "float16" in (half / "MODEL_CARD.md").read_text() and "float16" not in (full / "MODEL_CARD.md").read_text()
    original, shipped = load(full), load(half)
    for key, value in shipped.state_dict().items():
        assert value.dtype == original.state_dict()[key].dtype  # rebuilt in float32 (ints and bools kept)
        if value.is_floating_point():
            assert torch.equal(value, original.state_dict()[key].half().float())  # exactly the float16 rounding
    cond = {"age": 70.0, "sex": -1.0, "position": 0.5}
    a, b = sample_images(shipped, 3, cond, seed=0), sample_images(original, 3, cond, seed=0)
    assert abs(a - b).max() < 0.02 and not (a == b).all()


def test_cli_export_models_and_sample_by_name(tiny_run, tmp_path, monkeypatch):

    root = tmp_path / "pretrained"
    assert invoke("export", tiny_run, "--out", root / "tiny-model").exit_code == 0
    monkeypatch.setattr(rundir, "pretrained_root", lambda: root)
    listed = invoke("models")
    assert listed.exit_code == 0 and "tiny-model  cvae, 32 px, conditions: age, sex, position" in listed.output
    refused = invoke("sample", "tiny-model", "-n", 2)  # no --out: the package folder is read-only
    assert refused.exit_code == 1 and "read-only" in refused.output and "Traceback" not in refused.output
    done = invoke("sample", "tiny-model", "-n", 2, "--age", 70, "--sex", "F", "--out", tmp_path / "s")
    assert done.exit_code == 0, done.output
    assert (tmp_path / "s" / "slices.npy").exists()
    wrong = invoke("sample", "tiny-model", "-n", 2, "--guidance", 2, "--out", tmp_path / "s2")
    assert wrong.exit_code == 1 and "takes no sampling option" in wrong.output


def test_output_paths_of_a_run_folder(tmp_path):
    for folder in ("samples-age30-F", "samples", "reconstructions", "interpolation-1-2", "samples-empty", "quiz"):
        (tmp_path / folder).mkdir()
    for folder in ("samples-age30-F", "samples", "reconstructions", "interpolation-1-2"):
        (tmp_path / folder / "grid.png").write_bytes(b"")
    (tmp_path / "quiz" / "ann.score.json").write_text("{}")
    rd = RunDir(tmp_path)
    assert [d.name for d in rd.grid_dirs] == ["samples", "samples-age30-F", "reconstructions", "interpolation-1-2"]
    assert rd.quiz_scores == [tmp_path / "quiz" / "ann.score.json"]
    assert (rd.metrics_log, rd.eval_dir, rd.anomaly_dir, rd.utility_dir) == (
        tmp_path / "metrics.jsonl", tmp_path / "eval", tmp_path / "anomaly", tmp_path / "utility")
    assert rd.last_checkpoint == tmp_path / "checkpoints" / "last.safetensors"


def test_sampling_outside_the_training_ages_warns(tiny_run, tiny_store, tmp_path):

    ages = SliceStore(tiny_store).age_range("train")
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["train_ages"] == ages and ages[0] < ages[1]
    old = invoke("sample", tiny_run, "-n", 2, "--age", ages[1] + 10, "--out", tmp_path / "old")
    assert old.exit_code == 0 and "is outside the ages of" in old.output
    inside = invoke("sample", tiny_run, "-n", 2, "--age", (ages[0] + ages[1]) / 2, "--out", tmp_path / "mid")
    assert inside.exit_code == 0 and "outside the ages" not in inside.output

    del summary["train_ages"]  # a run from before summaries recorded them: export adds them from its store
    (tiny_run / "summary.json").write_text(json.dumps(summary))
    assert RunDir.resolve(tiny_run).age_warning(ages[1] + 10) is None
    export_model(tiny_run, tmp_path / "exported")
    assert json.loads((tmp_path / "exported" / "summary.json").read_text())["train_ages"] == ages
    assert "outside the ages" in RunDir.resolve(tmp_path / "exported").age_warning(ages[0] - 5)


def test_export_of_a_restoration_model_cards_its_anomaly_figures(tiny_store, tmp_path):
    """A dae cannot sample: its card says how to score with it, and reports the run's anomaly evaluation (the
    primary score first) from a summary without the per-case detail, written beside the card."""
    cfg = RunConfig(model={"arch": "dae", "image_size": 32, "channels": [8, 16]},
                    train=TrainConfig(steps=2, batch_size=8, val_batches=1, precision="fp32"))
    run = tmp_path / "dae"
    train(run, tiny_store, cfg, progress=False)
    export_model(run, tmp_path / "bare")
    card = (tmp_path / "bare" / "MODEL_CARD.md").read_text()
    assert "brainvae anomaly bare --data STORE" in card and "brainvae sample" not in card
    assert "run `brainvae anomaly` on the run" in card and "memorisation" not in card
    assert not (tmp_path / "bare" / "anomaly.json").exists() and "--features" not in card

    row = {"pixel_auroc": 0.81, "pixel_auprc": 0.47, "dice": 0.44, "val_dice": 0.3, "per_case": {"c1": {}},
           "label_free": {"dice": 0.41}, "case_detection": {"auroc": 1.0, "case_scores": {"c1": 2.0}}}
    (run / "anomaly").mkdir()
    (run / "anomaly" / "metrics.json").write_text(json.dumps({
        "store": "brats", "cases": {"validation": ["v1"], "test": ["t1", "t2"]}, "primary_score": "model/restoration_local",
        "features": "fae-run",
        "scores": {"model/residual": {**row, "dice": 0.2}, "model/restoration_local": row}}))
    export_model(run, tmp_path / "scored", name="scored")
    card = (tmp_path / "scored" / "MODEL_CARD.md").read_text()
    assert "\n\n\n" not in card and "Not evaluated" not in card
    assert "2 test cases, threshold and primary score chosen on 1 validation cases" in card
    assert "perceptual scores in the features of `fae-run`" in card
    table = [line for line in card.splitlines() if line.startswith("| ")][1:]
    assert table[0] == "| **model/restoration_local** (primary) | 0.81 | 0.47 | 0.44 | 0.41 | 1 |"
    assert table[1].startswith("| model/residual | 0.81 | 0.47 | 0.2 |")
    shipped = json.loads((tmp_path / "scored" / "anomaly.json").read_text())
    assert shipped["primary_score"] == "model/restoration_local"
    assert shipped["scores"]["model/residual"]["label_free_dice"] == 0.41 and "per_case" not in json.dumps(shipped)


def test_export_of_a_fae_cards_its_use_as_a_feature_net(tiny_store, tmp_path):
    """A fae is shipped for its encoder too: its card says how another model's scores use it (--features)."""
    cfg = RunConfig(model={"arch": "fae", "image_size": 32, "channels": [8, 8, 16], "ae_channels": [16, 8]},
                    train=TrainConfig(steps=2, batch_size=8, val_batches=1, precision="fp32"))
    train(tmp_path / "fae", tiny_store, cfg, progress=False)
    export_model(tmp_path / "fae", tmp_path / "feat", name="feat")
    card = (tmp_path / "feat" / "MODEL_CARD.md").read_text()
    assert "brainvae anomaly RUN --data STORE --features feat" in card and "brainvae sample" not in card
