"""The bad-input matrix: what a careful user might feed brainvae, and what must come out.

Each case builds its own tiny inputs under ``tmp_path`` and runs the command line. A refused input ends in
exactly one line ``error: ...`` that names the file (or option) and the problem, exit status 1, no
traceback, and nothing written or deleted anywhere (the whole ``tmp_path`` tree is unchanged). Skipped
inputs (``prepare`` without ``--strict``) give a correct result: the store without them, and the file and
the problem in ``problems.txt``.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from brainvae.cli import app
from brainvae.config import RunConfig, TrainConfig
from brainvae.train.engine import train

from conftest import head_phantom, make_store, psr_affine, write_nifti

runner = CliRunner()
SHAPE = (24, 24, 20)
BAD = "IXI002-Guys-1002-T1"  # the subject whose files the NIfTI cases spoil
PREPARE = ["--size", "16", "--spacing", "6", "--no-n4", "--workers", "1", "--quiet"]
TINY_MODEL = {"arch": "vae", "image_size": 32, "channels": [8, 16, 16], "latent_dim": 8}
RUN_TOML = """[model]
arch = "vae"
image_size = 32
channels = [8, 16, 16]
latent_dim = 8

[train]
batch_size = 8
steps = 2
val_batches = 1
precision = "fp32"
log_every = 1
"""


@pytest.fixture(autouse=True)
def home(tmp_path_factory, monkeypatch):
    """Archives are unpacked into ~/.cache (and matplotlib keeps its font cache there): not the user's."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


def refused(tmp: Path, argv: list, *expected: str) -> None:
    """``argv`` ends in one ``error:`` line holding every expected fragment, and changes nothing under ``tmp``."""
    before = snapshot(tmp)
    result = runner.invoke(app, [str(a) for a in argv])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert lines and lines[-1].startswith("error: "), result.output
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]], result.output
    for fragment in expected:
        assert fragment in lines[-1], (fragment, lines[-1])
    assert snapshot(tmp) == before, "the failed command wrote or deleted files"


# ---- builders ---------------------------------------------------------------------------------------------------

def ixi(tmp: Path, n: int = 3) -> Path:
    """A tiny IXI folder: n subjects with brain masks and a complete demographics table."""
    root = tmp / "ixi"
    rows = ["IXI_ID,sex,AGE"]
    for i in range(1, n + 1):
        name = f"IXI{i:03d}-{'HH' if i % 2 else 'Guys'}-{1000 + i}-T1"
        image, brain = head_phantom(SHAPE, seed=i)
        write_nifti(root / "IXI-T1" / f"{name}.nii.gz", image, psr_affine(SHAPE))
        write_nifti(root / "masks" / f"{name}_mask.nii.gz", brain, psr_affine(SHAPE))
        rows.append(f"{i},{'MF'[i % 2]},{20 + 10 * i}")
    (root / "demographics.csv").write_text("\n".join(rows) + "\n")
    return root


def image_of(root: Path) -> Path:
    return root / "IXI-T1" / f"{BAD}.nii.gz"


def mask_of(root: Path) -> Path:
    return root / "masks" / f"{BAD}_mask.nii.gz"


def nifti_bytes(data: np.ndarray, affine=None) -> bytes:
    return nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_bytes()


def flipped_crc(path: Path) -> None:
    raw = bytearray(gzip.compress(nifti_bytes(head_phantom(SHAPE)[0], psr_affine(SHAPE)), compresslevel=0))
    raw[-4000:-3936] = bytes(b ^ 0xFF for b in raw[-4000:-3936])  # stored blocks: only the CRC can tell
    path.write_bytes(bytes(raw))


def huge_header(path: Path) -> None:
    header = bytearray(nifti_bytes(np.ones((4, 4, 4), np.int16)))
    header[40:56] = np.array([3, 30000, 30000, 30000, 1, 1, 1, 1], "<i2").tobytes()
    path.write_bytes(gzip.compress(bytes(header)))


def with_zooms(path: Path, zoom: float) -> None:
    write_nifti(path, head_phantom(SHAPE)[0], psr_affine(SHAPE, zoom=zoom))


