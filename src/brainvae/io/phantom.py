"""A simulated IXI-like cohort: brainvae's embedded default data.

:func:`simulate_cohort` writes SIMULATED T1-weighted head volumes, derived from
the MNI152 2009 template that nilearn ships inside its package (no download),
in the IXI folder layout::

    out_dir/IXI-T1/SIM001-SIM-0001-T1.nii.gz     int16 T1w head, PSR orientation
    out_dir/masks/SIM001-SIM-0001-T1_mask.nii.gz  uint8 brain mask (1 = brain)
    out_dir/lesions/SIM001-SIM-0001-T1_lesion.nii.gz  uint8 (only if lesion_fraction > 0)
    out_dir/demographics.csv                      IXI_ID, SEX_ID (1=m, 2=f), AGE, SIMULATED, n_lesions
    out_dir/README.txt                            what this is and how it was made

so the rest of brainvae reads it exactly like the real IXI data. None of these
volumes is a real person.

How one subject is made (:func:`simulate_subject`):

1. Tissue maps from the template: WM and GM probabilities, the brain mask,
   and CSF = mask - GM - WM (clipped at 0; includes the ventricles). The
   template's own T1 contrast, minus what the tissue maps explain, is kept as
   a faint texture (deep grey nuclei, etc.).
2. Age: the ventricles widen (a smooth displacement along the gradient of a
   blurred ventricle mask, i.e. the ventricle walls are pushed outwards, more
   with age) and the cortex thins (GM within a few mm of the outer brain
   surface partly becomes CSF, more with age).
3. Sex: males' heads are about 6 % larger on average, plus individual jitter
   (a global and a small per-axis scale).
4. Head: CSF, skull (dark tables, brighter diploe) and scalp (muscle, bright
   fat, skin) shells around a smoothed hull of the brain.
5. T1 contrast: random tissue intensities (WM > GM > CSF), optional
   ellipsoidal hypo- or hyper-intense lesions with smooth edges, then TorchIO:
   a random rigid motion (up to 8 degrees and 5 mm per axis) and a modest
   elastic deformation (``RandomAffineElasticDeformation``), a bias field
   (``RandomBiasField``) and Rician noise (the magnitude of a two-channel image
   after ``RandomNoise``).

Speed: TorchIO's motion and elastic field are computed on an 8 mm image of
coordinates and interpolated to the output grid (see :func:`_torchio_warp`);
each output voxel then samples the template once (trilinear ``grid_sample``)
at its moved, rescaled and atrophied position, so image, brain mask and lesion
mask move together and are interpolated only once. A 2 mm subject takes about
0.3 s, a 256 x 256 x 150 one about 3 s. Randomness comes from
``numpy.random.Generator`` streams seeded by ``(seed, subject index)`` and from
``torch.manual_seed`` in a forked torch RNG around the TorchIO calls, so a
cohort is reproducible bit for bit and the caller's global torch RNG is left
untouched.
"""

from __future__ import annotations

import gzip
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ..errors import BrainVAEError, InputFileError, OutputExistsError
from ..progress import bar as progress_bar
from .atomic import atomic_write_bytes

__all__ = ["simulate_cohort", "simulate_subject", "SimulatedSubject", "default_grid", "subject_name"]

IMAGE_DIR = "IXI-T1"
MASK_DIR = "masks"
LESION_DIR = "lesions"
DEMOGRAPHICS = "demographics.csv"
README = "README.txt"
SEX_COLUMN = "SEX_ID (1=m, 2=f)"
AGE_RANGE = (20.0, 86.0)

# --- anatomy constants (mm unless said otherwise) ---------------------------
_PAD_BELOW_MM = 24  # the template's field of view cuts the brainstem at z = -72
_COARSE_MM = 2.0  # grid of the smooth fields (distances, ventricle displacement)
_VENTRICLE_SIGMA_MM = 8.0  # blur of the ventricle mask whose gradient pushes the walls
_VENTRICLE_PUSH_MM = 4.0  # largest displacement at age 86 (typical subject)
# The warp x -> x + push * grad(phi) / max|grad(phi)| stays one-to-one while
# det(I + push * Hessian) > 0: its minimum over the template is 0.28 at 3 mm,
# 0.07 at 5 mm and -0.03 at 8 mm for sigma = 8 mm (it folds at 4 mm for 4 mm).
_VENTRICLE_PUSH_MAX_MM = 5.0
_THINNING_MAX = 0.45  # fraction of superficial GM turned into CSF at age 86
_THINNING_DEPTH_MM = 3.0  # e-folding depth of cortical thinning below the brain surface
# MNI152 space is larger than a native head (its brain mask holds ~1.9 L): a
# typical man is scaled by 0.935 (brain mask ~1.5 L), a typical woman by 0.88,
# so men are ~6 % larger (linear).
_SCALE_MALE, _SCALE_FEMALE = 0.935, 0.88
_MIN_SCALE, _MAX_SCALE = 0.78, 1.04  # per-axis head scale limits
_MAX_DEGREES = 8.0  # per axis
_MAX_SHIFT_MM = 5.0  # per axis
_ELASTIC_MM = 4.0
_ELASTIC_POINTS = 7
_SHELL_MAX_MM = 17.0  # outer edge of the thickest possible scalp
_WARP_GRID_MM = 8.0  # TorchIO resamples a coordinate image on this grid (see _torchio_warp)
_OUTSIDE = 1.0e4  # coordinate (mm) given to points that TorchIO moves out of its grid


