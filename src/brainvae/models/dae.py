"""Denoising autoencoder for anomaly localisation (Kascenas et al. 2022, "Denoising autoencoders for
unsupervised anomaly detection in brain MRI", MIDL).

    x (B,1,128,128) + coarse noise --UNet--> x_hat (B,1,128,128);  score = |x - UNet(x)|

A U-Net (Ronneberger et al. 2015) learns to remove coarse noise from healthy slices: Gaussian noise drawn on a
``noise_res`` x ``noise_res`` grid (16 for 128 px), upsampled bilinearly to the image and added inside the
head (the non-zero foreground of a skull-stripped slice). Coarse noise looks like what a lesion does to a
slice (a blob of wrong intensity), so the network learns to redraw healthy tissue there, while its skip
connections keep every fine detail it can trust: the reconstructions stay sharp, and sulci do not light up
in the residual as they do for a bottleneck autoencoder's blurred ones. Scored clean (no noise): the
residual of the network's output.

No latent and no sampling: a restoration model, not a generator (``generative = False``): it offers the
reconstruction residuals, not the reconstruction probability or the KL scores; and ``restoration_local``, the
drift-free residual (``scoring.local_residual``) of the denoiser applied ``RESTORE_PASSES`` times, each output
fed back (one pass only partly redraws a large lesion); with a feature net, ``restoration_perceptual`` adds the
perceptual residual (``scoring.perceptual``) to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import check
from ..errors import BrainVAEError
from .base import BaseConfig, BrainModel, Cond, Output
from .blocks import ResBlock, conv_bn_act, up_bn_act
from .registry import register
from .scoring import KL_SCORES, RECONSTRUCTION_SCORES, Score, ScoreBatch, local_residual, perceptual


@dataclass(frozen=True)
class DAEConfig(BaseConfig):
    channels: tuple[int, ...] = (64, 128, 256)  # U-Net widths, one level each; each level after the first halves H, W
    # The first level works on patch x patch pixel blocks folded into channels (space-to-depth) and the head
    # unfolds them: full-resolution convs with few channels are memory-bound on CPUs (see blocks.ConvEncoder).
    patch: int = 2
    res_blocks: int = 1  # residual blocks per level, on the way down and up
    noise_res: int = 16  # side of the grid the training noise is drawn on (then upsampled to the image)
    noise_std: float = 0.2  # its standard deviation (images are in [0, 1])
    # Training only: each slice's intensities raised to the power exp(N(0, gamma_std)), a random change of
    # contrast (0 = off). The network then keeps a slice's own contrast instead of redrawing it as the training
    # scanner's: healthy tissue from another scanner leaves less residual.
    gamma_std: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.channels) >= 2 and all(c > 0 for c in self.channels), "channels: at least 2 positive widths")
        check(self.patch >= 1 and self.patch & (self.patch - 1) == 0, "patch must be a power of two")
        check(self.image_size // (self.patch << (len(self.channels) - 1)) >= 4,
              f"patch {self.patch} and {len(self.channels)} levels downsample {self.image_size} px below 4 px")
        check(self.res_blocks >= 0, "res_blocks must be >= 0")
        check(1 <= self.noise_res <= self.image_size, f"noise_res must be in [1, image_size], got {self.noise_res}")
        check(self.noise_std > 0, "noise_std must be > 0")
        check(self.gamma_std >= 0, "gamma_std must be >= 0")


RESTORE_PASSES = 3  # restoration_local: the denoiser applied this many times (chosen on the validation cases)


def coarse_noise(x: Tensor, res: int, std: float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise drawn on a res x res grid, upsampled bilinearly to x's (B, 1, H, W), zero where x is 0
    (outside the head of a skull-stripped slice)."""
    g = torch.randn((len(x), 1, res, res), generator=generator, device=generator.device if generator else x.device)
    noise = F.interpolate(g.to(x.device, torch.float32) * std, size=x.shape[-2:], mode="bilinear",
                          align_corners=False)
    return noise * (x > 0)


