"""ResNet VAE with a learned per-pixel variance decoder, a fitted sampling prior and an
optional patch-adversarial term.

A stronger sibling of ``vae`` built to stay within a few times its CPU cost:

* Residual blocks (He et al. 2016) in encoder and decoder, in the bottleneck
  form (1x1, 3x3, 3x3, 1x1 at half width, as in VDVAE, Child 2021), BatchNorm
  and SiLU; no convolution at full resolution: the first stage folds
  ``patch x patch`` pixels into channels and the decoder ends in a pixel
  shuffle (Shi et al. 2016), as the plain VAE does.
* A decoder that predicts a mean *and* a log standard deviation per pixel,
  trained with the Gaussian negative log-likelihood in float32 ("calibrated
  decoder", Rybkin et al. 2021; Dai & Wipf 2019), with a floor ``sigma_min`` so
  the likelihood cannot collapse onto the exactly-zero background.
  ``decode`` returns the mean image.
* A latent you can sample: a small spatial latent (``latent_channels`` at the
  bottleneck grid, S / 16 with the defaults: 8 x 4 x 4 at 64 px, 8 x 8 x 8 at
  128 px) or, with ``latent_channels = 0``, a flat ``latent_dim`` vector. The
  KL is against N(0, I) as in any VAE, but ``sample`` draws from a Gaussian
  fitted to the aggregate posterior q(z) (running moments, like BatchNorm's):
  after the short trainings this project runs, q(z) is far from N(0, I)
  (measured: covariance eigenvalues from 0.04 to 17 after 1,600 steps) and
  N(0, I) samples land where the decoder never was. ``prior = "standard"``
  restores N(0, I) sampling. A large spatial latent (the KL-autoencoder of
  Rombach et al. 2022) is not offered: no single Gaussian covers it.
* Optional: free bits (Kingma et al. 2016, IAF), and a PatchGAN discriminator
  (Isola et al. 2017) with spectral normalisation (Miyato et al. 2018) and the
  hinge loss (Lim & Ye 2017), weighted adaptively against the reconstruction
  term as in VQGAN (Esser et al. 2021). With ``adv_weight == 0`` no
  discriminator exists.

Engine contract for the adversarial term: ``optimizer_groups()`` returns
``{"model": [...], "disc": [...]}``; the engine sets ``model.step`` (an int,
the global optimiser step) before each forward; in training mode, once
``step >= adv_start``, the generator term ``adv`` is part of ``losses["loss"]``;
the engine then calls ``disc_loss(x, recon.detach(), cond)`` -> (B,) and steps
the "disc" group. Before ``adv_start`` ``disc_loss`` is a zero that touches no
parameter (so AdamW skips the group), and ``adv`` is absent; evaluation-mode
losses never contain ``adv``. Under DDP the discriminator is unused before
``adv_start``: wrap with ``find_unused_parameters=True`` when "disc" exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import check
from .base import (PRIORS, BaseConfig, BrainModel, Cond, Conditioning, DiagonalGaussian, FittedGaussianPrior, Output,
                   gaussian_nll, randn)
from .blocks import bottleneck_size, check_stages, conv_bn_act, up_bn_act
from .registry import register




@dataclass(frozen=True)
class ResVAEConfig(BaseConfig):
    channels: tuple[int, ...] = (64, 128, 256)  # stage widths: space-to-depth stage, then stride-2 stages
    patch: int = 4  # the first stage folds patch x patch pixels into channels (no full-resolution convs)
    enc_blocks: int = 1  # residual blocks per encoder stage
    dec_blocks: int = 1  # residual blocks per decoder stage
    enc_top_blocks: bool = True  # False: no encoder blocks at the first (widest, costliest) stage: faster
    latent_channels: int = 8  # spatial latent (latent_channels, s, s) at the bottleneck grid; 0 = flat
    latent_dim: int = 128  # flat latent size (used only when latent_channels == 0)
    beta: float = 1.0  # weight of the KL term (beta-VAE when != 1)
    # sampling prior: "standard" N(0, I), or "fitted" (Gaussian of the aggregate posterior; its (D, D) moments
    # are kept in the checkpoint, so it suits small latents only)
    prior: str = "fitted"
    prior_decay: float = 0.99  # per-step decay of the running moments behind the fitted prior
    sigma_min: float = 0.01  # floor of the decoder's per-pixel std (images in [0, 1])
    sigma_init: float = 0.1  # the decoder's std at initialisation
    free_bits: float = 0.0  # nats per latent unit below which the KL is not penalised (0 = off)
    cond_dim: int = 32  # width of the conditioning embedding
    adv_weight: float = 0.0  # weight of the patch-adversarial term (0 = no discriminator)
    adv_start: int = 2000  # optimiser step (``model.step``) at which the adversarial game starts
    fm_weight: float = 0.0  # discriminator feature matching, relative to the hinge term (adv_weight > 0)
    disc_channels: tuple[int, ...] = (32, 64, 128)  # PatchGAN widths, one stride-2 conv each

    def __post_init__(self) -> None:
        super().__post_init__()
        check_stages(self.image_size, self.channels, self.patch)
        check(self.enc_blocks >= 0 and self.dec_blocks >= 0, "enc_blocks and dec_blocks must be >= 0")
        check(self.latent_dim > 0 and self.latent_channels >= 0, "latent_dim must be > 0, latent_channels >= 0")
        check(self.beta >= 0 and self.free_bits >= 0, "beta and free_bits must be >= 0")
        check(self.prior in PRIORS, f"prior must be one of {PRIORS}, got {self.prior!r}")
        check(0 <= self.prior_decay < 1, "prior_decay must be in [0, 1)")
        check(0 < self.sigma_min < self.sigma_init, "need 0 < sigma_min < sigma_init")
        check(self.adv_weight >= 0 and self.adv_start >= 0 and self.fm_weight >= 0,
              "adv_weight, adv_start and fm_weight must be >= 0")
        check(len(self.disc_channels) >= 1 and all(c > 0 for c in self.disc_channels),
              "disc_channels must be positive")


class Bottleneck(nn.Module):
    """Bottleneck residual block (He et al. 2016; as in VDVAE, Child 2021): (B, C, h, w) -> same.

    1x1 conv to ``C / 2``, two 3x3 convs, 1x1 back to C, BatchNorm + SiLU: a
    3x3-pair's receptive field at 5.5 C^2 multiply-adds per pixel instead of
    the basic block's 18 C^2, which is what keeps this model within a few times
    the plain VAE's speed on CPU.
    """

    def __init__(self, c: int):
        super().__init__()
        m = max(c // 2, 8)
        self.body = nn.Sequential(
            nn.Conv2d(c, m, 1, bias=False), nn.BatchNorm2d(m), nn.SiLU(),
            nn.Conv2d(m, m, 3, 1, 1, bias=False), nn.BatchNorm2d(m), nn.SiLU(),
            nn.Conv2d(m, m, 3, 1, 1, bias=False), nn.BatchNorm2d(m), nn.SiLU(),
            nn.Conv2d(m, c, 1, bias=False), nn.BatchNorm2d(c))
        nn.init.zeros_(self.body[-1].weight)  # the branch starts at zero: identity at init (Goyal et al. 2017)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.body(x))


class ResEncoder(nn.Module):
    """(B, 1, S, S) -> (B, channels[-1], S / (patch * 2**(L - 1)), ...).

    Space-to-depth first (as the plain VAE's encoder): convolutions at full
    resolution with few channels are memory-bound on CPU. Each stage: a conv
    (stride 2 after the first) then ``blocks`` residual blocks.
    """

    def __init__(self, channels: tuple[int, ...], blocks: int, patch: int, top: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.PixelUnshuffle(patch)]
        prev = patch * patch
        for i, c in enumerate(channels):
            layers.append(conv_bn_act(prev, c, stride=1 if i == 0 else 2))
            layers.extend(Bottleneck(c) for _ in range(blocks if i > 0 or top else 0))
            prev = c
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ResDecoder(nn.Module):
    """(B, channels[-1], s, s) -> (B, 2, S, S): per-pixel mean logit and raw log-sigma.

    Each stage: ``blocks`` residual blocks then a transposed conv doubling H, W;
    the last stage ends in depth-to-space (pixel shuffle, Shi et al. 2016).
    """

    def __init__(self, channels: tuple[int, ...], blocks: int, patch: int):
        super().__init__()
        rev = tuple(reversed(channels))
        layers: list[nn.Module] = []
        for c_in, c in zip(rev, rev[1:]):
            layers.extend(Bottleneck(c_in) for _ in range(blocks))
            layers.append(up_bn_act(c_in, c))
        layers.extend(Bottleneck(channels[0]) for _ in range(blocks))
        self.net = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels[0], 2 * patch * patch, 3, 1, 1)  # (mean, log-sigma) x patch^2
        self.shuffle = nn.PixelShuffle(patch)

    def forward(self, h: Tensor) -> Tensor:
        return self.shuffle(self.head(self.net(h)))


class PatchDiscriminator(nn.Module):
    """PatchGAN critic (Isola et al. 2017) with spectral norm (Miyato et al. 2018), no normalisation layers.

    (B, 1, H, W) in [0, 1] -> (B, 1, H / 2**len(channels), W / 2**len(channels)) real-vs-fake logits.
    ``features`` also returns the activations after each stride-2 stage, for feature matching.
    """

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers: list[nn.Module] = []
        prev = 1
        for c in channels:
            layers += [sn(nn.Conv2d(prev, c, 4, 2, 1)), nn.LeakyReLU(0.2)]
            prev = c
        layers.append(sn(nn.Conv2d(prev, 1, 3, 1, 1)))
        self.net = nn.Sequential(*layers)

    def features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        h, feats = 2.0 * x - 1.0, []
        for layer in self.net:
            h = layer(h)
            if isinstance(layer, nn.LeakyReLU):
                feats.append(h)
        return h, feats

    def forward(self, x: Tensor) -> Tensor:
        return self.net(2.0 * x - 1.0)


def feature_matching(real: list[Tensor], fake: list[Tensor]) -> Tensor:
    """Discriminator feature matching (Salimans et al. 2016; pix2pixHD, Wang et al. 2018): mean |f(x) - f(x_hat)|
    over each layer's activations, averaged over layers, per sample (B,). The real features are constants."""
    terms = [(r.detach().float() - f.float()).abs().flatten(1).mean(1) for r, f in zip(real, fake)]
    return torch.stack(terms).mean(0)


def hinge_critic_loss(real: Tensor, fake: Tensor) -> Tensor:
    """Hinge loss of a critic per sample (B,), from its logits (B, P) on real and on generated inputs."""
    return F.relu(1.0 - real).mean(1) + F.relu(1.0 + fake).mean(1)


def adaptive_weight(rec: Tensor, adv: Tensor, wrt: Tensor) -> Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021): ||d rec / d wrt|| / ||d adv / d wrt||, a detached scalar, so
    an adversarial term scaled by it means the same whatever the reconstruction term's magnitude. ``rec``, ``adv``:
    the two terms (summed over the batch); ``wrt``: where their gradients meet (a last layer's weight, or the
    generated tensor)."""
    g_rec = torch.autograd.grad(rec, wrt, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, wrt, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


@register("resvae", ResVAEConfig)
class ResVAE(BrainModel):
    config: ResVAEConfig
    fills_missing_conditions = True  # sample() uses default_cond

    def __init__(self, config: ResVAEConfig):
        super().__init__(config)
        c = config
        self.bottom = bottleneck_size(c.image_size, c.channels, c.patch)  # spatial size at the bottleneck
        top = c.channels[-1]
        k = c.cond_dim if c.conditions else 0
        self.cond = Conditioning(c.conditions, c.cond_dim) if c.conditions else None
        self.encoder = ResEncoder(c.channels, c.enc_blocks, c.patch, c.enc_top_blocks)
        if c.latent_channels:  # spatial latent: 1x1 conv to the posterior, 3x3 conv back
            self.to_posterior = nn.Conv2d(top + k, 2 * c.latent_channels, 1)
            self.from_latent = nn.Sequential(nn.Conv2d(c.latent_channels + k, top, 3, 1, 1, bias=False),
                                             nn.BatchNorm2d(top), nn.SiLU())
        else:  # flat latent: dense layers through the whole bottleneck grid
            flat = top * self.bottom ** 2
            self.to_posterior = nn.Linear(flat + k, 2 * c.latent_dim)
            self.from_latent = nn.Sequential(nn.Linear(c.latent_dim + k, flat, bias=False),
                                             nn.Unflatten(1, (top, self.bottom, self.bottom)),
                                             nn.BatchNorm2d(top), nn.SiLU())
        self.decoder = ResDecoder(c.channels, c.dec_blocks, c.patch)
        self._init_head()
        self.disc = PatchDiscriminator(c.disc_channels) if c.adv_weight > 0 else None
        self.step = 0  # global optimiser step, set by the engine (see the ``step`` property)
        self.prior = (FittedGaussianPrior(self.latent_shape().numel(), c.prior_decay, cond_dim=len(c.conditions))
                      if c.prior == "fitted" else None)

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        """The engine's optimiser step; stored with a bool so torch.compile sees two values, not one per step."""
        self._step = int(value)
        self._adv_on = self.disc is not None and self._step >= self.config.adv_start

    def latent_shape(self) -> torch.Size:
        c = self.config
        return torch.Size((c.latent_channels, self.bottom, self.bottom) if c.latent_channels else (c.latent_dim,))

    def _init_head(self) -> None:
        """ICNR init of the pixel-shuffle head (Aitken et al. 2017: no checkerboard at init), and a
        uniform sigma = sigma_init (like the plain VAE) so early gradients are tame."""
        head, r2 = self.decoder.head, self.config.patch ** 2
        lo, init = math.log(self.config.sigma_min), math.log(self.config.sigma_init)
        with torch.no_grad():
            head.weight.copy_(head.weight[::r2].repeat_interleave(r2, dim=0))  # sub-pixels share a kernel
            head.bias.copy_(head.bias[::r2].repeat_interleave(r2))
            sigma = slice(self.config.patch ** 2, None)  # pixel shuffle: the second half is log-sigma
            self.decoder.head.weight[sigma].zero_()
            self.decoder.head.bias[sigma] = lo + math.log(math.expm1(init - lo))  # softplus^-1

    # -- conditioning -------------------------------------------------------------------------------
    @staticmethod
    def _append(h: Tensor, e: Tensor | None) -> Tensor:
        """Concatenate the condition embedding (B, k) to flat (B, F) or spatial (B, C, s, s) features."""
        if e is None:
            return h
        e = e.to(h.dtype)
        if h.dim() == 4:
            e = e[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
        return torch.cat([h, e], 1)

    # -- the contract ---------------------------------------------------------------------------------
    def encode(self, x: Tensor, cond: Cond = None) -> DiagonalGaussian:
        h = self.encoder(x)  # (B, C, s, s)
        if not self.config.latent_channels:
            h = h.flatten(1)  # (B, C * s * s)
        mean, logvar = self.to_posterior(self._append(h, self._embed(cond))).chunk(2, dim=1)
        return DiagonalGaussian(mean.float(), logvar.float())  # (B, D) or (B, Cz, s, s), float32

    def decode_params(self, z: Tensor, cond: Cond = None) -> tuple[Tensor, Tensor]:
        """Per-pixel mean in [0, 1] and log-sigma >= log(sigma_min), both (B, 1, H, W) float32."""
        h = self.from_latent(self._append(z, self._embed(cond)))  # (B, C, s, s)
        out = self.decoder(h).float()  # (B, 2, H, W); the likelihood is computed in float32
        lo = math.log(self.config.sigma_min)
        return torch.sigmoid(out[:, :1]), lo + F.softplus(out[:, 1:] - lo)

    def decode(self, z: Tensor, cond: Cond = None) -> Tensor:
        return self.decode_params(z, cond)[0]  # the mean image (B, 1, H, W)

    def forward(self, x: Tensor, cond: Cond = None, kl_scale: float = 1.0) -> Output:
        posterior = self.encode(x, cond)
        z = posterior.sample()
        if self.training and self.prior is not None:
            self.prior.update(z, self._cond_vector(cond))
        mean, log_sigma = self.decode_params(z, cond)
        rec = gaussian_nll(x.float(), mean, log_sigma)  # (B,) nats
        kl_terms = 0.5 * (posterior.mean.pow(2) + posterior.logvar.exp() - 1.0 - posterior.logvar)
        kl_terms = kl_terms.flatten(1)  # (B, D)
        kl = kl_terms.sum(1)
        kl_obj = kl_terms.clamp(min=self.config.free_bits).sum(1) if self.config.free_bits > 0 else kl
        losses = {"loss": rec + self.config.beta * kl_scale * kl_obj, "recon": rec, "kl": kl}
        if self._adversarial_active():
            adv = self._generator_adv(x, mean, rec)
            losses["adv"] = adv
            losses["loss"] = losses["loss"] + adv
        return Output(mean, posterior, losses)

    @torch.no_grad()
    def sample(self, n: int, cond: Cond = None, generator: torch.Generator | None = None) -> Tensor:
        cond = self.default_cond(n, cond) if self.cond is not None else None
        if self.config.prior == "fitted":
            z = self.prior.sample(n, generator, self.device, self._cond_vector(cond))  # (n, D)
        else:
            z = randn((n, self.latent_shape().numel()), generator, self.device)
        z = z.view(n, *self.latent_shape())
        return self.decode(z, cond)

    def likelihood(self) -> str:
        return "learned per-pixel sigma (decode_params)"

    # -- adversarial term -----------------------------------------------------------------------------
    def _adversarial_active(self) -> bool:
        return self._adv_on and self.training and torch.is_grad_enabled()

    def _generator_adv(self, x: Tensor, recon: Tensor, rec: Tensor) -> Tensor:
        """Hinge generator term -mean(D(recon)) (+ ``fm_weight`` x feature matching) per sample, scaled to
        the reconstruction term: (B,).

        The scale is VQGAN's adaptive weight (Esser et al. 2021): the ratio of the gradient norms of the
        reconstruction and adversarial terms at the decoder's last layer, so ``adv_weight`` means the
        same whatever the likelihood's magnitude.
        """
        logits, fake_feats = self.disc.features(recon)
        g_adv = -logits.float().flatten(1).mean(1)  # (B,)
        if self.config.fm_weight > 0:
            with torch.no_grad():
                real_feats = self.disc.features(x)[1]
            g_adv = g_adv + self.config.fm_weight * feature_matching(real_feats, fake_feats)
        scale = adaptive_weight(rec.sum(), g_adv.sum(), self.decoder.head.weight)
        return self.config.adv_weight * scale * g_adv

    def disc_loss(self, x: Tensor, recon: Tensor, cond: Cond = None) -> Tensor:
        """Hinge discriminator loss per sample (B,); zero, touching no parameter, before ``adv_start``."""
        if self.disc is None:
            raise RuntimeError("this resvae has adv_weight == 0: it has no discriminator")
        if not self._adv_on:
            return torch.zeros(len(x), device=x.device, requires_grad=True)
        real = self.disc(x).float().flatten(1)
        fake = self.disc(recon.detach()).float().flatten(1)
        return hinge_critic_loss(real, fake)

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        if self.disc is None:
            return {"model": list(self.parameters())}
        disc = {id(p) for p in self.disc.parameters()}
        return {"model": [p for p in self.parameters() if id(p) not in disc], "disc": list(self.disc.parameters())}