def singular(path: Path) -> None:
    """A header whose sform (the one nibabel uses, qform off) maps every voxel to one point."""
    raw = bytearray(nifti_bytes(head_phantom(SHAPE)[0], psr_affine(SHAPE)))
    raw[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1
    raw[280:328] = np.zeros(12, "<f4").tobytes()  # srow_x, srow_y, srow_z
    path.write_bytes(gzip.compress(bytes(raw)))


# (case, how the image is spoiled, the problem the error names)
VOLUME_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated gzip": (lambda p: p.write_bytes(p.read_bytes()[:300]), "truncated or corrupt gzip"),
    "flipped bytes (gzip CRC)": (flipped_crc, "CRC check failed"),
    "gzip of text": (lambda p: p.write_bytes(gzip.compress(b"hello, not an image" * 20)), "not a readable NIfTI"),
    "not gzip at all": (lambda p: p.write_bytes(b"plain text in a .nii.gz"), "truncated or corrupt gzip"),
    "empty file": (lambda p: p.write_bytes(b""), "not a readable NIfTI"),
    "4-D": (lambda p: p.write_bytes(gzip.compress(nifti_bytes(np.ones((4, 4, 4, 3), np.float32)))),
            "expected a 3-D volume"),
    "NaN voxels": (lambda p: p.write_bytes(gzip.compress(nifti_bytes(np.full(SHAPE, np.nan, np.float32)))), "NaN/Inf"),
    "all zero": (lambda p: p.write_bytes(gzip.compress(nifti_bytes(np.zeros(SHAPE, np.float32)))), "all-zero volume"),
    "constant": (lambda p: write_nifti(p, np.full(SHAPE, 50.0, np.float32), psr_affine(SHAPE)),
                 "no contrast inside the brain"),
    "huge declared dimensions": (huge_header, "the header declares 30000x30000x30000 voxels"),
    "400 m voxels": (lambda p: with_zooms(p, 400_000.0), "implausible voxel size"),
    "0.001 mm voxels": (lambda p: with_zooms(p, 0.001), "implausible voxel size"),
    "singular affine": (singular, "singular or non-finite affine"),
}


@pytest.mark.parametrize("case", VOLUME_CASES)
def test_bad_volume_is_refused_with_strict(tmp_path, case):
    spoil, problem = VOLUME_CASES[case]
    root = ixi(tmp_path)
    spoil(image_of(root))
    refused(tmp_path, ["data", "prepare", root, "--out", tmp_path / "store", "--strict", *PREPARE],
            f"{BAD}.nii.gz", problem)


@pytest.mark.parametrize("case", VOLUME_CASES)
def test_bad_volume_is_skipped_and_reported(tmp_path, case):
    spoil, problem = VOLUME_CASES[case]
    root = ixi(tmp_path)
    spoil(image_of(root))
    before = snapshot(root)
    result = runner.invoke(app, [str(a) for a in ["data", "prepare", root, "--out", tmp_path / "store", *PREPARE]])
    assert result.exit_code == 0, result.output
    problems = (tmp_path / "store" / "problems.txt").read_text().splitlines()
    assert [line for line in problems if line.startswith(f"skipped: {image_of(root)}: ") and problem in line]
    manifest = (tmp_path / "store" / "manifest.csv").read_text()
    assert "IXI002" not in manifest and "IXI001" in manifest and "IXI003" in manifest
    assert snapshot(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ixi", "store"]


MASK_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty mask": (lambda p: write_nifti(p, np.zeros(SHAPE, np.uint8), psr_affine(SHAPE)), "empty brain mask"),
    "mask of another shape": (lambda p: write_nifti(p, np.ones((20, 20, 20), np.uint8), psr_affine((20, 20, 20))),
                              "brain mask shape (20, 20, 20) differs"),
    "mask on another grid": (lambda p: write_nifti(p, head_phantom(SHAPE)[1], psr_affine(SHAPE, zoom=3.0)),
                             "brain mask affine differs"),
    "truncated mask": (lambda p: p.write_bytes(p.read_bytes()[:100]), "truncated or corrupt gzip"),
    "mask covering everything": (lambda p: write_nifti(p, np.ones(SHAPE, np.uint8), psr_affine(SHAPE)),
                                 "the brain mask covers 100 % of the volume"),
}


