"""Per-pixel anomaly scores: the part of the model contract that says what a model can score.

A model lists its scores with ``model.scores()`` (name -> :class:`Score`); each score
maps a :class:`ScoreBatch` (x (B, 1, H, W) in [0, 1], the conditions) to (B, 1, H, W),
higher = more abnormal. The scores of one batch share its mean reconstruction and its
KL gradient, each computed once. They use only the model contract (``encode`` ->
posterior with ``sample``/``mode``/``kl``, ``reconstruct``, ``decode_params``):

* residuals ``|x - x_hat|``, ``(x - x_hat)+`` (hyperintense) and
  ``(x_hat - x)+`` (hypointense) of the mean reconstruction (Baur et al. 2021,
  "Autoencoders for unsupervised anomaly segmentation in brain MR images: a
  comparative study"); on T1 many tumours are hypointense, so both signs are kept;
* the reconstruction probability (An & Cho 2015, "Variational autoencoder
  based anomaly detection using reconstruction probability"): the decoder's
  per-pixel negative log-likelihood averaged over L posterior samples
  (``decode_params``: a fixed sigma, or resvae's learned per-pixel sigma). For
  deterministic models (``model.stochastic`` False: ``ae``, ``vqvae``) it uses
  the single code and degenerates to ``r^2 / (2 sigma^2) + const``, a monotone
  function of the residual (same ranking);
* the context-encoding VAE scores (Zimmerer et al. 2018, "Context-encoding
  variational autoencoder for unsupervised anomaly detection"; Zimmerer et al.
  2019, "Unsupervised anomaly localization using variational auto-encoders"):
  the smoothed, per-image max-normalised |dKL/dx| times the residual
  (``kl_combined``), and an additive variant (``kl_additive``: the residual
  plus the normalised gradient, each divided by its robust dataset scale, see
  :attr:`Score.terms`). Only for models with a Gaussian posterior trained with a
  KL term (``model.stochastic``);
* the perceptual residual (LPIPS-style: Zhang et al. 2018; used for anomaly maps by
  Bercea et al. 2023, "Generalizing unsupervised anomaly detection: towards unbiased
  pathology screening"): how far apart x and x_hat are in the first feature level of a
  frozen encoder trained in-domain on healthy slices (the ``fae``'s: nothing is
  downloaded), each position's channel vector scaled to unit length. Texture a
  reconstruction renders a little differently (a sulcus drawn a pixel off) moves the
  features less than tissue of another kind does. These scores need the batch's
  ``features`` (:attr:`Score.needs_features`; ``brainvae anomaly --features FAE_RUN``).

An architecture adds a score of its own by extending ``scores()`` (vqvae: ``prior_nll``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

SMOOTH_SIGMA = 2.0  # px: Gaussian applied to the signed residual by residual_neg_smooth
# residual_local (chosen on the BraTS validation cases, benchmarks/README.md, anomaly, session 13): the signed
# residual's slow drift, its Gaussian mean over the head at this scale (px), is removed, and the brighter part
# counts with this weight beside the darker part.
DRIFT_SIGMA = 32.0
BRIGHT_WEIGHT = 0.25


def gaussian_blur(x: Tensor, sigma: float, padding: str = "reflect") -> Tensor:
    """Separable Gaussian blur of (B, 1, H, W); beyond the border the image is reflected, or ``padding="zeros"``
    (any kernel size: a wide blur of a small image cannot reflect)."""
    if sigma <= 0:
        return x
    r = max(1, int(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    if padding == "zeros":
        return F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, r)), k.view(1, 1, -1, 1), padding=(r, 0))
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


class ScoreBatch:
    """One batch to score, and what several scores share, each computed once on first use.

    ``n_samples`` posterior samples, drawn from ``generator``, feed the reconstruction probability.
    """

    def __init__(self, model, x: Tensor, cond=None, n_samples: int = 8, generator: torch.Generator | None = None,
                 features: Callable[[Tensor], Tensor] | None = None):
        self.model = model
        self.x = x.float()  # (B, 1, H, W)
        self.cond = cond
        self.n_samples = n_samples
        self.generator = generator
        self.features = features  # a frozen feature net (B, 1, H, W) -> (B, C, h, w), for the perceptual scores
        self.shared: dict[str, Tensor] = {}  # what an architecture's own scores share (e.g. ldm's restorations)

    @cached_property
    def x_hat(self) -> Tensor:
        """The mean reconstruction decode(mode of q(z|x)): (B, 1, H, W) float32."""
        return self.model.reconstruct(self.x, self.cond).float()

    @cached_property
    def perceptual(self) -> Tensor:
        """``feature_distance`` of x and x_hat in the batch's feature net: (B, 1, H, W), 0 outside the head."""
        if self.features is None:
            raise ValueError("a perceptual score needs the batch's features (ScoreBatch(features=...))")
        return feature_distance(self.features, self.x, self.x_hat)

    @cached_property
    def kl_grad(self) -> Tensor:
        """|dKL/dx|, smoothed and normalised (``kl_gradient``): (B, 1, H, W) in [0, 1]."""
        return kl_gradient(self.model, self.x, self.cond)


