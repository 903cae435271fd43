"""Readers: NIfTI checks, IXI names and spreadsheet, dataset discovery, bad input."""

from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainvae.errors import BrainVAEError, InputFileError
from brainvae.io.demographics import read_demographics
from brainvae.io.ixi import parse_ixi_name
from brainvae.io.nifti import load_mask, load_volume, orientation
from brainvae.io.scan import find_scans

from conftest import head_phantom, psr_affine, write_nifti


def test_parse_ixi_name():
    n = parse_ixi_name("IXI012-HH-1211-T1.nii.gz")
    assert (n.subject, n.hospital, n.scan, n.modality, n.suffix) == ("IXI012", "HH", "1211", "T1", "")
    assert parse_ixi_name("IXI002-Guys-0828-PD.nii").hospital == "Guys"
    assert parse_ixi_name("IXI012-HH-1211-T1_dlmuse.nii.gz").suffix == "_dlmuse"
    assert parse_ixi_name("brain.nii.gz") is None
    assert parse_ixi_name("IXI012-HH-1211-T1.txt") is None


def test_load_volume_reorients_psr_to_ras(tmp_path):
    data = np.zeros((8, 9, 10), np.float32)
    data[0, 8, 9] = 1  # axis 0 runs to posterior, so index 0 is the most anterior; most superior, most right
    path = write_nifti(tmp_path / "v.nii.gz", data, psr_affine(data.shape))
    assert orientation(nib.load(path)) == "PSR"
    vol = load_volume(path)
    assert vol.data.shape == (10, 8, 9)  # RAS: x (R) from axis 2, y (A) from axis 0, z (S) from axis 1
    i, j, k = np.argwhere(vol.data == 1)[0]
    assert i == 9 and j == 7 and k == 8  # right end, anterior end, superior end
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")


@pytest.mark.parametrize("problem, make", [
    ("truncated or corrupt gzip", lambda p, ok: p.write_bytes(ok.read_bytes()[: len(ok.read_bytes()) // 2])),
    ("not a readable NIfTI", lambda p, ok: p.write_bytes(gzip.compress(b"hello"))),
    ("expected a 3-D volume", lambda p, ok: nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 3), np.float32), np.eye(4)), p)),
    ("NaN/Inf", lambda p, ok: nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.nan, np.float32), np.eye(4)), p)),
    ("all-zero volume", lambda p, ok: nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), p)),
    ("file not found", lambda p, ok: None),
])
def test_bad_volumes_name_the_file_and_problem(tmp_path, problem, make):
    ok = write_nifti(tmp_path / "ok.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    bad = tmp_path / "bad.nii.gz"
    make(bad, ok)
    with pytest.raises(InputFileError) as info:
        load_volume(bad)
    assert problem in str(info.value) and "bad.nii.gz" in str(info.value)


def test_truncated_plain_gzip_stream(tmp_path):
    raw = gzip.compress(b"x" * 1000)[:-10]
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(raw)
    with pytest.raises(InputFileError, match="cut.nii.gz"):
        load_volume(bad)


def flipped_gzip(path, data: np.ndarray):
    """A .nii.gz whose deflate stream still decodes (stored blocks) but with 64 flipped bytes in the voxel
    data: only the gzip CRC can tell."""
    raw = bytearray(gzip.compress(nib.Nifti1Image(data, np.eye(4)).to_bytes(), compresslevel=0))
    raw[-400:-336] = bytes(b ^ 0xFF for b in raw[-400:-336])
    path.write_bytes(bytes(raw))
    return path


def test_gzip_crc_is_verified(tmp_path):
    bad = flipped_gzip(tmp_path / "flipped.nii.gz", np.full((16, 16, 16), 100, np.int16))
    with pytest.raises(InputFileError, match=r"flipped.nii.gz: truncated or corrupt gzip \(CRC check failed"):
        load_volume(bad)


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz"])
def test_huge_declared_dimensions_are_refused_before_allocating(tmp_path, name):
    header = bytearray(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4)).to_bytes())
    header[40:56] = np.array([3, 30000, 30000, 30000, 1, 1, 1, 1], "<i2").tobytes()  # dim[0..7]
    bad = tmp_path / name
    bad.write_bytes(gzip.compress(bytes(header)) if name.endswith(".gz") else bytes(header))
    with pytest.raises(InputFileError, match=f"{name}: the header declares 30000x30000x30000 voxels"):
        load_volume(bad)