@pytest.mark.parametrize("case", MASK_CASES)
def test_bad_brain_mask_is_refused_with_strict(tmp_path, case):
    spoil, problem = MASK_CASES[case]
    root = ixi(tmp_path)
    spoil(mask_of(root))
    named = f"{BAD}_mask.nii.gz" if case != "mask covering everything" else f"{BAD}.nii.gz"
    refused(tmp_path, ["data", "prepare", root, "--out", tmp_path / "store", "--strict", *PREPARE], named, problem)


def brats(tmp: Path, cases: int = 3, seg: bool = True) -> Path:
    root = tmp / "brats"
    for c in range(cases):
        case = root / f"Brats18_X_{c}"
        image, brain = head_phantom(SHAPE, seed=c)
        write_nifti(case / f"{case.name}_t1.nii.gz", image * brain, np.diag([4.0, 4.0, 4.0, 1.0]))
        if seg:
            lesion = np.zeros(SHAPE, np.uint8)
            lesion[10:13, 10:13, 8:11] = 1
            write_nifti(case / f"{case.name}_seg.nii.gz", lesion, np.diag([4.0, 4.0, 4.0, 1.0]))
    return root


def test_brats_lesion_mask_on_another_grid_is_refused(tmp_path):
    root = brats(tmp_path)
    seg = root / "Brats18_X_1" / "Brats18_X_1_seg.nii.gz"
    write_nifti(seg, np.zeros((20, 20, 20), np.uint8), np.diag([4.0, 4.0, 4.0, 1.0]))
    refused(tmp_path, ["data", "prepare", root, "--out", tmp_path / "store", "--strict", *PREPARE],
            "Brats18_X_1_seg.nii.gz", "lesion mask shape")


def test_brats_unknown_modality_is_refused(tmp_path):
    root = brats(tmp_path)
    refused(tmp_path, ["data", "prepare", root, "--out", tmp_path / "store", "--modality", "T3", *PREPARE],
            "BraTS modality must be one of", "'T3'")


FOLDER_CASES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "missing folder": (lambda t: t / "nowhere", ("nowhere: no such file or folder",)),
    "folder without volumes": (lambda t: (t / "empty").mkdir() or t / "empty", ("empty: no T1 NIfTI volumes found",)),
    "a text file": (lambda t: (t / "notes.txt").write_text("x") and t / "notes.txt",
                    ("notes.txt: expected a folder of NIfTI volumes or an IXI .tar archive",)),
}


@pytest.mark.parametrize("case", FOLDER_CASES)
def test_unusable_dataset_path(tmp_path, case):
    make, expected = FOLDER_CASES[case]
    refused(tmp_path, ["data", "prepare", make(tmp_path), "--out", tmp_path / "store", *PREPARE], *expected)


DEMOGRAPHICS_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing file": (lambda t: t / "missing.csv", "demographics file not found"),
    "missing columns": (lambda t: (t / "d.csv").write_text("IXI_ID,GENDER\n1,m\n") and t / "d.csv", "missing column(s)"),
    "binary garbage": (lambda t: (t / "d.csv").write_bytes(bytes(range(256)) * 4) and t / "d.csv",
                       "cannot read the spreadsheet"),
    "not a spreadsheet": (lambda t: (t / "d.xls").write_text("not excel") and t / "d.xls",
                          "cannot read the spreadsheet"),
}


@pytest.mark.parametrize("case", DEMOGRAPHICS_CASES)
def test_bad_demographics(tmp_path, case):
    make, problem = DEMOGRAPHICS_CASES[case]
    root = ixi(tmp_path)
    table = make(tmp_path)
    refused(tmp_path, ["data", "prepare", root, "--out", tmp_path / "store", "--demographics", table, *PREPARE],
            table.name, problem)