@dataclass(frozen=True)
class Score:
    """One anomaly score a model offers."""

    compute: Callable[[ScoreBatch], Tensor]  # -> (B, 1, H, W); an additive score: (B, len(terms), H, W)
    description: str
    # An additive score's terms, in different units: the evaluation divides each by its 99th percentile over
    # the in-brain pixels of all scored slices (no labels involved), then adds them.
    terms: tuple[str, ...] = ()
    # Facts reported beside the score's metrics, from the model and the number of posterior samples.
    details: Callable[[object, int], dict] | None = None
    needs_features: bool = False  # computed only with the batch's ``features`` (a perceptual score)


# -- the scores -------------------------------------------------------------------------------------
def residual(b: ScoreBatch) -> Tensor:
    """|x - x_hat| (Baur et al. 2021)."""
    return (b.x - b.x_hat).abs()


def residual_pos(b: ScoreBatch) -> Tensor:
    """(x - x_hat)+: the image is brighter than its reconstruction (hyperintense anomalies)."""
    return (b.x - b.x_hat).clamp_min(0)


def residual_neg(b: ScoreBatch) -> Tensor:
    """(x_hat - x)+: the image is darker than its reconstruction (hypointense anomalies, e.g. T1 tumour)."""
    return (b.x_hat - b.x).clamp_min(0)


def residual_neg_smooth(b: ScoreBatch) -> Tensor:
    """(G_sigma * (x_hat - x))+: smooth the SIGNED residual, then keep the darker-than-expected part.

    A reconstruction blurrier than its input is too dark on the thin bright ridges and too bright in
    the thin dark sulci between them, so (x_hat - x)+ lights up every sulcus; smoothing the signed
    residual first lets those neighbouring errors of opposite sign cancel, while a hypointense
    lesion wider than sigma (a T1 tumour core) stays negative throughout.
    """
    return gaussian_blur(b.x_hat - b.x, SMOOTH_SIGMA).clamp_min(0)


def without_drift(d: Tensor, inside: Tensor, sigma: float = DRIFT_SIGMA) -> Tensor:
    """d (B, 1, H, W) minus its slow drift, inside ``inside`` (0 elsewhere): the drift is d's Gaussian-weighted
    mean (sigma px) over the pixels inside, so the head's edge does not pull it towards 0."""
    m = inside.float()
    drift = gaussian_blur(d.float() * m, sigma, "zeros") / gaussian_blur(m, sigma, "zeros").clamp_min(1e-6)
    return (d - drift) * m


def local_residual(restored: Tensor, x: Tensor, sigma: float = DRIFT_SIGMA,
                   bright_weight: float = BRIGHT_WEIGHT) -> Tensor:
    """The signed residual restored - x (B, 1, H, W) over the head (x > 0), without its slow drift at scale
    ``sigma`` (``without_drift``; 0: kept): its darker-than-expected part plus ``bright_weight`` x its brighter
    part.

    Another scanner's healthy tissue differs from the training scans' on the scale of the head (a receive
    coil's bias, another grey/white contrast), and a model of healthy brains redraws it in the training
    scans' way: a residual that covers whole lobes. A lesion departs on its own, smaller scale. On T1 a tumour
    is mostly darker than expected, parts of it (and of its oedema) brighter.
    """
    head = x > 0
    d = restored.float() - x.float()
    d = without_drift(d, head, sigma) if sigma > 0 else d * head
    return d.clamp_min(0) + bright_weight * (-d).clamp_min(0)


def residual_local(b: ScoreBatch) -> Tensor:
    """``local_residual`` of the mean reconstruction."""
    return local_residual(b.x_hat, b.x)


@torch.no_grad()
def feature_distance(features: Callable[[Tensor], Tensor], a: Tensor, b: Tensor) -> Tensor:
    """||u(f(a)) - u(f(b))||^2 over channels, u scaling each position's channel vector to unit length, upsampled
    bilinearly from the feature grid to a's (B, 1, H, W)."""
    fa, fb = (f.float() / f.float().pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-6)
              for f in (features(a), features(b)))
    d = (fa - fb).pow(2).sum(1, keepdim=True)
    return F.interpolate(d, size=a.shape[-2:], mode="bilinear", align_corners=False) * (a > 0)


def perceptual(b: ScoreBatch) -> Tensor:
    """``feature_distance`` of x and its mean reconstruction in the batch's feature net, over the head (computed
    once per batch: ``perceptual_neg`` and the dae's ``restoration_perceptual`` add it to a residual)."""
    return b.perceptual


