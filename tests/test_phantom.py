"""Tests of the simulated IXI-like cohort (brainvae.io.phantom).

Small and coarse on purpose (a few subjects at 4 mm): the whole file runs in
seconds. The MNI152 template comes from inside the nilearn package (no download).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage as ndi

from brainvae.errors import BrainVAEError, OutputExistsError
from brainvae.io.phantom import SEX_COLUMN, simulate_cohort, simulate_subject, subject_name

SPACING = (4.0, 4.0, 4.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "cohort"
    table = simulate_cohort(out, 4, seed=7, spacing=SPACING, lesion_fraction=0.5, progress=False)
    return out, table


def _load(out, sid: str, kind: str) -> nib.Nifti1Image:
    stem = f"{sid}-SIM-{int(sid[3:]):04d}-T1"
    folder, suffix = {"image": ("IXI-T1", ""), "mask": ("masks", "_mask"), "lesion": ("lesions", "_lesion")}[kind]
    return nib.load(out / folder / f"{stem}{suffix}.nii.gz")


def test_files_csv_and_readme(cohort):
    out, table = cohort
    assert list(table.columns) == ["IXI_ID", SEX_COLUMN, "AGE", "SIMULATED", "n_lesions"]
    assert list(table["IXI_ID"]) == ["SIM001", "SIM002", "SIM003", "SIM004"]
    csv = pd.read_csv(out / "demographics.csv")
    assert list(csv.columns) == list(table.columns)
    assert list(csv["IXI_ID"]) == list(table["IXI_ID"])
    np.testing.assert_allclose(csv["AGE"], table["AGE"])
    assert csv["SIMULATED"].all()
    assert set(csv[SEX_COLUMN]) <= {1, 2}
    assert csv["AGE"].between(20, 86).all()
    assert (csv["n_lesions"] > 0).sum() == 2  # round(0.5 * 4)
    assert csv["n_lesions"].between(0, 3).all()

    names = {p.name for p in (out / "IXI-T1").iterdir()}
    assert names == {f"{subject_name(i)}-T1.nii.gz" for i in range(4)}
    assert "SIM001-SIM-0001-T1.nii.gz" in names
    assert {p.name for p in (out / "masks").iterdir()} == {f"{subject_name(i)}-T1_mask.nii.gz" for i in range(4)}
    assert {p.name for p in (out / "lesions").iterdir()} == {f"{subject_name(i)}-T1_lesion.nii.gz" for i in range(4)}
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left

    readme = (out / "README.txt").read_text()
    assert "SIMULATED" in readme and "MNI152 2009" in readme and "not real" in readme.lower()
    assert "seed             7" in readme


def test_names_parse_like_ixi(cohort):
    from brainvae.io.ixi import parse_ixi_name

    out, _ = cohort
    parsed = parse_ixi_name("SIM001-SIM-0001-T1_mask.nii.gz")
    assert (parsed.subject, parsed.hospital, parsed.modality, parsed.suffix) == ("SIM001", "SIM", "T1", "_mask")
    for path in (out / "IXI-T1").iterdir():
        assert parse_ixi_name(path.name).suffix == ""


def test_orientation_dtypes_and_anatomy(cohort):
    out, table = cohort
    for sid in table["IXI_ID"]:
        img, mask, lesion = (_load(out, sid, k) for k in ("image", "mask", "lesion"))
        assert nib.aff2axcodes(img.affine) == ("P", "S", "R")
        assert img.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        assert lesion.get_data_dtype() == np.uint8
        assert np.allclose(img.header.get_zooms(), SPACING)
        for other in (mask, lesion):
            assert other.shape == img.shape and np.allclose(other.affine, img.affine)
        assert int(img.header["qform_code"]) > 0 and int(img.header["sform_code"]) > 0

        canon = nib.as_closest_canonical(mask)
        assert nib.aff2axcodes(canon.affine) == ("R", "A", "S")
        brain = np.argwhere(canon.get_fdata() > 0)
        extent = (brain.max(0) - brain.min(0) + 1) * SPACING
        # A brain is longer front-to-back than it is wide, and over 10 cm in every direction.
        assert extent[1] > extent[0] > 100 and extent[2] > 100
        # Its lowest part (cerebellum, brainstem) lies behind its centre: checks A and S.
        low = brain[brain[:, 2] <= np.percentile(brain[:, 2], 8)]
        assert (low[:, 1].mean() - brain[:, 1].mean()) * SPACING[1] < -8  # mm


def test_mask_inside_head(cohort):
    out, table = cohort
    for sid in table["IXI_ID"]:
        image = _load(out, sid, "image").get_fdata()
        mask = _load(out, sid, "mask").get_fdata() > 0
        assert 900 < mask.sum() * np.prod(SPACING) / 1000 < 2200  # brain mask volume in mL
        brain_level = np.median(image[mask])
        # Field of view holds the whole head: only noise on its faces.
        faces = np.concatenate([np.take(image, e, axis=a).ravel() for a in range(3) for e in (0, -1)])
        assert faces.max() < 0.3 * brain_level
        # Bright scalp all around the brain: the head reaches >= 8 mm past the mask on every side.
        head = ndi.binary_fill_holes(ndi.binary_closing(image > 0.35 * brain_level, iterations=2))
        assert head[mask].mean() > 0.99
        for axis in range(3):
            others = tuple(a for a in range(3) if a != axis)
            m, h = np.flatnonzero(mask.any(others)), np.flatnonzero(head.any(others))
            assert h[0] <= m[0] - 2 and h[-1] >= m[-1] + 2
        # The ring just outside the brain (CSF, skull) is dark, as in a T1 head.
        ring = ndi.binary_dilation(mask, iterations=1) & ~mask
        assert np.median(image[ring]) < 0.8 * brain_level


def test_lesions_in_cohort(cohort):
    out, table = cohort
    for _, row in table.iterrows():
        image = _load(out, row["IXI_ID"], "image").get_fdata()
        mask = _load(out, row["IXI_ID"], "mask").get_fdata() > 0
        lesion = _load(out, row["IXI_ID"], "lesion").get_fdata() > 0
        if row["n_lesions"] == 0:
            assert not lesion.any()
            continue
        assert lesion.any() and (lesion <= mask).all()
        labels, n = ndi.label(lesion)
        assert 1 <= n <= row["n_lesions"]
        for i in range(1, n + 1):
            blob = labels == i
            ring = ndi.binary_dilation(blob, iterations=1) & ~lesion & mask
            contrast = abs(image[blob].mean() / image[ring].mean() - 1)
            assert contrast > 0.1, f"{row['IXI_ID']} lesion {i}: contrast {contrast:.2f}"


def test_lesions_only_change_lesion_voxels():
    with_lesions = simulate_subject(50, 1, seed=3, n_lesions=3, spacing=SPACING)
    healthy = simulate_subject(50, 1, seed=3, n_lesions=0, spacing=SPACING)
    assert len(with_lesions.params["lesions"]) == 3
    lesion = with_lesions.lesion > 0
    assert lesion.any() and not healthy.lesion.any()
    np.testing.assert_array_equal(with_lesions.brain, healthy.brain)
    brain_level = np.median(healthy.image[healthy.brain > 0])
    diff = np.abs(with_lesions.image - healthy.image)
    assert diff[lesion].mean() > 0.2 * brain_level
    far = ~ndi.binary_dilation(lesion, iterations=3)
    assert diff[far].max() < 0.01 * brain_level  # smooth edges, then nothing


def _central_csf_ml(sub) -> float:
    """Dark (CSF-like) brain-mask voxels within 20-25 mm of the brain's centre."""
    brain = sub.brain > 0
    level = np.median(sub.image[brain])
    idx = np.indices(sub.image.shape).reshape(3, -1).T
    world = nib.affines.apply_affine(sub.affine, idx).reshape(*sub.image.shape, 3)
    centre = nib.affines.apply_affine(sub.affine, np.argwhere(brain).mean(0))
    box = (np.abs(world - centre) < [20, 25, 20]).all(-1)
    return float(((sub.image < 0.5 * level) & brain & box).sum() * np.prod(SPACING) / 1000)