PREPARE_CONFIG_CASES: dict[str, tuple[str | None, str]] = {
    "boolean for a number": ("size = true\n", "size = True is bool, expected int"),
    "float for an int": ("size = 16.5\n", "size = 16.5 is float, expected int"),
    "string for a float": ('min_brain = "a lot"\n', "min_brain = 'a lot' is str, expected float"),
    "unknown key": ("sise = 16\n", "unknown key(s) ['sise']"),
    "invalid value": ('axis = "oblique"\n', "axis must be one of"),
    "not TOML": ("size = = 3\n", "not valid TOML"),
    "missing file": (None, "config file not found"),
}


@pytest.mark.parametrize("case", PREPARE_CONFIG_CASES)
def test_bad_prepare_config(tmp_path, case):
    text, problem = PREPARE_CONFIG_CASES[case]
    root = ixi(tmp_path)
    config = tmp_path / "prep.toml"
    if text is not None:
        config.write_text(text)
    refused(tmp_path, ["data", "prepare", root, "--out", tmp_path / "store", "--config", config, *PREPARE],
            "prep.toml", problem)


def test_prepare_output_overlapping_the_dataset_is_refused(tmp_path):
    root = ixi(tmp_path)
    refused(tmp_path, ["data", "prepare", root, "--out", root, "--force", *PREPARE], "the output is the input")
    refused(tmp_path, ["data", "prepare", root, "--out", root / "store", *PREPARE], "lies inside the input")
    refused(tmp_path, ["data", "prepare", root / "IXI-T1", "--out", root, "--force", *PREPARE],
            "holds the input")


# ---- archives ---------------------------------------------------------------------------------------------------

def archive(tmp: Path, extra: tarfile.TarInfo | None = None, data: bytes | None = None) -> Path:
    """An IXI-like .tar of the tiny volumes, with one more member appended."""
    root = ixi(tmp)
    path = tmp / "IXI-T1.tar"
    with tarfile.open(path, "w") as tar:
        for volume in sorted((root / "IXI-T1").iterdir()):
            tar.add(volume, arcname=volume.name)
        if extra is not None:
            tar.addfile(extra, io.BytesIO(data) if data is not None else None)
    shutil.rmtree(root)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, size
    return info


ARCHIVE_CASES: dict[str, tuple[tarfile.TarInfo, bytes | None, str]] = {
    "symlink out": (member("evil", tarfile.SYMTYPE, "../../outside"), None, "symbolic link"),
    "symlink inside": (member("alias.nii.gz", tarfile.SYMTYPE, "IXI001-HH-1001-T1.nii.gz"), None, "symbolic link"),
    "absolute symlink": (member("sub/passwd", tarfile.SYMTYPE, "/etc/passwd"), None, "symbolic link"),
    "hard link": (member("hard", tarfile.LNKTYPE, "IXI001-HH-1001-T1.nii.gz"), None, "hard link"),
    "character device": (member("dev", tarfile.CHRTYPE), None, "device or special file"),
    "fifo": (member("pipe", tarfile.FIFOTYPE), None, "device or special file"),
    "absolute path": (member("/tmp/evil.txt", size=4), b"evil", "absolute path"),
    "parent folder": (member("../evil.txt", size=4), b"evil", "path traversal"),
}


@pytest.mark.parametrize("command", ["prepare", "describe"])
@pytest.mark.parametrize("case", ARCHIVE_CASES)
def test_unsafe_archive_is_refused_before_extracting_anything(tmp_path, case, command):
    info, data, problem = ARCHIVE_CASES[case]
    tar = archive(tmp_path, info, data)
    args = PREPARE if command == "prepare" else ["--workers", "1", "--quiet"]
    refused(tmp_path, ["data", command, tar, "--out", tmp_path / "out", *args],
            "IXI-T1.tar", f"unsafe member '{info.name}'", problem)


def test_symlink_chain_past_path_max_is_refused(tmp_path):
    from test_download import symlink_chain_tar

    tar = symlink_chain_tar(tmp_path / "chain.tar", "../")
    refused(tmp_path, ["data", "prepare", tar, "--out", tmp_path / "out", *PREPARE], "chain.tar", "symbolic link")