def subject_name(index: int) -> str:
    """``SIM001-SIM-0001`` for ``index`` 0 (file names add ``-T1.nii.gz`` etc.)."""
    return f"SIM{index + 1:03d}-SIM-{index + 1:04d}"


# ---------------------------------------------------------------------------
# Template (loaded once per process and resolution)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Template:
    fine: torch.Tensor  # (1, 4, X, Y, Z): GM, WM, brain mask, T1 texture; RAS voxel axes
    fine_origin: np.ndarray  # MNI mm of voxel (0, 0, 0)
    fine_spacing: float
    dist: torch.Tensor  # (1, 2, X, Y, Z) on the coarse grid: signed distance to head hull, brain depth
    push: torch.Tensor  # (1, 3, X, Y, Z) on the coarse grid: unit-max ventricle push direction (RAS)
    coarse_origin: np.ndarray
    coarse_spacing: float
    centre: np.ndarray  # head centre, MNI mm
    half_extent: np.ndarray  # (3,) RAS mm: half size of a box around the centre that holds any moved head


def _decimate(vol: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return vol
    return ndi.gaussian_filter(vol, 0.42 * factor)[::factor, ::factor, ::factor].copy()


def _signed_distance(inside: np.ndarray, spacing: float) -> np.ndarray:
    """Positive outside ``inside``, negative inside, in mm (0 halfway across the edge)."""
    out = ndi.distance_transform_edt(~inside) - ndi.distance_transform_edt(inside)
    return ((out + np.where(inside, 0.5, -0.5)) * spacing).astype(np.float32)


@lru_cache(maxsize=2)
def _load_template(fine_mm: int) -> _Template:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        t1_img = datasets.load_mni152_template(resolution=1)
        gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
        wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
        brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)
        t1 = t1_img.get_fdata(dtype=np.float32)
    aff = t1_img.affine
    if not np.allclose(aff[:3, :3], np.eye(3)):
        raise BrainVAEError("unexpected MNI152 template affine in nilearn; cannot build the phantom")

    brain = (brain > 0.5).astype(np.float32)
    gm, wm = gm * brain, wm * brain
    over = np.maximum(gm + wm, 1.0)
    gm, wm = gm / over, wm / over
    csf = np.clip(brain - gm - wm, 0.0, None)
    # Template T1 contrast not explained by the tissue maps, in units of (WM - CSF).
    means = []
    for p in (csf, gm, wm):
        sel = p > 0.9
        means.append(float(t1[sel].mean()))
    model = csf * means[0] + gm * means[1] + wm * means[2]
    texture = np.clip((t1 - model) * brain / (means[2] - means[0]), -0.4, 0.4)

    pad = ((0, 0), (0, 0), (_PAD_BELOW_MM, 0))
    gm, wm, brain, csf, texture = (np.pad(v, pad) for v in (gm, wm, brain, csf, texture))
    origin1 = aff[:3, 3] - np.array([0.0, 0.0, _PAD_BELOW_MM])

    fine = np.stack([_decimate(v, fine_mm) for v in (gm, wm, brain, texture)])

    k = int(_COARSE_MM)
    brain_c = _decimate(brain, k) > 0.5
    csf_c = _decimate(csf, k)
    hull = ndi.binary_fill_holes((ndi.gaussian_filter(brain_c.astype(np.float32), 3.0 / _COARSE_MM) > 0.5) | brain_c)
    d_hull = _signed_distance(hull, _COARSE_MM)
    depth = -_signed_distance(brain_c, _COARSE_MM)

    # Ventricles: deep CSF in a central box, largest connected pieces.
    shape_c = brain_c.shape
    grid = [origin1[a] + _COARSE_MM * np.arange(shape_c[a]) for a in range(3)]
    x, y, z = np.meshgrid(*grid, indexing="ij", sparse=True)
    box = (np.abs(x) < 35) & (y > -60) & (y < 35) & (z > -20) & (z < 40)
    vent = (csf_c > 0.4) & (depth > 6) & box
    labels, n = ndi.label(vent)
    sizes = ndi.sum(vent, labels, np.arange(1, n + 1)) * _COARSE_MM**3
    vent = np.isin(labels, 1 + np.flatnonzero(sizes >= 400))
    phi = ndi.gaussian_filter(vent.astype(np.float32), _VENTRICLE_SIGMA_MM / _COARSE_MM)
    grad = np.stack(np.gradient(phi, _COARSE_MM))
    grad /= np.sqrt((grad**2).sum(0)).max()

    centre = np.array([np.mean(g[np.any(hull, axis=tuple(b for b in range(3) if b != a))][[0, -1]])
                       for a, g in enumerate(grid)])
    # Largest head (scale 1.04) after the largest rotation: three Euler angles of
    # up to 8 degrees combine to at most ~14 degrees about some axis, which moves
    # coordinate a of point p by at most |p_a| cos + |p_perp| sin of that angle.
    head = np.argwhere(d_hull <= _SHELL_MAX_MM) * _COARSE_MM + origin1 - centre
    head *= _MAX_SCALE
    theta = math.radians(_MAX_DEGREES * math.sqrt(3))
    radius2 = (head**2).sum(1)
    half_extent = np.array([
        (np.abs(head[:, a]) * math.cos(theta) + np.sqrt(radius2 - head[:, a] ** 2) * math.sin(theta)).max()
        for a in range(3)
    ]) + _MAX_SHIFT_MM + _ELASTIC_MM + _COARSE_MM

    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]  # noqa: E731
    return _Template(
        fine=as_t(fine), fine_origin=origin1, fine_spacing=float(fine_mm),
        dist=as_t(np.stack([d_hull, depth])), push=as_t(grad),
        coarse_origin=origin1, coarse_spacing=_COARSE_MM,
        centre=centre, half_extent=half_extent,
    )