def test_mask_checks(tmp_path):
    image, brain = head_phantom((12, 12, 10))
    vol = load_volume(write_nifti(tmp_path / "img.nii.gz", image, psr_affine(image.shape)))
    assert load_mask(write_nifti(tmp_path / "m.nii.gz", brain, psr_affine(image.shape)), vol).sum() == brain.sum()
    with pytest.raises(InputFileError, match="empty brain mask"):
        load_mask(write_nifti(tmp_path / "e.nii.gz", np.zeros_like(brain), psr_affine(image.shape)), vol)
    with pytest.raises(InputFileError, match="shape"):
        load_mask(write_nifti(tmp_path / "s.nii.gz", brain[:-1], psr_affine(brain[:-1].shape)), vol)
    shifted = psr_affine(image.shape)
    shifted[0, 3] += 5
    with pytest.raises(InputFileError, match="affine differs"):
        load_mask(write_nifti(tmp_path / "a.nii.gz", brain, shifted), vol)


def test_read_demographics_ixi_columns_and_duplicates(tmp_path):
    csv = tmp_path / "d.csv"
    pd.DataFrame({
        "IXI_ID": [2, 12, 12, 13, 13, 14],
        "SEX_ID (1=m, 2=f)": [2, 1, 1, 2, 1, 1],
        "AGE": [35.8, 38.8, 38.8, 40.0, 41.0, None],
        "HEIGHT": [1, 2, 3, 4, 5, 6],
    }).to_csv(csv, index=False)
    table, problems = read_demographics(csv)
    assert list(table.index) == ["IXI002", "IXI012", "IXI013", "IXI014"]
    assert table.loc["IXI002", "sex"] == "F" and table.loc["IXI012", "sex"] == "M"
    assert table.loc["IXI012", "age"] == pytest.approx(38.8)  # identical duplicates collapse silently
    assert pd.isna(table.loc["IXI013", "sex"]) and np.isnan(table.loc["IXI013", "age"])
    assert len(problems) == 2 and all("IXI013" in p for p in problems)
    assert np.isnan(table.loc["IXI014", "age"])


def test_read_demographics_missing_columns(tmp_path):
    csv = tmp_path / "d.csv"
    pd.DataFrame({"IXI_ID": [1], "GENDER": ["m"]}).to_csv(csv, index=False)
    expected = r"expected a subject column \(participant_id, subject, subject_id, id or IXI_ID\), age \(years\) and sex"
    with pytest.raises(InputFileError, match=r"d.csv: missing column\(s\) age; " + expected):
        read_demographics(csv)
    pd.DataFrame({"name": ["a"], "years": [30], "sex": ["F"]}).to_csv(csv, index=False)
    with pytest.raises(InputFileError, match=r"d.csv: missing column\(s\) subject, age; .*found columns "
                                             r"\['name', 'years', 'sex'\]"):
        read_demographics(csv)


@pytest.mark.parametrize("name, text, sidecar", [
    ("d.csv", "subject,age,sex\nA,30,M\nB,40,female\nC,n/a,O\n", None),
    ("d.tsv", "ID\tAge\tGender\nA\t30\tmale\nB\t40\tF\nC\t\t\n", None),
    ("d.csv", "subject_id,age,Sex (0=F; 1=M)\nA,30,1\nB,40,0\nC,,\n", None),  # coding in the column name
    ("participants.tsv", "participant_id\tage\tsex\nsub-A\t30\t1\nB\t40\t2\nsub-C\tn/a\tn/a\n",
     {"sex": {"Levels": {"1": "male", "2": "female"}}}),  # coding in the BIDS sidecar; "sub-" added to B
])
def test_read_demographics_codings(tmp_path, name, text, sidecar):
    (tmp_path / name).write_text(text)
    if sidecar:
        (tmp_path / "participants.json").write_text(json.dumps(sidecar))
    table, problems = read_demographics(tmp_path / name)
    prefix = "sub-" if name == "participants.tsv" else ""
    assert list(table.index) == [f"{prefix}{s}" for s in "ABC"]
    assert list(table["sex"][:2]) == ["M", "F"] and list(table["age"][:2]) == [30.0, 40.0]
    assert pd.isna(table["sex"].iloc[2]) and np.isnan(table["age"].iloc[2])
    assert problems == (["d.csv: 1 row(s) with sex 'O' (neither M nor F); sex left unknown"] if "O" in text else [])