@pytest.mark.parametrize("seed", [0, 1])
def test_ventricles_grow_with_age(seed):
    # Same individual (seed, index, sex) at two ages: only the age-dependent
    # atrophy differs, so the comparison is fair.
    young = simulate_subject(25, 2, seed=seed, spacing=SPACING)
    old = simulate_subject(85, 2, seed=seed, spacing=SPACING)
    assert old.params["ventricle_push_mm"] > young.params["ventricle_push_mm"]
    assert old.params["cortical_thinning"] > young.params["cortical_thinning"]
    assert _central_csf_ml(old) > 1.25 * _central_csf_ml(young)


def test_male_heads_larger():
    males = [simulate_subject(50, 1, seed=s, spacing=SPACING).brain.sum() for s in range(3)]
    females = [simulate_subject(50, 2, seed=s, spacing=SPACING).brain.sum() for s in range(3)]
    ratio = np.mean(males) / np.mean(females)
    assert 1.12 < ratio < 1.26  # ~6 % linear -> ~19 % in volume


def test_deterministic_and_seed_dependent(tmp_path):
    a = simulate_subject(40, 1, seed=5, index=2, spacing=SPACING)
    b = simulate_subject(40, 1, seed=5, index=2, spacing=SPACING)
    c = simulate_subject(40, 1, seed=6, index=2, spacing=SPACING)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.brain, b.brain)
    assert not np.array_equal(a.image, c.image)

    # Whole cohorts: byte-identical files for the same seed.
    first = simulate_cohort(tmp_path / "a", 2, seed=11, spacing=SPACING, progress=False)
    second = simulate_cohort(tmp_path / "b", 2, seed=11, spacing=SPACING, progress=False)
    other = simulate_cohort(tmp_path / "c", 2, seed=12, spacing=SPACING, progress=False)
    pd.testing.assert_frame_equal(first, second)
    assert not first["AGE"].equals(other["AGE"])
    for name in ("IXI-T1/SIM001-SIM-0001-T1.nii.gz", "masks/SIM002-SIM-0002-T1_mask.nii.gz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    assert not (tmp_path / "a" / "lesions").exists()


def test_global_torch_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    simulate_subject(30, 2, seed=0, spacing=SPACING)
    assert torch.equal(torch.rand(3), expected)


def test_explicit_grid():
    sub = simulate_subject(30, 1, seed=0, shape=(40, 44, 36), spacing=(5.0, 5.0, 6.0))
    assert sub.image.shape == sub.brain.shape == sub.lesion.shape == (40, 44, 36)
    assert np.allclose(nib.affines.voxel_sizes(sub.affine), (5.0, 5.0, 6.0))
    assert nib.aff2axcodes(sub.affine) == ("P", "S", "R")
    assert sub.brain.any()


def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "cohort"
    simulate_cohort(out, 3, seed=0, spacing=SPACING, progress=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        simulate_cohort(out, 2, seed=1, spacing=SPACING, progress=False)
    assert len(list((out / "IXI-T1").iterdir())) == 3  # untouched

    table = simulate_cohort(out, 2, seed=1, spacing=SPACING, progress=False, force=True)
    assert len(table) == 2
    assert sorted(p.name for p in (out / "IXI-T1").iterdir()) == [
        "SIM001-SIM-0001-T1.nii.gz", "SIM002-SIM-0002-T1.nii.gz"]  # the stale SIM003 is gone
    assert len(list((out / "masks").iterdir())) == 2
    assert (out / "notes.txt").read_text() == "mine"  # other files are kept
    assert len(pd.read_csv(out / "demographics.csv")) == 2


def test_empty_existing_dir_is_fine_and_bad_arguments(tmp_path):
    (tmp_path / "empty").mkdir()
    simulate_cohort(tmp_path / "empty", 1, spacing=(8.0, 8.0, 8.0), progress=False)
    assert (tmp_path / "empty" / "demographics.csv").exists()
    for kwargs in ({"n_subjects": 0}, {"lesion_fraction": 1.5}, {"spacing": (2.0, 2.0)}, {"shape": (10, 10)}):
        args = {"n_subjects": 1, **kwargs}
        with pytest.raises(BrainVAEError):
            simulate_cohort(tmp_path / "bad", progress=False, **args)
    assert not (tmp_path / "bad").exists()
