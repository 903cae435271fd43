"""The scores every evaluation adds beside the model's, and the post-processing all scores share.

The model's own scores are part of the model contract (``model.scores()``, ``brainvae.models.scoring``).
Here: the brightness baselines (intensity for hyperintense, 1 - intensity inside the brain for
hypointense lesions), a detector any model must beat (Meissen et al. 2021, "Challenging current
semi-supervised anomaly segmentation methods for brain MRI").

Post-processing (Baur et al. 2021; StRegA, Chatterjee et al. 2022): the score is
median filtered (5 x 5), averaged over neighbouring slices of the same volume
(a lesion spans several slices, noise does not), set to 0 outside the brain mask
eroded by a few pixels (the rim of every brain reconstructs badly), and, once
thresholded, connected components smaller than a minimum area are removed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from torch import Tensor

from ..errors import BrainVAEError


# -- brightness baselines -----------------------------------------------------------------------------
def brightness_hyper(x: Tensor, brain: Tensor | None = None) -> Tensor:
    """Brightness baseline, hyperintense: the intensity itself."""
    return x.float()


def brightness_hypo(x: Tensor, brain: Tensor | None = None) -> Tensor:
    """Brightness baseline, hypointense: 1 - intensity inside the brain (0 outside)."""
    s = 1.0 - x.float()
    return s if brain is None else s * (brain > 0)


# name -> (score of images (N, H, W) and brain masks, description)
BRIGHTNESS = {
    "hyper": (brightness_hyper, "intensity (hyperintense lesions): brightness baseline"),
    "hypo": (brightness_hypo, "1 - intensity inside the brain (hypointense lesions): brightness baseline"),
}


# -- post-processing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PostProcess:
    """Baur et al. 2021 / StRegA (Chatterjee et al. 2022) post-processing parameters (pixels)."""

    erode: int = 3  # brain mask erosion (iterations of a 3 x 3 cross) before scoring
    median: int = 5  # median filter size (in-plane); 0 or 1 = off
    across: int = 1  # mean over this many neighbouring slices of a volume (through-plane); 1 = off
    min_area: int = 10  # connected components (8-connected) smaller than this are removed after thresholding

    def __post_init__(self) -> None:
        for name in ("erode", "median", "min_area"):
            if getattr(self, name) < 0:
                raise BrainVAEError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.across < 1:
            raise BrainVAEError(f"--across must be >= 1 (1 = no through-plane mean), got {self.across}")

    def to_dict(self) -> dict:
        return asdict(self)


def eroded_mask(brain: np.ndarray, iterations: int) -> np.ndarray:
    """(N, H, W) brain masks eroded in-plane, slice by slice (bool)."""
    brain = np.asarray(brain) > 0
    if iterations <= 0:
        return brain
    cross = ndimage.generate_binary_structure(2, 1)[None]  # (1, 3, 3): never erode across slices
    return ndimage.binary_erosion(brain, structure=cross, iterations=iterations)


def slice_runs(cases: np.ndarray, slice_index: np.ndarray) -> np.ndarray:
    """(N,) run number of each slice: consecutive slices of one volume (the same case, slice indices one apart)
    share a run; the through-plane mean of ``postprocess`` never crosses from one run to another."""
    cases, slice_index = np.asarray(cases), np.asarray(slice_index)
    new_run = (cases[1:] != cases[:-1]) | (np.diff(slice_index) != 1)
    return np.r_[0, np.cumsum(new_run)]


def postprocess(score: np.ndarray, region: np.ndarray, median: int = 5, across: int = 1,
                runs: np.ndarray | None = None) -> np.ndarray:
    """Median filter each (H, W) slice of score (N, H, W), average each pixel over ``across`` neighbouring
    slices of its run (``slice_runs``; the ends repeat their edge slice), then zero outside ``region``
    (eroded brain)."""
    s = np.asarray(score, np.float32)
    if median and median > 1:
        s = ndimage.median_filter(s, size=(1, median, median), mode="nearest")
    if across > 1:
        if runs is None:
            raise ValueError("a through-plane mean needs the runs of consecutive slices (slice_runs)")
        s = s.copy()
        for run in np.unique(runs):
            k = runs == run
            s[k] = ndimage.uniform_filter1d(s[k], across, axis=0, mode="nearest")
    return np.where(region, s, np.float32(0))


def remove_small_components(binary: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected components smaller than ``min_area`` pixels, per slice of (N, H, W) or (H, W)."""
    binary = np.asarray(binary, bool)
    if min_area <= 1 or not binary.any():
        return binary
    structure = np.zeros((3, 3, 3), bool) if binary.ndim == 3 else None
    if binary.ndim == 3:
        structure[1] = True  # 8-connected in-plane, no connection across slices
    labels, n = ndimage.label(binary, structure=structure if binary.ndim == 3 else np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def segment(score: np.ndarray, threshold: float, min_area: int) -> np.ndarray:
    """Binary segmentation: score >= threshold (the precision-recall curve's convention), small components removed."""
    return remove_small_components(np.asarray(score) >= threshold, min_area)