def _template_for(spacing: tuple[float, float, float]) -> _Template:
    return _load_template(1 if min(spacing) < 1.5 else 2)


# ---------------------------------------------------------------------------
# Output grid (IXI-like PSR orientation)
# ---------------------------------------------------------------------------


def _psr_affine(shape, spacing, centre) -> np.ndarray:
    """Voxel -> RAS mm for axes (Posterior, Superior, Right), centred on ``centre``."""
    sp, ss, sr = spacing
    lin = np.array([[0.0, 0.0, sr], [-sp, 0.0, 0.0], [0.0, ss, 0.0]])
    mid = (np.asarray(shape, dtype=float) - 1) / 2
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = np.asarray(centre, dtype=float) - lin @ mid
    return aff


def default_grid(spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine (PSR) of a field of view that holds any simulated head.

    The field of view covers the largest head (the largest scale on every
    axis) after the largest rotation, shift and elastic displacement, centred
    on the head.
    """
    tpl = _template_for(spacing)
    half_psr = tpl.half_extent[[1, 2, 0]]  # array axes P, S, R <- world y, z, x
    shape = tuple(int(2 * math.ceil(h / sp)) for h, sp in zip(half_psr, spacing))
    return shape, _psr_affine(shape, spacing, tpl.centre)


# ---------------------------------------------------------------------------
# One subject
# ---------------------------------------------------------------------------


@dataclass
class SimulatedSubject:
    """A simulated head: ``image`` (float32, arbitrary T1 units), masks and the voxel -> RAS affine."""

    image: np.ndarray
    brain: np.ndarray  # uint8, 1 = brain
    lesion: np.ndarray  # uint8, 1 = lesion
    affine: np.ndarray  # PSR orientation
    params: dict = field(default_factory=dict)


def _seed_sequence(seed: int, *key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(int(k) for k in key))


def _sample(volume: torch.Tensor, points: torch.Tensor, origin, spacing) -> torch.Tensor:
    """Trilinear samples (C, *points.shape[:-1]) of ``volume`` (1, C, X, Y, Z) at MNI mm ``points`` (..., 3)."""
    # grid_sample wants (z, y, x) voxel indices scaled to [-1, 1]: one small matrix product.
    sizes = np.asarray(volume.shape[2:], dtype=float)
    scale = 2.0 / ((sizes - 1) * spacing)
    mat = np.zeros((3, 3))
    for out_col, axis in enumerate((2, 1, 0)):
        mat[axis, out_col] = scale[axis]
    offset = -np.asarray(origin, dtype=float)[[2, 1, 0]] * scale[[2, 1, 0]] - 1.0
    grid = torch.addmm(torch.from_numpy(offset.astype(np.float32)), points.reshape(-1, 3),
                       torch.from_numpy(mat.astype(np.float32)))
    out = F.grid_sample(volume, grid.reshape(1, -1, 1, 1, 3), mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out.reshape(volume.shape[1], *points.shape[:-1])


def _head_profile(p: dict, lo: float = -10.0, hi: float = 40.0, step: float = 0.05) -> tuple[torch.Tensor, float, float]:
    """T1 signal outside the brain against the signed distance (mm) to the head hull, as a lookup table.

    From the hull outwards: CSF, skull (dark inner table, brighter diploe,
    dark outer table), scalp (muscle, bright fat, skin), then air; the layers
    have 0.4 mm soft edges.
    """
    d = torch.arange(lo, hi + step, step, dtype=torch.float64)
    t_csf = p["csf_mm"]
    t_skull = t_csf + p["skull_mm"]
    t_scalp = t_skull + p["scalp_mm"]
    layers = [  # (outer edge of a layer, intensity of the next layer outwards)
        (t_csf, p["bone"]),
        (t_csf + 0.3 * p["skull_mm"], p["diploe"]),
        (t_csf + 0.7 * p["skull_mm"], p["bone"]),
        (t_skull, p["muscle"]),
        (t_skull + 0.35 * p["scalp_mm"], p["fat"]),
        (t_scalp - 1.0, p["skin"]),
        (t_scalp, 0.0),
    ]
    out = torch.full_like(d, p["csf"])
    prev = p["csf"]
    for edge, value in layers:
        out += (value - prev) * torch.sigmoid((d - edge) / 0.4)
        prev = value
    return out.float(), lo, step


def _head_intensity(d: torch.Tensor, p: dict) -> torch.Tensor:
    table, lo, step = _head_profile(p)
    idx = ((d - lo) * (1.0 / step)).round_().clamp_(0, table.numel() - 1).long()
    return table[idx]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _add_lesions(image, brain_p, wm, depth, pos, n_lesions, rng, spacing, p) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Blend ``n_lesions`` smooth ellipsoids into ``image``; return (image, lesion membership, descriptions).

    ``pos`` holds each voxel's position in the subject's own (unmoved) head, so
    the ellipsoids move with the anatomy.
    """
    lesion = torch.zeros_like(image)
    info = []
    r_min = max(3.0, 1.3 * max(spacing))
    for _ in range(n_lesions):
        radii = rng.uniform(r_min, max(10.0, 2 * r_min), size=3)
        ok = (wm > 0.6) & (depth > radii.max() + 2.0) & (brain_p > 0.99)
        if not bool(ok.any()):
            ok = (brain_p > 0.99) & (depth > radii.min())
        candidates = torch.nonzero(ok.flatten()).flatten().numpy()
        if candidates.size == 0:
            break
        centre_idx = np.unravel_index(int(candidates[rng.integers(candidates.size)]), image.shape)
        rot = torch.from_numpy(_random_rotation(rng).astype(np.float32))
        hyper = bool(rng.random() < 0.35)
        level = (rng.uniform(1.25, 1.5) if hyper else rng.uniform(0.35, 0.6)) * p["wm"]
        centre = pos[centre_idx]
        reach = radii.max() + 3.0 + 2 * _ELASTIC_MM  # search box, in output voxels below
        sl = tuple(slice(max(0, int(ci - math.ceil(reach / s))), int(ci + math.ceil(reach / s)) + 1)
                   for ci, s in zip(centre_idx, spacing))
        local = (pos[sl] - centre) @ rot
        rho = torch.sqrt(((local / torch.from_numpy(radii.astype(np.float32))) ** 2).sum(-1))
        member = torch.sigmoid((1.0 - rho) * float(radii.mean()) / 0.8) * brain_p[sl]
        image[sl] = image[sl] * (1 - member) + level * member
        lesion[sl] = torch.maximum(lesion[sl], member)
        info.append({"centre_voxel": [int(v) for v in centre_idx], "radii_mm": [round(float(v), 1) for v in radii],
                     "kind": "hyper" if hyper else "hypo", "relative_intensity": round(float(level / p["wm"]), 3)})
    return image, lesion, info


def _torchio_warp(shape, spacing, affine, centre) -> tuple[torch.Tensor, torch.Tensor]:
    """TorchIO's random motion, elastic deformation and bias field, sampled on the output grid.

    Returns ``(moved, bias)``: for every output voxel, the RAS position (mm,
    relative to ``centre``) in the unmoved head that it shows, and the
    multiplicative bias field. Draws from the global torch RNG (the caller
    seeds it).

    TorchIO (``RandomAffineElasticDeformation``: rotation, shift and B-spline
    elastic field in one SimpleITK resampling) is applied to an image whose
    three channels hold each voxel's own coordinates, on an 8 mm grid spanning
    the output field of view plus a margin. Linear resampling of a linear
    function is exact, so the result is TorchIO's transform itself, sampled
    every 8 mm; trilinear upsampling to the output grid adds an error of the
    order of 0.1 mm (estimated: displacements <= 4 mm vary over the ~50 mm
    between B-spline control points). Resampling the full-size image and both
    masks with SimpleITK instead took 0.7 s per 2 mm volume (and TorchIO's
    bias field 0.6 s), several times the budget of the embedded cohort. Voxels
    moved from outside the coarse grid get coordinate ``_OUTSIDE`` (they show
    background). The bias field (``RandomBiasField``, a smooth polynomial) is
    likewise computed on a coarse grid spanning the output field of view.
    """
    import torchio as tio

    shape_np = np.asarray(shape)
    # Coarse voxel c (per axis) sits on output voxel (c - 2) * k: k output voxels
    # (~8 mm) apart, with 2 extra coarse voxels beyond each face of the output grid.
    k = np.maximum(np.rint(_WARP_GRID_MM / np.asarray(spacing)), 1).astype(int)
    n_coarse = -(-(shape_np - 1) // k) + 5
    coarse_affine = affine.copy()
    coarse_affine[:3, :3] = affine[:3, :3] * k
    coarse_affine[:3, 3] = affine[:3, 3] - affine[:3, :3] @ (2 * k)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in n_coarse], indexing="ij"), axis=-1)
    coords = idx @ coarse_affine[:3, :3].T + coarse_affine[:3, 3] - centre
    coords_img = tio.ScalarImage(tensor=torch.from_numpy(coords.astype(np.float32)).permute(3, 0, 1, 2),
                                 affine=coarse_affine)
    geometry = tio.RandomAffineElasticDeformation(
        affine_kwargs={"scales": 0, "degrees": _MAX_DEGREES, "translation": _MAX_SHIFT_MM,
                       "default_pad_value": _OUTSIDE, "image_interpolation": "linear"},
        elastic_kwargs={"num_control_points": _ELASTIC_POINTS, "max_displacement": _ELASTIC_MM,
                        "locked_borders": 2, "image_interpolation": "linear"},
    )
    moved = geometry(coords_img).data  # (3, *n_coarse)
    # Coarse voxels that came from outside hold _OUTSIDE; any output voxel that
    # interpolates from one of them (even a little) is marked outside.
    valid = (moved.abs().amax(0, keepdim=True) < _OUTSIDE / 2).float()
    moved = torch.cat([moved * valid, valid])

    dense = tuple(int(v) for v in (n_coarse - 1) * k + 1)
    moved = F.interpolate(moved[None], size=dense, mode="trilinear", align_corners=True)[0]
    moved = moved[:, 2 * k[0]: 2 * k[0] + shape_np[0], 2 * k[1]: 2 * k[1] + shape_np[1],
                  2 * k[2]: 2 * k[2] + shape_np[2]]
    outside = moved[3] < 0.999
    moved = moved[:3].permute(1, 2, 3, 0).contiguous()
    moved[outside] = _OUTSIDE

    n_bias = -(-(shape_np - 1) // k) + 1
    ones = tio.ScalarImage(tensor=torch.ones(1, *n_bias), affine=coarse_affine)
    bias = tio.RandomBiasField(coefficients=0.3, order=3)(ones).data
    bias = F.interpolate(bias[None], size=tuple(int(n) for n in shape), mode="trilinear", align_corners=True)[0, 0]
    return moved, bias


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads, then restore the previous number.

    A subject is many medium-sized tensor operations: on 2 cores, one thread
    took 0.3 s per 2 mm subject against 0.2 s with two on an idle machine but
    1.0 s with two when another process kept the cores busy.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def simulate_subject(
    age: float,
    sex: int,
    *,
    seed: int = 0,
    index: int = 0,
    n_lesions: int = 0,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
) -> SimulatedSubject:
    """Simulate one head; ``sex`` is 1 (male) or 2 (female) as in IXI.

    The random draws depend only on ``(seed, index)``: two calls that differ
    only in ``age`` give the same individual (head size, intensities, motion,
    noise) at two ages, and ``n_lesions`` only adds lesions to an otherwise
    identical image. Torch runs single-threaded meanwhile (see ``_torch_threads``).
    """
    with _torch_threads(1):
        return _simulate_subject(age, sex, seed=seed, index=index, n_lesions=n_lesions, shape=shape, spacing=spacing)


def _simulate_subject(age, sex, *, seed, index, n_lesions, shape, spacing) -> SimulatedSubject:
    import torchio as tio

    spacing = tuple(float(s) for s in spacing)
    tpl = _template_for(spacing)
    if shape is None:
        shape, affine = default_grid(spacing)
    else:
        shape = tuple(int(n) for n in shape)
        affine = _psr_affine(shape, spacing, tpl.centre)

    ss_anat, ss_lesion, ss_torch = _seed_sequence(seed, 1, index).spawn(3)
    rng = np.random.default_rng(ss_anat)
    t = float(np.clip((age - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0]), 0.0, 1.0))

    # --- individual parameters (always drawn in the same order) ---
    base_scale = _SCALE_MALE if sex == 1 else _SCALE_FEMALE
    scale = np.clip(base_scale * (1 + 0.03 * rng.standard_normal()) * (1 + 0.012 * rng.standard_normal(3)),
                    _MIN_SCALE, _MAX_SCALE)
    push = float(np.clip(0.6 * rng.standard_normal() + _VENTRICLE_PUSH_MM * t**1.3 * rng.lognormal(0, 0.2),
                         -1.5, _VENTRICLE_PUSH_MAX_MM))
    thinning = float(np.clip(_THINNING_MAX * t * rng.lognormal(0, 0.2), 0.0, 0.8))
    p = {
        "wm": 1.0,
        "gm": rng.uniform(0.60, 0.72),
        "csf": rng.uniform(0.15, 0.28),
        "texture": rng.uniform(0.5, 0.9),
        "bone": rng.uniform(0.05, 0.15),
        "diploe": rng.uniform(0.35, 0.6),
        "muscle": rng.uniform(0.4, 0.55),
        "fat": rng.uniform(0.95, 1.2),
        "skin": rng.uniform(0.45, 0.6),
        "csf_mm": rng.uniform(1.5, 3.0),
        "skull_mm": rng.uniform(5.0, 8.0),
        "scalp_mm": rng.uniform(4.0, 6.5),
        "gain": rng.uniform(700.0, 1000.0),
    }
    seed_geometry, seed_noise = (int(v) for v in ss_torch.generate_state(2, dtype=np.uint32))

    # --- where each output voxel samples the template ---
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_geometry)
        pos, bias = _torchio_warp(shape, spacing, affine, tpl.centre)  # subject mm, relative to the centre
    centre = torch.from_numpy(tpl.centre.astype(np.float32))
    unscaled = (pos / torch.from_numpy(scale.astype(np.float32)) + centre).reshape(-1, 3)
    # Outside the head hull only the distance to it matters (the ventricle push
    # vanishes there); the tissue maps are sampled only inside, to save time.
    d_hull = _sample(tpl.dist[:, :1], unscaled, tpl.coarse_origin, tpl.coarse_spacing)[0]
    image = _head_intensity(d_hull, p)
    inner = torch.nonzero(d_hull < 3.0).squeeze(1)
    src = unscaled[inner]
    del unscaled
    src += push * _sample(tpl.push, src, tpl.coarse_origin, tpl.coarse_spacing).T

    gm, wm, brain_p, texture = _sample(tpl.fine, src, tpl.fine_origin, tpl.fine_spacing)
    d_in, depth = _sample(tpl.dist, src, tpl.coarse_origin, tpl.coarse_spacing)
    del src
    brain_p = brain_p.clamp(0, 1)
    gm, wm = gm.clamp(min=0) * brain_p, wm.clamp(min=0) * brain_p
    csf = (brain_p - gm - wm).clamp(min=0)
    converted = gm * thinning * torch.exp(-depth.clamp(min=0) / _THINNING_DEPTH_MM)
    gm, csf = gm - converted, csf + converted
    tissue = csf * p["csf"] + gm * p["gm"] + wm * p["wm"] + texture * p["texture"] * (p["wm"] - p["csf"])
    image[inner] = brain_p * tissue + (1 - brain_p) * _head_intensity(d_in, p)
    del tissue, gm, csf, texture, converted, d_in, d_hull

    def full(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(int(np.prod(shape)), dtype=torch.float32)
        out[inner] = values
        return out.reshape(shape)

    image = image.reshape(shape)
    brain_p = full(brain_p)
    lesion_info: list = []
    lesion = torch.zeros(shape)
    if n_lesions > 0:
        image, lesion, lesion_info = _add_lesions(image, brain_p, full(wm), full(depth), pos, n_lesions,
                                                  np.random.default_rng(ss_lesion), spacing, p)
    del wm, depth, pos

    # --- bias field and Rician noise (magnitude of a complex signal with Gaussian noise) ---
    signal = (image * bias).clamp(min=0)
    del image, bias
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_noise)
        pair = tio.ScalarImage(tensor=torch.stack([signal, torch.zeros_like(signal)]), affine=affine)
        noisy = tio.RandomNoise(std=(0.015, 0.04))(pair).data
    magnitude = torch.sqrt((noisy**2).sum(0)) * p["gain"]

    brain = brain_p > 0.5
    params = {"age": float(age), "sex": int(sex), "head_scale": [round(float(s), 4) for s in scale],
              "ventricle_push_mm": round(push, 3), "cortical_thinning": round(thinning, 3),
              "intensities": {k: round(float(v), 3) for k, v in p.items() if not k.endswith("_mm")},
              "lesions": lesion_info}
    return SimulatedSubject(
        image=magnitude.numpy().astype(np.float32, copy=False),
        brain=brain.numpy().astype(np.uint8),
        lesion=((lesion > 0.5) & brain).numpy().astype(np.uint8),
        affine=affine,
        params=params,
    )


