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

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import PrepareConfig, load_config, save_config
from ..errors import BrainVAEError, InputFileError
from ..io.atomic import atomic_dir



# The store's arrays and their types on disk (lesion only in stores with lesion masks).
ARRAY_DTYPES = {"images": np.float32, "brain": np.uint8, "lesion": np.uint8}


class NpyAppender:
    """Writes an (N, H, W) ``.npy`` file block by block; N is known only at the end.

    A fixed-size header is reserved and filled in by ``close``, so slices go to
    disk as volumes finish instead of being concatenated in memory.
    """

    HEADER_BYTES = 128

    def __init__(self, path: Path, dtype, frame_shape: tuple[int, ...]):
        self.path, self.dtype, self.frame_shape, self.n = Path(path), np.dtype(dtype), tuple(frame_shape), 0
        self.file = open(self.path, "wb", buffering=0)  # blocks are large; append_file writes to the descriptor
        self.file.write(b"\0" * self.HEADER_BYTES)

    def append(self, block: np.ndarray) -> None:
        if tuple(block.shape[1:]) != self.frame_shape:
            raise ValueError(f"{self.path.name}: block of shape {block.shape}, expected (n, *{self.frame_shape})")
        self.file.write(np.ascontiguousarray(block, dtype=self.dtype).data)
        self.n += len(block)

    def append_file(self, part: Path, n: int) -> None:
        """Append ``n`` frames held as raw bytes in ``part`` (``write_part``), copied by the kernel where it can."""
        size = part.stat().st_size
        if size != n * self.dtype.itemsize * int(np.prod(self.frame_shape)):
            raise ValueError(f"{part.name}: {size} bytes, expected {n} frames of {self.frame_shape} {self.dtype}")
        with open(part, "rb") as src:
            copied = 0
            try:
                while copied < size:
                    step = os.copy_file_range(src.fileno(), self.file.fileno(), size - copied)
                    if step == 0:
                        raise OSError("copy_file_range copied nothing")
                    copied += step
            except (AttributeError, OSError):  # not Linux, or a file system without it: copy through Python
                src.seek(copied)
                shutil.copyfileobj(src, self.file)
        self.n += n

    def close(self) -> None:
        header = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                       "shape": (self.n, *self.frame_shape)})
        text = header.ljust(self.HEADER_BYTES - 10 - 1) + "\n"  # magic(6) + version(2) + length(2)
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1"))
        self.file.close()


