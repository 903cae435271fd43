"""Convolutional Gaussian VAE (Kingma & Welling 2014) with a flat latent.

β-VAE (Higgins et al. 2017) is this model with ``beta != 1``; KL warm-up
(Bowman et al. 2016) is the engine's ``kl_scale`` ramp. Conditioning on age,
sex and slice position (``conditions``) is a composed module: its embedding is
appended to the encoder features and to the latent code (CVAE, Sohn et al. 2015).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import check
from .base import PRIORS, BaseConfig, FittedGaussianPrior, BrainModel, Cond, Conditioning, DiagonalGaussian, Output, gaussian_nll, randn
from .blocks import ConvDecoder, ConvEncoder, bottleneck_size, check_stages
from .registry import register


@dataclass(frozen=True)
class VAEConfig(BaseConfig):
    channels: tuple[int, ...] = (64, 128, 256)  # stage widths: space-to-depth stage, then stride-2 stages
    patch: int = 4  # the first stage folds patch x patch pixels into channels
    res_blocks: int = 0  # residual blocks per stage
    latent_dim: int = 128
    beta: float = 1.0  # weight of the KL term (beta-VAE when != 1)
    sigma: float = 0.1  # fixed per-pixel std of the Gaussian likelihood
    cond_dim: int = 32  # width of the conditioning embedding
    # Sampling prior: "fitted", a Gaussian fitted to the aggregate posterior (see
    # FittedGaussianPrior), or "standard" N(0, I). Training is identical; on IXI T1 at
    # 128 px N(0, I) samples of a 5-minute run are noise-like (benchmarks/results/grids).
    prior: str = "fitted"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_stages(self.image_size, self.channels, self.patch)
        check(self.latent_dim > 0 and self.beta >= 0 and self.sigma > 0, "latent_dim, beta, sigma must be positive")
        check(self.prior in PRIORS, f"prior must be one of {PRIORS}, got {self.prior!r}")


@register("vae", VAEConfig)
class VAE(BrainModel):
    config: VAEConfig
    fills_missing_conditions = True  # sample() uses default_cond

    def __init__(self, config: VAEConfig):
        super().__init__(config)
        c = config
        self.bottom = bottleneck_size(c.image_size, c.channels, c.patch)  # spatial size at the bottleneck
        flat = c.channels[-1] * self.bottom ** 2
        k = c.cond_dim if c.conditions else 0
        self.cond = Conditioning(c.conditions, c.cond_dim) if c.conditions else None
        self.encoder = ConvEncoder(c.channels, 1, c.res_blocks, c.patch)
        self.to_posterior = nn.Linear(flat + k, 2 * c.latent_dim)
        self.from_latent = nn.Linear(c.latent_dim + k, flat)
        self.decoder = ConvDecoder(c.channels, 1, c.res_blocks, c.patch)
        self.prior = FittedGaussianPrior(c.latent_dim, cond_dim=len(c.conditions)) if c.prior == "fitted" else None

    def encode(self, x: Tensor, cond: Cond = None) -> DiagonalGaussian:
        h = self.encoder(x).flatten(1)  # (B, C * s * s)
        e = self._embed(cond)
        if e is not None:
            h = torch.cat([h, e.to(h.dtype)], 1)
        mean, logvar = self.to_posterior(h).chunk(2, dim=1)  # (B, latent_dim) each
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: Tensor, cond: Cond = None) -> Tensor:
        e = self._embed(cond)
        if e is not None:
            z = torch.cat([z, e.to(z.dtype)], 1)
        h = self.from_latent(z).view(len(z), self.config.channels[-1], self.bottom, self.bottom)
        return torch.sigmoid(self.decoder(h))  # (B, 1, H, W)

    @property
    def fixed_sigma(self) -> float:
        return self.config.sigma

    def losses(self, x: Tensor, recon: Tensor, posterior: DiagonalGaussian, kl_scale: float) -> dict[str, Tensor]:
        rec = gaussian_nll(x.float(), recon.float(), math.log(self.config.sigma))
        kl = posterior.kl().float() if self.stochastic else torch.zeros_like(rec)
        return {"loss": rec + self.config.beta * kl_scale * kl, "recon": rec, "kl": kl}

    def forward(self, x: Tensor, cond: Cond = None, kl_scale: float = 1.0) -> Output:
        posterior = self.encode(x, cond)
        z = posterior.sample() if self.stochastic else posterior.mode()
        if self.training and self.prior is not None:
            self.prior.update(z, self._cond_vector(cond))
        recon = self.decode(z, cond)
        return Output(recon, posterior, self.losses(x, recon, posterior, kl_scale))

    @torch.no_grad()
    def sample(self, n: int, cond: Cond = None, generator: torch.Generator | None = None) -> Tensor:
        cond = self.default_cond(n, cond) if self.cond is not None else None
        if self.prior is not None:
            z = self.prior.sample(n, generator, self.device, self._cond_vector(cond))
        else:
            z = randn((n, self.config.latent_dim), generator, self.device)
        return self.decode(z, cond)


@dataclass(frozen=True)
class CVAEConfig(VAEConfig):
    conditions: tuple[str, ...] = ("age", "sex", "position")


@register("cvae", CVAEConfig)
class CVAE(VAE):
    """The VAE conditioned on age, sex and slice position by default."""


@dataclass(frozen=True)
class AEConfig(VAEConfig):
    beta: float = 0.0  # no KL term: kept only so the VAE network is reused unchanged

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta == 0, "ae has no KL term: beta must be 0")
        check(self.prior == "fitted", "ae samples from a Gaussian fitted to its codes: prior must be 'fitted'")


@register("ae", AEConfig)
class AE(VAE):
    """Plain deterministic autoencoder: the VAE network, the posterior mean as the code, no KL.

    The anomaly-detection baseline (Baur et al. 2021); it still generates by sampling a
    Gaussian fitted to its codes (Ghosh et al. 2020's regularised-AE recipe, minus the regulariser).
    """

    stochastic = False  # VAE.forward then uses the posterior mean and no KL term
