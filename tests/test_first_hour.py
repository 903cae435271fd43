"""Issue 11, a researcher's first hour: shipped configs by name, --set overrides, --version, readable help,
packaging (configs as package data, licence, citation, dependencies) and validated sampling conditions."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import brainvae
from brainvae.cli import app
from brainvae.config import (RunConfig, apply_overrides, config_description, load_config, load_run_config,
                             resolve_run_config, shipped_configs)
from brainvae.errors import BrainVAEError
from brainvae.conditions import check_conditions, parse_sex

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
TINY = ["--set", "model.image_size=32", "--set", "model.channels=[8,16]", "--set", "model.latent_dim=8",
        "--set", "train.batch_size=8", "--set", "train.val_batches=1", "--set", "train.precision=fp32"]


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


# -- shipped configs by name ----------------------------------------------------------------------------------

def test_shipped_configs_live_in_the_package_and_resolve_by_name(tmp_path):
    shipped = shipped_configs()
    assert {"vae", "cvae", "cevae", "vqvae", "resvae", "ae", "ldm", "beta-vae"} <= set(shipped)
    for name, path in shipped.items():
        assert path.parent == Path(brainvae.__file__).parent / "configs" and path.name == f"{name}.toml"
        assert config_description(path)  # every config opens with a one-line summary
    assert resolve_run_config("ldm") == shipped["ldm"] == resolve_run_config("ldm.toml")
    own = tmp_path / "vae"  # an existing path wins over the shipped name
    own.write_text('[model]\narch = "ae"\n')
    assert resolve_run_config(own) == own
    with pytest.raises(BrainVAEError, match=r"nosuch.*shipped: ae, beta-vae, .*vae, vqvae"):
        resolve_run_config("nosuch")


def test_configs_command_lists_names_with_their_summary():
    r = invoke("configs")
    assert r.exit_code == 0, r.output
    lines = dict(line.split(None, 1) for line in r.output.strip().splitlines())
    assert set(lines) == set(shipped_configs())
    assert lines["vae"].startswith("Plain convolutional Gaussian VAE")


# -- --set overrides ------------------------------------------------------------------------------------------

def test_overrides_set_dotted_keys_with_toml_values():
    cfg = load_run_config("ldm", ["model.prior.steps=16", "train.lr=3e-4", "model.autoencoder.channels=[32,64]",
                                  "model.prior.solver=euler", "train.budget=20m"])
    assert cfg.model["prior"]["steps"] == 16 and cfg.model["prior"]["solver"] == "euler"
    assert cfg.model["autoencoder"]["channels"] == [32, 64]
    assert cfg.train.lr == 3e-4 and cfg.train.budget == "20m"
    assert load_run_config("vae", ["model.beta=0.5"]).model_config().beta == 0.5
    assert load_run_config("vae") == load_config(RunConfig, shipped_configs()["vae"])  # no overrides: unchanged
    raw = {"model": {"arch": "vae"}}
    assert apply_overrides(raw, ["model.beta=2"]) == {"model": {"arch": "vae", "beta": 2}} and "beta" not in raw["model"]


@pytest.mark.parametrize("override, message", [
    ("model.betaa=1", r"unknown key\(s\) \['betaa'\]"),
    ("trian.lr=1", r"unknown key\(s\) \['trian'\]"),
    ("train.lrr=1", r"unknown key\(s\) \['lrr'\]"),
    ("model.prior.steps=16", r"model.prior is a value, not a table"),  # vae: prior = "fitted"
    ("train.lr=abc", r"train.lr must be a number"),
    ("model.channels=[32,64", r"not a TOML value"),
    ("model.beta", r"expected KEY=VALUE"),
])
def test_bad_overrides_are_refused_naming_the_key(override, message):
    with pytest.raises(BrainVAEError, match=message):
        load_run_config("vae", [override])


def test_train_by_name_with_overrides_then_sample_with_validated_conditions(tiny_store, tmp_path):
    run = tmp_path / "run"
    r = invoke("train", "cvae", "--data", tiny_store, "--out", run, "--steps", 2, "--quiet", *TINY,
               "--set", "model.beta=0.5")
    assert r.exit_code == 0, r.output
    saved = load_config(RunConfig, run / "config.toml")  # the run records the resolved, overridden config
    assert saved.arch == "cvae" and saved.model["beta"] == 0.5 and saved.model["channels"] == [8, 16]

    r = invoke("train", "cvae", "--data", tiny_store, "--out", tmp_path / "r2", "--set", "model.betaa=1")
    assert r.exit_code == 1 and "['betaa']" in r.output and "Traceback" not in r.output
    r = invoke("train", "cvea", "--data", tiny_store, "--out", tmp_path / "r2")
    assert r.exit_code == 1 and "not a shipped config name" in r.output and "cvae" in r.output

    # CLI: every bad condition is a one-line user error naming the value
    for args, message in ((["--age", 130], "age must be within 0..120 years, got 130"),
                          (["--age", -1], "got -1"),
                          (["--position", 1.5], "position must be within 0..1, got 1.5"),
                          (["--sex", "X"], "sex must be M or F"),
                          (["--sex", "2"], "got '2'")):
        r = invoke("sample", run, "-n", 2, "--out", tmp_path / "bad", *args)
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, (args, r.output)
    r = invoke("sample", run, "-n", 2, "--age", 120, "--sex", "female", "--position", 0, "--out", tmp_path / "ok")
    assert r.exit_code == 0, r.output

    # Python API: {"sex": "F"} works, and the same checks apply
    model = brainvae.load(run)
    g = torch.Generator().manual_seed(0)
    female = model.generate(3, {"age": 70, "sex": "F", "position": 0.5}, g)
    assert female.shape == (3, 1, 32, 32)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(female, model.generate(3, {"age": 70, "sex": -1, "position": 0.5}, g))
    for cond, message in (({"sex": "X"}, "sex must be M or F"), ({"age": 200}, "age must be within"),
                          ({"position": -0.1}, "position must be within"),
                          ({"agee": 70}, r"not conditioned on \['agee'\]"),
                          ({"age": np.array([30.0, 130.0])}, "got 130")):
        with pytest.raises(BrainVAEError, match=message):
            model.generate(2, cond)
    with pytest.raises(BrainVAEError, match="takes no sampling option"):
        model.generate(2, {"age": 70, "sex": "F", "position": 0.5}, steps=4)
    # sample_images (the CLI's path, on an inference copy) samples through generate: the same checks
    from brainvae.generate import sample_images

    assert sample_images(model, 2, {"sex": "M", "age": 40, "position": 0.5}, seed=0).shape == (2, 32, 32)
    with pytest.raises(BrainVAEError, match="age must be within"):
        sample_images(model, 2, {"age": 121}, seed=0)


def test_compare_and_tune_take_names_and_overrides(tiny_store, tmp_path):
    out = tmp_path / "cmp"
    r = invoke("compare", "ae", "vae", "--data", tiny_store, "--out", out, "--steps", 2, "--no-evaluate", "--quiet",
               *TINY, "--log-file", tmp_path / "compare.log")
    assert r.exit_code == 0, r.output
    assert {"ae", "vae"} <= set(r.output.split())  # leaderboard rows, named by config
    assert "leaderboard ->" in (tmp_path / "compare.log").read_text()  # the log file gets the summary too
    for name in ("ae", "vae"):  # compare trained the overridden configs, kept beside the runs
        assert load_config(RunConfig, out / "configs" / f"{name}.toml").model["channels"] == [8, 16]
        assert load_config(RunConfig, out / f"{name}-s0" / "config.toml").model["image_size"] == 32
    r = invoke("compare", "ae", "vae", "--data", tiny_store, "--out", tmp_path / "c2", "--steps", 2,
               "--set", "model.beta=0.5")  # the ae refuses beta != 0, before anything is trained
    assert r.exit_code == 1 and "ae has no KL term" in r.output and not (tmp_path / "c2").exists()

    r = invoke("tune", "vae", "--data", tiny_store, "--out", tmp_path / "tune", "--trials", 1, "--steps", 2, "--quiet",
               *TINY, "--set", "tune={lr={low=1e-3,high=2e-3}}", "--log-file", tmp_path / "tune.log")
    assert r.exit_code == 0, r.output  # (--set tune=... replaced the whole search space)
    assert "best of 1 completed trials" in (tmp_path / "tune.log").read_text()
    best = load_config(RunConfig, tmp_path / "tune" / "best.toml")
    assert best.model["channels"] == [8, 16] and 1e-3 <= best.train.lr <= 2e-3


def test_condition_checks():
    keys = ("age", "sex", "position")
    assert parse_sex("male") == parse_sex("M") == parse_sex(" m ") == parse_sex("+1") == 1.0
    assert parse_sex("FEMALE") == parse_sex("f") == parse_sex("-1") == -1.0
    assert check_conditions({"age": 0, "sex": "F", "position": 1}, keys) == {"age": 0.0, "sex": -1.0, "position": 1.0}
    assert check_conditions({"age": None}, keys) is None and check_conditions(None, keys) is None
    ages = np.array([20.0, np.nan, 80.0])  # per-sample values from data; NaN = unknown
    assert check_conditions({"age": ages, "sex": torch.tensor([1.0, 0.0, -1.0])}, keys)["age"] is ages
    for cond, message in (({"age": 120.5}, "age"), ({"age": float("nan")}, "age"), ({"sex": 0.5}, "sex"),
                          ({"sex": True, "age": "old"}, "age must be a number"),
                          ({"position": torch.tensor([0.5, 2.0])}, "got 2.0"), ({"size": 3}, "size")):
        with pytest.raises(BrainVAEError, match=message):
            check_conditions(cond, keys)
    with pytest.raises(BrainVAEError, match=r"vae model is not conditioned on \['age'\] \(its conditions: none\)"):
        check_conditions({"age": 50}, (), "vae")


# -- CLI surface ----------------------------------------------------------------------------------------------

def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip() == f"brainvae {metadata.version('brainvae')}"
    assert brainvae.__version__ == metadata.version("brainvae")


def test_help_shows_brackets_metavars_and_fits_80_columns():
    r = invoke("train", "--help", env={"COLUMNS": "80"})
    assert r.exit_code == 0 and "[model]" in r.output and "[train]" in r.output and "--set KEY=VALUE" in r.output
    r = invoke("data", "prepare", "--help", env={"COLUMNS": "80"})
    assert r.exit_code == 0
    assert re.search(r"--positions LO HI\s", r.output) and "<float,float>" not in r.output
    assert "--split TRAIN VAL TEST" in r.output
    assert max(map(len, r.output.splitlines())) <= 80
    assert not re.search(r"[╭│╰]", r.output)  # plain text, no Rich panels that squeeze the help column


# -- packaging ------------------------------------------------------------------------------------------------

def test_dependencies_licence_and_citation():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[=<>]", d)[0].lower() for d in project["dependencies"]}
    assert "monai" not in deps and "xlrd" not in deps
    assert any(d.startswith("monai") for d in project["optional-dependencies"]["bench"])
    src = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
    assert not re.search(r"^\s*(import|from) (monai|xlrd)\b", src, re.M)
    assert "MIT License" in (ROOT / "LICENSE").read_text() and "2026 brainvae contributors" in (ROOT / "LICENSE").read_text()
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["title"] == "brainvae" and cff["license"] == "MIT"
    assert str(cff["version"]) == project["version"] and cff["message"] and cff["authors"][0]["name"]


def test_every_shipped_model_has_a_card_a_config_and_weights():
    from safetensors import safe_open

    folders = [p for p in sorted((ROOT / "src" / "brainvae" / "pretrained").glob("*")) if p.is_dir()
               and p.name != "__pycache__"]
    if not folders:
        pytest.skip("no pretrained model in src/brainvae/pretrained/")
    for folder in folders:
        card = folder / "MODEL_CARD.md"
        assert card.is_file() and card.read_text().startswith(f"# {folder.name}\n"), card
        assert load_config(RunConfig, folder / "config.toml").arch, folder  # a valid run config
        weights = folder / "checkpoints" / "best.safetensors"
        assert weights.is_file(), f"{folder.name}: no checkpoints/best.safetensors"
        with safe_open(str(weights), "pt") as f:  # real weights, not a Git LFS pointer
            assert list(f.keys()), weights


def test_configs_by_name_after_a_non_editable_install(tmp_path):
    """Build the wheel (what `pip install .` installs), unpack it, and resolve a config by name from it."""
    project = tmp_path / "project"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, project / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(tmp_path / "wheel"), str(project)], capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr[-200:]}")
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "wheel").glob("brainvae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"brainvae/configs/{n}.toml" for n in shipped_configs()} <= set(names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import brainvae, brainvae.config as c; from pathlib import Path; "
            "assert Path(brainvae.__file__).is_relative_to(Path(r'%s')), brainvae.__file__; "
            "print(c.resolve_run_config('vae')); print(c.load_run_config('ldm', ['train.lr=1e-4']).train.lr)" % site)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    path, lr = r.stdout.split()
    assert Path(path) == site / "brainvae" / "configs" / "vae.toml" and float(lr) == 1e-4