class StoreWriter:
    """Build a store in a temporary folder that replaces ``path`` only when ``finish`` succeeded.

        with StoreWriter(path, (H, W), lesions=True, force=False) as w:
            w.add(images, brain, lesion)        # per volume, (n, H, W) each
            w.finish(manifest, subjects, cfg, provenance, problems)
    """

    def __init__(self, path: Path, frame_shape: tuple[int, int], *, lesions: bool, force: bool = False):
        self.path, self.frame_shape, self.lesions, self.force = Path(path), tuple(frame_shape), lesions, force

    def __enter__(self) -> "StoreWriter":
        self._dir = atomic_dir(self.path, force=self.force)
        tmp = self._dir.__enter__()
        self.tmp = tmp
        self.arrays = {name: NpyAppender(tmp / f"{name}.npy", dtype, self.frame_shape)
                       for name, dtype in ARRAY_DTYPES.items() if name != "lesion" or self.lesions}
        self.finished = False
        return self

    def add(self, images: np.ndarray, brain: np.ndarray, lesion: np.ndarray | None = None) -> None:
        self.arrays["images"].append(images)
        self.arrays["brain"].append(brain)
        if self.lesions:
            self.arrays["lesion"].append(lesion if lesion is not None else np.zeros_like(brain))

    @property
    def parts(self) -> Path:
        """Where worker processes leave their volumes' pixels (``write_part``) for ``add_part``."""
        folder = self.tmp / "parts"
        folder.mkdir(exist_ok=True)
        return folder

    def add_part(self, files: dict[str, Path], n: int) -> None:
        """Append the ``n`` slices that ``write_part`` left in ``files``, and delete those files."""
        for name, appender in self.arrays.items():
            if name in files:
                appender.append_file(files[name], n)
                files[name].unlink()
            else:  # a volume without a lesion mask, in a store with lesion masks
                appender.append(np.zeros((n, *self.frame_shape), np.uint8))

    def finish(self, manifest: pd.DataFrame, subjects: pd.DataFrame, cfg: PrepareConfig, provenance: dict,
               problems: list[str]) -> None:
        if len(manifest) != self.arrays["images"].n:
            raise ValueError(f"{len(manifest)} manifest rows for {self.arrays['images'].n} slices")
        manifest.to_csv(self.tmp / "manifest.csv", index=False)
        subjects.to_csv(self.tmp / "subjects.csv", index=False)
        save_config(cfg, self.tmp / "prepare.toml")
        (self.tmp / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
        (self.tmp / "problems.txt").write_text("".join(f"{p}\n" for p in problems))
        shutil.rmtree(self.tmp / "parts", ignore_errors=True)
        self.finished = True

    def __exit__(self, exc_type, exc, tb) -> bool:
        for appender in self.arrays.values():
            appender.close()
        if exc_type is None and not self.finished:
            exc = RuntimeError("StoreWriter closed without finish()")
            self._dir.__exit__(RuntimeError, exc, None)  # discards the temporary folder
            raise exc
        self._dir.__exit__(exc_type, exc, tb)  # renames into place, or discards on error
        return False


def write_part(folder: Path, key: str, images: np.ndarray, brain: np.ndarray,
               lesion: np.ndarray | None = None) -> dict[str, Path]:
    """One volume's slices as raw files in ``folder`` (``StoreWriter.parts``), for ``StoreWriter.add_part``: a
    worker process hands its pixels over through the disk cache instead of pickling them through a pipe (20 %
    faster on 2 cores, benchmarks/README.md)."""
    files = {}
    for name, array in (("images", images), ("brain", brain), ("lesion", lesion)):
        if array is not None:
            files[name] = folder / f"{key}.{name}"
            with open(files[name], "wb", buffering=0) as f:
                f.write(np.ascontiguousarray(array, dtype=ARRAY_DTYPES[name]).data)
    return files


def write_store(path: Path, arrays: dict[str, np.ndarray], manifest: pd.DataFrame, subjects: pd.DataFrame,
                cfg: PrepareConfig, provenance: dict, problems: list[str], *, force: bool = False) -> Path:
    """Write a complete store from in-memory arrays (atomically)."""
    with StoreWriter(path, arrays["images"].shape[1:], lesions="lesion" in arrays, force=force) as w:
        w.add(arrays["images"], arrays["brain"], arrays.get("lesion"))
        w.finish(manifest, subjects, cfg, provenance, problems)
    return Path(path)


MANIFEST_COLUMNS = ("subject", "split", "age", "sex", "position")  # what training and evaluation read
NUMERIC_COLUMNS = ("age", "position")


def _read_csv(file: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(file, dtype={"subject": str})
    except FileNotFoundError:
        raise InputFileError(file, "missing; prepare the store again") from None
    except (ValueError, UnicodeDecodeError) as exc:  # empty, unparsable or binary
        raise InputFileError(file, f"not a readable CSV table ({exc})") from None


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
        file = self.path / "manifest.csv"
        table = _read_csv(file)
        missing = [c for c in MANIFEST_COLUMNS if c not in table.columns]
        if missing:
            raise InputFileError(file, f"missing column(s) {', '.join(missing)}; prepare the store again")
        for column in NUMERIC_COLUMNS:
            if not pd.api.types.is_numeric_dtype(table[column]):
                raise InputFileError(file, f"column {column!r} holds non-numbers; prepare the store again")
        return table

    @cached_property
    def subjects(self) -> pd.DataFrame:
        return _read_csv(self.path / "subjects.csv")

    def array(self, name: str) -> np.ndarray:
        """``images``, ``brain`` or ``lesion`` as a read-only memory map (N, H, W), one per manifest row."""
        file = self.path / f"{name}.npy"
        if not file.exists():
            raise BrainVAEError(f"{self.path}: this store has no {name} masks")
        try:
            array = np.load(file, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:  # truncated, or not a .npy file
            raise InputFileError(file, f"not a readable .npy array ({exc}); prepare the store again") from None
        if array.ndim != 3 or len(array) != len(self.manifest):
            raise InputFileError(file, f"holds an array of shape {array.shape}, but manifest.csv lists "
                                       f"{len(self.manifest)} slices; prepare the store again")
        return array

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

    def age_range(self, split: str = "train") -> list[float] | None:
        """[youngest, oldest] known age of a split's subjects, or None when no age is known."""
        ages = self.manifest["age"].iloc[self.indices(split)].dropna() if "age" in self.manifest else []
        return [float(ages.min()), float(ages.max())] if len(ages) else None

    def __len__(self) -> int:
        return len(self.manifest)

    def fingerprint(self) -> str:
        """Identifies the store's content cheaply: SHA-256 of its tables and prep config (the manifest carries
        every source volume's checksum) and of 8 evenly spaced slices. A moved store keeps it; a store
        prepared from other volumes or with other settings gets another."""
        digest = hashlib.sha256()
        for name in ("manifest.csv", "subjects.csv", "prepare.toml"):
            if (self.path / name).exists():
                digest.update((self.path / name).read_bytes())
        images = self.images
        digest.update(repr(images.shape).encode())
        for i in np.linspace(0, len(images) - 1, num=min(8, len(images)), dtype=int):
            digest.update(np.ascontiguousarray(images[i]).tobytes())
        return digest.hexdigest()
