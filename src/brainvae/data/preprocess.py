"""From one 3-D volume to normalised 2-D slices: pure functions, one volume at a time.

Pipeline (``prepare_volume``):
  load + header checks (nibabel) -> brain mask (given, or the image's support)
  -> optional N4 bias-field correction (SimpleITK)
  -> optional affine registration to the MNI152 2009 template (SimpleITK)
  -> ONE resampling (SimpleITK, linear) onto an output grid that is aligned with
     RAS, has the requested spacing, is centred on the brain and already laid
     out as (slice, row, col) in the display convention below
  -> intensity normalisation by robust percentiles inside the brain -> [0, 1]
  -> skull stripping (background 0) -> slice selection.

Display convention, used everywhere in brainvae: rows run from anterior (axial)
or superior (coronal, sagittal) at the top; columns show the patient's right on
the image's left for axial and coronal slices (radiological convention) and
anterior on the left for sagittal slices. Slices are ordered inferior ->
superior (axial), posterior -> anterior (coronal), right -> left (sagittal).
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..config import PrepareConfig
from ..errors import InputFileError
from ..io.download import file_sha256
from ..io.nifti import Volume, load_mask, load_volume
from ..io.scan import Scan

# Output grid axes (col, row, slice) as directions in SimpleITK's LPS world.
_GRID_DIRECTIONS = {
    "axial": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),  # col -> patient left, row -> posterior, slice -> superior
    "coronal": ((1, 0, 0), (0, 0, -1), (0, -1, 0)),  # col -> left, row -> inferior, slice -> anterior
    "sagittal": ((0, 1, 0), (0, 0, -1), (1, 0, 0)),  # col -> posterior, row -> inferior, slice -> left
}


# Plausible brain MRI: voxel sizes (mm per axis), the brain's extent (mm per axis) and the share of the
# volume it fills. Outside these a volume is skipped and reported, not turned into slices without anatomy.
VOXEL_MM = (0.05, 20.0)
BRAIN_EXTENT_MM = (30.0, 300.0)
MAX_BRAIN_FRACTION = 0.9


def implausible_voxels(zooms: tuple[float, float, float]) -> str | None:
    """Why these voxel sizes cannot be a brain MRI's, or None."""
    lo, hi = VOXEL_MM
    if all(lo <= z <= hi for z in zooms):
        return None
    return (f"implausible voxel size {' x '.join(f'{z:g}' for z in zooms)} mm "
            f"(expected {lo:g} to {hi:g} mm per axis; is the header's unit wrong?)")


def implausible_brain(data: np.ndarray, brain: np.ndarray, zooms: tuple[float, float, float]) -> str | None:
    """Why this volume and its brain mask do not look like a brain scan (constant intensity, a mask that fills
    the whole field of view, a brain far too small or too large), or None."""
    sub = brain[::2, ::2, ::2]  # the contrast check reads every second voxel per axis: a check, not the normalisation
    values = data[::2, ::2, ::2][sub] if sub.any() else data[brain]
    lo, hi = np.percentile(values, (1, 99))
    if hi <= lo:
        return f"no contrast inside the brain (intensity {lo:g} almost everywhere)"
    fraction = brain.mean()
    if fraction > MAX_BRAIN_FRACTION:
        return f"the brain mask covers {100 * fraction:.0f} % of the volume (expected a head inside a larger field of view)"
    extent = np.array([np.ptp(np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))) + 1
                       for axis in range(3)]) * np.asarray(zooms)
    lo_mm, hi_mm = BRAIN_EXTENT_MM
    if extent.min() < lo_mm or extent.max() > hi_mm:
        return (f"implausible brain extent {' x '.join(f'{e:.0f}' for e in extent)} mm "
                f"(expected {lo_mm:g} to {hi_mm:g} mm per axis)")
    return None


