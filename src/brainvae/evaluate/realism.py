"""Distances between a set of real and a set of generated images (pure numpy / scipy / scikit-learn).

Feature-space distances take (n, d) feature arrays: Fréchet distance,
kernel inception-style distance, precision / recall / density / coverage.
Pixel-space measures take (n, H, W) images in [0, 1]: diversity (MS-SSIM between
random pairs), memorisation (nearest training slice by SSIM) and the distance
between in-brain intensity histograms.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import linalg
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance
from sklearn.metrics import pairwise_distances
from sklearn.neighbors import NearestNeighbors

from .reconstruction import ms_ssim, ssim_pairs

FOREGROUND = 0.05  # intensity above which a pixel counts as brain in images without a mask (samples)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    vals, vecs = linalg.eigh(s)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (n, d), (m, d).

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}); Heusel et al. 2017,
    "GANs trained by a two time-scale update rule converge to a local Nash
    equilibrium" (FID). The reference implementation takes ``scipy.linalg.sqrtm``
    of the non-symmetric S_a S_b, which is slow and can come back complex or
    non-finite when a covariance is singular (fewer samples than dimensions).
    Here Tr (S_a S_b)^{1/2} = Tr (S_a^{1/2} S_b S_a^{1/2})^{1/2}, the sum of the
    square roots of the eigenvalues of a symmetric PSD matrix (same value, real
    by construction; round-off negatives are clipped to 0, and so is a tiny
    negative total).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(s_a)
    m = root_a @ s_b @ root_a
    tr_covmean = np.sqrt(np.clip(linalg.eigvalsh(0.5 * (m + m.T)), 0, None)).sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)
    return max(fd, 0.0)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kernel_distance(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, (mean, std) over subsets.

    Bińkowski et al. 2018, "Demystifying MMD GANs". Each subset draws
    ``min(subset_size, min(n, m) // 2)`` rows of each set without replacement
    (at most half of a set, so that subsets differ and the std says something).
    Unbiased, so it can be slightly negative for sets from one distribution.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    size = min(subset_size, max(2, min(len(a), len(b)) // 2))
    if size < 2:
        raise ValueError("KID needs at least 2 features in each set")
    rng = np.random.default_rng(seed)
    values = [_mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage with k-nearest-neighbour balls (Euclidean).

    Naeem et al. 2020, "Reliable fidelity and diversity metrics for generative
    models": a real sample's ball has the radius of its k-th nearest real
    neighbour. Precision: share of fakes inside some real ball. Recall: share
    of reals inside some fake ball (radii from the fakes). Density: mean number
    of real balls holding a fake, divided by k. Coverage: share of real balls
    holding at least one fake. ``k`` is reduced to n - 1 for tiny sets.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    k = max(1, min(k, len(real) - 1, len(fake) - 1))

    def radii(x: np.ndarray) -> np.ndarray:  # distance to the k-th neighbour other than itself
        dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
        return dist[:, -1]

    r_real, r_fake = radii(real), radii(fake)
    d = pairwise_distances(real, fake)  # (n_real, n_fake)
    inside = d <= r_real[:, None]  # fake j in the ball of real i
    return {
        "precision": float(inside.any(0).mean()),
        "recall": float((d <= r_fake[None, :]).any(1).mean()),
        "density": float(inside.sum(0).mean() / k),
        "coverage": float((d.min(1) <= r_real).mean()),
    }


def feature_distances(real: np.ndarray, fake: np.ndarray, seed: int = 0, kid_subsets: int = 100) -> dict[str, float]:
    """FD, KID (mean, std) and PRDC between two feature sets, in one dict."""
    kid, kid_std = kernel_distance(real, fake, subsets=kid_subsets, seed=seed)
    return {"fd": frechet_distance(real, fake), "kid": kid, "kid_std": kid_std, **prdc(real, fake)}


def random_pairs(n: int, pairs: int, seed: int = 0) -> np.ndarray:
    """(p, 2) index pairs i != j drawn from range(n)."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, pairs)
    j = (i + rng.integers(1, n, pairs)) % n  # never equal to i
    return np.stack([i, j], 1)


def diversity(images: np.ndarray, pairs: int = 500, seed: int = 0) -> float:
    """Mean MS-SSIM between random pairs of one set (n, H, W): 1 = all identical, lower = more diverse.

    The MS-SSIM diversity measure of Odena et al. 2017 ("Conditional image
    synthesis with auxiliary classifier GANs"), with MS-SSIM of Wang et al. 2003.
    """
    images = np.asarray(images)
    if len(images) < 2:
        return float("nan")
    idx = random_pairs(len(images), pairs, seed)
    return float(np.mean(ms_ssim(images[idx[:, 0]], images[idx[:, 1]])))


