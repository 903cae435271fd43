"""``describe_dataset`` on a tiny synthetic IXI folder (and once on the real scans, when present)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainvae.describe import describe_dataset, mid_slices
from brainvae.errors import OutputExistsError
from brainvae.io.scan import find_scans

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAPE = (16, 16, 12)
ZOOM = 2.0
# PSR storage like IXI: axis 0 -> posterior, 1 -> superior, 2 -> right.
AFFINE = np.array([[0, 0, ZOOM, -11], [-ZOOM, 0, 0, 15], [0, ZOOM, 0, -15], [0, 0, 0, 1]], dtype=float)


def _head(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy ellipsoid 'head' and its inner 'brain' mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    r = np.sqrt((grid ** 2).sum(0))
    brain = r < 0.6
    image = np.where(brain, 100.0, np.where(r < 0.9, 50.0, 0.0)) + rng.uniform(0, 5, SHAPE) * (r < 0.9)
    return image.astype(np.float32), brain.astype(np.uint8)


def _save(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), path)


def _ixi_folder(root: Path, hospital: str = "HH", simulated_column: bool = False) -> Path:
    """Four readable subjects (IXI004 missing from the CSV), one truncated file (IXI006), IXI005 without image."""
    for i in range(1, 5):
        name = f"IXI{i:03d}-{hospital}-{i:04d}-T1"
        image, brain = _head(seed=i)
        _save(root / "IXI-T1" / f"{name}.nii.gz", image)
        _save(root / "masks" / f"{name}_mask.nii.gz", brain)
    corrupt = (root / "IXI-T1" / f"IXI001-{hospital}-0001-T1.nii.gz").read_bytes()
    (root / "IXI-T1" / f"IXI006-{hospital}-0006-T1.nii.gz").write_bytes(corrupt[: len(corrupt) // 2])
    demographics = pd.DataFrame({
        "IXI_ID": [1, 2, 3, 5, 6],
        "SEX_ID (1=m, 2=f)": [1, 2, 2, 1, 1],
        "AGE": [30.5, 40.0, None, 50.0, 60.0],
    })
    if simulated_column:
        demographics["SIMULATED"] = 1
    demographics.to_csv(root / "demographics.csv", index=False)
    return root


def test_describe_synthetic_dataset(tmp_path: Path) -> None:
    inventory = find_scans(_ixi_folder(tmp_path / "ixi"))
    out = describe_dataset(inventory, tmp_path / "describe", workers=1, progress=False, montage_subjects=2)

    names = {p.name for p in out.iterdir()}
    assert {"subjects.csv", "summary.json", "problems.txt", "index.html", "montage.png",
            "intensity_histograms.png", "age_by_sex.png", "subjects_by_hospital_sex.png",
            "field_strength.png", "geometry.png"} <= names

    summary = json.loads((out / "summary.json").read_text())
    counts = summary["counts"]
    assert counts["subjects"] == 5
    assert (counts["volumes_read"], counts["volumes_unreadable"]) == (4, 1)
    assert counts["sex"] == {"F": 2, "M": 2, "unknown": 1}
    assert counts["by_hospital_sex"] == {"HH": {"F": 2, "M": 2, "unknown": 1}}
    assert (counts["with_age"], counts["without_age"], counts["without_demographics"]) == (3, 2, 1)
    assert summary["subjects_without_images"] == ["IXI005"]
    assert summary["shapes"] == {"16x16x12": 4}
    assert summary["voxel_sizes_mm"] == {"2x2x2": 4}
    assert summary["orientations"] == {"PSR": 4}
    assert summary["age_by_sex"]["F"]["n"] == 1 and summary["age_by_sex"]["all"]["max"] == 60.0
    assert summary["simulated"] is False

    corrupt = [p for p in summary["problems"] if "IXI006-HH-0006-T1.nii.gz" in p]
    assert corrupt and "truncated" in " ".join(corrupt)
    assert "IXI006-HH-0006-T1.nii.gz" in (out / "problems.txt").read_text()
    assert any("IXI004" in p for p in summary["problems"])  # missing from the demographics

    table = pd.read_csv(out / "subjects.csv", keep_default_na=False)
    assert list(table["subject"]) == ["IXI001", "IXI002", "IXI003", "IXI004", "IXI006"]
    ixi001 = table.set_index("subject").loc["IXI001"]
    assert ixi001["dtype"] == "float32" and ixi001["field_strength_T"] == 3.0
    assert float(ixi001["brain_ml"]) == pytest.approx(_head(1)[1].sum() * ZOOM ** 3 / 1000)
    assert table.set_index("subject").loc["IXI006", "problem"] != ""

    html = (out / "index.html").read_text()
    assert html.count('src="data:image/png;base64,') == 6
    assert 'src="http' not in html and "SIMULATED" not in html
    assert "IXI006-HH-0006-T1.nii.gz" in html


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    inventory = find_scans(_ixi_folder(tmp_path / "ixi"))
    out = tmp_path / "describe"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError):
        describe_dataset(inventory, out, workers=1, progress=False, montage_subjects=0)
    assert (out / "keep.txt").read_text() == "old"
    describe_dataset(inventory, out, force=True, workers=2, progress=False, montage_subjects=0)  # in parallel
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "summary.json").read_text())["counts"]["volumes_read"] == 4
    assert not (out / "montage.png").exists()


@pytest.mark.parametrize("hospital, column", [("SIM", False), ("HH", True)])
def test_simulated_data_is_flagged(tmp_path: Path, hospital: str, column: bool) -> None:
    inventory = find_scans(_ixi_folder(tmp_path / "ixi", hospital=hospital, simulated_column=column))
    out = describe_dataset(inventory, tmp_path / "describe", workers=1, progress=False, montage_subjects=0)
    assert json.loads((out / "summary.json").read_text())["simulated"] is True
    assert 'class="notice">SIMULATED DATA' in (out / "index.html").read_text()


def test_mid_slices_follow_the_display_convention() -> None:
    """A marker at the anterior-right-superior corner of a RAS volume lands where the convention says."""
    data = np.zeros((5, 6, 7), dtype=np.float32)
    data[4, 5, 6] = 1.0  # x = right, y = anterior, z = superior (the maxima of RAS)
    slices = mid_slices(data, (1.0, 1.0, 2.0), np.array([4, 5, 6]))
    axial, aspect = slices["axial"]
    assert axial.shape == (6, 5) and aspect == 1.0 and axial[0, 0] == 1  # anterior up, right on the left
    coronal, aspect = slices["coronal"]
    assert coronal.shape == (7, 5) and aspect == 2.0 and coronal[0, 0] == 1  # superior up, right on the left
    sagittal, _ = slices["sagittal"]
    assert sagittal.shape == (7, 6) and sagittal[0, 0] == 1  # superior up, anterior on the left


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED_DATA / "ixi-t1-2mm").exists(), reason="real data in ../shared/data not present")
def test_describe_real_ixi(tmp_path: Path) -> None:
    inventory = find_scans(SHARED_DATA / "ixi-t1-2mm")
    out = describe_dataset(inventory, tmp_path / "describe", progress=False, montage_subjects=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["subjects"] == 124
    assert summary["counts"]["volumes_read"] == 124
    assert summary["orientations"] == {"PSR": 124}