@dataclass
class PreparedVolume:
    """The selected slices of one volume, ready for the store."""

    slices: np.ndarray  # (n, H, W) float32 in [0, 1]
    brain: np.ndarray  # (n, H, W) uint8 brain mask
    lesion: np.ndarray | None  # (n, H, W) uint8 lesion mask, or None
    slice_index: np.ndarray  # (n,) index in the output grid along the axis
    position: np.ndarray  # (n,) position within the brain's extent, 0..1
    brain_fraction: np.ndarray  # (n,) fraction of the slice that is brain
    checksum: str  # sha256 of the source image file
    stats: dict  # per-volume numbers for the manifest (percentiles, N4, registration)


def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image with the geometry of a nibabel (X, Y, Z) array and RAS affine."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))  # sitk wants (Z, Y, X)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    img.SetSpacing(tuple(float(z) for z in zooms))
    img.SetDirection(tuple((ras_to_lps @ (affine[:3, :3] / zooms)).ravel()))
    img.SetOrigin(tuple(ras_to_lps @ affine[:3, 3]))
    return img


def foreground_mask(data: np.ndarray) -> np.ndarray:
    """Support of an image: voxels above a small fraction of its robust maximum, holes filled.

    Used as the brain mask of skull-stripped data (BraTS), and as a head mask
    when no brain mask is given (then intensities are normalised over the head).
    """
    p99 = np.percentile(data[data > 0], 99) if np.any(data > 0) else 0.0
    mask = data > 0.05 * p99
    mask = ndimage.binary_opening(mask, iterations=1)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask)


def n4_correct(image: sitk.Image, mask: sitk.Image, *, target_mm: float = 10.0, iterations=(50, 40, 30)) -> sitk.Image:
    """N4 bias-field correction (Tustison et al. 2010), fitted on a copy shrunk to about ``target_mm`` voxels
    and applied at full resolution. The field is smooth: fitting at 10 mm corrects as much as at 4 mm (the
    benchmark's top/mid white-matter ratio 0.780 against 0.777) at a tenth of the time (benchmarks/README.md)."""
    shrink = [max(1, int(round(target_mm / s))) for s in image.GetSpacing()]
    small = sitk.Shrink(image, shrink)
    small_mask = sitk.Shrink(mask, shrink)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(iterations))
    n4.Execute(small, small_mask)
    log_bias = n4.GetLogBiasFieldAsImage(image)
    return image / sitk.Exp(log_bias)


# The MNI152 2009 T1 brain template as nilearn ships it (``nilearn.datasets.load_mni152_template``: this
# file over its maximum; its brain mask: the template above 0.2), read from nilearn's package data without
# importing nilearn (2 s, in every worker process).
MNI152_FILE = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI152_BRAIN_THRESHOLD = 0.2


