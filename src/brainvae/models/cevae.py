"""Context-encoding VAE (Zimmerer et al. 2018, "Context-encoding Variational Autoencoder
for Unsupervised Anomaly Detection"; 2019 MIDL).

The VAE objective plus a context-encoding term: the same encoder/decoder must
reconstruct the original image from a copy with random rectangles replaced by
noise. Its anomaly scores (``kl_combined``, ``kl_additive`` in ``models.scoring``, offered
by every model with a KL term) combine the residual with the gradient of the KL term with
respect to the input, which highlights what the encoder finds unlikely; ``score_smoothing``
sets how much that gradient is smoothed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Cond, Output, gaussian_nll
from .registry import register
from .vae import VAE, VAEConfig


@dataclass(frozen=True)
class CEVAEConfig(VAEConfig):
    ce_weight: float = 1.0  # weight of the context-encoding reconstruction
    n_patches: int = 3  # rectangles masked per image
    patch_max: float = 0.35  # largest rectangle side as a fraction of the image
    score_smoothing: float = 1.5  # Gaussian sigma (px) applied to the KL gradient


def mask_patches(x: Tensor, n_patches: int, patch_max: float, generator: torch.Generator | None = None) -> Tensor:
    """Copy of x (B, 1, H, W) with ``n_patches`` random rectangles per image replaced by uniform noise."""
    b, _, h, w = x.shape
    dev = generator.device if generator is not None else x.device
    lo = max(2, int(0.1 * h))
    hi = max(lo + 1, int(patch_max * h))
    sizes = torch.randint(lo, hi, (b, n_patches, 2), generator=generator, device=dev)
    y0 = (torch.rand(b, n_patches, generator=generator, device=dev) * (h - sizes[..., 0])).long()
    x0 = (torch.rand(b, n_patches, generator=generator, device=dev) * (w - sizes[..., 1])).long()
    rows = torch.arange(h, device=dev).view(1, 1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, 1, w)
    inside = ((rows >= y0[..., None, None]) & (rows < (y0 + sizes[..., 0])[..., None, None])
              & (cols >= x0[..., None, None]) & (cols < (x0 + sizes[..., 1])[..., None, None]))
    mask = inside.any(dim=1, keepdim=True).to(x.device)  # (B, 1, H, W)
    noise = torch.rand(x.shape, generator=generator, device=dev).to(x.device, x.dtype)
    return torch.where(mask, noise, x)


@register("cevae", CEVAEConfig)
class CEVAE(VAE):
    config: CEVAEConfig

    @property
    def score_smoothing(self) -> float:
        return self.config.score_smoothing

    def forward(self, x: Tensor, cond: Cond = None, kl_scale: float = 1.0) -> Output:
        out = super().forward(x, cond, kl_scale)
        masked = mask_patches(x, self.config.n_patches, self.config.patch_max)
        ce_recon = self.decode(self.encode(masked, cond).mode(), cond)
        ce = gaussian_nll(x.float(), ce_recon.float(), math.log(self.config.sigma))
        out.losses["ce"] = ce
        out.losses["loss"] = out.losses["loss"] + self.config.ce_weight * ce
        return out
