"""The prepared slice store: one folder per dataset, written once, read memory-mapped.

Layout of ``datasets/<name>/``::

    images.npy      (N, H, W) float32 in [0, 1], background 0
    brain.npy       (N, H, W) uint8 brain mask
    lesion.npy      (N, H, W) uint8 lesion mask (only for data with lesion masks)
    manifest.csv    one row per slice: subject, hospital, age, sex, split,
                    slice_index, position, brain_fraction, lesion_fraction, source, checksum
    subjects.csv    one row per volume, with per-volume preprocessing numbers
    prepare.toml    the resolved PrepareConfig
    provenance.json package versions, source folder, date, counts, timing
    problems.txt    volumes skipped and why, demographics issues
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import PrepareConfig, load_config, save_config
from ..errors import BrainVAEError
from ..io.atomic import atomic_dir

ARRAYS = ("images", "brain", "lesion")


def write_store(path: Path, arrays: dict[str, np.ndarray], manifest: pd.DataFrame, subjects: pd.DataFrame,
                cfg: PrepareConfig, provenance: dict, problems: list[str], *, force: bool = False) -> Path:
    """Write a complete store atomically: nothing appears under ``path`` unless all of it was written."""
    n = len(manifest)
    for name, arr in arrays.items():
        if name not in ARRAYS or arr.shape[0] != n:
            raise ValueError(f"array {name} with {arr.shape[0]} rows for {n} manifest rows")
    with atomic_dir(path, force=force) as tmp:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        manifest.to_csv(tmp / "manifest.csv", index=False)
        subjects.to_csv(tmp / "subjects.csv", index=False)
        save_config(cfg, tmp / "prepare.toml")
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
        (tmp / "problems.txt").write_text("".join(f"{p}\n" for p in problems))
    return Path(path)


@dataclass
class SliceStore:
    """Read access to a prepared store; arrays are memory-mapped, never copied whole."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not (self.path / "manifest.csv").exists() or not (self.path / "images.npy").exists():
            raise BrainVAEError(f"{self.path}: not a brainvae slice store (no manifest.csv / images.npy); "
                                "create one with `brainvae data prepare`")

    @cached_property
    def config(self) -> PrepareConfig:
        return load_config(PrepareConfig, self.path / "prepare.toml")

    @cached_property
    def manifest(self) -> pd.DataFrame:
        return pd.read_csv(self.path / "manifest.csv", dtype={"subject": str})

    @cached_property
    def subjects(self) -> pd.DataFrame:
        return pd.read_csv(self.path / "subjects.csv", dtype={"subject": str})

    def array(self, name: str) -> np.ndarray:
        """``images``, ``brain`` or ``lesion`` as a read-only memory map (N, H, W)."""
        file = self.path / f"{name}.npy"
        if not file.exists():
            raise BrainVAEError(f"{self.path}: this store has no {name} masks")
        return np.load(file, mmap_mode="r")

    @property
    def images(self) -> np.ndarray:
        return self.array("images")

    @property
    def has_lesions(self) -> bool:
        return (self.path / "lesion.npy").exists()

    def indices(self, split: str | None = None) -> np.ndarray:
        """Row indices of one split (``train``/``val``/``test``) or of all slices."""
        if split is None:
            return np.arange(len(self.manifest))
        return np.flatnonzero(self.manifest["split"].to_numpy() == split)

    def __len__(self) -> int:
        return len(self.manifest)