# ---------------------------------------------------------------------------
# Cohort
# ---------------------------------------------------------------------------


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, description: str, level: int = 6) -> bytes:
    """NIfTI-1 bytes, gzipped without a timestamp (the same data give the same file)."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header["descrip"] = description.encode()[:79]
    return gzip.compress(img.to_bytes(), compresslevel=level, mtime=0)


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputFileError(out_dir, "exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise OutputExistsError(out_dir)
        # Remove a previous cohort's files (only those), so no stale subject survives.
        patterns = {IMAGE_DIR: r"SIM\d+-SIM-\d+-T1\.nii\.gz", MASK_DIR: r"SIM\d+-SIM-\d+-T1_mask\.nii\.gz",
                    LESION_DIR: r"SIM\d+-SIM-\d+-T1_lesion\.nii\.gz"}
        for sub, pattern in patterns.items():
            folder = out_dir / sub
            if folder.is_dir():
                for f in folder.iterdir():
                    if re.fullmatch(pattern, f.name):
                        f.unlink()
        for name in (DEMOGRAPHICS, README):
            (out_dir / name).unlink(missing_ok=True)


def _readme(n_subjects, seed, shape, spacing, lesion_fraction, table: pd.DataFrame) -> str:
    from .. import __version__

    n_m = int((table[SEX_COLUMN] == 1).sum())
    return f"""SIMULATED DATA - NOT REAL SUBJECTS
