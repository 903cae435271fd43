"""Image similarity: SSIM, MS-SSIM and per-image reconstruction metrics inside / outside the brain.

All images are float arrays in [0, 1] (data range 1), shape (n, H, W).

* SSIM (Wang et al. 2004, "Image quality assessment: from error visibility to
  structural similarity") with scikit-image's defaults: a 7x7 uniform window,
  K1 = 0.01, K2 = 0.03, sample covariance. ``reconstruction_metrics`` uses
  ``skimage.metrics.structural_similarity`` itself and averages its SSIM map over
  the brain (or background) pixels; ``ssim_batch`` is the same computation on
  torch, batched, for the many comparisons of the memorisation search (a test
  checks it equals scikit-image).
* MS-SSIM (Wang, Simoncelli & Bovik 2003, "Multi-scale structural similarity for
  image quality assessment"): contrast-structure at every scale, luminance at the
  coarsest, combined with the paper's weights (0.0448, 0.2856, 0.3001, 0.2363,
  0.1333). The paper's 11x11 Gaussian window over 5 scales needs images of at
  least 161 px (MONAI's ``MultiScaleSSIMMetric`` enforces that), so here the
  window is 7x7 Gaussian (sigma 1.5) and the number of scales is the largest
  M <= 5 whose coarsest image still holds one window: 2 scales at 16 px, 3 at
  32, 4 at 64, 5 at 128. The first M weights are renormalised to sum to 1.
  Negative contrast-structure values are clipped at 0 before the fractional
  powers. Optional weight maps (a brain mask) average each scale's map over the
  masked pixels only; the mask is average-pooled with the image, and the
  windows are then reflect-padded (maps of the input's size, like
  scikit-image's full SSIM map) so that a region near the border, such as the
  background, keeps pixels at the coarsest scale.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch.nn import functional as F

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, Table 1
K1, K2 = 0.01, 0.03
PSNR_CAP = 100.0  # dB, for a perfect reconstruction (MSE 0), so JSON stays finite


def _as_tensor(x) -> torch.Tensor:
    """(n, H, W) or (H, W) array (or tensor) -> (n, 1, H, W) float64 tensor."""
    t = x.double() if torch.is_tensor(x) else torch.tensor(np.asarray(x, dtype=np.float64))
    return t.reshape(-1, 1, *t.shape[-2:])


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """A 1-D normalised Gaussian (size,); the 2-D window is its outer product (applied separably)."""
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _uniform_window(size: int = 7) -> torch.Tensor:
    return torch.full((size,), 1.0 / size, dtype=torch.float64)


def _filter(x: torch.Tensor, window: torch.Tensor, same: bool = False) -> torch.Tensor:
    """Separable filtering of (n, 1, H, W) with the outer product of the 1-D ``window``.

    'valid' output (n, 1, H - k + 1, W - k + 1), or reflect-padded to (n, 1, H, W)
    if ``same``. A uniform window uses average pooling (float64 conv2d is slow on CPU).
    """
    k = len(window)
    if same:
        p = k // 2
        x = F.pad(x, (p, p, p, p), mode="reflect")
    if torch.all(window == window[0]):
        return F.avg_pool2d(F.avg_pool2d(x, (k, 1), stride=1), (1, k), stride=1)
    return F.conv2d(F.conv2d(x, window.view(1, 1, k, 1)), window.view(1, 1, 1, k))


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, cov_norm: float = 1.0, same: bool = False):
    """Luminance * contrast-structure map and contrast-structure map ('valid' sized, or input sized if ``same``)."""
    mx, my = _filter(x, window, same), _filter(y, window, same)
    sxx = cov_norm * (_filter(x * x, window, same) - mx * mx)
    syy = cov_norm * (_filter(y * y, window, same) - my * my)
    sxy = cov_norm * (_filter(x * y, window, same) - mx * my)
    c1, c2 = K1 ** 2, K2 ** 2
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return lum * cs, cs


def ssim_batch(x, y, win_size: int = 7) -> np.ndarray:
    """Mean SSIM of each pair (x[i], y[i]), (n,) — scikit-image's default SSIM, batched on torch.

    x, y: (n, H, W) in [0, 1]. A uniform window with the sample covariance
    (N / (N - 1)) and the mean over the map without its border, as
    ``skimage.metrics.structural_similarity(x, y, data_range=1)``.
    """
    a, b = _as_tensor(x), _as_tensor(y)
    window = _uniform_window(win_size)
    npx = win_size ** 2
    out = []
    for i in range(0, len(a), _chunk(a)):
        ssim, _ = _ssim_terms(a[i:i + _chunk(a)], b[i:i + _chunk(a)], window, cov_norm=npx / (npx - 1))
        out.append(ssim.flatten(1).mean(1))
    return torch.cat(out).numpy()


def ssim_pairs(x, y, pairs: np.ndarray, win_size: int = 7) -> np.ndarray:
    """``ssim_batch(x[pairs[:, 0]], y[pairs[:, 1]])`` without refiltering an image for every pair it is in.

    x: (n, H, W), y: (u, H, W), pairs: (p, 2) -> (p,). Local means and second
    moments are filtered once per image; only the cross term is filtered per
    pair (1 filter per pair instead of 5), for the many-to-many memorisation search.
    Computed in float32 (half the memory traffic; within ~1e-5 of float64, and
    exactly 1 for identical images).
    """
    a, b = _as_tensor(x).float(), _as_tensor(y).float()
    pairs = torch.as_tensor(np.asarray(pairs, dtype=np.int64)).reshape(-1, 2)
    window = _uniform_window(win_size).float()
    npx = win_size ** 2
    cov_norm = npx / (npx - 1)
    ma, mb = _filter(a, window), _filter(b, window)  # (n | u, 1, h, w)
    va, vb = cov_norm * (_filter(a * a, window) - ma * ma), cov_norm * (_filter(b * b, window) - mb * mb)
    c1, c2 = K1 ** 2, K2 ** 2
    out = []
    step = _chunk(a)
    for start in range(0, len(pairs), step):
        i, j = pairs[start:start + step, 0], pairs[start:start + step, 1]
        mx, my = ma[i], mb[j]
        sxy = cov_norm * (_filter(a[i] * b[j], window) - mx * my)
        ssim = (2 * mx * my + c1) * (2 * sxy + c2) / ((mx * mx + my * my + c1) * (va[i] + vb[j] + c2))
        out.append(ssim.flatten(1).double().mean(1))
    return torch.cat(out).numpy() if out else np.zeros(0)


def _chunk(t: torch.Tensor, elements: int = 2 ** 22) -> int:
    """Images per chunk so that each temporary stays near 32 MB (float64)."""
    return max(1, elements // (t.shape[-2] * t.shape[-1]))


def ms_ssim_scales(size: int, win_size: int = 7) -> int:
    """Scales that fit an image of ``size`` px: the coarsest must hold one window (max 5)."""
    return max(1, min(len(MS_SSIM_WEIGHTS), int(math.floor(math.log2(size / win_size))) + 1))


def _weighted_mean(m: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    if w is None:
        return m.flatten(1).mean(1)
    total = w.flatten(1).sum(1)
    return torch.where(total > 0, (m * w).flatten(1).sum(1) / total.clamp(min=1e-12), torch.nan)


def ms_ssim(x, y, weight=None, win_size: int = 7, sigma: float = 1.5) -> np.ndarray:
    """MS-SSIM of each pair (x[i], y[i]) (Wang et al. 2003), (n,); 1 for identical images.

    x, y: (n, H, W) in [0, 1]; weight: optional (n, H, W) map (e.g. a brain mask)
    over which each scale's map is averaged. See the module docstring for the
    window and scale choices that make it work at 16..128 px.
    """
    a, b = _as_tensor(x), _as_tensor(y)
    w = None if weight is None else _as_tensor(weight)
    if len(a) > _chunk(a):
        c = _chunk(a)
        return np.concatenate([ms_ssim(a[i:i + c, 0], b[i:i + c, 0], None if w is None else w[i:i + c, 0],
                                       win_size, sigma) for i in range(0, len(a), c)])
    scales = ms_ssim_scales(min(a.shape[-2:]), win_size)
    betas = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
    betas = betas / betas.sum()
    window = _gaussian_window(win_size, sigma)
    values = []
    for s in range(scales):
        ssim, cs = _ssim_terms(a, b, window, same=w is not None)
        values.append(_weighted_mean(ssim if s == scales - 1 else cs, w))
        if s < scales - 1:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
            w = None if w is None else F.avg_pool2d(w, 2)
    values = torch.stack(values, 1).clamp(min=0)  # (n, scales)
    return torch.prod(values ** betas, dim=1).numpy()


def psnr(mse: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB from MSE; capped at ``PSNR_CAP`` for MSE 0."""
    mse = np.asarray(mse, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.minimum(10 * np.log10(data_range ** 2 / mse), PSNR_CAP)


def reconstruction_metrics(x: np.ndarray, recon: np.ndarray, brain: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image MSE, PSNR, SSIM and MS-SSIM inside and outside the brain mask.

    x, recon: (n, H, W) in [0, 1]; brain: (n, H, W) bool. Returns arrays of shape
    (n,) keyed ``{metric}_{brain|background}``; an image whose region is empty
    gets NaN there. SSIM in a region is the mean of scikit-image's SSIM map over
    the region's pixels.
    """
    x, recon = np.asarray(x, np.float64), np.asarray(recon, np.float64)
    brain = np.asarray(brain, bool)
    out: dict[str, np.ndarray] = {}
    ssim_maps = np.stack([structural_similarity(a, b, data_range=1.0, full=True)[1] for a, b in zip(x, recon)])
    sq = (x - recon) ** 2
    for region, mask in (("brain", brain), ("background", ~brain)):
        count = mask.reshape(len(x), -1).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mse = np.where(count > 0, (sq * mask).reshape(len(x), -1).sum(1) / np.maximum(count, 1), np.nan)
            ssim = np.where(count > 0, (ssim_maps * mask).reshape(len(x), -1).sum(1) / np.maximum(count, 1), np.nan)
        out[f"mse_{region}"] = mse
        out[f"psnr_{region}"] = np.where(count > 0, psnr(np.nan_to_num(mse, nan=1.0)), np.nan)
        out[f"ssim_{region}"] = ssim
        out[f"ms_ssim_{region}"] = ms_ssim(x, recon, weight=mask.astype(np.float64))
    return out


def summarise(values: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """{name: (n,) array} -> {name: {"mean", "std"}} ignoring NaNs (null when all are NaN)."""
    out = {}
    for name, v in values.items():
        v = np.asarray(v, np.float64)
        finite = v[np.isfinite(v)]
        out[name] = {"mean": float(finite.mean()) if finite.size else None,
                     "std": float(finite.std()) if finite.size else None}
    return out