def test_read_demographics_refuses_undocumented_numeric_sex(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("subject,age,sex\nA,30,1\nB,40,2\n")
    with pytest.raises(InputFileError, match=r"d.csv: column 'sex' holds numeric codes \(1, 2\) whose meaning is "
                                             r"not documented; write M / F, or give the coding in the column name"):
        read_demographics(csv)
    tsv = tmp_path / "participants.tsv"  # a BIDS sidecar without Levels documents nothing either
    tsv.write_text("participant_id\tage\tsex\nsub-A\t30\t0\n")
    (tmp_path / "participants.json").write_text(json.dumps({"sex": {"Description": "sex"}}))
    with pytest.raises(InputFileError, match=r"participants.tsv: column 'sex' holds numeric codes \(0\)"):
        read_demographics(tsv)


def test_find_scans_ixi(ixi_folder):
    (ixi_folder / "demographics.csv").write_text(
        (ixi_folder / "demographics.csv").read_text() + "99,1,50.0\n")  # a subject without images
    inv = find_scans(ixi_folder)
    assert inv.dataset == "ixi" and len(inv.scans) == 6
    s = inv.scans[0]
    assert (s.subject, s.hospital, s.sex, s.age) == ("IXI001", "HH", "F", 30.0)
    assert s.mask is not None and s.mask.name == "IXI001-HH-1001-T1_mask.nii.gz"
    assert inv.subjects_without_images == ["IXI099"]


def test_find_scans_reports_missing_demographics_and_duplicates(ixi_folder):
    df = pd.read_csv(ixi_folder / "demographics.csv")
    df[df.IXI_ID != 3].to_csv(ixi_folder / "demographics.csv", index=False)
    src = ixi_folder / "IXI-T1" / "IXI001-HH-1001-T1.nii.gz"
    (ixi_folder / "IXI-T1" / "IXI001-HH-2001-T1.nii.gz").write_bytes(src.read_bytes())
    inv = find_scans(ixi_folder)
    assert any("IXI003" in p and "not in demographics.csv" in p for p in inv.problems)
    assert any("duplicate subject IXI001" in p for p in inv.problems)
    assert {s.subject for s in inv.scans} == {f"IXI{i:03d}" for i in range(1, 7)}  # kept, not dropped
    assert next(s for s in inv.scans if s.subject == "IXI003").age is None


def test_find_scans_brats_and_errors(tmp_path):
    case = tmp_path / "brats" / "Brats18_X_1"
    image, _ = head_phantom((12, 12, 10))
    for mod in ("t1", "t2", "flair", "seg"):
        write_nifti(case / f"Brats18_X_1_{mod}.nii.gz", image, np.eye(4))
    inv = find_scans(tmp_path / "brats", "T1")
    assert inv.dataset == "brats" and inv.scans[0].lesion.name == "Brats18_X_1_seg.nii.gz"
    assert find_scans(tmp_path / "brats", "flair").scans[0].image.name == "Brats18_X_1_flair.nii.gz"
    (tmp_path / "empty").mkdir()
    with pytest.raises(BrainVAEError, match="no T1 NIfTI volumes found"):
        find_scans(tmp_path / "empty")
    with pytest.raises(BrainVAEError, match="no such file"):
        find_scans(tmp_path / "missing")


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    import torch
    from safetensors.torch import save_file

    from brainvae.io.atomic import atomic_dir, atomic_path, atomic_write_bytes

    mask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.txt", b"x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"x": torch.zeros(1)}, str(tmp))  # safetensors writes 0600
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644


def test_atomic_dir_removes_temporary_folders_of_killed_processes(tmp_path):
    import subprocess
    import sys

    from brainvae.io.atomic import atomic_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.{int(dead.stdout)}.abc123.tmp"  # left by a prepare that was killed
    stale.mkdir()
    (stale / "images.npy").write_bytes(b"half")
    alive = tmp_path / f".out.{os.getpid()}.xyz.tmp"  # a process still writing
    alive.mkdir()
    with atomic_dir(tmp_path / "out") as d:
        (d / "f").write_text("y")
    assert not stale.exists() and alive.exists()


def test_brats_cases_without_segmentations_are_one_subject_each(tmp_path):
    """A BraTS validation release (no _seg files): one subject per case folder, not one per modality file."""
    image, _ = head_phantom((12, 12, 10))
    for c in ("Brats18_V_1", "Brats18_V_2"):
        for mod in ("t1", "t1ce", "t2", "flair"):
            write_nifti(tmp_path / "val" / c / f"{c}_{mod}.nii.gz", image, np.eye(4))
    inv = find_scans(tmp_path / "val", "T1")
    assert inv.dataset == "brats" and [s.subject for s in inv.scans] == ["Brats18_V_1", "Brats18_V_2"]
    assert all(s.lesion is None and s.image.name.endswith("_t1.nii.gz") for s in inv.scans)
