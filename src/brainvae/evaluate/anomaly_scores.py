"""Per-pixel anomaly scores of a trained model, and the post-processing every score shares.

Every score takes ``(model, x, cond)`` with x (B, 1, H, W) in [0, 1] and returns
(B, 1, H, W), higher = more abnormal. They use only the model contract
(``encode`` -> posterior with ``sample``/``mode``/``kl``, ``decode``), plus
``decode_params`` (per-pixel mean and log-sigma) where a model has one:

* residuals ``|x - x_hat|``, ``(x - x_hat)+`` (hyperintense) and
  ``(x_hat - x)+`` (hypointense) of the mean reconstruction (Baur et al. 2021,
  "Autoencoders for unsupervised anomaly segmentation in brain MR images: a
  comparative study"); on T1 many tumours are hypointense, so both signs are kept;
* the reconstruction probability (An & Cho 2015, "Variational autoencoder
  based anomaly detection using reconstruction probability"): the decoder's
  per-pixel negative log-likelihood averaged over L posterior samples, with the
  model's fixed ``sigma`` (vae, cvae, cevae, ae, vqvae) or its learned per-pixel
  sigma (resvae, via ``decode_params``). For deterministic models (``ae``,
  ``vqvae``: ``model.stochastic`` is False or the posterior is not Gaussian)
  it degenerates to ``r^2 / (2 sigma^2) + const``, a monotone function of the
  residual (same ranking);
* the context-encoding VAE scores (Zimmerer et al. 2018, "Context-encoding
  variational autoencoder for unsupervised anomaly detection"; Zimmerer et al.
  2019, "Unsupervised anomaly localization using variational auto-encoders"):
  the smoothed, per-image max-normalised |dKL/dx| times the residual
  (``kl_combined``), and an additive variant (``kl_additive``: residual plus
  the normalised gradient, each divided by its robust dataset scale; see
  ``kl_additive``). Only for models with a Gaussian posterior that were trained
  with a KL term.

Post-processing (Baur et al. 2021; StRegA, Chatterjee et al. 2022): the score is
median filtered (5 x 5), set to 0 outside the brain mask eroded by a few pixels
(the rim of every brain reconstructs badly), and, once thresholded, connected
components smaller than a minimum area are removed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from ..models.base import DiagonalGaussian
from ..models.cevae import gaussian_blur

MODEL_SCORES = ("residual", "residual_pos", "residual_neg", "residual_neg_smooth", "recon_prob", "kl_combined",
                "kl_additive")
SMOOTH_SIGMA = 2.0  # px: Gaussian applied to the signed residual by residual_neg_smooth
BRIGHTNESS_SCORES = ("brightness_hyper", "brightness_hypo")
SCORE_HELP = {
    "residual": "|x - x_hat| of the mean reconstruction",
    "residual_pos": "(x - x_hat)+: brighter than reconstructed (hyperintense lesions)",
    "residual_neg": "(x_hat - x)+: darker than reconstructed (hypointense lesions, e.g. tumour on T1)",
    "residual_neg_smooth": f"(G * (x_hat - x))+: the signed residual smoothed (Gaussian, sigma {SMOOTH_SIGMA:g} px) "
                           "before rectification, so thin dark structures a blurry reconstruction cannot draw cancel",
    "recon_prob": "reconstruction probability (An & Cho 2015): per-pixel NLL averaged over L posterior samples",
    "kl_combined": "ceVAE combined score (Zimmerer et al. 2019): residual x normalised smoothed |dKL/dx|",
    "kl_additive": "ceVAE additive variant: residual + normalised smoothed |dKL/dx| (each over its dataset scale)",
    "prior_nll": "VQ-VAE prior's NLL of each code, upsampled (vqvae only)",
    "brightness_hyper": "intensity (hyperintense lesions): brightness baseline",
    "brightness_hypo": "1 - intensity inside the brain (hypointense lesions): brightness baseline",
}


def is_stochastic(model) -> bool:
    """A model with a Gaussian posterior trained with a KL term (``model.stochastic``; not ``ae``, not ``vqvae``)."""
    return getattr(model, "stochastic", True)


def fixed_log_sigma(model) -> float:
    """log of the fixed likelihood std from the model's config (0.1 if it has none)."""
    return math.log(getattr(model.config, "sigma", 0.1))


def decode_mean_log_sigma(model, z: Tensor, cond) -> tuple[Tensor, Tensor]:
    """Per-pixel mean (B, 1, H, W) and log-sigma (broadcastable): learned (``decode_params``) or fixed."""
    if hasattr(model, "decode_params"):
        mean, log_sigma = model.decode_params(z, cond)
        return mean.float(), log_sigma.float()
    mean = model.decode(z, cond).float()
    return mean, torch.full((1, 1, 1, 1), fixed_log_sigma(model), device=mean.device)


