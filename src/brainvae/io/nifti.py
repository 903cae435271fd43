"""NIfTI reading with header checks, RAS reorientation and atomic saving (nibabel)."""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip
from isal.igzip_lib import IsalError

from ..errors import InputFileError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    name = Path(path).name.lower()
    return name.endswith(NIFTI_SUFFIXES) and not name.startswith(".")


def strip_nifti_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class Volume:
    """A 3-D volume reoriented to canonical RAS: ``data[i, j, k]`` runs Right, Anterior, Superior."""

    data: np.ndarray  # (X, Y, Z) float32
    affine: np.ndarray  # (4, 4) voxel -> RAS mm
    path: Path

    @property
    def zooms(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


def load_image(path: Path) -> nib.Nifti1Image:
    """Load a NIfTI image into memory (float32, scaling applied), with errors that name the file.

    A ``.gz`` is decompressed once, in memory, checking its CRC and length
    (``isal.igzip.decompress``, gzip's checks): nibabel reads only the bytes the header asks for,
    so a corrupt gzip would otherwise pass as garbage voxels. The size the
    header declares must fit in the data (a bad header must not allocate
    gigabytes). Then the data are read here, once, so any other problem is
    reported now, as a problem of this file; the header (original dtype,
    zooms) is kept.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "file not found")
    try:
        if path.name.lower().endswith(".gz"):
            raw = igzip.decompress(path.read_bytes())  # gzip's format and checks, ISA-L's speed (1.6x)
            proxy, data_bytes = _from_bytes(raw), len(raw)
        else:
            proxy, data_bytes = nib.load(path), path.stat().st_size
        _check_declared_size(proxy, data_bytes, path)
        img = nib.Nifti1Image(proxy.get_fdata(dtype=np.float32), proxy.affine, proxy.header)
    except (EOFError, gzip.BadGzipFile, zlib.error, IsalError) as exc:
        raise InputFileError(path, f"truncated or corrupt gzip ({exc})") from None
    except nib.filebasedimages.ImageFileError as exc:
        raise InputFileError(path, f"not a readable NIfTI image ({' '.join(str(exc).split())})") from None
    except MemoryError:
        raise InputFileError(path, "too large to load into memory") from None
    except (OSError, ValueError) as exc:
        raise InputFileError(path, f"cannot read image data ({' '.join(str(exc).split())})") from None
    return img


def _from_bytes(raw: bytes) -> nib.Nifti1Image:
    """A NIfTI-1 or NIfTI-2 image over the bytes of a decompressed .nii (by its header size, either byte order)."""
    sizes = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
    klass = nib.Nifti2Image if 540 in sizes else nib.Nifti1Image
    try:
        return klass.from_bytes(raw)
    except (nib.wrapstruct.WrapStructError, nib.spatialimages.HeaderDataError) as exc:
        raise nib.filebasedimages.ImageFileError(f"no valid NIfTI header ({exc})") from None


def _check_declared_size(proxy, available: int, path: Path) -> None:
    """Refuse a header whose shape and data type need more bytes than the file holds."""
    header = proxy.header
    shape = header.get_data_shape()
    itemsize = header.get_data_dtype().itemsize
    needed = int(header.get_data_offset()) + int(np.prod(shape, dtype=np.float64)) * itemsize
    if needed > available:
        raise InputFileError(path, f"the header declares {'x'.join(map(str, shape))} voxels of "
                                   f"{header.get_data_dtype()} ({needed:,} bytes) but the data hold "
                                   f"only {available:,} bytes (truncated file or corrupt header)")


def check_image(img: nib.Nifti1Image, path: Path, *, allow_empty: bool = False) -> np.ndarray:
    """Validate dimensionality, voxel sizes and values; return the data as float32 (X, Y, Z)."""
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    elif len(shape) != 3:
        raise InputFileError(path, f"expected a 3-D volume, got shape {shape} ({len(shape)}-D)")
    zooms = img.header.get_zooms()[:3]
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise InputFileError(path, f"invalid voxel sizes {tuple(float(z) for z in zooms)} in the header")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-9:
        raise InputFileError(path, "singular or non-finite affine in the header")
    data = np.asarray(img.get_fdata(dtype=np.float32))
    n_bad = int((~np.isfinite(data)).sum())
    if n_bad:
        raise InputFileError(path, f"{n_bad} NaN/Inf voxel values")
    if not allow_empty and not np.any(data):
        raise InputFileError(path, "all-zero volume")
    return data


def load_volume(path: Path, *, allow_empty: bool = False) -> Volume:
    """Load, check and reorient to canonical RAS."""
    path = Path(path)
    img = load_image(path)
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    check_image(img, path, allow_empty=allow_empty)
    ras = nib.as_closest_canonical(img)
    return Volume(np.asarray(ras.get_fdata(dtype=np.float32)), ras.affine.copy(), path)


def load_mask(path: Path, like: Volume, *, what: str = "brain mask") -> np.ndarray:
    """Load a label/mask volume on the grid of ``like`` as a bool array (label > 0).

    The mask must share its image's shape and affine: a mask from another grid
    would silently mislabel voxels.
    """
    mask = load_volume(path, allow_empty=True)
    if mask.data.shape != like.data.shape:
        raise InputFileError(path, f"{what} shape {mask.data.shape} differs from its image {like.path.name} {like.data.shape}")
    if not np.allclose(mask.affine, like.affine, atol=1e-3):
        raise InputFileError(path, f"{what} affine differs from its image {like.path.name}")
    out = mask.data > 0
    if what == "brain mask" and not out.any():
        raise InputFileError(path, "empty brain mask (no voxel > 0)")
    return out


def orientation(img_or_affine) -> str:
    affine = getattr(img_or_affine, "affine", img_or_affine)
    return "".join(nib.aff2axcodes(affine))


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, description: str = "") -> None:
    """Save atomically: nibabel writes a temporary file with the same suffix, then it is renamed.
    ``description``: the header's ``descrip`` field (at most 80 characters)."""
    path = Path(path)
    if len(description) > 80:
        raise ValueError(f"a NIfTI description holds at most 80 characters: {description!r}")
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = description
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{strip_nifti_suffix(path.name)}.tmp{os.getpid()}{suffix}")
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