@functools.lru_cache(maxsize=1)
def mni_template(spacing_mm: float = 2.0) -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    """The MNI152 2009 T1 brain template shipped inside nilearn (no download) at ``spacing_mm``, its brain
    mask on the same grid, and its brain centre (LPS mm)."""
    import importlib.util

    import nibabel as nib

    t1 = nib.load(Path(importlib.util.find_spec("nilearn").submodule_search_locations[0]) / MNI152_FILE)
    data = t1.get_fdata(dtype=np.float32)
    data /= data.max()
    m = data > MNI152_BRAIN_THRESHOLD
    image = to_sitk(data, t1.affine)
    mask_image = to_sitk(m.astype(np.uint8), t1.affine)
    factor = max(1, int(round(spacing_mm)))
    image = sitk.Shrink(sitk.SmoothingRecursiveGaussian(image, 0.5 * factor), [factor] * 3)
    mask_image = sitk.Resample(mask_image, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    centre_ras = (t1.affine @ np.append(np.argwhere(m).mean(axis=0), 1.0))[:3]
    return image, mask_image, np.array([-centre_ras[0], -centre_ras[1], centre_ras[2]])


# A registered brain whose normalised correlation with the template (inside the template's brain) is below
# this is taken as a failed registration: reported and skipped, not stored misaligned. Measured on the 124
# shared IXI T1 volumes: 0.435-0.62 (mean 0.54) registered; 0.30-0.33 for the same brains upside down (the
# registration cannot recover a 180 degree turn), about -0.06 for a registration 4 cm off.
MIN_TEMPLATE_CORRELATION = 0.38
# Registration pyramid: shrink factors of the template's 2 mm grid (8 mm, then 4 mm; an affine needs no finer
# level), and the margin (template voxels) around the template's brain where the metric is sampled: the
# brain's outline is most of what aligns a skull-stripped brain.
PYRAMID = (4, 2)
MASK_MARGIN = 4


def _level(image: sitk.Image, factor: int, mask: bool = False) -> sitk.Image:
    """One pyramid level: smoothed (sigma = factor / 2 voxels) and shrunk by ``factor``; masks only shrunk."""
    if factor == 1:
        return image
    if not mask:
        image = sitk.SmoothingRecursiveGaussian(image, 0.5 * factor * image.GetSpacing()[0])
    return sitk.Shrink(image, [factor] * 3)


@functools.lru_cache(maxsize=4)
def _template_pyramid(shrink: tuple[int, ...]) -> list[tuple[sitk.Image, sitk.Image]]:
    """(template, sampling mask) per level: the template's brain and a margin of MASK_MARGIN voxels around it."""
    fixed, fixed_mask, _ = mni_template()
    around = sitk.BinaryDilate(fixed_mask, [MASK_MARGIN] * 3)
    return [(_level(fixed, f), _level(around, f, mask=True)) for f in shrink]


def _register_level(fixed: sitk.Image, mask: sitk.Image, moving: sitk.Image, transform: sitk.Transform,
                    iterations: int, sampling: float, seed: int) -> float:
    """Optimise ``transform`` in place on one pyramid level (Mattes mutual information, sampled at random
    inside ``mask``); returns the final metric. The images come pre-shrunk: ITK's own pyramid filters the
    full-size images at every level, which cost more than the optimisation."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricFixedMask(mask)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, seed + 1)  # ITK reads a seed of 0 as 'from the clock'
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=iterations,
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed, moving)
    return float(reg.GetMetricValue())


def register_to_mni(image: sitk.Image, mask: sitk.Image, *, seed: int = 0, sampling: float = 0.2,
                    shrink: tuple[int, ...] = PYRAMID, iterations: int = 200) -> tuple[sitk.Transform, float, float]:
    """Affine registration of a brain (masked) image to the MNI152 template.

    Initialised by moments, then a rigid stage and an affine stage, each over the pyramid ``shrink``
    (template voxels), with Mattes mutual information sampled at random around the template's brain.
    Returns the transform (MNI -> image, SimpleITK's convention), the final metric and the normalised
    correlation of the registered brain with the template inside the template's brain
    (``template_correlation``), the check that the registration did not fail.
    """
    fixed, _, _ = mni_template()
    moving = sitk.Cast(image, sitk.sitkFloat32) * sitk.Cast(mask, sitk.sitkFloat32)
    factor = [max(1, int(round(fixed.GetSpacing()[0] / s))) for s in moving.GetSpacing()]
    if max(factor) > 1:  # work at the template's spacing: a finer moving image only costs time
        moving = sitk.Shrink(sitk.SmoothingRecursiveGaussian(moving, 0.5 * fixed.GetSpacing()[0]), factor)
    levels = [(f, m, _level(moving, s)) for (f, m), s in zip(_template_pyramid(tuple(shrink)), shrink)]
    rigid = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS))
    for f, m, mv in levels:
        _register_level(f, m, mv, rigid, iterations, sampling, seed)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    for f, m, mv in levels:
        metric = _register_level(f, m, mv, affine, iterations, sampling, seed)
    return affine, metric, template_correlation(moving, affine)


def template_correlation(moving: sitk.Image, transform: sitk.Transform) -> float:
    """Pearson correlation of ``moving`` resampled onto the template with the template, inside its brain."""
    fixed, fixed_mask, _ = mni_template()
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    inside = sitk.GetArrayViewFromImage(fixed_mask) > 0
    a = sitk.GetArrayViewFromImage(warped)[inside].astype(np.float64)
    b = sitk.GetArrayViewFromImage(fixed)[inside].astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def output_grid(centre_lps: np.ndarray, axis: str, size: int, spacing: float, first: int, n_slices: int) -> sitk.Image:
    """A reference grid of ``size x size`` pixels and ``n_slices`` slices starting at grid index ``first``.

    The full grid is a cube of ``size`` slices centred on ``centre_lps``;
    only slices ``first .. first + n_slices - 1`` are built.
    """
    direction = np.array(_GRID_DIRECTIONS[axis], dtype=float).T  # columns: col, row, slice axes
    half = spacing * (size - 1) / 2.0
    origin = centre_lps - direction @ np.array([half, half, half]) + direction[:, 2] * spacing * first
    ref = sitk.Image(size, size, n_slices, sitk.sitkFloat32)
    ref.SetSpacing((spacing,) * 3)
    ref.SetDirection(tuple(direction.ravel()))
    ref.SetOrigin(tuple(origin))
    return ref


def _interpolate_axis(data: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """``data`` linearly interpolated at continuous indices ``coords`` along ``axis``, with ITK's border
    rules: inside is [-0.5, n - 0.5) (the half voxel past each end takes the edge value), outside is 0."""
    n = data.shape[axis]
    inside = (coords >= -0.5) & (coords < n - 0.5)
    c = np.clip(coords, 0, n - 1)
    lo = np.minimum(np.floor(c).astype(np.intp), max(n - 2, 0))
    frac = c - lo
    shape = [1, 1, 1]
    shape[axis] = -1
    out = np.take(data, lo, axis=axis)
    out *= np.where(inside, 1 - frac, 0).astype(np.float32).reshape(shape)
    upper = np.take(data, np.minimum(lo + 1, n - 1), axis=axis)
    upper *= np.where(inside, frac, 0).astype(np.float32).reshape(shape)
    out += upper
    return out


def _axis_aligned(affine: np.ndarray, ref: sitk.Image, tol: float = 1e-6) -> list[tuple[int, np.ndarray]] | None:
    """Per voxel axis of an image with RAS ``affine``: the ``ref`` axis it follows and the image's continuous
    indices at that axis's grid points, when every ``ref`` axis runs along one voxel axis (None otherwise:
    oblique grids)."""
    to_lps = np.diag([-1.0, -1.0, 1.0])
    inv = np.linalg.inv(to_lps @ affine[:3, :3])  # LPS mm -> voxel index
    a = inv @ np.array(ref.GetDirection()).reshape(3, 3) @ np.diag(ref.GetSpacing())  # index = a @ ref index + b
    b = inv @ (np.array(ref.GetOrigin()) - to_lps @ affine[:3, 3])
    big = np.abs(a) > tol * np.abs(a).max()
    if not (big.sum(axis=0) == 1).all() or not (big.sum(axis=1) == 1).all():
        return None
    axes = []
    for i in range(3):
        r = int(np.flatnonzero(big[i])[0])
        axes.append((r, a[i, r] * np.arange(ref.GetSize()[r]) + b[i]))
    return axes


def resample_to_grid(data: np.ndarray, affine: np.ndarray, ref: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """The (X, Y, Z) volume ``data`` with RAS ``affine`` linearly resampled onto ``ref`` through ``transform``
    (grid point -> image point), as a float32 (slice, row, col) array, 0 outside the image: what
    ``sitk.Resample`` gives.

    Without a transform and with ``ref``'s axes parallel to the voxel axes (any order and sign: the usual case
    without registration), trilinear interpolation is three 1-D ones, each two gathers along one axis: 5x
    faster than ITK on one thread (benchmarks/README.md, prepare speed)."""
    axes = _axis_aligned(affine, ref) if transform.GetName() == "Transform" else None
    if axes is None:
        image = to_sitk(data.astype(np.float32, copy=False), affine)
        return sitk.GetArrayFromImage(sitk.Resample(image, ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    # Lay the voxels out as ref's (slice, row, col) first (the input is the smaller array); each step below
    # then keeps that layout.
    order = [next(i for i in range(3) if axes[i][0] == r) for r in (2, 1, 0)]
    data = np.ascontiguousarray(data.transpose(order), dtype=np.float32)
    coords = [axes[i][1] for i in order]

    def cost(axis_order) -> int:  # voxels written by the three steps in this order
        shape, total = list(data.shape), 0
        for q in axis_order:
            shape[q] = len(coords[q])
            total += int(np.prod(shape))
        return total

    for q in min(itertools.permutations(range(3)), key=cost):
        data = _interpolate_axis(data, coords[q], q)
    return data


def grid_geometry(ref: sitk.Image, first: int, transform: sitk.Transform) -> str:
    """JSON of the output grid's slab (``ref``, whose slice 0 is grid slice ``first``) and the transform
    (grid point -> scan point, SimpleITK's convention for ``Resample``); ``parse_geometry`` reads it back."""
    affine = transform.GetName() == "AffineTransform"
    return json.dumps({
        "origin": list(ref.GetOrigin()), "direction": list(ref.GetDirection()), "spacing": list(ref.GetSpacing()),
        "size": list(ref.GetSize()), "first": int(first),
        "transform": {"type": "affine" if affine else "identity",
                      "parameters": list(transform.GetParameters()) if affine else [],
                      "fixed": list(transform.GetFixedParameters()) if affine else []}})


def _brain_slice_range(points_lps: np.ndarray, centre_lps: np.ndarray, axis: str, size: int, spacing: float) -> tuple[int, int]:
    """Grid slice indices [first, last] that the brain points cover, clipped to the cube."""
    normal = np.array(_GRID_DIRECTIONS[axis][2], dtype=float)
    offsets = (points_lps - centre_lps) @ normal / spacing + (size - 1) / 2.0
    first = int(np.clip(np.floor(offsets.min()), 0, size - 1))
    last = int(np.clip(np.ceil(offsets.max()), 0, size - 1))
    return first, last


def _voxels_to_lps(mask: np.ndarray, affine: np.ndarray, stride: int = 2) -> np.ndarray:
    ijk = np.argwhere(mask[::stride, ::stride, ::stride]) * stride
    ras = ijk @ affine[:3, :3].T + affine[:3, 3]
    return ras * np.array([-1.0, -1.0, 1.0])


def normalise(volume: np.ndarray, brain: np.ndarray, percentiles: tuple[float, float]) -> tuple[np.ndarray, float, float]:
    """Map robust percentiles inside the brain to [0, 1], clipping outside them."""
    lo, hi = (float(v) for v in np.percentile(volume[brain], percentiles))
    if hi <= lo:
        hi = lo + 1e-6
    out = np.subtract(volume, lo, dtype=np.float32)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out), lo, hi


