"""Tiny synthetic volumes written by the tests themselves (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

# Tests use tiny tensors: one thread avoids OpenMP contention on small shared machines.
torch.set_num_threads(1)

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


def make_store(path: Path, n_subjects: int = 6, slices: int = 8, size: int = 32, seed: int = 0) -> Path:
    """A tiny slice store of disc-shaped 'brains' whose radius grows with age (no preprocessing)."""
    from brainvae.config import PrepareConfig
    from brainvae.data.store import write_store

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    images, rows = [], []
    splits = ["train", "train", "train", "train", "val", "test"]
    for s in range(n_subjects):
        age, sex = 20 + 60 * s / max(n_subjects - 1, 1), "MF"[s % 2]
        for k in range(slices):
            r = 0.5 + 0.3 * age / 80 * np.sin(np.pi * (k + 1) / (slices + 1))
            img = np.clip((xx ** 2 + yy ** 2 < r ** 2) * (0.6 + 0.1 * rng.standard_normal((size, size))), 0, 1)
            images.append(img.astype(np.float32))
            rows.append({"subject": f"S{s:02d}", "hospital": "SIM", "age": age, "sex": sex,
                         "split": splits[s % len(splits)], "slice_index": k, "position": k / (slices - 1),
                         "brain_fraction": float((img > 0).mean()), "lesion_fraction": np.nan,
                         "source": "synthetic", "checksum": "0"})
    images = np.stack(images)
    manifest = pd.DataFrame(rows)
    subjects = manifest.drop_duplicates("subject")[["subject", "hospital", "age", "sex", "split"]]
    write_store(path, {"images": images, "brain": (images > 0).astype(np.uint8)}, manifest, subjects,
                PrepareConfig(size=size), {"synthetic": True}, [])
    return path


@pytest.fixture
def tiny_store(tmp_path: Path) -> Path:
    return make_store(tmp_path / "store")


def pixel_features(x):
    """A fixed stand-in for a feature net (the perceptual scores' ``ScoreBatch.features``): the image, its 3 x 3
    mean and its complement, on a grid 2x coarser: (B, 3, H/2, W/2)."""
    import torch
    from torch.nn import functional as F

    return F.avg_pool2d(torch.cat([x, F.avg_pool2d(x, 3, 1, 1), 1 - x], 1), 2)
