"""Structural feature autoencoder (FAE) for anomaly localisation, after Meissen et al. 2022 ("Unsupervised
anomaly localization with structural feature-autoencoders"), with an encoder trained in-domain.

    x (B,1,128,128) --encoder (frozen)--> features at 3 scales --resize, concat--> F (B,C,32,32)
    F --feature autoencoder--> F_hat;   score = 1 - SSIM(F, F_hat) per position, upsampled to (B,1,128,128)

Meissen et al. compare an image with healthy anatomy in the feature space of a pretrained CNN: an autoencoder
reconstructs the multi-scale feature maps, and the structural dissimilarity (1 - SSIM) between features and
their reconstruction marks what the healthy model cannot explain. Texture and fine anatomy that a pixel
autoencoder blurs (and so flags everywhere) are summarised by the features; a lesion changes them. The
benchmark of Frotscher et al. 2025 found it the best method on BraTS T1.

Nothing is downloaded here, so the feature encoder is trained in-domain first, on healthy slices, by two
pretext tasks that need no labels beyond the manifest's slice position (stage ``features``): regress the
slice's position in the brain (its anatomy), and tell which corruption was applied to it: none, blur, noise,
or CutPaste (a patch of the slice pasted elsewhere in it, Li et al. 2021, a local structural anomaly).
Stage ``autoencoder`` freezes it and trains the feature autoencoder with the SSIM loss.

Not a generator (``generative = False``) and no pixel reconstruction: ``reconstruct`` returns its input.
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
from .scoring import KL_SCORES, RECONSTRUCTION_SCORES, Score, gaussian_blur

CORRUPTIONS = ("none", "blur", "noise", "cutpaste")  # the features stage's classification targets


@dataclass(frozen=True)
class FAEConfig(BaseConfig):
    channels: tuple[int, ...] = (32, 64, 128)  # feature encoder widths: levels at S/2, S/4, S/8
    ae_channels: tuple[int, ...] = (128, 64)  # feature autoencoder widths; the last one at half the feature grid
    position_weight: float = 10.0  # features stage: weight of the position MSE (0..1) beside the cross-entropy
    ssim_window: int = 5  # the feature SSIM's Gaussian window (positions of the feature grid)
    score_smoothing: float = 2.0  # px: Gaussian applied to the upsampled score map

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.channels) == 3 and all(c > 0 for c in self.channels), "channels: three positive widths")
        check(len(self.ae_channels) == 2 and all(c > 0 for c in self.ae_channels), "ae_channels: two widths")
        check(self.image_size >= 32, "fae needs image_size >= 32")
        check(self.ssim_window >= 3 and self.ssim_window % 2 == 1, "ssim_window must be odd and >= 3")
        check(self.position_weight >= 0 and self.score_smoothing >= 0, "weights and smoothing must be >= 0")


def corrupt(x: Tensor, labels: Tensor) -> Tensor:
    """x (B, 1, H, W) with corruption ``CORRUPTIONS[labels[i]]`` applied to slice i (same shape)."""
    out = x.clone()
    blur, noise, paste = (labels == CORRUPTIONS.index(n) for n in ("blur", "noise", "cutpaste"))
    if blur.any():
        out[blur] = gaussian_blur(x[blur].float(), 1.5).to(x.dtype)
    if noise.any():
        out[noise] = (x[noise] + 0.05 * torch.randn_like(x[noise])).clamp(0, 1) * (x[noise] > 0)
    size = x.shape[-1]
    for i in torch.nonzero(paste).flatten().tolist():  # a patch of 1/8 to 1/4 of the side, moved inside the slice
        p = int(torch.randint(size // 8, size // 4 + 1, ()))
        (r0, c0), (r1, c1) = torch.randint(size // 8, size - p - size // 8, (2, 2)).tolist()
        out[i, :, r1:r1 + p, c1:c1 + p] = x[i, :, r0:r0 + p, c0:c0 + p]
    return out


class FeatureEncoder(nn.Module):
    """(B, 1, S, S) -> three feature maps (B, c_i, S / 2^(i+1), ...), plus pretext heads on the last one."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        c0, c1, c2 = channels
        self.levels = nn.ModuleList([
            nn.Sequential(nn.PixelUnshuffle(2), conv_bn_act(4, c0), ResBlock(c0)),
            nn.Sequential(conv_bn_act(c0, c1, stride=2), ResBlock(c1)),
            nn.Sequential(conv_bn_act(c1, c2, stride=2), ResBlock(c2)),
        ])
        self.head = nn.Linear(c2, 1 + len(CORRUPTIONS))  # position, corruption logits

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = []
        for level in self.levels:
            x = level(x)
            maps.append(x)
        return maps

    def pretext(self, last: Tensor) -> tuple[Tensor, Tensor]:
        out = self.head(last.mean((2, 3)))
        return torch.sigmoid(out[:, 0]), out[:, 1:]


