"""Issue 11 §3-§4: logs under a scheduler (plain lines, --quiet, --log-file), what `sample` / `reconstruct` write
(greyscale PNGs, an honest NIfTI, meta.json with the conditions used), a run's provenance, runs refused on a
store that does not match, the API example."""

from __future__ import annotations

import io
import json
import re
import runpy
import sys
from pathlib import Path
from unittest import mock

import nibabel as nib
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import brainvae
from brainvae import generate as G
from brainvae import progress
from brainvae.cli import app
from brainvae.data.store import SliceStore
from brainvae.evaluate import run_eval
from brainvae.hardware import cpu_model, git_commit
from brainvae.io.download import file_sha256
from brainvae.rundir import RunDir, shipped_models

from conftest import make_store

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
TINY = ["--set", "model.image_size=32", "--set", "model.channels=[8,16]", "--set", "model.latent_dim=8",
        "--set", "train.batch_size=8", "--set", "train.val_batches=1", "--set", "train.precision=fp32"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step cvae on a tiny 32 px store, trained through the CLI with a log file: (store, run, result, log)."""
    tmp = tmp_path_factory.mktemp("trained")
    store, run, log = make_store(tmp / "store"), tmp / "run", tmp / "train.log"
    result = invoke("train", "cvae", "--data", store, "--out", run, "--steps", 3, "--log-file", log, *TINY)
    assert result.exit_code == 0, result.output
    return store, run, result, log


def plain(text: str) -> list[str]:
    """The lines of redirected output, checked to be what a scheduler's log can hold."""
    assert "\r" not in text and "\x1b" not in text  # no carriage returns, no cursor moves
    lines = text.splitlines()
    assert max(map(len, lines)) <= 300, max(lines, key=len)
    return lines


# -- logs ------------------------------------------------------------------------------------------------------

def test_progress_bar_writes_whole_lines_when_stderr_is_not_a_terminal(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(progress, "LOG_SECONDS", 0.0)  # a line at every update
    for _ in progress.bar(range(300), desc="work", unit="item", leave=False):
        pass
    lines = plain(err.getvalue())
    assert len(lines) > 3 and lines[0].startswith("work:   0%") and lines[-1].startswith("work: 100%|")

    err.truncate(0)
    for _ in progress.bar(range(2), desc="outer"):  # a bar inside a bar (a feature net trained inside evaluate)
        for _ in progress.bar(range(3), desc="inner", leave=False):
            pass
    assert "\x1b" not in err.getvalue() and "inner: 100%" in err.getvalue()  # no cursor moves, whole lines


def test_train_under_a_scheduler_logs_start_progress_and_summary(trained):
    store, run, result, log = trained
    lines = plain(result.output)
    start = f"train cvae (32 px) on {store}: 32 train / 8 val slices, cpu, fp32, 3 steps -> {run}"
    assert lines[0] == start and lines[-1].startswith("trained cvae: 3 steps in ")
    assert [line for line in lines if line.startswith("train cvae: ")][-1].startswith("train cvae: 100%|")
    assert plain(log.read_text()) == lines  # --log-file holds the same lines


def test_quiet_keeps_the_start_line_and_summary_and_the_log_its_progress(tiny_store, tmp_path):
    log = tmp_path / "logs" / "quiet.log"
    r = invoke("train", "vae", "--data", tiny_store, "--out", tmp_path / "run", "--steps", 2, "--quiet",
               "--log-file", log, *TINY)
    assert r.exit_code == 0, r.output
    lines = plain(r.output)
    assert len(lines) == 2 and lines[0].startswith("train vae (32 px) on ") and lines[1].startswith("trained vae: 2 steps")
    logged = plain(log.read_text())
    assert logged[0] == lines[0] and logged[-1] == lines[1] and any("100%|" in line for line in logged)
    r = invoke("train", "vae", "--data", tiny_store, "--out", tmp_path / "r2", "--log-file", tmp_path / "r2" / "x.log")
    assert r.exit_code == 1 and "may not lie inside the output folder" in r.output


def test_quiz_make_logs_its_start_line_and_summary(trained, tmp_path):
    store, run, _, _ = trained
    out, log = tmp_path / "quiz", tmp_path / "quiz.log"
    r = invoke("quiz", "make", run, "--data", store, "-n", 4, "--out", out, "--device", "cpu", "--log-file", log)
    assert r.exit_code == 0, r.output
    lines = plain(r.output)
    assert lines[0] == f"quiz make: 2 samples of {run}, 2 real test slices of {store} -> {out}"
    assert lines[-1].startswith(f"quiz of 4 images -> {out / 'quiz.html'}")
    assert plain(log.read_text()) == lines


def test_utility_logs_its_start_line_and_summary(trained, tmp_path, monkeypatch):
    """The stubbed utility study (tests/test_utility.py runs it) leaves the CLI's own lines to check."""
    from brainvae.evaluate import utility

    store, run, _, _ = trained
    monkeypatch.setattr(utility, "write_utility", lambda run, data, out, cfg, **kwargs:
                        (out, {"tasks": {"sex": {"n_test_subjects": 1}}}))
    monkeypatch.setattr(utility, "format_table", lambda metrics: "arm  sex  age_band")
    log = tmp_path / "utility.log"
    r = invoke("utility", run, "--data", store, "--ratios", "1,2", "--steps", 5, "--log-file", log)
    assert r.exit_code == 0, r.output
    lines = plain(r.output)
    assert lines == [f"utility of {run} on {store}: synthetic:real ratios 1, 2, 5 steps x 1 seed(s) per arm -> "
                     f"{run / 'utility'}", "arm  sex  age_band",
                     f"balanced accuracy on 1 real test subjects, 95 % subject-bootstrap CI -> "
                     f"{run / 'utility' / 'metrics.json'}"]
    assert plain(log.read_text()) == lines


def test_demo_logs_its_steps(tmp_path, monkeypatch):
    """The demo's step lines and summary reach --log-file (its pipeline stubbed: each stage has its own tests)."""
    import brainvae.demo as demo

    for name in ("simulate_cohort", "find_scans", "describe_dataset", "prepare_dataset", "train", "G", "SliceStore",
                 "evaluate_run", "write_utility", "anomalies_store", "evaluate_anomaly", "make_quiz", "write_report"):
        monkeypatch.setattr(demo, name, mock.MagicMock())
    demo.G.reconstruct_split.return_value = (None, None)  # (real, reconstructed)
    monkeypatch.setattr(demo, "shipped_models", lambda: {})
    out, log = tmp_path / "demo", tmp_path / "demo.log"
    r = invoke("demo", "--out", out, "--log-file", log)
    assert r.exit_code == 0, r.output
    lines = plain(r.output)
    assert re.fullmatch(r"\[ +\d+\.\ds\] simulate 24 subjects \(SIMULATED data from the MNI152 template\)", lines[0])
    assert lines[-5].endswith("] done")
    assert lines[-4] == f"report: {out / 'report.html'}   quiz: {out / 'quiz' / 'quiz.html'}"
    assert plain(log.read_text()) == lines


def test_prepare_lists_subjects_without_age_or_sex_and_without_skull_stripping(ixi_folder, tmp_path):
    (ixi_folder / "demographics.csv").unlink()
    for mask in (ixi_folder / "masks").iterdir():
        mask.unlink()
    (ixi_folder / "masks").rmdir()
    log = tmp_path / "prepare.log"
    r = invoke("data", "prepare", ixi_folder, "--out", tmp_path / "s", "--size", 16, "--spacing", 6, "--no-n4",
               "--workers", 1, "--quiet", "--log-file", log)
    assert r.exit_code == 0, r.output
    lines = plain(r.output)
    assert [line for line in plain(log.read_text()) if line not in lines][-1].startswith("prepare: 100%|")
    assert lines[0] == f"prepare 6 ixi volumes of {ixi_folder} (T1, axial, 16 px) -> {tmp_path / 's'}"
    subjects = "6 of 6 subjects: IXI001, IXI002, IXI003, IXI004, IXI005, IXI006"
    for what in ("age unknown (no demographics file found; give one with --demographics)",
                 "sex unknown (no demographics file found; give one with --demographics)",
                 "no skull stripping (no brain mask: intensities are normalised over the whole head; give masks "
                 "with --masks)"):
        assert f"note: {what}: {subjects}" in lines
        assert f"{what}: {subjects}" in (tmp_path / "s" / "problems.txt").read_text().splitlines()
    assert lines[-2].startswith("prepared ") and lines[-1].startswith("problems are listed in ")


def test_a_trained_run_records_its_commit_hardware_and_store(trained):
    store, run, _, _ = trained
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["git_commit"] == git_commit()
    if Path(brainvae.__file__).resolve().is_relative_to(ROOT) and (ROOT / ".git").exists():  # tests of a checkout
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", prov["git_commit"]), prov["git_commit"]
    assert prov["hardware"]["cpu_model"] == cpu_model() and prov["hardware"]["cpu_model"]
    assert prov["hardware"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert prov["store"] == str(store) and prov["store_fingerprint"] == SliceStore(store).fingerprint()


# -- outputs of sample and reconstruct -------------------------------------------------------------------------

def test_sample_writes_greyscale_pngs_an_honest_nifti_and_its_conditions(trained, tmp_path):
    _, run, _, _ = trained
    out, log = tmp_path / "samples", tmp_path / "sample.log"
    r = invoke("sample", run, "-n", 3, "--age", 70, "--sex", "female", "--out", out, "--log-file", log)
    assert r.exit_code == 0, r.output
    lines = plain(r.output)
    assert lines[0] == f"sample 3 slices from {run} (cvae, seed 0) -> {out}" and lines[-1] == f"3 samples -> {out}"
    assert any(line.startswith("warning: age 70 is outside the ages of run's training subjects") for line in lines)
    assert plain(log.read_text()) == lines  # --log-file: the start line, the warning and the summary
    for png in (out / "grid.png", out / "png" / "0000.png"):
        assert Image.open(png).mode == "L"  # 8-bit greyscale, not a colour-mapped RGBA
    img = nib.load(out / "slices.nii.gz")
    assert img.shape == (32, 32, 1, 3)  # samples along axis 4: no spacing claimed between unrelated slices
    assert img.header.get_zooms() == (6.0, 6.0, 6.0, 1.0)
    description = "3 independent samples along axis 4 (not slices of one volume)"
    assert img.header["descrip"].item().decode() == description
    meta = json.loads((out / "meta.json").read_text())
    best = run / "checkpoints" / "best.safetensors"
    assert meta["images"] == description and meta["n"] == 3 and meta["seed"] == 0
    assert meta["cond"] == {"age": 70.0, "sex": "F", "position": "not given (set to 0.5)"}  # the value cvae used
    assert meta["checkpoint"] == {"path": str(best), "sha256": file_sha256(best), "step": 3, "stage": 0}

    model = G.load(run)
    assert G.sample_meta(run, model, 1, 0, None, None)["cond"] == {
        "age": "not given (set to 50.0)", "sex": "not given (set to unknown)", "position": "not given (set to 0.5)"}
    model.fills_missing_conditions = False  # as an ldm, trained with conditions hidden: it marginalises them
    assert G.sample_meta(run, model, 1, 0, {"sex": 1.0}, None)["cond"] == {
        "age": "not given (marginalised)", "sex": "M", "position": "not given (marginalised)"}


def test_reconstructions_label_which_half_is_real(trained, tmp_path):
    store, run, _, _ = trained
    out = tmp_path / "recon"
    r = invoke("reconstruct", run, "--data", store, "-n", 4, "--out", out)
    assert r.exit_code == 0, r.output
    img = nib.load(out / "slices.nii.gz")
    description = "axis 4: 0-3 real test slices, 4-7 their reconstructions"
    assert img.shape == (32, 32, 1, 8) and img.header["descrip"].item().decode() == description
    assert json.loads((out / "meta.json").read_text())["images"] == description


# -- a run and a store that do not match -----------------------------------------------------------------------

def test_a_store_of_another_size_needs_resize(trained, tmp_path):
    _, run, _, _ = trained
    small, lesions = make_store(tmp_path / "small", size=16), tmp_path / "small-lesions"
    assert invoke("data", "anomalies", small, "--out", lesions, "--split", "all").exit_code == 0
    for store, command in ((small, ["reconstruct", run, "--out", tmp_path / "r"]),
                           (small, ["interpolate", run, 0, 1, "--out", tmp_path / "i"]),
                           (small, ["evaluate", run, "--out", tmp_path / "e"]),
                           (lesions, ["anomaly", run, "--out", tmp_path / "a"]),
                           (small, ["quiz", "make", run, "--out", tmp_path / "q"])):
        r = invoke(*command, "--data", store)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert f"{store}: its slices are 16 x 16 px, but run was trained on 32 x 32 px slices; prepare the store " \
               f"with --size 32, or pass --resize" in " ".join(r.output.split()), command
    r = invoke("reconstruct", run, "--data", small, "-n", 2, "--out", tmp_path / "r", "--resize")
    assert r.exit_code == 0, r.output


def test_evaluate_refuses_training_subjects_and_warns_on_another_store(trained, tmp_path, monkeypatch):
    store, run, _, _ = trained
    other = make_store(tmp_path / "other", seed=1)  # the same source checksums as the training store
    r = invoke("evaluate", run, "--data", other, "--out", tmp_path / "e")
    assert r.exit_code == 1 and "1 of its test subjects (S05) are volumes run trained on" in " ".join(r.output.split())
    rd = RunDir.resolve(run)
    assert rd.other_store_warning(SliceStore(store), "test") is None
    manifest = pd.read_csv(other / "manifest.csv")
    manifest["checksum"] = manifest["subject"]  # other volumes than the run's
    manifest.to_csv(other / "manifest.csv", index=False)
    warning = rd.other_store_warning(SliceStore(other), "test")
    assert warning.startswith(f"{other} is not the store run was trained on ({store})")

    # the CLI says so, on the console and in its log (the evaluation itself is stubbed: only the warning is tested)
    evaluated = []

    def evaluate_run(run, store, out, **kwargs):
        evaluated.append(store.path)
        return {"summary": [], "n": 0}

    monkeypatch.setattr(run_eval, "evaluate_run", evaluate_run)
    log = tmp_path / "evaluate.log"
    r = invoke("evaluate", run, "--data", other, "--out", tmp_path / "e", "--log-file", log)
    assert r.exit_code == 0, r.output
    assert evaluated == [other]
    lines = plain(r.output)
    assert lines[0] == f"warning: {warning}" and lines[1].startswith(f"evaluate {run} on {other} (test split")
    assert plain(log.read_text()) == lines


# -- the Python API example ------------------------------------------------------------------------------------

@pytest.mark.skipif("ixi-t1-128" not in shipped_models(), reason="the pretrained model is not shipped")
def test_python_api_example_runs_on_the_shipped_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python_api.py", str(tmp_path)])
    runpy.run_path(str(ROOT / "examples" / "python_api.py"), run_name="__main__")
    assert "generate: (4, 1, 128, 128)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "age75-M" / "meta.json").read_text())
    assert meta["cond"] == {"age": 75.0, "sex": "M", "position": 0.5}
    assert meta["sampler"]["sampler"] == "student" and meta["sampler"]["steps"] == 2  # the shipped default
    assert Image.open(tmp_path / "age75-M" / "png" / "0007.png").size == (128, 128)
