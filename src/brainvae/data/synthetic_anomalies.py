"""Synthetic anomalies pasted into healthy slices, with exact masks.

For users without annotated lesions (and for the tests): a healthy slice store
becomes a store with ``lesion.npy`` whose masks mark exactly the pixels that
were changed. Three kinds, each placed inside the brain mask:

* ``bright`` / ``dark``: an intensity-shifted ellipse (the 2-D section of an
  ellipsoid) -- pixels pushed towards 1 (``x + d (1 - x)``) or towards 0
  (``x (1 - d)``), ``d`` in [0.3, 0.6]. On T1 many tumours are hypointense,
  so both signs are offered.
* ``fpi``: foreign-patch interpolation (Tan et al. 2020, "Detecting outliers
  with foreign patch interpolation"): a rectangle of another slice at a
  similar position is blended in, ``(1 - a) x + a y`` with ``a`` in [0.4, 0.9].
* ``noise``: a square of uniform noise (as in the context-encoding masks of
  Zimmerer et al. 2018).

A pixel belongs to the mask iff its intensity changed by more than ``tol``
(default 0.01); smaller changes are reverted, so image and mask always agree.
These anomalies are easier than real tumours (sharp edges, no mass effect); use
them to check a pipeline, not to claim clinical performance.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import BrainVAEError
from .store import SliceStore, write_store

KINDS = ("bright", "dark", "fpi", "noise")


def _centre(brain: np.ndarray, rng: np.random.Generator, margin: int) -> tuple[int, int] | None:
    """A random pixel of the brain mask eroded by ``margin`` (falls back to the mask itself)."""
    core = ndimage.binary_erosion(brain, iterations=max(margin, 1)) if margin > 0 else brain
    ys, xs = np.nonzero(core if core.any() else brain)
    if len(ys) == 0:
        return None
    k = rng.integers(len(ys))
    return int(ys[k]), int(xs[k])


def _ellipse(shape: tuple[int, int], centre: tuple[int, int], radii: tuple[float, float], angle: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    dy, dx = yy - centre[0], xx - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / radii[1]) ** 2 + (v / radii[0]) ** 2 <= 1.0


def _rectangle(shape: tuple[int, int], centre: tuple[int, int], half: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, bool)
    out[max(centre[0] - half[0], 0):centre[0] + half[0] + 1, max(centre[1] - half[1], 0):centre[1] + half[1] + 1] = True
    return out


def add_anomaly(image: np.ndarray, brain: np.ndarray, kind: str, rng: np.random.Generator,
                donor: np.ndarray | None = None, size: tuple[float, float] = (0.05, 0.15),
                tol: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """One anomaly of ``kind`` in a (H, W) slice; returns (new image, bool mask of changed pixels).

    ``size`` bounds the anomaly's radius (half side) as a fraction of the image
    side; ``donor`` is the slice that ``fpi`` blends in (required for it).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown anomaly kind {kind!r}; choose from {KINDS}")
    img = np.asarray(image, np.float32)
    brain = np.asarray(brain) > 0
    h, w = img.shape
    lo, hi = max(size[0] * h, 1.5), max(size[1] * h, 2.0)
    centre = _centre(brain, rng, int(lo))
    if centre is None:
        return img.copy(), np.zeros_like(brain)
    new = img.copy()
    if kind in ("bright", "dark"):
        region = _ellipse((h, w), centre, tuple(rng.uniform(lo, hi, 2)), rng.uniform(0, np.pi)) & brain
        d = rng.uniform(0.3, 0.6)
        new[region] = img[region] + d * (1 - img[region]) if kind == "bright" else img[region] * (1 - d)
    elif kind == "fpi":
        if donor is None:
            raise ValueError("fpi needs a donor slice")
        half = tuple(int(v) for v in rng.uniform(lo, hi, 2))
        region = _rectangle((h, w), centre, half) & brain
        a = rng.uniform(0.4, 0.9)
        new[region] = (1 - a) * img[region] + a * np.asarray(donor, np.float32)[region]
    else:  # noise
        half = int(rng.uniform(lo, hi))
        region = _rectangle((h, w), centre, (half, half)) & brain
        new[region] = rng.uniform(0, 1, int(region.sum())).astype(np.float32)
    new = np.clip(new, 0, 1)
    mask = np.abs(new - img) > tol
    new = np.where(mask, new, img)  # sub-tolerance changes are reverted: mask == changed pixels
    return new.astype(np.float32), mask


