"""Preprocessing, slice selection, splits and the slice store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from brainvae.config import PrepareConfig, load_config, save_config
from brainvae.data.prepare import prepare_dataset
from brainvae.data.preprocess import normalise, prepare_volume, select_slices
from brainvae.data.split import assign_splits
from brainvae.data.store import SliceStore
from brainvae.errors import BrainVAEError, OutputExistsError
from brainvae.io.scan import Scan, find_scans

from conftest import head_phantom, psr_affine, write_nifti

TINY = PrepareConfig(size=16, spacing=6.0, min_brain=0.05)


def _marker_scan(tmp_path, marker_ras_sign):
    """A head stored PSR with a bright marker displaced towards ``marker_ras_sign`` (R, A, S signs)."""
    shape = (24, 24, 20)
    image, brain = head_phantom(shape)
    affine = psr_affine(shape)
    world = np.array(marker_ras_sign, float) * 25.0  # mm, inside the 0.7-radius brain
    ijk = np.round(np.linalg.solve(affine[:3, :3], world - affine[:3, 3])).astype(int)
    image[tuple(slice(c - 1, c + 2) for c in ijk)] = 1000.0
    img = write_nifti(tmp_path / "IXI001-HH-0001-T1.nii.gz", image, affine)
    mask = write_nifti(tmp_path / "m" / "IXI001-HH-0001-T1_mask.nii.gz", brain, affine)
    return Scan("IXI001", img, "T1", "ixi", "HH", mask=mask)


@pytest.mark.parametrize("axis, expect", [
    # marker at patient right-anterior-superior; where it must appear (row half, col half, slice half)
    ("axial", ("top", "left", "high")),  # anterior up, patient right on the image left, superior = later slice
    ("coronal", ("top", "left", "high")),  # superior up, right on the left, anterior = later slice
    ("sagittal", ("top", "left", "low")),  # superior up, anterior on the left, right = earlier slice
])
def test_display_convention(tmp_path, axis, expect):
    scan = _marker_scan(tmp_path, (1, 1, 1))
    pv = prepare_volume(scan, PrepareConfig(size=24, spacing=4.0, axis=axis, min_brain=0.0,
                                                skull_strip=False, percentiles=(0.0, 100.0)))
    k, r, c = np.unravel_index(np.argmax(pv.slices), pv.slices.shape)
    grid_k = pv.slice_index[k]
    assert ("top" if r < 12 else "bottom") == expect[0]
    assert ("left" if c < 12 else "right") == expect[1]
    assert ("low" if grid_k < 12 else "high") == expect[2]


def test_prepare_volume_normalises_inside_brain(tmp_path):
    scan = _marker_scan(tmp_path, (0, 0, 0))
    pv = prepare_volume(scan, TINY)
    assert pv.slices.dtype == np.float32 and pv.slices.shape[1:] == (16, 16)
    assert pv.slices.min() >= 0 and pv.slices.max() <= 1
    assert np.all(pv.slices[pv.brain == 0] == 0)  # skull-stripped background is 0
    assert np.all(pv.brain_fraction >= TINY.min_brain)
    assert len(pv.checksum) == 64


def test_normalise_percentiles():
    vol = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    brain = np.ones_like(vol, bool)
    out, lo, hi = normalise(vol, brain, (1, 99))
    assert lo == pytest.approx(9.99) and hi == pytest.approx(989.01)
    assert out.min() == 0 and out.max() == 1 and out[5, 0, 0] == pytest.approx((500 - lo) / (hi - lo))


def test_select_slices_rules():
    brain = np.zeros((10, 4, 4), bool)
    brain[2:8, :2, :2] = True  # 25 % brain in slices 2..7
    brain[2, 0, 1:] = False  # slice 2 has less brain
    keep, pos, frac = select_slices(brain, first=0, cfg=PrepareConfig(min_brain=0.2))
    assert list(keep) == [3, 4, 5, 6, 7]
    keep, pos, _ = select_slices(brain, first=0, cfg=PrepareConfig(min_brain=0.0, position_range=(0.4, 1.0)))
    assert list(keep) == [4, 5, 6, 7] and pos[0] == pytest.approx(0.4)
    keep, _, _ = select_slices(brain, first=10, cfg=PrepareConfig(min_brain=0.0, index_range=(13, 15)))
    assert list(keep) == [3, 4]


def _subjects(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"sex": rng.choice(["M", "F", None], n, p=[0.45, 0.45, 0.1]),
                         "age": np.where(rng.random(n) < 0.1, np.nan, rng.uniform(20, 85, n))},
                        index=[f"S{i:03d}" for i in range(n)])


def test_split_ratios_determinism_and_strata():
    subjects = _subjects()
    split = assign_splits(subjects, (0.7, 0.15, 0.15), (40, 60), seed=1)
    assert split.notna().all()
    counts = split.value_counts()
    assert abs(counts["train"] - 42) <= 2 and abs(counts["val"] - 9) <= 2 and abs(counts["test"] - 9) <= 2
    assert split.equals(assign_splits(subjects, (0.7, 0.15, 0.15), (40, 60), seed=1))
    assert not split.equals(assign_splits(subjects, (0.7, 0.15, 0.15), (40, 60), seed=2))
    # both sexes reach the test split
    assert set(subjects.loc[split == "test", "sex"].dropna()) == {"M", "F"}


def test_split_small_cohort_fills_every_split():
    split = assign_splits(_subjects(3), (0.8, 0.1, 0.1), (40, 60), seed=0)
    assert sorted(split) == ["test", "train", "val"]


def test_prepare_dataset_store_round_trip(ixi_folder, tmp_path):
    inv = find_scans(ixi_folder)
    out = prepare_dataset(inv, tmp_path / "store", TINY, workers=2, progress=False)
    store = SliceStore(out)
    m = store.manifest
    assert store.images.shape == (len(m), 16, 16) and store.images.dtype == np.float32
    assert store.array("brain").shape == store.images.shape
    assert not store.has_lesions
    # no subject crosses splits, and every slice carries its subject's metadata
    assert (m.groupby("subject")["split"].nunique() == 1).all()
    assert set(m.columns) >= {"subject", "hospital", "age", "sex", "split", "slice_index", "position",
                              "brain_fraction", "source", "checksum"}
    assert m.loc[m.subject == "IXI002", "age"].iloc[0] == 40.0
    assert store.config == TINY
    assert sorted(q.name for q in out.iterdir()) == ["brain.npy", "images.npy", "manifest.csv", "prepare.toml",
                                                     "problems.txt", "provenance.json", "subjects.csv"]
    assert len(store.indices("train")) + len(store.indices("val")) + len(store.indices("test")) == len(store)
    # an existing store is never overwritten without force
    with pytest.raises(OutputExistsError):
        prepare_dataset(inv, out, TINY, progress=False)
    prepare_dataset(inv, out, TINY, workers=1, force=True, progress=False)
    assert np.array_equal(SliceStore(out).images, store.images)  # deterministic


@pytest.mark.parametrize("where", ["source", "inside the source", "above the source", "masks"])
def test_prepare_refuses_an_output_that_overlaps_its_inputs(ixi_folder, tmp_path, where):
    out = {"source": ixi_folder, "inside the source": ixi_folder / "store", "above the source": tmp_path,
           "masks": ixi_folder / "masks"}[where]
    before = {p: p.read_bytes() for p in ixi_folder.rglob("*") if p.is_file()}
    with pytest.raises(BrainVAEError, match=f"{out}: the output"):
        prepare_dataset(find_scans(ixi_folder), out, TINY, workers=1, force=True, progress=False)
    assert {p: p.read_bytes() for p in ixi_folder.rglob("*") if p.is_file()} == before


def test_prepare_skips_bad_volume_or_fails_strict(ixi_folder, tmp_path):
    bad = ixi_folder / "IXI-T1" / "IXI003-HH-1003-T1.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    inv = find_scans(ixi_folder)
    out = prepare_dataset(inv, tmp_path / "store", TINY, workers=2, progress=False)  # errors cross processes
    assert "IXI003" not in set(SliceStore(out).manifest.subject)
    assert "IXI003-HH-1003-T1.nii.gz: truncated or corrupt gzip" in (out / "problems.txt").read_text()
    with pytest.raises(BrainVAEError, match="IXI003-HH-1003-T1.nii.gz"):
        prepare_dataset(inv, tmp_path / "strict", TINY, workers=1, strict=True, progress=False)
    assert not (tmp_path / "strict").exists()  # nothing half-written


def test_implausible_volumes_are_skipped_and_reported(ixi_folder, tmp_path):
    shape = (24, 24, 20)
    images = ixi_folder / "IXI-T1"
    write_nifti(images / "IXI003-HH-1003-T1.nii.gz", np.full(shape, 50.0, np.float32), psr_affine(shape))
    image, brain = head_phantom(shape, seed=4)
    write_nifti(images / "IXI004-Guys-1004-T1.nii.gz", image, psr_affine(shape, zoom=400_000.0))  # 400 m voxels
    write_nifti(ixi_folder / "masks" / "IXI004-Guys-1004-T1_mask.nii.gz", brain, psr_affine(shape, zoom=400_000.0))
    tiny, _ = head_phantom(shape, seed=5)
    write_nifti(images / "IXI005-HH-1005-T1.nii.gz", tiny, psr_affine(shape, zoom=0.5))  # a 8 mm 'brain'
    write_nifti(ixi_folder / "masks" / "IXI005-HH-1005-T1_mask.nii.gz", brain, psr_affine(shape, zoom=0.5))

    out = prepare_dataset(find_scans(ixi_folder), tmp_path / "s", TINY, workers=1, progress=False)
    problems = (out / "problems.txt").read_text()
    assert "IXI003-HH-1003-T1.nii.gz: no contrast inside the brain" in problems
    assert "IXI004-Guys-1004-T1.nii.gz: implausible voxel size 400000 x 400000 x 400000 mm" in problems
    assert "IXI005-HH-1005-T1.nii.gz: implausible brain extent" in problems
    assert set(SliceStore(out).manifest.subject) == {"IXI001", "IXI002", "IXI006"}


def test_constant_volume_without_mask_is_not_a_full_field_brain(tmp_path):
    shape = (24, 24, 20)
    path = write_nifti(tmp_path / "flat.nii.gz", np.full(shape, 7.0, np.float32), psr_affine(shape))
    with pytest.raises(BrainVAEError, match="flat.nii.gz: no contrast inside the brain"):
        prepare_volume(Scan("flat", path, "T1", "nifti"), TINY)
    image, _ = head_phantom(shape)
    image[image == 0] = 30.0  # a 'head' that fills the whole field of view
    path = write_nifti(tmp_path / "full.nii.gz", image, psr_affine(shape))
    with pytest.raises(BrainVAEError, match=r"full.nii.gz: the brain mask covers 9\d % of the volume"):
        prepare_volume(Scan("full", path, "T1", "nifti"), TINY)


def test_empty_mask_is_reported(ixi_folder, tmp_path):
    mask = ixi_folder / "masks" / "IXI002-Guys-1002-T1_mask.nii.gz"
    shape = (24, 24, 20)
    write_nifti(mask, np.zeros(shape, np.uint8), psr_affine(shape))
    out = prepare_dataset(find_scans(ixi_folder), tmp_path / "s", TINY, workers=1, progress=False)
    assert "empty brain mask" in (out / "problems.txt").read_text()


def test_lesion_masks_are_carried(tmp_path):
    case = tmp_path / "brats" / "Brats18_X_1"
    shape = (24, 24, 20)
    image, brain = head_phantom(shape)
    image = image * brain  # skull-stripped like BraTS
    seg = np.zeros(shape, np.int16)
    seg[10:14, 10:14, 8:12] = 2
    for mod, arr in (("t1", image), ("seg", seg)):
        write_nifti(case / f"Brats18_X_1_{mod}.nii.gz", arr, np.diag([4.0, 4.0, 4.0, 1.0]))
    out = prepare_dataset(find_scans(tmp_path / "brats"), tmp_path / "s", TINY, workers=1, progress=False)
    store = SliceStore(out)
    assert store.has_lesions and store.array("lesion").sum() > 0
    assert store.manifest["lesion_fraction"].max() > 0
    from brainvae.report.figures import save_store_montage

    png = save_store_montage(store, tmp_path / "show.png", per_subject=3)
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(BrainVAEError, match="no slices for subject"):
        save_store_montage(store, tmp_path / "x.png", subjects=["nobody"])


def test_config_toml_round_trip_and_validation(tmp_path):
    cfg = PrepareConfig(axis="coronal", size=64, index_range=(3, 40))
    save_config(cfg, tmp_path / "c.toml")
    assert load_config(PrepareConfig, tmp_path / "c.toml") == cfg
    (tmp_path / "bad.toml").write_text('axsi = "axial"\n')
    with pytest.raises(BrainVAEError, match="unknown key"):
        load_config(PrepareConfig, tmp_path / "bad.toml")
    with pytest.raises(BrainVAEError, match="axis must be one of"):
        PrepareConfig(axis="oblique")


def test_npy_appender_writes_a_loadable_array(tmp_path):
    from brainvae.data.store import NpyAppender

    a = NpyAppender(tmp_path / "x.npy", np.float32, (3, 4))
    blocks = [np.random.default_rng(i).random((n, 3, 4)) for i, n in enumerate((2, 0, 5))]
    for b in blocks:
        a.append(b)
    a.close()
    out = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert out.shape == (7, 3, 4) and out.dtype == np.float32
    assert np.allclose(out, np.concatenate(blocks).astype(np.float32))
    with pytest.raises(ValueError, match="expected"):
        NpyAppender(tmp_path / "y.npy", np.uint8, (3, 4)).append(np.zeros((1, 4, 3)))


def test_store_parts_from_workers_land_in_order(tmp_path):
    """Worker processes leave each volume's pixels as raw part files; the writer appends them in order, fills
    a missing lesion mask with zeros, deletes the parts and refuses a part of the wrong size."""
    from brainvae.data.store import StoreWriter, write_part

    rng = np.random.default_rng(0)
    vols = [(rng.random((n, 4, 5)).astype(np.float32), rng.random((n, 4, 5)) > 0.5) for n in (3, 2)]
    lesion = rng.random((3, 4, 5)) > 0.8
    manifest = pd.DataFrame({"subject": ["a"] * 3 + ["b"] * 2})
    with StoreWriter(tmp_path / "s", (4, 5), lesions=True) as w:
        first = write_part(w.parts, "0", vols[0][0], vols[0][1], lesion)
        second = write_part(w.parts, "1", vols[1][0], vols[1][1])
        w.add_part(first, 3)
        w.add_part(second, 2)
        assert not any(f.exists() for f in (*first.values(), *second.values()))
        with pytest.raises(ValueError, match="expected 4 frames"):
            w.add_part(write_part(w.parts, "2", vols[1][0], vols[1][1]), 4)
        assert [a.n for a in w.arrays.values()] == [5, 5, 5]  # refused before anything was appended
        w.finish(manifest, manifest, PrepareConfig(), {}, [])
    images, brain, lesions = (np.load(tmp_path / "s" / f"{n}.npy") for n in ("images", "brain", "lesion"))
    assert np.array_equal(images, np.concatenate([v[0] for v in vols]))
    assert np.array_equal(brain, np.concatenate([v[1] for v in vols]).astype(np.uint8))
    assert np.array_equal(lesions, np.concatenate([lesion, np.zeros((2, 4, 5), bool)]).astype(np.uint8))
    assert not (tmp_path / "s" / "parts").exists()


def test_match_resolution_blurs_fine_voxels_only():
    import SimpleITK as sitk

    from brainvae.data.preprocess import match_resolution

    vol = np.zeros((20, 20, 20), np.float32)
    vol[:, :, 10:] = 1.0  # a sharp edge along the last numpy axis (sitk x)
    fine = sitk.GetImageFromArray(vol)
    fine.SetSpacing((1.0, 1.0, 1.0))
    smooth = sitk.GetArrayFromImage(match_resolution(fine, 2.0))
    assert np.abs(np.diff(smooth[10, 10])).max() < 0.6 * np.abs(np.diff(vol[10, 10])).max()
    assert smooth.sum() == pytest.approx(vol.sum(), rel=0.02)  # smoothing keeps the mean intensity
    coarse = sitk.GetImageFromArray(vol)
    coarse.SetSpacing((2.0, 2.0, 2.0))
    assert np.array_equal(sitk.GetArrayFromImage(match_resolution(coarse, 2.0)), vol)  # already that coarse


def test_bids_layout_is_prepared_into_a_store(tmp_path):
    """sub-*/[ses-*/]anat/*_<suffix>.nii.gz with participants.tsv: one scan per subject (its first session), subject
    ids from the BIDS entities, masks matched by entities; problems.txt lists what the store lacks."""
    root, shape = tmp_path / "bids", (24, 24, 20)
    image, brain = head_phantom(shape)
    for rel in ("sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
                "sub-01/ses-1/anat/sub-01_ses-1_T2w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz",
                "sub-03/anat/sub-03_run-1_T1w.nii.gz", "sub-04/anat/sub-04_T2w.nii.gz"):
        write_nifti(root / rel, image, psr_affine(shape))
    write_nifti(tmp_path / "masks" / "sub-02_desc-brain_mask.nii.gz", brain, psr_affine(shape))
    (root / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t25\tM\nsub-02\tn/a\tfemale\n"
                                           "sub-03\t61\tn/a\n")

    inv = find_scans(root, "T1", masks=tmp_path / "masks")
    assert inv.dataset == "bids" and inv.demographics == root / "participants.tsv"
    assert [(s.subject, s.image.name, s.age, s.sex) for s in inv.scans] == [
        ("sub-01", "sub-01_ses-1_T1w.nii.gz", 25.0, "M"), ("sub-02", "sub-02_T1w.nii.gz", None, "F"),
        ("sub-03", "sub-03_run-1_T1w.nii.gz", 61.0, None)]
    assert [s.mask.name if s.mask else None for s in inv.scans] == [None, "sub-02_desc-brain_mask.nii.gz", None]
    assert [s.subject for s in find_scans(root, "T2").scans] == ["sub-01", "sub-04"]

    out = prepare_dataset(inv, tmp_path / "store", TINY, workers=1, progress=False)
    m = SliceStore(out).manifest
    assert set(m.subject) == {"sub-01", "sub-02", "sub-03"} and (m.groupby("subject")["split"].nunique() == 1).all()
    assert set(m.loc[m.subject == "sub-01", "source"]) == {str(inv.scans[0].image)}
    problems = (out / "problems.txt").read_text().splitlines()
    assert "sub-01: 2 T1w images (sessions or runs); using ses-1/anat/sub-01_ses-1_T1w.nii.gz, not " \
           "ses-2/anat/sub-01_ses-2_T1w.nii.gz" in problems
    assert "sub-04: no T1w image in anat/" in problems
    assert "age unknown in participants.tsv: 1 of 3 subjects: sub-02" in problems
    assert "sex unknown in participants.tsv: 1 of 3 subjects: sub-03" in problems
    assert any(p.startswith("no skull stripping (no brain mask") and p.endswith("2 of 3 subjects: sub-01, sub-03")
               for p in problems)


def test_prepare_names_the_demographics_file_and_its_expected_columns(ixi_folder, tmp_path):
    from typer.testing import CliRunner

    from brainvae.cli import app

    bad = tmp_path / "people.csv"
    bad.write_text("name,years,gender\nIXI001,30,F\n")
    r = CliRunner().invoke(app, ["data", "prepare", str(ixi_folder), "--out", str(tmp_path / "s"),
                                 "--demographics", str(bad)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{bad}: missing column(s) subject, age; expected a subject column (participant_id, subject, subject_id, id " \
           "or IXI_ID), age (years) and sex" in " ".join(r.output.split())


def test_brats_validation_release_without_segmentations_keeps_each_patient_in_one_split(tmp_path):
    shape = (24, 24, 20)
    for c in range(3):
        case = tmp_path / "brats" / f"Brats18_V_{c}"
        image, brain = head_phantom(shape, seed=c)
        for mod in ("t1", "t1ce", "t2", "flair"):
            write_nifti(case / f"{case.name}_{mod}.nii.gz", image * brain, np.diag([4.0, 4.0, 4.0, 1.0]))
    out = prepare_dataset(find_scans(tmp_path / "brats"), tmp_path / "s", TINY, workers=1, progress=False)
    m = SliceStore(out).manifest
    assert sorted(m["subject"].unique()) == ["Brats18_V_0", "Brats18_V_1", "Brats18_V_2"]
    assert m.groupby("subject")["split"].nunique().max() == 1 and not SliceStore(out).has_lesions


def _template_subject(tmp_path, turn: bool = False, shift_mm: float = 0.0):
    """The MNI template itself as a subject's T1 and brain mask (2 mm), shifted ``shift_mm`` to the patient's
    right, or turned upside down (a 180 degree turn about the left-right axis)."""
    import SimpleITK as sitk

    from brainvae.data.preprocess import mni_template

    fixed, mask, _ = mni_template()
    image = sitk.GetArrayFromImage(fixed).transpose(2, 1, 0)  # (X, Y, Z) in LPS order of the sitk grid
    brain = sitk.GetArrayFromImage(mask).transpose(2, 1, 0).astype(np.float32)
    if turn:
        image, brain = image[:, ::-1, ::-1].copy(), brain[:, ::-1, ::-1].copy()
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)  # the sitk grid's index -> RAS mm
    affine[:3, :3] = lps_to_ras @ np.reshape(fixed.GetDirection(), (3, 3)) @ np.diag(fixed.GetSpacing())
    affine[:3, 3] = lps_to_ras @ np.array(fixed.GetOrigin()) + [shift_mm, 0, 0]
    img = write_nifti(tmp_path / "IXI002-HH-0002-T1.nii.gz", image, affine)
    msk = write_nifti(tmp_path / "m" / "IXI002-HH-0002-T1_mask.nii.gz", brain, affine)
    return Scan("IXI002", img, "T1", "ixi", "HH", mask=msk)


def test_registration_brings_a_shifted_brain_back_onto_the_template(tmp_path):
    from brainvae.data.preprocess import MIN_TEMPLATE_CORRELATION

    scan = _template_subject(tmp_path, shift_mm=12.0)
    cfg = PrepareConfig(size=32, spacing=6.0, min_brain=0.0, register=True, n4=False)
    moved = prepare_volume(scan, cfg)
    assert moved.stats["template_correlation"] > 0.9 > MIN_TEMPLATE_CORRELATION
    still = prepare_volume(_template_subject(tmp_path / "still"), cfg)  # the template unmoved: the same slices
    assert np.array_equal(moved.slice_index, still.slice_index)
    assert np.abs(moved.slices - still.slices).mean() < 0.02


def test_registration_is_repeatable(tmp_path):
    """The metric's random samples come from a fixed seed (ITK reads a seed of 0 as 'from the clock'): on one
    thread, as in prepare's workers, the same volume registers to the same transform every time."""
    import SimpleITK as sitk

    from brainvae.data.preprocess import register_to_mni, to_sitk
    from brainvae.io.nifti import load_mask, load_volume

    scan = _template_subject(tmp_path, shift_mm=12.0)
    vol = load_volume(scan.image)
    image, mask = to_sitk(vol.data, vol.affine), to_sitk(load_mask(scan.mask, vol).astype(np.uint8), vol.affine)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        first, second = (register_to_mni(image, mask, iterations=20)[0].GetParameters() for _ in range(2))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    assert first == second


def test_a_registration_that_fails_is_reported_not_stored(tmp_path):
    scan = _template_subject(tmp_path, turn=True)
    with pytest.raises(BrainVAEError, match="registration to the MNI template failed.*IXI002|IXI002.*registration"):
        prepare_volume(scan, PrepareConfig(size=32, spacing=6.0, min_brain=0.0, register=True, n4=False))


def _dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("register", [False, True])
def test_maps_on_the_grid_go_back_onto_the_source_scan(tmp_path, register):
    """A lesion mask carried onto the store's grid and put back (``data.to_source``) lands where it was on the
    source scan: its grid, affine and axis order (PSR storage here), through the registration's inverse too."""
    import nibabel as nib

    from brainvae.data.to_source import to_source

    if register:  # the MNI template shifted 12 mm: prepare registers it back
        scan = _template_subject(tmp_path, shift_mm=12.0)
        cfg = PrepareConfig(size=96, spacing=2.0, min_brain=0.0, position_range=(0.0, 1.0), register=True, n4=False)
    else:
        shape = (40, 40, 36)
        image, brain = head_phantom(shape)
        img = write_nifti(tmp_path / "IXI003-HH-0003-T1.nii.gz", image, psr_affine(shape, zoom=3.0))
        msk = write_nifti(tmp_path / "m" / "IXI003-HH-0003-T1_mask.nii.gz", brain, psr_affine(shape, zoom=3.0))
        scan = Scan("IXI003", img, "T1", "ixi", "HH", mask=msk)
        cfg = PrepareConfig(size=48, spacing=3.0, min_brain=0.0, position_range=(0.0, 1.0), n4=False)
    source = nib.load(scan.image)
    lesion = np.zeros(source.shape, np.uint8)
    centre = np.array(source.shape) // 2
    lesion[tuple(slice(c - 4, c + 3) for c in centre + [3, -2, 2])] = 1  # an off-centre block inside the brain
    scan = Scan(scan.subject, scan.image, scan.modality, scan.dataset, scan.hospital, mask=scan.mask,
                lesion=write_nifti(tmp_path / "lesion.nii.gz", lesion, source.affine))
    prepared = prepare_volume(scan, cfg)
    assert prepared.lesion.sum() > 0
    back = to_source(prepared.lesion.astype(np.float32), prepared.slice_index, prepared.stats["grid"], scan.image,
                     nearest=True)
    assert back.shape == source.shape and np.allclose(back.affine, source.affine)
    assert _dice(back.get_fdata(), lesion) > 0.8
    # a float map too: the brain's grid intensities come back inside the source's brain
    soft = to_source(prepared.slices, prepared.slice_index, prepared.stats["grid"], scan.image)
    inside = np.asarray(nib.load(scan.mask).dataobj) > 0
    assert soft.get_fdata()[inside].mean() > 5 * soft.get_fdata()[~inside].mean()


def test_a_dataset_format_registered_outside_the_package(tmp_path, monkeypatch):
    """CONTRIBUTING.md's "Adding a dataset format", done from a test: a toy layout (one folder per case with
    ``anat.nii.gz``, ages and sexes in ``cases.json``) registered with ``register_layout``, then prepared."""
    import json

    from brainvae.io import scan as scan_module
    from brainvae.io.scan import Inventory, register_layout

    monkeypatch.setattr(scan_module, "LAYOUTS", list(scan_module.LAYOUTS))  # the registration stays in this test
    root = tmp_path / "toy"
    shape = (24, 24, 20)
    cases = {f"case{i}": {"age": 30.0 + 10 * i, "sex": "MF"[i % 2]} for i in range(3)}
    for i, case in enumerate(cases):
        image, _ = head_phantom(shape, seed=i)
        write_nifti(root / case / "anat.nii.gz", image, psr_affine(shape))
    (root / "cases.json").write_text(json.dumps(cases))

    def find(folder, modality, masks, lesions):
        info = json.loads((folder / "cases.json").read_text())
        return Inventory(folder, "toy", [Scan(c, folder / c / "anat.nii.gz", modality, "toy", age=v["age"],
                                              sex=v["sex"]) for c, v in sorted(info.items())])

    register_layout("toy", lambda folder: (folder / "cases.json").exists(), find)
    with pytest.raises(ValueError, match="twice"):
        register_layout("toy", lambda folder: False, find)
    inventory = find_scans(root)
    assert inventory.dataset == "toy" and [s.subject for s in inventory.scans] == list(cases)
    out = prepare_dataset(inventory, tmp_path / "store", TINY, workers=1, progress=False)
    subjects = SliceStore(out).subjects.set_index("subject")
    assert subjects.loc["case2", "age"] == 50.0 and subjects.loc["case1", "sex"] == "F"


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
@pytest.mark.parametrize("voxel_axes", [(0, 1, 2), (2, 0, 1)])
def test_separable_resampling_matches_itk(axis, voxel_axes):
    """Without a transform, a grid parallel to the voxel axes is resampled by three 1-D interpolations; the
    result is ITK's linear resampling (0 outside the volume, edge values in the half voxel past each end),
    whatever the order and signs of the voxel axes. An oblique volume takes ITK's path."""
    import SimpleITK as sitk

    from brainvae.data.preprocess import _axis_aligned, output_grid, resample_to_grid, to_sitk

    rng = np.random.default_rng(1)
    data = rng.random((21, 17, 13)).astype(np.float32) * 100
    affine = np.eye(4)
    affine[:3, :3] = np.diag([1.3, -0.9, 2.1])[list(voxel_axes)]  # voxel axis i runs along world axis voxel_axes[i]
    affine[:3, 3] = (-10.0, 7.0, -12.0)
    for spacing, size in ((0.7, 24), (1.9, 12)):  # finer and coarser than the voxels, partly outside the volume
        centre = np.array([8.0, -1.0, -3.0]) + rng.normal(0, 2, 3)
        ref = output_grid(centre, axis, size, spacing, 2, size - 4)
        assert _axis_aligned(affine, ref) is not None  # the separable path
        ours = resample_to_grid(data, affine, ref, sitk.Transform())
        itk = sitk.GetArrayFromImage(sitk.Resample(to_sitk(data, affine), ref, sitk.Transform(), sitk.sitkLinear,
                                                   0.0, sitk.sitkFloat32))
        assert ours.shape == itk.shape == (size - 4, size, size)
        assert (itk == 0).mean() > 0.05  # part of the grid lies outside the volume
        np.testing.assert_allclose(ours, itk, atol=1e-3)
    rotation = sitk.Euler3DTransform((0, 0, 0), 0.3, 0.2, 0.0)
    oblique = affine.copy()
    oblique[:3, :3] = np.asarray(rotation.GetMatrix()).reshape(3, 3) @ affine[:3, :3]
    ref = output_grid(np.array([8.0, -1.0, -3.0]), axis, 16, 1.0, 0, 16)
    assert _axis_aligned(oblique, ref) is None
    np.testing.assert_allclose(
        resample_to_grid(data, oblique, ref, sitk.Transform()),
        sitk.GetArrayFromImage(sitk.Resample(to_sitk(data, oblique), ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                                             sitk.sitkFloat32)), atol=1e-3)
