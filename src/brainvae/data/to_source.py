"""Slices of the store's grid back onto the scan they came from: score maps a viewer opens over the original.

``prepare_volume`` resamples each scan once onto an output grid (``output_grid``) through a transform (the
registration to MNI152, or the identity); it records that geometry per subject (``preprocess.grid_geometry``,
the ``grid`` column of the store's subjects.csv). ``to_source`` inverts it: maps on the grid's slices (n, H, W)
are placed in the grid's slab, resampled onto the source scan's voxels through the inverse transform, and
returned as a NIfTI image on the source's own grid (its shape, affine and axis order), so that it opens
over the original scan in ITK-SNAP, FSLeyes or 3D Slicer.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ..errors import InputFileError
from ..io.nifti import load_image
from .preprocess import to_sitk


def parse_geometry(text: str) -> tuple[sitk.Image, int, sitk.Transform]:
    """(the grid's slab as an empty image, its first grid slice, grid -> scan transform) from
    ``preprocess.grid_geometry``."""
    g = json.loads(text)
    ref = sitk.Image([int(s) for s in g["size"]], sitk.sitkFloat32)
    ref.SetOrigin(g["origin"])
    ref.SetDirection(g["direction"])
    ref.SetSpacing(g["spacing"])
    t = g["transform"]
    if t["type"] == "affine":
        transform = sitk.AffineTransform(3)
        transform.SetFixedParameters(t["fixed"])
        transform.SetParameters(t["parameters"])
    else:
        transform = sitk.Transform()  # identity
    return ref, int(g["first"]), transform


def to_source(maps: np.ndarray, slice_index: np.ndarray, geometry: str, source: Path | str, *,
              nearest: bool = False) -> nib.Nifti1Image:
    """``maps`` (n, H, W) on grid slices ``slice_index`` (n,) of a scan prepared with ``geometry``, as an image
    on the grid of ``source`` (its shape and affine; float32, or uint8 with ``nearest`` for binary maps).
    Voxels outside the prepared slices are 0."""
    ref, first, transform = parse_geometry(geometry)
    slab = np.zeros(ref.GetSize()[::-1], np.float32)  # (slices, H, W): sitk's array order of the grid
    k = np.asarray(slice_index) - first
    if len(k) and (k.min() < 0 or k.max() >= len(slab) or maps.shape[1:] != slab.shape[1:]):
        raise ValueError(f"maps {maps.shape} at grid slices {slice_index.min()}..{slice_index.max()} do not fit "
                         f"the prepared slab {slab.shape} from slice {first}")
    slab[k] = maps
    grid = sitk.GetImageFromArray(slab)
    grid.CopyInformation(ref)

    original = load_image(Path(source))
    ras = nib.as_closest_canonical(original)  # prepare worked in this orientation (io.nifti.load_volume)
    target = to_sitk(np.zeros(ras.shape[:3], np.float32), ras.affine)
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(grid, target, transform.GetInverse(), interp, 0.0, sitk.sitkFloat32)
    data = sitk.GetArrayFromImage(out).transpose(2, 1, 0)  # (X, Y, Z) on the RAS grid
    image = nib.Nifti1Image(data.astype(np.uint8) if nearest else data, ras.affine)
    back = nib.orientations.ornt_transform(nib.io_orientation(ras.affine), nib.io_orientation(original.affine))
    image = image.as_reoriented(back)  # the source's own axis order
    if image.shape[:3] != original.shape[:3] or not np.allclose(image.affine, original.affine, atol=1e-3):
        raise InputFileError(source, "the map could not be put back on this scan's grid (its geometry changed "
                                     "since prepare?)")
    return image