=================================

These {n_subjects} T1-weighted head volumes are SIMULATED by brainvae {__version__}
(brainvae.io.phantom.simulate_cohort). They are derived from the MNI152 2009
template (ICBM 2009a nonlinear symmetric T1, GM, WM and brain mask, as shipped
inside the nilearn package); no image of a real person was used or is contained
here, and the ages and sexes are random draws. Do not use them for any
scientific or clinical conclusion about real brains.

Layout (same as the IXI data set, hospital code "SIM"):
  IXI-T1/SIMnnn-SIM-nnnn-T1.nii.gz            int16 T1-weighted head, PSR orientation
  masks/SIMnnn-SIM-nnnn-T1_mask.nii.gz         uint8 brain mask (1 = brain)
  lesions/SIMnnn-SIM-nnnn-T1_lesion.nii.gz     uint8 lesion mask (only when lesion_fraction > 0)
  demographics.csv                            IXI_ID, {SEX_COLUMN}, AGE, SIMULATED, n_lesions

Generation parameters:
  n_subjects       {n_subjects}
  seed             {seed}
  grid shape       {tuple(shape)} (axes P, S, R)
  voxel size (mm)  {tuple(float(s) for s in spacing)}
  lesion_fraction  {lesion_fraction}
  subjects         {n_m} male, {n_subjects - n_m} female; ages {table['AGE'].min():.1f}-{table['AGE'].max():.1f}
                   (uniform {AGE_RANGE[0]:.0f}-{AGE_RANGE[1]:.0f}); {int((table['n_lesions'] > 0).sum())} with lesions