def recon_prob(b: ScoreBatch) -> Tensor:
    """Reconstruction probability (An & Cho 2015) as a per-pixel NLL in nats, averaged over L samples.

    -log p(x | z_l) per pixel = (x - mu_l)^2 / (2 sigma_l^2) + log sigma_l + log(2 pi) / 2, for
    z_l ~ q(z|x), l = 1..L; a deterministic model uses its single code.
    """
    model, x = b.model, b.x
    post = model.encode(x, b.cond)
    zs = [post.sample(b.generator) for _ in range(b.n_samples)] if model.stochastic else [post.mode()]
    total = torch.zeros_like(x)
    for z in zs:
        mean, log_sigma = model.decode_params(z, b.cond)
        mean, log_sigma = mean.float(), log_sigma.float()
        total += 0.5 * ((x - mean) / log_sigma.exp()).pow(2) + log_sigma + 0.5 * math.log(2 * math.pi)
    return total / len(zs)


def recon_prob_details(model, n_samples: int) -> dict:
    return {"likelihood": model.likelihood(), "samples": n_samples if model.stochastic else 1}


def kl_gradient(model, x: Tensor, cond=None) -> Tensor:
    """|dKL(q(z|x) || p(z)) / dx|, Gaussian-smoothed (``model.score_smoothing`` px), divided by its per-image
    maximum: (B, 1, H, W) in [0, 1] (Zimmerer et al. 2019). Raises ``ValueError`` for models without a KL term."""
    from .base import DiagonalGaussian

    if not model.stochastic:
        raise ValueError(f"{model.arch} has no Gaussian posterior trained with a KL term")
    with torch.enable_grad():
        x_in = x.detach().float().clone().requires_grad_(True)
        post = model.encode(x_in, cond)
        if not isinstance(post, DiagonalGaussian):
            raise ValueError(f"{model.arch}'s posterior is not Gaussian")
        (grad,) = torch.autograd.grad(post.kl().sum(), x_in)
    g = gaussian_blur(grad.abs(), model.score_smoothing)
    return (g / g.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)).detach()


def kl_combined(b: ScoreBatch) -> Tensor:
    """ceVAE combined score (Zimmerer et al. 2019): |x - x_hat| * normalised smoothed |dKL/dx|."""
    return residual(b) * b.kl_grad


def kl_additive_terms(b: ScoreBatch) -> Tensor:
    """The two terms of the additive variant, |x - x_hat| and normalised |dKL/dx|: (B, 2, H, W)."""
    return torch.cat([residual(b), b.kl_grad], 1)


# Every model's scores (``BrainModel.scores``), in report order.
RECONSTRUCTION_SCORES = {
    "residual": Score(residual, "|x - x_hat| of the mean reconstruction"),
    "residual_pos": Score(residual_pos, "(x - x_hat)+: brighter than reconstructed (hyperintense lesions)"),
    "residual_neg": Score(residual_neg, "(x_hat - x)+: darker than reconstructed (hypointense lesions, e.g. "
                                        "tumour on T1)"),
    "residual_neg_smooth": Score(residual_neg_smooth, f"(G * (x_hat - x))+: the signed residual smoothed (Gaussian, "
                                                      f"sigma {SMOOTH_SIGMA:g} px) before rectification, so thin dark "
                                                      "structures a blurry reconstruction cannot draw cancel"),
    "residual_local": Score(residual_local, f"(x_hat - x) without its slow drift (its Gaussian mean over the head, "
                                            f"sigma {DRIFT_SIGMA:g} px): the darker part + {BRIGHT_WEIGHT:g} x "
                                            f"the brighter part"),
    "recon_prob": Score(recon_prob, "reconstruction probability (An & Cho 2015): per-pixel NLL averaged over L "
                                    "posterior samples", details=recon_prob_details),
    "perceptual": Score(perceptual, "distance of x and x_hat in the first level of an in-domain feature encoder "
                                    "(unit-length channel vectors; LPIPS-style)", needs_features=True),
    "perceptual_neg": Score(lambda b: torch.cat([perceptual(b), residual_neg(b)], 1),
                            "perceptual + residual_neg (each over its dataset scale)",
                            terms=("perceptual", "residual_neg"), needs_features=True),
}
# Scores of models with a Gaussian posterior trained with a KL term (``model.stochastic``).
KL_SCORES = {
    "kl_combined": Score(kl_combined, "ceVAE combined score (Zimmerer et al. 2019): residual x normalised smoothed "
                                      "|dKL/dx|"),
    "kl_additive": Score(kl_additive_terms, "ceVAE additive variant: residual + normalised smoothed |dKL/dx| (each "
                                            "over its dataset scale)", terms=("residual", "kl_gradient")),
}