def test_truncated_archive_and_archive_as_output(tmp_path):
    tar = archive(tmp_path)
    refused(tmp_path, ["data", "prepare", tar, "--out", tar, "--force", *PREPARE], "the output is the input")
    tar.write_bytes(tar.read_bytes()[:3000])
    refused(tmp_path, ["data", "prepare", tar, "--out", tmp_path / "out", *PREPARE],
            "IXI-T1.tar", "not a readable tar archive")


def test_safe_archive_is_prepared(tmp_path):
    tar = archive(tmp_path)
    result = runner.invoke(app, [str(a) for a in ["data", "prepare", tar, "--out", tmp_path / "out", *PREPARE]])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "manifest.csv").read_text().count("IXI00") > 3


@pytest.mark.parametrize("argv, expected", [
    (["data", "download", "brats"], "unknown dataset 'brats'"),
    (["data", "download", "ixi", "--modality", "FLAIR"], "unknown IXI modality 'FLAIR'"),
])
def test_download_options(tmp_path, argv, expected):
    refused(tmp_path, [*argv, "--dest", tmp_path / "dl"], expected)


# ---- training: configs, stores, runs ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny store and a 2-step run on it, made once; cases copy them."""
    base = tmp_path_factory.mktemp("trained")
    store = make_store(base / "store")
    cfg = RunConfig(model=TINY_MODEL, train=TrainConfig(batch_size=8, steps=2, val_batches=1, precision="fp32",
                                                        log_every=1))
    train(base / "run", store, cfg, device="cpu", progress=False)
    (base / "run.toml").write_text(RUN_TOML)
    return store, base / "run"


def copies(tmp: Path, trained) -> tuple[Path, Path, Path]:
    """(store, run, config) copied into this case's folder."""
    store, run = trained
    shutil.copytree(store, tmp / "store")
    shutil.copytree(run, tmp / "run")
    shutil.copy(run.parent / "run.toml", tmp / "run.toml")
    return tmp / "store", tmp / "run", tmp / "run.toml"


def train_argv(config, store, out, *extra) -> list:
    return ["train", config, "--data", store, "--out", out, "--device", "cpu", "--quiet", *extra]


TRAIN_CONFIG_CASES: dict[str, tuple[str, str, str]] = {
    "boolean learning rate": ("precision = \"fp32\"", "precision = \"fp32\"\nlr = true", "lr = True is bool, expected float"),
    "float batch size": ("batch_size = 8", "batch_size = 8.5", "batch_size = 8.5 is float, expected int"),
    "string steps": ("steps = 2", 'steps = "2"', "steps = '2' is str, expected int | None"),
    "negative learning rate": ("batch_size = 8", "batch_size = 8\nlr = -1.0", "batch_size and lr must be positive"),
    "bad budget": ("steps = 2", 'steps = 2\nbudget = "soon"', "invalid duration 'soon'"),
    "unknown train key": ("steps = 2", "steps = 2\nstpes = 3", "unknown key(s) ['stpes']"),
    "unknown architecture": ('arch = "vae"', 'arch = "gan"', "unknown architecture 'gan'"),
    "unknown model key": ("latent_dim = 8", "latent_dim = 8\nlatent = 3", "unknown key(s) ['latent']"),
    "boolean model field": ("latent_dim = 8", "latent_dim = true", "latent_dim = True is bool, expected int"),
    "not TOML": ("[train]", "[train", "not valid TOML"),
}


@pytest.mark.parametrize("case", TRAIN_CONFIG_CASES)
def test_bad_train_config(tmp_path, trained, case):
    old, new, problem = TRAIN_CONFIG_CASES[case]
    store, _, config = copies(tmp_path, trained)
    config.write_text(config.read_text().replace(old, new))
    refused(tmp_path, train_argv(config, store, tmp_path / "new"), "run.toml", problem)


def test_bad_set_override(tmp_path, trained):
    store, _, config = copies(tmp_path, trained)
    refused(tmp_path, train_argv(config, store, tmp_path / "new", "--set", "train.lr=true"),
            "train.lr=true", "lr = True is bool")


def spoil_manifest_column(store: Path) -> None:
    text = (store / "manifest.csv").read_text()
    (store / "manifest.csv").write_text(text.replace("split", "fold", 1))


