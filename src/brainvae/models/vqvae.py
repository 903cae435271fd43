"""Vector-quantised VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning")
with a learned autoregressive prior over its code map, so it can generate.

    x (B,1,H,W) --encoder--> z_e (B,D,h,w) --nearest code--> indices (B,h,w) --codebook--> z_q --decoder--> x_hat
                                                                  |
                                     causal transformer prior p(indices | cond), raster order

* The codebook is updated by exponential moving averages of the encodings
  assigned to each code (the paper's appendix; Razavi et al. 2019, VQ-VAE-2),
  not by gradients, so the only VQ loss is the commitment term
  ``commitment * ||z_e - sg(z_q)||^2``. Gradients reach the encoder through the
  straight-through estimator.
* Codebook collapse is guarded against twice: the codebook is initialised from
  encodings of the first training batch, and a code whose moving-average
  assignment count falls below ``dead_threshold`` (encodings per batch) is
  restarted at a random encoding of the current batch (as in Dhariwal et al.
  2020, Jukebox).
* The prior is a small GPT-style causal transformer over the raster-ordered
  code map (as in Esser et al. 2021, VQGAN, in place of the paper's PixelCNN),
  trained in the same loop on the *detached* code indices: its NLL (nats per
  sample) is added to the loss with weight ``prior_weight`` and moves no
  autoencoder weight. Sampling caches keys and values, so each of the h*w
  positions costs one single-token pass for the whole batch; attention is
  multi-query (one shared key/value head, Shazeer 2019), which keeps the cache
  small, and ``prior_window`` can bound it further (a banded causal mask).
* Conditioning (age, sex, slice position) enters the prior only: the code map
  carries all of the image, the prior decides which code maps are likely for a
  given age/sex/position. ``encode``/``decode`` accept ``cond`` and ignore it.
* The "posterior" is deterministic, so ``kl_scale`` is accepted and ignored and
  ``posterior.kl()`` is zero (a uniform prior over codes would only add the
  constant h*w*log K).
* Distances to the codebook are computed in float32 with autocast disabled, so
  bf16 autocast changes no code assignment through rounding alone.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import check
from .base import BaseConfig, BrainModel, Cond, Conditioning, Output, gaussian_nll
from .blocks import ConvDecoder, ConvEncoder, ResBlock, bottleneck_size, check_stages
from .registry import register
from .scoring import Score


@dataclass(frozen=True)
class VQVAEConfig(BaseConfig):
    channels: tuple[int, ...] = (32, 64, 128)  # stage widths: space-to-depth stage, then stride-2 stages
    patch: int = 2  # the first stage folds patch x patch pixels into channels: code map S / (patch * 2**(stages-1))
    res_blocks: int = 2  # residual blocks at the code resolution, in encoder and decoder (as in the paper)
    codebook_size: int = 256  # K
    code_dim: int = 64  # D
    commitment: float = 0.25  # beta of the commitment loss
    codebook_decay: float = 0.99  # EMA decay of the codebook statistics
    dead_threshold: float = 1.0  # codes assigned fewer encodings per batch (EMA) than this are restarted
    sigma: float = 0.1  # fixed per-pixel std of the Gaussian likelihood
    cond_dim: int = 32  # width of the conditioning embedding
    prior_layers: int = 4
    prior_width: int = 128
    prior_heads: int = 4
    prior_dropout: float = 0.0
    prior_window: int = 0  # attend to the last this-many positions only (0 = all); bounds sampling cost
    prior_weight: float = 1.0  # weight of the prior NLL in the loss (it only trains the prior)
    temperature: float = 1.0  # softmax temperature when sampling from the prior

    def __post_init__(self) -> None:
        super().__post_init__()
        check_stages(self.image_size, self.channels, self.patch)
        check(self.res_blocks >= 0, "res_blocks must be >= 0")
        check(self.codebook_size >= 2 and self.code_dim > 0, "codebook_size must be >= 2 and code_dim positive")
        check(self.commitment >= 0 and self.sigma > 0, "commitment must be >= 0 and sigma positive")
        check(0 < self.codebook_decay < 1, "codebook_decay must be in (0, 1)")
        check(self.dead_threshold >= 0, "dead_threshold must be >= 0")
        check(self.prior_layers >= 1 and self.prior_width > 0, "prior_layers and prior_width must be positive")
        check(self.prior_heads >= 1 and self.prior_width % self.prior_heads == 0,
              f"prior_width {self.prior_width} must be divisible by prior_heads {self.prior_heads}")
        check(0 <= self.prior_dropout < 1, "prior_dropout must be in [0, 1)")
        check(self.prior_window >= 0, "prior_window must be >= 0 (0 = full causal attention)")
        check(self.prior_weight >= 0 and self.temperature > 0, "prior_weight must be >= 0 and temperature positive")
        check(self.cond_dim > 0, "cond_dim must be positive")


class Quantised:
    """The VQ "posterior" of a batch: deterministic, so ``mode() == sample()`` and ``kl() == 0``."""

    def __init__(self, z_e: Tensor, z_q: Tensor, indices: Tensor):
        self.z_e = z_e  # (B, D, h, w) encoder output
        self.z_q = z_q  # (B, D, h, w) float32 quantised, straight-through gradient to z_e
        self.indices = indices  # (B, h, w) int64 code indices

    def mode(self) -> Tensor:
        return self.z_q

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return self.z_q

    def kl(self) -> Tensor:  # (B,)
        return torch.zeros(len(self.z_q), device=self.z_q.device)


class EMACodebook(nn.Module):
    """K codes of dimension D, updated by moving averages with dead-code restarts (no gradients)."""

    def __init__(self, size: int, dim: int, decay: float, dead_threshold: float, eps: float = 1e-5):
        super().__init__()
        self.decay, self.dead_threshold, self.eps = decay, dead_threshold, eps
        codes = torch.randn(size, dim)
        self.register_buffer("codes", codes)  # (K, D)
        self.register_buffer("cluster_size", torch.zeros(size))  # (K,) EMA of encodings per batch
        self.register_buffer("code_sum", codes.clone())  # (K, D) EMA of summed encodings
        self.register_buffer("initialised", torch.tensor(False))

    def nearest(self, flat: Tensor) -> Tensor:
        """(N, D) float32 -> (N,) index of the closest code (squared Euclidean, float32)."""
        with torch.autocast(flat.device.type, enabled=False):
            codes = self.codes.float()
            dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]
        return dist.argmin(1)

    def lookup(self, indices: Tensor) -> Tensor:
        """(...) int -> (..., D) float32."""
        return F.embedding(indices, self.codes.float())

    @staticmethod
    def _all_reduce(*tensors: Tensor) -> None:
        # Under DDP every rank then sees the statistics of the global batch.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in tensors:
                torch.distributed.all_reduce(t)

    @torch.no_grad()
    def update(self, flat: Tensor, indices: Tensor) -> None:
        """One EMA step from a batch of encodings (N, D) float32 and their assignments (N,)."""
        k = len(self.codes)
        if not bool(self.initialised):
            # Data-dependent init: codes start on encodings, each counted as an average code.
            # (Under DDP the ranks differ here; DDP broadcasts rank 0's buffers before the next step.)
            pick = torch.randint(0, len(flat), (k,), device=flat.device)
            start = flat[pick] + 1e-3 * flat.std() * torch.randn(k, flat.shape[1], device=flat.device)
            self.codes.copy_(start)
            self.cluster_size.fill_(max(len(flat) / k, self.dead_threshold))
            self.code_sum.copy_(start * self.cluster_size[:, None])
            self.initialised.fill_(True)
            indices = self.nearest(flat)
        counts = torch.bincount(indices, minlength=k).to(flat.dtype)  # (K,)
        sums = torch.zeros_like(self.code_sum).index_add_(0, indices, flat)  # (K, D)
        self._all_reduce(counts, sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.code_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n  # Laplace smoothing
        self.codes.copy_(self.code_sum / smoothed[:, None])
        dead = self.cluster_size < self.dead_threshold
        n_dead = int(dead.sum())
        if n_dead:
            new = flat[torch.randint(0, len(flat), (n_dead,), device=flat.device)]
            self.codes[dead] = new
            self.cluster_size[dead] = self.dead_threshold
            self.code_sum[dead] = new * self.dead_threshold


class CausalBlock(nn.Module):
    """Pre-LayerNorm transformer block (Radford et al. 2019, GPT-2) with causal multi-query
    attention (Shazeer 2019, "Fast Transformer Decoding: One Write-Head is All You Need"):
    all heads share one key and one value head, so the sampling cache is ``heads`` times
    smaller and each step's attention is one batched matrix product per sample."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, width // heads, dropout
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, width + 2 * self.head_dim)  # -> queries (heads x dh), key (dh), value (dh)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout))

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, W) -> q (B, heads, T, dh), k (B, T, dh), v (B, T, dh)."""
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).split([w, self.head_dim, self.head_dim], dim=-1)
        return q.view(b, t, self.heads, self.head_dim).transpose(1, 2), k, v

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # x (B, T, W); mask (T, T) bool or None
        q, k, v = self._split(x)
        k, v = k[:, None], v[:, None]  # (B, 1, T, dh): one key/value head shared by all query heads
        # On CPU attention runs in float32: the bf16 flash-attention backward is several times slower there.
        cpu = x.device.type == "cpu"
        with torch.autocast(x.device.type, enabled=False) if cpu else contextlib.nullcontext():
            if cpu:
                q, k, v = q.float(), k.float(), v.float()
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        x = x + F.dropout(self.proj(a.transpose(1, 2).flatten(2).to(x.dtype)), self.dropout, self.training)
        return x + self.mlp(self.ln2(x))

    def step(self, x: Tensor, cache_k: Tensor, cache_v: Tensor, t: int, lo: int = 0) -> Tensor:
        """One position: x (B, 1, W); float32 caches (B, T, dh) are written at t and read over lo..t."""
        q, k, v = self._split(x)
        cache_k[:, t] = k[:, 0]
        cache_v[:, t] = v[:, 0]
        # Explicit float32 attention of one query (CPU SDPA kernels are slow for a query length of 1).
        with torch.autocast(x.device.type, enabled=False):
            q = q[:, :, 0].float() * self.head_dim ** -0.5  # (B, heads, dh)
            scores = torch.bmm(q, cache_k[:, lo:t + 1].transpose(1, 2))  # (B, heads, t + 1 - lo)
            a = torch.bmm(torch.softmax(scores, dim=-1), cache_v[:, lo:t + 1])  # (B, heads, dh)
        x = x + self.proj(a.flatten(1)[:, None].to(x.dtype))
        return x + self.mlp(self.ln2(x))


class CodePrior(nn.Module):
    """p(c_1..c_T | cond) = prod_t p(c_t | c_<t, cond) over a raster-ordered code map of T positions."""

    def __init__(self, codebook_size: int, positions: int, width: int, layers: int, heads: int, dropout: float,
                 cond_dim: int = 0, window: int = 0):
        super().__init__()
        self.positions = positions
        self.window = window if 0 < window < positions else 0
        # None: plain causal attention; windowed: a banded causal mask, position i attends to j in (i - window, i].
        lag = torch.arange(positions)[:, None] - torch.arange(positions)[None]
        self.register_buffer("mask", (lag >= 0) & (lag < self.window) if self.window else None, persistent=False)
        self.tok = nn.Embedding(codebook_size, width)
        self.pos = nn.Parameter(torch.randn(1, positions, width) * 0.02)
        self.start = nn.Parameter(torch.randn(1, 1, width) * 0.02)  # input at position 0
        self.cond = nn.Linear(cond_dim, width) if cond_dim else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(CausalBlock(width, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, codebook_size, bias=False)
        nn.init.normal_(self.tok.weight, std=0.02)

    def _cond(self, e: Tensor | None) -> Tensor | float:
        return 0.0 if self.cond is None or e is None else self.cond(e)[:, None]  # (B, 1, W)

    def logits(self, indices: Tensor, e: Tensor | None = None) -> Tensor:
        """indices (B, T) -> logits (B, T, K); position t sees indices < t and the condition."""
        b = len(indices)
        x = torch.cat([self.start.expand(b, -1, -1), self.tok(indices[:, :-1])], 1) + self.pos + self._cond(e)
        x = self.drop(x)
        for blk in self.blocks:
            x = blk(x, self.mask)
        return self.head(self.ln(x))

    def nll(self, indices: Tensor, e: Tensor | None = None) -> Tensor:
        """Per-position negative log-likelihood in nats: (B, T) float32."""
        logits = self.logits(indices, e).float()
        return F.cross_entropy(logits.transpose(1, 2), indices, reduction="none")

    def new_cache(self, n: int) -> list[tuple[Tensor, Tensor]]:
        """Empty float32 key/value caches for incremental decoding of n sequences: per block (n, T, dh) x 2."""
        dh = self.blocks[0].head_dim
        return [(self.pos.new_zeros(n, self.positions, dh, dtype=torch.float32),
                 self.pos.new_zeros(n, self.positions, dh, dtype=torch.float32)) for _ in self.blocks]

    def step_logits(self, prev: Tensor | None, t: int, e: Tensor | None, cache: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Logits (n, K) float32 of position t given the index drawn at t - 1 (None at t = 0); fills ``cache``."""
        n = len(cache[0][0])
        x = self.start.expand(n, -1, -1) if prev is None else self.tok(prev)[:, None]
        x = x + self.pos[:, t:t + 1] + self._cond(e)  # (n, 1, W)
        lo = max(0, t - self.window + 1) if self.window else 0
        for blk, (ck, cv) in zip(self.blocks, cache):
            x = blk.step(x, ck, cv, t, lo)
        return self.head(self.ln(x))[:, 0].float()

    @torch.no_grad()
    def sample(self, uniforms: Tensor, e: Tensor | None, temperature: float) -> Tensor:
        """Ancestral sampling with a key/value cache: uniforms (n, T) in [0, 1) -> indices (n, T).

        Each position is drawn by inverting the categorical CDF at its uniform, so
        the result depends only on the uniforms (drawn from the caller's generator).
        """
        n, t_max = uniforms.shape
        cache = self.new_cache(n)
        out = torch.empty(n, t_max, dtype=torch.long, device=uniforms.device)
        idx = None
        for t in range(t_max):
            cdf = torch.softmax(self.step_logits(idx, t, e, cache) / temperature, dim=-1).cumsum(-1)  # (n, K)
            idx = (cdf < uniforms[:, t:t + 1] * cdf[:, -1:]).sum(-1).clamp_max(cdf.shape[-1] - 1)
            out[:, t] = idx
        return out