Model: template tissue maps (CSF = mask - GM - WM); ventricles widen and the
cortex thins with age; male heads ~6 % larger; CSF/skull/scalp shells around
the brain; random tissue intensities (WM > GM > CSF); optional ellipsoidal
hypo- or hyper-intense lesions; TorchIO random rigid motion (<= {_MAX_DEGREES:g} deg,
<= {_MAX_SHIFT_MM:g} mm), elastic deformation, bias field and Rician noise. The same
seed gives identical files.
"""


def simulate_cohort(
    out_dir: Path,
    n_subjects: int = 24,
    *,
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    lesion_fraction: float = 0.0,
    force: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Write a simulated IXI-like T1 cohort to ``out_dir`` and return its demographics.

    Args:
        out_dir: destination folder (created; must be absent or empty unless ``force``).
        n_subjects: number of simulated subjects (``SIM001`` ...).
        seed: the whole cohort (ages, sexes, anatomy, noise) follows from it.
        shape: grid (P, S, R voxels); default: a field of view that holds the whole head.
        spacing: voxel size in mm along (P, S, R); (0.9375, 0.9375, 1.2) with
            shape (256, 256, 150) mimics the official full-resolution IXI T1.
        lesion_fraction: fraction of subjects (rounded) given 1-3 lesions; when > 0,
            a lesion mask is written for every subject (all zero for healthy ones).
        force: replace a previous cohort in a non-empty ``out_dir`` (only the
            files this function writes are removed; other files are kept).
        progress: show a progress bar (see :mod:`brainvae.progress`).

    Returns:
        One row per subject: ``IXI_ID``, ``SEX_ID (1=m, 2=f)``, ``AGE``, ``SIMULATED``, ``n_lesions``.

    Raises:
        OutputExistsError: ``out_dir`` is not empty and ``force`` is false.
        BrainVAEError: invalid parameters.
    """
    out_dir = Path(out_dir)
    if isinstance(n_subjects, bool) or int(n_subjects) != n_subjects or n_subjects < 1:
        raise BrainVAEError(f"n_subjects must be a positive integer, got {n_subjects!r}")
    n_subjects = int(n_subjects)
    if len(spacing) != 3 or not all(np.isfinite(s) and 0.3 <= s <= 10 for s in spacing):
        raise BrainVAEError(f"spacing must be three voxel sizes between 0.3 and 10 mm, got {spacing!r}")
    if shape is not None and (len(shape) != 3 or not all(int(n) == n and 8 <= n <= 1024 for n in shape)):
        raise BrainVAEError(f"shape must be three integers between 8 and 1024, got {shape!r}")
    if not 0.0 <= lesion_fraction <= 1.0:
        raise BrainVAEError(f"lesion_fraction must be between 0 and 1, got {lesion_fraction!r}")
    _check_out_dir(out_dir, force)

    spacing = tuple(float(s) for s in spacing)
    grid_shape = tuple(int(n) for n in shape) if shape is not None else default_grid(spacing)[0]

    rng = np.random.default_rng(_seed_sequence(seed, 0))
    ages = np.round(rng.uniform(*AGE_RANGE, size=n_subjects), 2)
    sexes = rng.integers(1, 3, size=n_subjects)
    n_lesions = np.zeros(n_subjects, dtype=int)
    n_sick = int(round(lesion_fraction * n_subjects))
    if lesion_fraction > 0 and n_sick == 0:
        n_sick = 1
    sick = rng.choice(n_subjects, size=n_sick, replace=False)
    n_lesions[sick] = rng.integers(1, 4, size=n_sick)

    table = pd.DataFrame({
        "IXI_ID": [subject_name(i).split("-")[0] for i in range(n_subjects)],
        SEX_COLUMN: sexes.astype(int),
        "AGE": ages.astype(float),
        "SIMULATED": True,
        "n_lesions": n_lesions,
    })

    description = "brainvae SIMULATED from MNI152 2009 template; not a real subject"
    for i in progress_bar(range(n_subjects), desc="simulating cohort", unit="subject", disable=not progress):
        sub = simulate_subject(float(ages[i]), int(sexes[i]), seed=seed, index=i, n_lesions=int(n_lesions[i]),
                               shape=grid_shape, spacing=spacing)
        stem = subject_name(i) + "-T1"
        image = np.clip(np.rint(sub.image), 0, np.iinfo(np.int16).max).astype(np.int16)
        atomic_write_bytes(out_dir / IMAGE_DIR / f"{stem}.nii.gz", _nifti_bytes(image, sub.affine, description, level=1))
        atomic_write_bytes(out_dir / MASK_DIR / f"{stem}_mask.nii.gz", _nifti_bytes(sub.brain, sub.affine, description))
        if lesion_fraction > 0:
            atomic_write_bytes(out_dir / LESION_DIR / f"{stem}_lesion.nii.gz",
                               _nifti_bytes(sub.lesion, sub.affine, description))

    atomic_write_bytes(out_dir / README, _readme(n_subjects, seed, grid_shape, spacing, lesion_fraction, table).encode())
    atomic_write_bytes(out_dir / DEMOGRAPHICS, table.to_csv(index=False).encode())
    return table