def spoil_rows(store: Path) -> None:
    lines = (store / "manifest.csv").read_text().splitlines(keepends=True)
    (store / "manifest.csv").write_text("".join(lines[:-3]))


def spoil_splits(store: Path) -> None:
    (store / "manifest.csv").write_text((store / "manifest.csv").read_text().replace(",val,", ",test,"))


STORE_CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "no manifest": (lambda s: (s / "manifest.csv").unlink(), "store", "not a brainvae slice store"),
    "truncated images": (lambda s: (s / "images.npy").write_bytes((s / "images.npy").read_bytes()[:5000]),
                         "images.npy", "not a readable .npy array"),
    "images not .npy": (lambda s: (s / "images.npy").write_bytes(b"garbage" * 100), "images.npy",
                        "not a readable .npy array"),
    "manifest without split": (spoil_manifest_column, "manifest.csv", "missing column(s) split"),
    "manifest rows != images": (spoil_rows, "images.npy", "but manifest.csv lists 45 slices"),
    "empty manifest": (lambda s: (s / "manifest.csv").write_text(""), "manifest.csv", "not a readable CSV table"),
    "text ages": (lambda s: (s / "manifest.csv").write_text((s / "manifest.csv").read_text().replace(",20.0,", ",twenty,")),
                  "manifest.csv", "column 'age' holds non-numbers"),
    "no validation split": (spoil_splits, "store", "split 'val' has no slices"),
    "corrupt prepare.toml": (lambda s: (s / "prepare.toml").write_text("size = = 1"), "prepare.toml", "not valid TOML"),
}


@pytest.mark.parametrize("case", STORE_CASES)
def test_bad_store(tmp_path, trained, case):
    spoil, named, problem = STORE_CASES[case]
    store, _, config = copies(tmp_path, trained)
    spoil(store)
    refused(tmp_path, train_argv(config, store, tmp_path / "new"), named, problem)


def test_train_output_overlapping_inputs_is_refused(tmp_path, trained):
    store, run, config = copies(tmp_path, trained)
    refused(tmp_path, train_argv(config, store, store, "--force"), "the output is the input")
    refused(tmp_path, train_argv(config, store, tmp_path, "--force"), "holds the input")
    refused(tmp_path, train_argv(config, store, run, "--force", "--init", run), "the output is the input")
    refused(tmp_path, train_argv(config, store, tmp_path / "new", "--init", tmp_path / "nowhere"),
            "nowhere: no such run folder")
    refused(tmp_path, train_argv(config, store, run), "run already exists; pass --force")


IS, HOLDS, INSIDE = "the output is the input", "holds the input", "inside the input"
OVERLAP_CASES = {  # case -> (argv from (store, run), the refusal): each output would delete or sit in an input
    "reconstruct --out STORE": (lambda s, r: ["reconstruct", r, "--data", s, "--out", s, "--force"], IS),
    "reconstruct --out RUN": (lambda s, r: ["reconstruct", r, "--data", s, "--out", r, "--force"], IS),
    "interpolate --out PARENT": (lambda s, r: ["interpolate", r, 0, 1, "--data", s, "--out", r.parent, "--force"],
                                 HOLDS),
    "evaluate --out STORE": (lambda s, r: ["evaluate", r, "--data", s, "--out", s, "--force"], IS),
    "evaluate --out inside STORE": (lambda s, r: ["evaluate", r, "--data", s, "--out", s / "eval"], INSIDE),
    "anomaly --out STORE": (lambda s, r: ["anomaly", r, "--data", s, "--out", s, "--force"], IS),
    "anomaly --out RUN": (lambda s, r: ["anomaly", r, "--data", s, "--out", r, "--force"], IS),
    "utility --out RUN": (lambda s, r: ["utility", r, "--data", s, "--out", r, "--force"], IS),
    "export --out RUN": (lambda s, r: ["export", r, "--out", r, "--force"], IS),
    "quiz make --out STORE": (lambda s, r: ["quiz", "make", r, "--data", s, "--out", s, "--force"], IS),
    "describe --out DATA": (lambda s, r: ["data", "describe", s.parent / "ixi", "--out", s.parent / "ixi",
                                          "--force"], IS),
}