def select_slices(brain: np.ndarray, first: int, cfg: PrepareConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices into ``brain`` (n, H, W) that pass the slice-selection rules, with positions and brain fractions."""
    fraction = brain.reshape(len(brain), -1).mean(axis=1)
    has_brain = np.flatnonzero(fraction > 0)
    if len(has_brain) == 0:
        return np.array([], dtype=int), np.array([]), np.array([])
    lo_k, hi_k = has_brain[0], has_brain[-1]
    position = (np.arange(len(brain)) - lo_k) / max(hi_k - lo_k, 1)
    keep = (fraction >= max(cfg.min_brain, 1e-9)) & (position >= cfg.position_range[0]) & (position <= cfg.position_range[1])
    if cfg.index_range is not None:
        grid_index = first + np.arange(len(brain))
        keep &= (grid_index >= cfg.index_range[0]) & (grid_index < cfg.index_range[1])
    keep = np.flatnonzero(keep)
    return keep, position[keep], fraction[keep]


def match_resolution(image: sitk.Image, fwhm_mm: float) -> sitk.Image:
    """Gaussian-smooth ``image`` so that its effective resolution is about ``fwhm_mm`` on every axis.

    A voxel of size s is treated as a point spread of FWHM s; the extra smoothing per
    axis has FWHM sqrt(fwhm^2 - s^2) (zero where the voxels are already that coarse).
    """
    fwhm = [max(fwhm_mm ** 2 - s ** 2, 0.0) ** 0.5 for s in image.GetSpacing()]
    sigma = [f / (8 * np.log(2)) ** 0.5 for f in fwhm]  # FWHM = 2.3548 sigma, in mm
    if max(sigma) == 0:
        return image
    smoothed = image
    for axis, s in enumerate(sigma):  # one axis at a time: the recursive filter takes one sigma per call
        if s > 0:
            f = sitk.RecursiveGaussianImageFilter()
            f.SetSigma(s)
            f.SetDirection(axis)
            smoothed = f.Execute(smoothed)
    return smoothed


def prepare_volume(scan: Scan, cfg: PrepareConfig) -> PreparedVolume:
    """Run the whole per-volume pipeline (see the module docstring)."""
    vol = load_volume(scan.image)
    if problem := implausible_voxels(vol.zooms):
        raise InputFileError(scan.image, problem)
    stats: dict = {}
    if scan.mask is not None and cfg.skull_strip:
        brain = load_mask(scan.mask, vol)
        stats["mask_source"] = "given"
    else:
        brain = foreground_mask(vol.data)
        stats["mask_source"] = "image support" if scan.dataset == "brats" else "head (no brain mask)"
        if not brain.any():
            raise InputFileError(scan.image, "no foreground found to normalise")
    if problem := implausible_brain(vol.data, brain, vol.zooms):
        given = f" (brain mask {scan.mask.name})" if stats["mask_source"] == "given" else ""
        raise InputFileError(scan.image, problem + given)
    lesion = load_mask(scan.lesion, vol, what="lesion mask") if scan.lesion is not None else None

    data = vol.data  # (X, Y, Z) on vol.affine's grid throughout
    if cfg.n4 or cfg.resolution_mm is not None or cfg.register:  # the ITK steps
        image = to_sitk(data, vol.affine)
        mask_img = to_sitk(brain.astype(np.uint8), vol.affine)
        if cfg.n4:
            image = n4_correct(image, mask_img)
        if cfg.resolution_mm is not None:
            image = match_resolution(image, cfg.resolution_mm)
        data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    spacing = cfg.voxel_mm
    if cfg.register:
        transform, metric, correlation = register_to_mni(image, mask_img, seed=cfg.seed)
        stats.update(registration_metric=metric, template_correlation=correlation)
        if correlation < MIN_TEMPLATE_CORRELATION:
            raise InputFileError(scan.image, f"registration to the MNI template failed: the registered brain "
                                 f"correlates {correlation:.2f} with the template (below "
                                 f"{MIN_TEMPLATE_CORRELATION}); check the volume's orientation and brain mask")
        _, _, centre = mni_template()
        # The template's brain fills a known slab; map the subject's brain into MNI to find it.
        inverse = transform.GetInverse()
        points = np.array([inverse.TransformPoint(tuple(p)) for p in _voxels_to_lps(brain, vol.affine, stride=4)])
    else:
        transform = sitk.Transform()  # identity
        points = _voxels_to_lps(brain, vol.affine)
        centre = points.mean(axis=0)
    first, last = _brain_slice_range(points, centre, cfg.axis, cfg.size, spacing)
    ref = output_grid(centre, cfg.axis, cfg.size, spacing, first, last - first + 1)
    stats["grid"] = grid_geometry(ref, first, transform)  # to put maps back on the scan (data.to_source)

    def resample(array: np.ndarray) -> np.ndarray:
        return resample_to_grid(array, vol.affine, ref, transform)  # (n_slices, H, W)

    grid_image = resample(data)
    grid_brain = resample(brain) > 0.5
    if not grid_brain.any():
        raise InputFileError(scan.image, "the brain falls outside the output field of view")
    slices, lo, hi = normalise(grid_image, grid_brain, cfg.percentiles)
    if cfg.skull_strip:
        slices *= grid_brain
    stats.update(p_lo=lo, p_hi=hi)
    keep, position, fraction = select_slices(grid_brain, first, cfg)
    grid_lesion = None
    if lesion is not None:
        grid_lesion = (resample(lesion) > 0.5).astype(np.uint8)[keep]
    return PreparedVolume(
        slices=slices[keep],
        brain=grid_brain[keep].astype(np.uint8),
        lesion=grid_lesion,
        slice_index=first + keep,
        position=position.astype(np.float32),
        brain_fraction=fraction.astype(np.float32),
        checksum=file_sha256(scan.image),
        stats=stats,
    )