def thumbnails(images: np.ndarray, size: int = 32) -> np.ndarray:
    """(n, H, W) -> (n, size * size), resized as ``data.resize`` does (block means when H is a multiple of size)."""
    from ..data.resize import resize_images

    return resize_images(images, size).reshape(len(images), -1).numpy()


def nearest_by_ssim(queries: np.ndarray, train_thumbs: np.ndarray, train_images: Callable[[np.ndarray], np.ndarray],
                    k: int = 20, thumb_size: int = 32, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each query's most similar training image by SSIM: (index into train, SSIM), each (n,).

    Exact SSIM against every training slice is too slow, so candidates are the
    k nearest training thumbnails by L2 (``thumbnails``, 32 px) and the exact
    SSIM (``ssim_pairs``, scikit-image's SSIM) decides among them. ``train_images(idx)`` returns the
    training images (len(idx), H, W) at the queries' size.
    """
    queries = np.asarray(queries, np.float32)
    q = thumbnails(queries, thumb_size)
    t = np.asarray(train_thumbs, np.float32)
    k = min(k, len(t))
    t_sq = (t ** 2).sum(1)
    chunk = chunk or 256
    best_idx, best_ssim = np.zeros(len(q), int), np.zeros(len(q))
    for start in range(0, len(q), chunk):
        qc = q[start:start + chunk]
        d = (qc ** 2).sum(1)[:, None] - 2 * qc @ t.T + t_sq[None]  # (c, N) squared L2
        cand = np.argpartition(d, k - 1, axis=1)[:, :k]  # (c, k)
        flat = np.unique(cand)
        lookup = dict(zip(flat.tolist(), range(len(flat))))
        imgs = train_images(flat)  # (u, H, W)
        pos = np.vectorize(lookup.get)(cand)  # (c, k) rows of imgs
        pairs = np.stack([np.repeat(np.arange(len(qc)), k), pos.reshape(-1)], 1)  # (c * k, 2)
        s = ssim_pairs(queries[start:start + chunk], imgs, pairs).reshape(len(qc), k)
        j = s.argmax(1)
        best_idx[start:start + len(qc)] = cand[np.arange(len(qc)), j]
        best_ssim[start:start + len(qc)] = s[np.arange(len(qc)), j]
    return best_idx, best_ssim


def memorisation(sample_nn_ssim: np.ndarray, test_nn_ssim: np.ndarray, quantile: float = 99.0) -> dict[str, float]:
    """Share of samples closer to a training slice than real unseen slices ever are.

    The threshold is the ``quantile``-th percentile of the SSIM between each
    real test slice (other subjects) and its nearest training slice; a sample
    above it is flagged as a likely copy. The same share for the test slices is
    the floor (about 1 - quantile / 100 by construction).
    """
    threshold = float(np.percentile(test_nn_ssim, quantile))
    return {"threshold_ssim": threshold, "share_above": float(np.mean(np.asarray(sample_nn_ssim) > threshold)),
            "floor_share_above": float(np.mean(np.asarray(test_nn_ssim) > threshold)),
            "nn_ssim_mean": float(np.mean(sample_nn_ssim)), "test_nn_ssim_mean": float(np.mean(test_nn_ssim))}


def intensity_histogram(images: np.ndarray, masks: np.ndarray | None = None, bins: int = 128) -> np.ndarray:
    """Normalised histogram (bins,) over [0, 1] of in-brain pixels (mask, else intensity > FOREGROUND)."""
    images = np.asarray(images)
    masks = images > FOREGROUND if masks is None else np.asarray(masks, bool)
    hist, _ = np.histogram(images[masks], bins=bins, range=(0.0, 1.0))
    total = hist.sum()
    return hist / total if total else np.full(bins, 1.0 / bins)


def histogram_distance(p: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """Distances between two normalised intensity histograms over [0, 1] of the same bins.

    ``wasserstein``: 1-D earth mover's distance (intensity units) between the
    binned distributions; ``js``: Jensen-Shannon distance (sqrt of the
    divergence, base 2, in [0, 1]); ``intersection``: sum of bin-wise minima
    (1 for identical histograms, Swain & Ballard 1991).
    """
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    centres = (np.arange(len(p)) + 0.5) / len(p)
    return {"wasserstein": float(wasserstein_distance(centres, centres, p, q)),
            "js": float(np.nan_to_num(jensenshannon(p, q, base=2))),
            "intersection": float(np.minimum(p, q).sum())}