@pytest.mark.parametrize("case", OVERLAP_CASES)
def test_outputs_overlapping_inputs_are_refused(tmp_path, trained, case):
    store, run, _ = copies(tmp_path, trained)
    ixi(tmp_path)
    argv, message = OVERLAP_CASES[case]
    if case.startswith("anomaly"):  # a store with lesion masks, so the overlap is what is refused
        shutil.copy(store / "brain.npy", store / "lesion.npy")
    refused(tmp_path, argv(store, run), message)


def test_resume_that_changes_the_run_is_refused(tmp_path, trained):
    store, run, config = copies(tmp_path, trained)
    refused(tmp_path, train_argv(config, store, run, "--resume", "--steps", "4"),
            "--resume continues a run exactly as it was started", "train.steps was 2, now 4")
    other = make_store(tmp_path / "other", seed=3)
    refused(tmp_path, train_argv(config, other, run, "--resume"), "other: not the store", "--resume needs the same --data")
    refused(tmp_path, train_argv(config, store, tmp_path / "other", "--resume"), "nothing to resume")


@pytest.mark.parametrize("spoil, problem", [
    (lambda s: s.write_bytes(s.read_bytes()[:100]), "not a readable training state"),
    (lambda s: s.write_bytes(b"not a pickle"), "not a readable training state"),
    (lambda s: s.unlink(), "no training state to resume from"),
])
def test_resume_from_a_bad_training_state(tmp_path, trained, spoil, problem):
    store, run, config = copies(tmp_path, trained)
    spoil(run / "checkpoints" / "last.state.pt")
    refused(tmp_path, train_argv(config, store, run, "--resume"), "last.state.pt", problem)


def write_safetensors(path: Path, metadata: dict | None) -> None:
    save_file({"x": torch.zeros(2)}, str(path), metadata=metadata)


CHECKPOINT_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated header": (lambda p: p.write_bytes(p.read_bytes()[:50]), "not a readable safetensors checkpoint"),
    "truncated data": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "not a readable safetensors checkpoint"),
    "not brainvae": (lambda p: write_safetensors(p, None), "not a brainvae checkpoint"),
    "unknown architecture": (lambda p: write_safetensors(p, {"brainvae_model": json.dumps({"arch": "gan"})}),
                             "unknown architecture 'gan'"),
    "metadata not JSON": (lambda p: write_safetensors(p, {"brainvae_model": "{"}), "corrupt checkpoint metadata"),
    "weights of another config": (lambda p: write_safetensors(p, {"brainvae_model": json.dumps(
        {"arch": "vae", "image_size": 32, "channels": [8, 16, 16], "latent_dim": 8})}), "weights do not fit"),
    "missing": (lambda p: p.unlink(), "no best checkpoint"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_sample_from_a_bad_checkpoint(tmp_path, trained, case):
    spoil, problem = CHECKPOINT_CASES[case]
    _, run, _ = copies(tmp_path, trained)
    spoil(run / "checkpoints" / "best.safetensors")
    named = "run" if case == "missing" else "best.safetensors"
    refused(tmp_path, ["sample", run, "-n", "2", "--device", "cpu"], named, problem)


def test_sample_output_that_would_replace_the_run_is_refused(tmp_path, trained):
    _, run, _ = copies(tmp_path, trained)
    refused(tmp_path, ["sample", run, "--out", run, "--force", "-n", "2", "--device", "cpu"], "the output is the input")
    refused(tmp_path, ["sample", run, "--out", tmp_path, "--force", "-n", "2", "--device", "cpu"], "holds the input")
    (run / "samples").mkdir()
    refused(tmp_path, ["sample", run, "-n", "2", "--device", "cpu"], "samples already exists; pass --force")
    result = runner.invoke(app, ["sample", str(run), "-n", "2", "--device", "cpu", "--force"])  # RUN/samples is fine
    assert result.exit_code == 0, result.output
    assert (run / "samples" / "grid.png").exists() and (run / "checkpoints" / "best.safetensors").exists()
