"""Tiny synthetic volumes written by the tests themselves (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# PSR storage like the IXI sagittal acquisitions: axis 0 -> posterior, 1 -> superior, 2 -> right.
PSR = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)


def psr_affine(shape: tuple[int, int, int], zoom: float = 4.0) -> np.ndarray:
    """A PSR affine with the volume centred on the world origin."""
    aff = PSR.copy()
    aff[:3, :3] *= zoom
    aff[:3, 3] = -aff[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return aff


def head_phantom(shape=(24, 24, 20), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoidal 'head' (scalp + brain) in PSR storage; returns (image, brain mask)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid ** 2).sum(0))
    brain = r < 0.7
    head = r < 0.9
    image = np.where(brain, 100.0, np.where(head, 60.0, 0.0)) + rng.normal(0, 2, shape) * head
    return image.astype(np.float32), brain.astype(np.uint8)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.fixture
def ixi_folder(tmp_path: Path) -> Path:
    """Six IXI-named subjects (two hospitals) with masks and a demographics CSV."""
    root = tmp_path / "ixi"
    shape = (24, 24, 20)
    rows = []
    for i in range(1, 7):
        hospital = "HH" if i % 2 else "Guys"
        name = f"IXI{i:03d}-{hospital}-{1000 + i}-T1"
        image, brain = head_phantom(shape, seed=i)
        write_nifti(root / "IXI-T1" / f"{name}.nii.gz", image, psr_affine(shape))
        write_nifti(root / "masks" / f"{name}_mask.nii.gz", brain, psr_affine(shape))
        rows.append({"IXI_ID": i, "SEX_ID (1=m, 2=f)": 1 + i % 2, "AGE": 20.0 + 10 * i})
    pd.DataFrame(rows).to_csv(root / "demographics.csv", index=False)
    return root