def likelihood_kind(model) -> str:
    return "learned per-pixel sigma (decode_params)" if hasattr(model, "decode_params") else \
        f"fixed sigma = {math.exp(fixed_log_sigma(model)):g}"


# -- one function per score -------------------------------------------------------------------------
@torch.no_grad()
def reconstruction(model, x: Tensor, cond=None) -> Tensor:
    """The mean reconstruction x_hat = decode(mode of q(z|x)): (B, 1, H, W) float32."""
    return model.reconstruct(x, cond).float()


@torch.no_grad()
def residual(model, x: Tensor, cond=None, x_hat: Tensor | None = None) -> Tensor:
    """|x - x_hat| (Baur et al. 2021)."""
    x_hat = reconstruction(model, x, cond) if x_hat is None else x_hat
    return (x.float() - x_hat).abs()


@torch.no_grad()
def residual_pos(model, x: Tensor, cond=None, x_hat: Tensor | None = None) -> Tensor:
    """(x - x_hat)+: the image is brighter than its reconstruction (hyperintense anomalies)."""
    x_hat = reconstruction(model, x, cond) if x_hat is None else x_hat
    return (x.float() - x_hat).clamp_min(0)


@torch.no_grad()
def residual_neg(model, x: Tensor, cond=None, x_hat: Tensor | None = None) -> Tensor:
    """(x_hat - x)+: the image is darker than its reconstruction (hypointense anomalies, e.g. T1 tumour)."""
    x_hat = reconstruction(model, x, cond) if x_hat is None else x_hat
    return (x_hat - x.float()).clamp_min(0)


@torch.no_grad()
def residual_neg_smooth(model, x: Tensor, cond=None, x_hat: Tensor | None = None, sigma: float = SMOOTH_SIGMA) -> Tensor:
    """(G_sigma * (x_hat - x))+: smooth the SIGNED residual, then keep the darker-than-expected part.

    A reconstruction blurrier than its input is too dark on the thin bright ridges and too bright in
    the thin dark sulci between them, so (x_hat - x)+ lights up every sulcus; smoothing the signed
    residual first lets those neighbouring errors of opposite sign cancel, while a hypointense
    lesion wider than sigma (a T1 tumour core) stays negative throughout.
    """
    x_hat = reconstruction(model, x, cond) if x_hat is None else x_hat
    return gaussian_blur(x_hat - x.float(), sigma).clamp_min(0)


@torch.no_grad()
def recon_prob(model, x: Tensor, cond=None, n_samples: int = 8, generator: torch.Generator | None = None) -> Tensor:
    """Reconstruction probability (An & Cho 2015) as a per-pixel NLL in nats, averaged over L samples.

    -log p(x | z_l) per pixel = (x - mu_l)^2 / (2 sigma_l^2) + log sigma_l + log(2 pi) / 2, for
    z_l ~ q(z|x), l = 1..L. A deterministic model (``is_stochastic`` False) uses its single code,
    so the score is a monotone function of the residual.
    """
    x = x.float()
    post = model.encode(x, cond)
    zs = [post.sample(generator) for _ in range(n_samples)] if is_stochastic(model) else [post.mode()]
    total = torch.zeros_like(x)
    for z in zs:
        mean, log_sigma = decode_mean_log_sigma(model, z, cond)
        total += 0.5 * ((x - mean) / log_sigma.exp()).pow(2) + log_sigma + 0.5 * math.log(2 * math.pi)
    return total / len(zs)


def kl_gradient(model, x: Tensor, cond=None, smoothing: float | None = None) -> Tensor:
    """|dKL(q(z|x) || p(z)) / dx|, Gaussian-smoothed, divided by its per-image maximum: (B, 1, H, W) in [0, 1].

    As in Zimmerer et al. 2019 and ``CEVAE.anomaly_map``; ``smoothing`` (px) defaults to the
    model's ``score_smoothing`` or 1.5. Raises ``ValueError`` for models without a KL term.
    """
    if not is_stochastic(model):
        raise ValueError(f"{model.arch} has no Gaussian posterior trained with a KL term")
    sigma = getattr(model.config, "score_smoothing", 1.5) if smoothing is None else smoothing
    with torch.enable_grad():
        x_in = x.detach().float().clone().requires_grad_(True)
        post = model.encode(x_in, cond)
        if not isinstance(post, DiagonalGaussian):
            raise ValueError(f"{model.arch}'s posterior is not Gaussian")
        (grad,) = torch.autograd.grad(post.kl().sum(), x_in)
    g = gaussian_blur(grad.abs(), sigma)
    return (g / g.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)).detach()


def kl_combined(model, x: Tensor, cond=None, x_hat: Tensor | None = None, grad: Tensor | None = None) -> Tensor:
    """ceVAE combined score (Zimmerer et al. 2019): |x - x_hat| * normalised smoothed |dKL/dx|."""
    grad = kl_gradient(model, x, cond) if grad is None else grad
    return residual(model, x, cond, x_hat) * grad


