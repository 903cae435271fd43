"""Age effect: does the CSF share of a mid-brain slice grow with the requested age as it does in real brains?

With age the brain shrinks and the ventricles and sulci widen: on IXI T1 the
in-brain fraction of dark (CSF) pixels of a mid-brain axial slice roughly
doubles from the 20s to the 70s (e.g. Good et al. 2001, "A voxel-based
morphometric study of ageing in 465 normal adult human brains"). This module
measures that fraction (``csf_fraction``), fits its slope against age
(``line_fit``, per decade), and gives the slope of real slices a 95 % interval by
bootstrapping over subjects (``bootstrap_slope``; slices of one subject are
not independent). ``compare_age_effect`` puts the samples' slope beside it:
a conditional model has learnt the age effect when its slope lies inside the
real interval.

All functions are pure numpy / scipy; ``run_eval.age_effect_section`` draws the
samples and the real slices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from .stats import bootstrap_ci

AGES = (25, 35, 45, 55, 65, 75, 85)
PER_AGE = 32  # samples per age (half female, half male when the model takes sex)
POSITION = 0.5  # slice position (fraction of the brain's extent) of samples and real slices
WINDOW = 0.05  # real slices with |position - POSITION| <= WINDOW
FOREGROUND = 0.05  # brain = (intensity > FOREGROUND) with holes filled (background is 0 after skull stripping)
# CSF = in-brain pixels below this intensity. Slices are normalised so the brain's 1st / 99th intensity
# percentiles are 0 / 1. Measured on the shared IXI T1 store (2 mm Hammersmith scans, registered, 128 px;
# 374 test + val slices of 36 subjects at position 0.45-0.55): grey matter peaks near 0.68 and white matter
# near 0.93; at 2 mm CSF has no mode of its own but a low plateau from 0.05 to 0.3 (partial volume), above
# which the grey-matter flank rises. Below 0.3: a fitted 4.4 % of the brain at age 25 and 10.1 % at 75
# (x 2.3), slope +0.0115 per decade, subject-bootstrap 95 % CI 0.0076 to 0.0151. Thresholds 0.2-0.4 give the
# same picture (x 2.1-2.4 from 25 to 75). The mask made from the image (``brain_mask``) covers 98.9 % of
# the store's own brain mask there, so samples (which have no mask) and real slices are measured alike.
CSF_THRESHOLD = 0.3
N_BOOT = 2000


def brain_mask(images: np.ndarray, foreground: float = FOREGROUND) -> np.ndarray:
    """(n, H, W) -> (n, H, W) bool: pixels above ``foreground``, with enclosed holes (ventricles at 0) filled."""
    images = np.asarray(images)
    return np.stack([ndimage.binary_fill_holes(img > foreground) for img in images]) if len(images) else \
        np.zeros(images.shape, bool)


def csf_fraction(images: np.ndarray, threshold: float = CSF_THRESHOLD, foreground: float = FOREGROUND) -> np.ndarray:
    """In-brain fraction of dark (CSF) pixels of each image: (n, H, W) in [0, 1] -> (n,), NaN for an empty brain."""
    images = np.asarray(images, np.float32)
    brain = brain_mask(images, foreground)  # (n, H, W)
    dark = brain & (images < threshold)
    area = brain.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(area > 0, dark.sum((1, 2)) / np.maximum(area, 1), np.nan)


def line_fit(age: np.ndarray, value: np.ndarray) -> tuple[float, float]:
    """Least-squares line value = intercept + slope * age / 10 over finite points: (slope per decade, intercept)."""
    age, value = np.asarray(age, float), np.asarray(value, float)
    keep = np.isfinite(age) & np.isfinite(value)
    if keep.sum() < 2 or np.ptp(age[keep]) == 0:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(age[keep] / 10.0, value[keep], 1)
    return float(slope), float(intercept)


def bootstrap_slope(age: np.ndarray, value: np.ndarray, groups: np.ndarray, n_boot: int = N_BOOT, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the slope per decade, resampling whole groups (subjects) with replacement
    (``stats.bootstrap_ci``: each replicate refits the line to all the slices of the drawn subjects)."""
    age, value = np.asarray(age, float), np.asarray(value, float)
    return bootstrap_ci(lambda rows: line_fit(age[rows], value[rows])[0], groups, n_boot=n_boot, level=level,
                        seed=seed)


def compare_age_effect(sample_age: np.ndarray, sample_csf: np.ndarray, real_age: np.ndarray, real_csf: np.ndarray,
                       real_subject: np.ndarray, *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """The samples' CSF-vs-age slope beside the real one and its subject-bootstrap 95 % interval.

    Inputs are per slice: sample ages (n,) and CSF fractions (n,); real ages,
    CSF fractions and subject ids (m,). Slopes are per decade (CSF fraction
    units). Returns {"sample_slope", "sample_intercept", "real_slope",
    "real_intercept", "real_ci": [lo, hi], "within_ci", "n_real_subjects",
    "n_real_slices", "n_samples", "sample_mean_by_age": {age: mean}}.
    """
    sample_age, sample_csf = np.asarray(sample_age, float), np.asarray(sample_csf, float)
    s_slope, s_icpt = line_fit(sample_age, sample_csf)
    r_slope, r_icpt = line_fit(real_age, real_csf)
    lo, hi = bootstrap_slope(real_age, real_csf, real_subject, n_boot=n_boot, seed=seed)
    by_age = {}  # mean CSF fraction of the samples at each requested age (NaN when every brain was empty)
    for a in np.unique(sample_age):
        v = sample_csf[(sample_age == a) & np.isfinite(sample_csf)]
        by_age[f"{a:g}"] = float(v.mean()) if len(v) else float("nan")
    return {"sample_slope": s_slope, "sample_intercept": s_icpt, "real_slope": r_slope, "real_intercept": r_icpt,
            "real_ci": [lo, hi], "within_ci": bool(lo <= s_slope <= hi),
            "n_real_subjects": int(len(np.unique(real_subject))), "n_real_slices": int(len(real_csf)),
            "n_samples": int(len(sample_csf)), "sample_mean_by_age": by_age}


def fig_age_effect(path: Path, result: dict, sample_age: np.ndarray, sample_csf: np.ndarray, real_age: np.ndarray,
                   real_csf: np.ndarray) -> None:
    """CSF fraction vs age: real slices and samples (jittered ages) with both fitted lines."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    jitter = np.random.default_rng(0).uniform(-1.5, 1.5, len(sample_age))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(real_age, real_csf, s=14, color="tab:blue", alpha=0.7, label="real (test + val)")
    ax.scatter(np.asarray(sample_age) + jitter, sample_csf, s=8, color="tab:orange", alpha=0.4, label="samples")
    ages = np.linspace(min(np.min(real_age), np.min(sample_age)), max(np.max(real_age), np.max(sample_age)), 2)
    lo, hi = result["real_ci"]
    ax.plot(ages, result["real_intercept"] + result["real_slope"] * ages / 10, color="tab:blue",
            label=f"real: {result['real_slope']:+.4f} / decade (95 % CI {lo:+.4f} to {hi:+.4f})")
    ax.plot(ages, result["sample_intercept"] + result["sample_slope"] * ages / 10, color="tab:orange",
            label=f"samples: {result['sample_slope']:+.4f} / decade")
    ax.set_xlabel("age (years)")
    ax.set_ylabel(f"in-brain fraction below {CSF_THRESHOLD}")
    ax.set_title(f"CSF fraction vs age, slice position {POSITION} ± {WINDOW}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