@register("vqvae", VQVAEConfig)
class VQVAE(BrainModel):
    """VQ-VAE with an EMA codebook and a causal-transformer prior trained in the same loop."""

    config: VQVAEConfig
    stochastic = False  # the encoder's code is a deterministic nearest codebook entry
    fills_missing_conditions = True  # sample() uses default_cond

    def __init__(self, config: VQVAEConfig):
        super().__init__(config)
        c = config
        self.bottom = bottleneck_size(c.image_size, c.channels, c.patch)  # code map is bottom x bottom
        self.cond = Conditioning(c.conditions, c.cond_dim) if c.conditions else None
        top = c.channels[-1]
        # Residual blocks only at the code resolution, as in the paper: full-resolution
        # convolutions with few channels would dominate the CPU cost of training and sampling.
        self.encoder = nn.Sequential(ConvEncoder(c.channels, 1, patch=c.patch), *(ResBlock(top) for _ in range(c.res_blocks)),
                                     nn.Conv2d(top, c.code_dim, 1))  # (B, 1, H, W) -> (B, D, h, w)
        self.codebook = EMACodebook(c.codebook_size, c.code_dim, c.codebook_decay, c.dead_threshold)
        self.decoder = nn.Sequential(nn.Conv2d(c.code_dim, top, 3, 1, 1), *(ResBlock(top) for _ in range(c.res_blocks)),
                                     ConvDecoder(c.channels, 1, patch=c.patch))  # (B, D, h, w) -> (B, 1, H, W) logits
        self.prior = CodePrior(c.codebook_size, self.bottom ** 2, c.prior_width, c.prior_layers, c.prior_heads,
                               c.prior_dropout, c.cond_dim if c.conditions else 0, c.prior_window)

    def _quantise(self, z_e: Tensor, update: bool) -> Quantised:
        b, d, h, w = z_e.shape
        flat = z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        indices = self.codebook.nearest(flat)
        if update:
            self.codebook.update(flat, indices)
            indices = self.codebook.nearest(flat)  # assignments under the updated codebook
        z_q = self.codebook.lookup(indices).view(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, h, w) float32
        z_st = z_e.float() + (z_q - z_e.float()).detach()  # straight-through estimator
        return Quantised(z_e, z_st, indices.view(b, h, w))

    def encode(self, x: Tensor, cond: Cond = None) -> Quantised:
        """x (B, 1, H, W) -> quantised code map; ``cond`` is not used by the autoencoder."""
        return self._quantise(self.encoder(x), update=False)

    def decode(self, z: Tensor, cond: Cond = None) -> Tensor:
        """z_q (B, D, h, w) -> (B, 1, H, W) in [0, 1]; ``cond`` is not used by the autoencoder."""
        return torch.sigmoid(self.decoder(z))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Code indices (B, h, w) -> images (B, 1, H, W)."""
        return self.decode(self.codebook.lookup(indices).permute(0, 3, 1, 2))

    def forward(self, x: Tensor, cond: Cond = None, kl_scale: float = 1.0) -> Output:
        """One training step's outputs; ``kl_scale`` is ignored (there is no KL term to anneal)."""
        z_e = self.encoder(x)  # (B, D, h, w)
        post = self._quantise(z_e, update=self.training)
        recon = self.decode(post.z_q)
        rec = gaussian_nll(x.float(), recon.float(), math.log(self.config.sigma))
        vq = self.config.commitment * (z_e.float() - post.z_q.detach()).pow(2).flatten(1).sum(1)
        prior = self.prior.nll(post.indices.flatten(1).detach(), self._embed(cond)).sum(1)
        losses = {"loss": rec + vq + self.config.prior_weight * prior, "recon": rec, "vq": vq, "prior": prior}
        return Output(recon, post, losses)

    @torch.no_grad()
    def sample_indices(self, n: int, cond: Cond = None, generator: torch.Generator | None = None,
                       temperature: float | None = None) -> Tensor:
        """n code maps (n, h, w) drawn from the prior (``temperature`` overrides the config's)."""
        temperature = self.config.temperature if temperature is None else float(temperature)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        t = self.bottom ** 2
        dev = self.device
        if generator is None:
            u = torch.rand((n, t), device=dev)
        else:
            u = torch.rand((n, t), generator=generator, device=generator.device).to(dev)
        e = self._embed(self.default_cond(n, cond)) if self.cond is not None else None
        idx = self.prior.sample(u, e, temperature)
        return idx.view(n, self.bottom, self.bottom)

    @torch.no_grad()
    def sample(self, n: int, cond: Cond = None, generator: torch.Generator | None = None,
               temperature: float | None = None) -> Tensor:
        """Ancestral samples from the prior, decoded: (n, 1, H, W) in [0, 1]."""
        return self.decode_indices(self.sample_indices(n, cond, generator, temperature))

    @property
    def fixed_sigma(self) -> float:
        return self.config.sigma

    def scores(self) -> dict[str, Score]:
        return {**super().scores(), "prior_nll": Score(lambda b: b.model.prior_nll_map(b.x, b.cond).float(),
                                                       "VQ-VAE prior's NLL of each code, upsampled (vqvae only)")}

    @torch.no_grad()
    def prior_nll_map(self, x: Tensor, cond: Cond = None) -> Tensor:
        """The prior's NLL (nats) of each code of x, bilinearly upsampled to (B, 1, H, W)."""
        idx = self.encode(x).indices  # (B, h, w)
        nll = self.prior.nll(idx.flatten(1), self._embed(cond)).view(len(x), 1, self.bottom, self.bottom)
        return F.interpolate(nll, size=x.shape[-2:], mode="bilinear", align_corners=False)