class UNet(nn.Module):
    """(B, 1, S, S) -> (B, 1, S, S): space-to-depth by ``patch``; per level conv + ``res_blocks`` ResBlocks,
    stride-2 convs down; transposed convs up with the level's skip concatenated; a 3x3 head, depth-to-space."""

    def __init__(self, channels: tuple[int, ...], res_blocks: int, patch: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.PixelUnshuffle(patch), conv_bn_act(patch * patch, channels[0]))
        self.down = nn.ModuleList()
        for i, c in enumerate(channels):
            first = conv_bn_act(channels[i - 1], c, stride=2) if i else nn.Identity()
            self.down.append(nn.Sequential(first, *(ResBlock(c) for _ in range(res_blocks))))
        self.up, self.merge = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(channels) - 1)):
            self.up.append(up_bn_act(channels[i + 1], channels[i]))
            self.merge.append(nn.Sequential(conv_bn_act(2 * channels[i], channels[i]),
                                            *(ResBlock(channels[i]) for _ in range(res_blocks))))
        self.head = nn.Sequential(nn.Conv2d(channels[0], patch * patch, 3, 1, 1), nn.PixelShuffle(patch))

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        skips = []
        for level in self.down:
            h = level(h)
            skips.append(h)
        skips.pop()  # the bottleneck
        for up, merge in zip(self.up, self.merge):
            h = merge(torch.cat([up(h), skips.pop()], 1))
        return self.head(h)


def restoration_local(b: ScoreBatch) -> Tensor:
    """``local_residual`` of the dae's restoration (``DAE.restore``)."""
    return local_residual(b.model.restorations(b)[0], b.x)


@register("dae", DAEConfig)
class DAE(BrainModel):
    """Denoising U-Net (see the module docstring)."""

    stochastic = False
    generative = False

    def __init__(self, config: DAEConfig):
        super().__init__(config)
        self.net = UNet(tuple(config.channels), config.res_blocks, config.patch)

    def denoise(self, x: Tensor) -> Tensor:
        """(B, 1, H, W) -> (B, 1, H, W) in [0, 1]."""
        return torch.sigmoid(self.net(x))

    def forward(self, x: Tensor, cond: Cond = None, kl_scale: float = 1.0) -> Output:
        """The denoising objective: coarse noise added, the clean slice's per-pixel squared error, summed per
        sample. In eval mode the noise comes from a fixed seed, so validation losses compare across epochs."""
        g = None if self.training else torch.Generator(device=x.device).manual_seed(0)
        if self.training and self.config.gamma_std > 0:  # a random contrast: the target changes with the input
            gamma = torch.exp(torch.randn(len(x), 1, 1, 1, device=x.device) * self.config.gamma_std)
            x = x.float().clamp_min(0).pow(gamma)  # background 0 stays 0, [0, 1] stays [0, 1]
        noisy = x + coarse_noise(x, self.config.noise_res, self.config.noise_std, g)
        recon = self.denoise(noisy)
        mse = (recon.float() - x.float()).pow(2).flatten(1).sum(1)  # (B,)
        return Output(recon, None, {"loss": mse, "mse": mse})

    @torch.no_grad()
    def reconstruct(self, x: Tensor, cond: Cond = None) -> Tensor:
        return self.denoise(x)

    @torch.no_grad()
    def restore(self, x: Tensor, passes: int = RESTORE_PASSES) -> Tensor:
        """(B, 1, H, W) -> the denoiser applied ``passes`` times, each output (0 outside the head, x == 0) fed
        back: what one pass leaves of a lesion, the next redraws further towards healthy tissue."""
        head = x > 0
        for _ in range(passes):
            x = self.denoise(x) * head
        return x

    def restorations(self, b: ScoreBatch) -> Tensor:
        """``restore`` of the batch, computed once: (1, B, 1, H, W) (the evaluation shows it in its overlays)."""
        if "restorations" not in b.shared:
            b.shared["restorations"] = self.restore(b.x)[None]
        return b.shared["restorations"]

    def encode(self, x: Tensor, cond: Cond = None):
        raise BrainVAEError("dae has no latent: it maps a slice to its denoised version (reconstruct)")

    def decode(self, z: Tensor, cond: Cond = None) -> Tensor:
        raise BrainVAEError("dae has no latent: it maps a slice to its denoised version (reconstruct)")

    def scores(self) -> dict[str, Score]:
        return {**{n: s for n, s in RECONSTRUCTION_SCORES.items() if n != "recon_prob"},
                "restoration_local": Score(restoration_local, f"residual_local of the denoiser applied "
                                                              f"{RESTORE_PASSES} times (each output fed back) "
                                                              "instead of once"),
                "restoration_perceptual": Score(lambda b: torch.cat([perceptual(b), restoration_local(b)], 1),
                                                "perceptual + restoration_local (each over its dataset scale)",
                                                terms=("perceptual", "restoration_local"), needs_features=True)}

    def unavailable_scores(self) -> dict[str, str]:
        why = "dae has no latent or likelihood: no reconstruction probability and no KL gradient"
        return dict.fromkeys(["recon_prob", *KL_SCORES], why)