def kl_additive(model, x: Tensor, cond=None, x_hat: Tensor | None = None, grad: Tensor | None = None,
                scales: tuple[float, float] = (1.0, 1.0)) -> Tensor:
    """Additive variant: |x - x_hat| / s_r + normalised |dKL/dx| / s_g.

    The two terms have different units, so each is divided by a scale; ``evaluate_anomaly``
    passes the 99th percentile of each term over the in-brain pixels of all scored slices
    (label-free, so no test label leaks). With the default (1, 1) the terms are added raw.
    """
    grad = kl_gradient(model, x, cond) if grad is None else grad
    return residual(model, x, cond, x_hat) / scales[0] + grad / scales[1]


@torch.no_grad()
def prior_nll(model, x: Tensor, cond=None) -> Tensor:
    """The VQ-VAE prior's per-code NLL, upsampled (models with ``prior_nll_map`` only)."""
    return model.prior_nll_map(x, cond if model.config.conditions else None).float()


def brightness_hyper(x: Tensor, brain: Tensor | None = None) -> Tensor:
    """Brightness baseline, hyperintense: the intensity itself."""
    return x.float()


def brightness_hypo(x: Tensor, brain: Tensor | None = None) -> Tensor:
    """Brightness baseline, hypointense: 1 - intensity inside the brain (0 outside)."""
    s = 1.0 - x.float()
    return s if brain is None else s * (brain > 0)


def available_scores(model) -> dict[str, str | None]:
    """Score name -> None if available for this model, else the reason it is not."""
    out: dict[str, str | None] = {name: None for name in MODEL_SCORES}
    if not is_stochastic(model):
        why = (f"{model.arch} is deterministic (no Gaussian posterior trained with a KL term): "
               "no KL gradient")
        out["kl_combined"] = out["kl_additive"] = why
    if hasattr(model, "prior_nll_map"):
        out["prior_nll"] = None
    return out


def model_score_batch(model, x: Tensor, cond, names: list[str], n_samples: int = 8,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The requested scores of one batch, sharing the reconstruction and the KL gradient.

    Returns raw maps (B, 1, H, W); also ``"recon"`` (x_hat). ``kl_additive`` is returned as its
    two unscaled terms ``"_kl_residual"`` and ``"_kl_grad"``; the caller scales and adds them.
    """
    x = x.float()
    x_hat = reconstruction(model, x, cond)
    out = {"recon": x_hat}
    grad = kl_gradient(model, x, cond) if {"kl_combined", "kl_additive"} & set(names) else None
    for name in names:
        if name == "residual":
            out[name] = residual(model, x, cond, x_hat)
        elif name == "residual_pos":
            out[name] = residual_pos(model, x, cond, x_hat)
        elif name == "residual_neg":
            out[name] = residual_neg(model, x, cond, x_hat)
        elif name == "residual_neg_smooth":
            out[name] = residual_neg_smooth(model, x, cond, x_hat)
        elif name == "recon_prob":
            out[name] = recon_prob(model, x, cond, n_samples, generator)
        elif name == "kl_combined":
            out[name] = kl_combined(model, x, cond, x_hat, grad)
        elif name == "kl_additive":
            out["_kl_residual"], out["_kl_grad"] = residual(model, x, cond, x_hat), grad
        elif name == "prior_nll":
            out[name] = prior_nll(model, x, cond)
        else:
            raise ValueError(f"unknown model score {name!r}")
    return out


# -- post-processing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PostProcess:
    """Baur et al. 2021 / StRegA (Chatterjee et al. 2022) post-processing parameters (pixels)."""

    erode: int = 3  # brain mask erosion (iterations of a 3 x 3 cross) before scoring
    median: int = 5  # median filter size (in-plane); 0 or 1 = off
    min_area: int = 10  # connected components (8-connected) smaller than this are removed after thresholding

    def to_dict(self) -> dict:
        return asdict(self)


def eroded_mask(brain: np.ndarray, iterations: int) -> np.ndarray:
    """(N, H, W) brain masks eroded in-plane, slice by slice (bool)."""
    brain = np.asarray(brain) > 0
    if iterations <= 0:
        return brain
    cross = ndimage.generate_binary_structure(2, 1)[None]  # (1, 3, 3): never erode across slices
    return ndimage.binary_erosion(brain, structure=cross, iterations=iterations)


def postprocess(score: np.ndarray, region: np.ndarray, median: int = 5) -> np.ndarray:
    """Median filter each (H, W) slice of score (N, H, W), then zero outside ``region`` (eroded brain)."""
    s = np.asarray(score, np.float32)
    if median and median > 1:
        s = ndimage.median_filter(s, size=(1, median, median), mode="nearest")
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