def make_anomalies(images: np.ndarray, brain: np.ndarray, positions: np.ndarray | None = None,
                   subjects: np.ndarray | None = None, *, fraction: float = 0.5,
                   kinds: tuple[str, ...] = KINDS, seed: int = 0,
                   size: tuple[float, float] = (0.05, 0.15)) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Anomalies in a random ``fraction`` of the slices (N, H, W).

    Returns (images, masks uint8, kind per slice: "" where untouched). The
    ``fpi`` donor is the slice of another subject (when ``subjects`` has more
    than one) whose ``position`` is closest.
    """
    if not 0 <= fraction <= 1:
        raise BrainVAEError(f"--fraction must be in [0, 1], got {fraction}")
    bad = sorted(set(kinds) - set(KINDS))
    if bad or not kinds:
        raise BrainVAEError(f"unknown anomaly kind(s) {bad}; choose from {list(KINDS)}")
    rng = np.random.default_rng(seed)
    n = len(images)
    out = np.array(images, dtype=np.float32, copy=True)
    masks = np.zeros(out.shape, np.uint8)
    labels = [""] * n
    chosen = np.sort(rng.choice(n, size=int(round(fraction * n)), replace=False)) if n else np.array([], int)
    pos = np.asarray(positions, float) if positions is not None else np.linspace(0, 1, n)
    for i in chosen:
        kind = str(kinds[rng.integers(len(kinds))])
        donor = None
        if kind == "fpi":
            if n < 2:
                kind = "bright"
            else:
                gap = np.abs(pos - pos[i]) + rng.uniform(0, 1e-3, n)  # random tie-break
                gap[i] = np.inf
                if subjects is not None and (subjects != subjects[i]).any():
                    gap[subjects == subjects[i]] = np.inf
                donor = np.asarray(images[int(np.argmin(gap))], np.float32)
        new, mask = add_anomaly(images[i], brain[i], kind, rng, donor, size)
        out[i], masks[i] = new, mask
        labels[i] = kind if mask.any() else ""
    return out, masks, labels


def anomalies_store(store: SliceStore | str, out, *, split: str | None = "test", fraction: float = 0.5,
                    kinds: tuple[str, ...] = KINDS, seed: int = 0, force: bool = False) -> "SliceStore":
    """A new store (same layout) of ``split``'s slices with synthetic anomalies and ``lesion.npy``."""
    from ..provenance import provenance

    store = store if isinstance(store, SliceStore) else SliceStore(store)
    rows = store.indices(None if split in (None, "all") else split)
    if len(rows) == 0:
        splits = sorted(store.manifest["split"].unique())
        raise BrainVAEError(f"{store.path}: split {split!r} has no slices (splits: {splits})")
    manifest = store.manifest.iloc[rows].reset_index(drop=True)
    images = np.asarray(store.images[rows], np.float32)
    brain = np.asarray(store.array("brain")[rows], np.uint8)
    if store.has_lesions and np.asarray(store.array("lesion")[rows]).any():
        raise BrainVAEError(f"{store.path} already has lesion masks; synthetic anomalies go into healthy stores")
    new, masks, labels = make_anomalies(images, brain, manifest["position"].to_numpy(float),
                                        manifest["subject"].to_numpy(str), fraction=fraction,
                                        kinds=tuple(kinds), seed=seed)
    manifest["lesion_fraction"] = masks.reshape(len(masks), -1).mean(1)
    manifest["anomaly"] = labels
    subjects = store.subjects[store.subjects["subject"].isin(set(manifest["subject"]))].reset_index(drop=True)
    prov = provenance(source_store=str(store.path), split=split, fraction=fraction, kinds=list(kinds), seed=seed,
                      synthetic_anomalies=True, counts={k: labels.count(k) for k in KINDS})
    write_store(out, {"images": new, "brain": brain, "lesion": masks}, manifest, subjects, store.config, prov,
                [], force=force)
    return SliceStore(out)