class Standardise(nn.Module):
    """Per-channel standardisation of (B, C, h, w) by running statistics (BatchNorm without an affine part, kept
    apart from the convolutions' BatchNorms, which ``for_inference`` folds away): batch statistics in training."""

    def __init__(self, c: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("var", torch.ones(c))

    def forward(self, f: Tensor) -> Tensor:
        if self.training:
            mean, var = f.mean((0, 2, 3)), f.var((0, 2, 3))
            with torch.no_grad():
                self.mean.lerp_(mean.detach(), self.momentum)
                self.var.lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.mean, self.var
        return (f - mean[:, None, None]) / (var[:, None, None] + 1e-5).sqrt()


def ssim_map(a: Tensor, b: Tensor, window: int) -> Tensor:
    """Per-channel SSIM map of feature maps (B, C, h, w) with a Gaussian window (sigma = window / 3.5); features
    standardised per channel, so the stabilising constants use a data range of 4."""
    with torch.autocast(a.device.type, enabled=False):  # second moments minus squared means: float32 only
        return _ssim_map(a.float(), b.float(), window)


def _ssim_map(a: Tensor, b: Tensor, window: int) -> Tensor:
    sigma = window / 3.5
    t = torch.arange(window, device=a.device, dtype=torch.float32) - window // 2
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k[:, None] * k[None]) / k.sum() ** 2
    c = a.shape[1]
    w = k.expand(c, 1, window, window)

    def filt(v):
        return F.conv2d(F.pad(v, [window // 2] * 4, mode="reflect"), w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = (filt(a * a) - mu_a ** 2).clamp_min(0)
    var_b = (filt(b * b) - mu_b ** 2).clamp_min(0)
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 4) ** 2, (0.03 * 4) ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


@register("fae", FAEConfig)
class FAE(BrainModel):
    """Structural feature autoencoder (see the module docstring)."""

    stages = ("features", "autoencoder")
    stochastic = False
    generative = False

    def __init__(self, config: FAEConfig):
        super().__init__(config)
        c = config.channels
        self.encoder = FeatureEncoder(c)
        self.norm = Standardise(sum(c))  # per-channel standardisation of the features
        a0, a1 = config.ae_channels
        self.feature_ae = nn.Sequential(
            conv_bn_act(sum(c), a0), conv_bn_act(a0, a1, stride=2),  # (B, a1, h/2, w/2)
            up_bn_act(a1, a0), nn.Conv2d(a0, sum(c), 3, 1, 1))
        self.stage = "features"
        self.set_stage("features")

    def set_stage(self, name: str) -> None:
        super().set_stage(name)
        self.stage = name
        self.encoder.requires_grad_(name == "features")
        self.feature_ae.requires_grad_(name == "autoencoder")
        self.train(self.training)

    def train(self, mode: bool = True) -> "FAE":
        super().train(mode)
        if self.stage == "autoencoder":
            self.encoder.eval()  # frozen, with its BatchNorm statistics
        return self

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"model": [p for p in self.parameters() if p.requires_grad]}

    def perceptual_features(self, x: Tensor) -> Tensor:
        """The encoder's first level (B, channels[0], S/2, S/2): what the perceptual scores of other models compare
        (``brainvae anomaly --features``; ``scoring.perceptual``)."""
        return self.encoder.levels[0](x)

    def features(self, x: Tensor) -> Tensor:
        """Standardised multi-scale features on the middle level's grid: (B, sum(channels), S/4, S/4)."""
        f0, f1, f2 = self.encoder(x)
        size = f1.shape[-2:]
        f = torch.cat([F.adaptive_avg_pool2d(f0, size), f1, F.interpolate(f2, size=size, mode="bilinear",
                                                                          align_corners=False)], 1)
        return self.norm(f.float())

    def forward(self, x: Tensor, cond: Cond = None, kl_scale: float = 1.0) -> Output:
        if self.stage == "features":
            labels = torch.randint(len(CORRUPTIONS), (len(x),), device=x.device)
            if not self.training:  # fixed corruptions for comparable validation losses
                labels = torch.arange(len(x), device=x.device) % len(CORRUPTIONS)
            position, logits = self.encoder.pretext(self.encoder(corrupt(x, labels))[-1])
            target = (cond or {}).get("position")
            pos = (position.float() - target.float()).pow(2) if target is not None else torch.zeros(len(x))
            pos = torch.nan_to_num(pos, nan=0.0).to(x.device)
            ce = F.cross_entropy(logits.float(), labels, reduction="none")
            return Output(None, None, {"loss": self.config.position_weight * pos + ce, "position": pos,
                                       "corruption": ce})
        with torch.no_grad():
            f = self.features(x)
        dissim = 1 - ssim_map(f, self.feature_ae(f).float(), self.config.ssim_window)  # (B, C, h, w)
        loss = dissim.mean((1, 2, 3))
        return Output(None, None, {"loss": loss, "ssim_loss": loss})

    @torch.no_grad()
    def feature_score(self, x: Tensor) -> Tensor:
        """1 - SSIM of the features and their reconstruction, averaged over channels, upsampled and smoothed:
        (B, 1, H, W)."""
        f = self.features(x)
        d = (1 - ssim_map(f, self.feature_ae(f).float(), self.config.ssim_window)).mean(1, keepdim=True)
        d = F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return gaussian_blur(d, self.config.score_smoothing)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, cond: Cond = None) -> Tensor:
        return x  # no pixel reconstruction: the features are what it reconstructs

    def encode(self, x: Tensor, cond: Cond = None):
        raise BrainVAEError("fae has no pixel latent: it reconstructs an encoder's features (see feature_score)")

    def decode(self, z: Tensor, cond: Cond = None) -> Tensor:
        raise BrainVAEError("fae has no pixel latent: it reconstructs an encoder's features (see feature_score)")

    def scores(self) -> dict[str, Score]:
        return {"feature_ssim": Score(lambda b: b.model.feature_score(b.x),
                                      "1 - SSIM between the in-domain encoder's multi-scale features and their "
                                      "reconstruction by the feature autoencoder (Meissen et al. 2022), upsampled")}

    def unavailable_scores(self) -> dict[str, str]:
        why = "fae reconstructs features, not pixels: no pixel residual, likelihood or KL gradient"
        return dict.fromkeys([*RECONSTRUCTION_SCORES, *KL_SCORES], why)
