"""A learned prior over a spatial latent: conditional flow matching (rectified flow).

    prior = FlowPrior(FlowConfig(), latent_shape=(4, 32, 32), conditions=("age", "sex", "position"))
    loss  = prior.loss(z, cond)                                   # (B,) per-sample objective
    z     = prior.sample(n, cond, generator, steps=16, guidance=1.0, solver="heun")

Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023): a network
v(z_t, t, c) learns the velocity of the straight path z_t = (1 - t) z_0 + t eps
from a data latent z_0 (t = 0) to Gaussian noise eps (t = 1); its regression
target is eps - z_0. Sampling integrates dz/dt = v from t = 1 to 0 with Euler or
Heun steps. Training times are drawn from a logit-normal density (Esser et al.
2024, Stable Diffusion 3), which spends more of the budget on the middle of the path.

Conditioning: each condition (age, sex, position) enters as its standardised
value and a "missing" bit. In training each key is hidden with probability
``drop_key`` and all of them with ``drop_all`` (unknown ages in the data are
hidden too), so the network also learns p(z | some conditions) and p(z); at
sampling, keys left out are marginalised, and classifier-free guidance (Ho &
Salimans 2022) combines v = v(z, {}) + w (v(z, c) - v(z, {})): w = 0 is the
unconditional model, w = 1 the conditional one (one network pass per step), w > 1
sharpens the conditions.

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of
itself"), ``guide = "weak"``: the same combination with a weaker network in place of
the unconditional one, v = v_weak(z, c) + w (v(z, c) - v_weak(z, c)), both under the
same conditions. The weak network (smaller and/or trained for less) makes the same
kind of errors, only more; extrapolating away from it removes them, where
classifier-free guidance mostly exaggerates the conditions and narrows the variety.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import check
from .base import Conditioning, randn

SOLVERS = ("euler", "heun")
GUIDES = ("unconditional", "weak")  # what guidance extrapolates away from


@dataclass(frozen=True)
class FlowConfig:
    """The velocity network and its training/sampling defaults."""

    widths: tuple[int, ...] = (64, 128)  # UNet widths, one level each (the first after the patch fold)
    blocks: int = 2  # residual blocks per level, on the way down and up
    patch: int = 2  # space-to-depth fold of the latent before the first level
    attention: bool = True  # self-attention at the coarsest level
    emb_dim: int = 256  # time + condition embedding width
    drop_key: float = 0.1  # training: hide each condition with this probability
    drop_all: float = 0.1  # training: hide all conditions with this probability
    steps: int = 16  # default sampling steps (heun: 2 network passes each)
    solver: str = "heun"  # default solver
    guidance: float = 1.0  # default guidance scale
    guide: str = "unconditional"  # default guide: the model without conditions (CFG) or a weak network (autoguidance)

    def __post_init__(self) -> None:
        check(len(self.widths) >= 1 and all(w > 0 and w % 8 == 0 for w in self.widths),
              f"prior widths must be positive multiples of 8, got {self.widths}")
        check(self.blocks >= 1, "prior blocks must be >= 1")
        check(self.patch >= 1 and self.patch & (self.patch - 1) == 0, "prior patch must be a power of two")
        check(0 <= self.drop_key < 1 and 0 <= self.drop_all < 1, "drop_key and drop_all must be in [0, 1)")
        check(self.steps >= 1, "prior steps must be >= 1")
        check(self.solver in SOLVERS, f"solver must be one of {SOLVERS}, got {self.solver!r}")
        check(self.guidance >= 0, "guidance must be >= 0")
        check(self.guide in GUIDES, f"guide must be one of {GUIDES}, got {self.guide!r}")


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (Vaswani et al. 2017, as in DDPM): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], 1)


class EmbResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding as a per-channel scale and shift in between (FiLM / AdaGN,
    Dhariwal & Nichol 2021): (B, c_in, h, w), (B, E) -> (B, c_out, h, w). Starts as the identity (zero last conv)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the h*w positions with a residual: (B, C, h, w) -> same."""

    def __init__(self, c: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(8, c)
        self.attn = nn.MultiheadAttention(c, heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)  # (B, h*w, C)
        out, _ = self.attn(seq, seq, seq, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class VelocityUNet(nn.Module):
    """v(z_t, t, c): (B, C, s, s) latent, (B, E) embedding -> (B, C, s, s) velocity.

    Fold ``patch`` x ``patch`` latent pixels into channels (as DiT's patches), then a
    UNet (Ronneberger et al. 2015): per level ``blocks`` EmbResBlocks and a stride-2
    conv down; self-attention at the coarsest level; back up with nearest
    upsampling, the level's skip concatenated, ``blocks`` EmbResBlocks; unfold.
    """

    def __init__(self, channels: int, cfg: FlowConfig):
        super().__init__()
        w, e, p = cfg.widths, cfg.emb_dim, cfg.patch
        self.fold, self.unfold = nn.PixelUnshuffle(p), nn.PixelShuffle(p)
        self.stem = nn.Conv2d(channels * p * p, w[0], 3, 1, 1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, c in enumerate(w):
            self.down.append(nn.ModuleList(EmbResBlock(c, c, e) for _ in range(cfg.blocks)))
            if i + 1 < len(w):
                self.downsample.append(nn.Conv2d(c, w[i + 1], 3, 2, 1))
        self.mid_attn = SelfAttention(w[-1]) if cfg.attention else nn.Identity()
        self.mid = EmbResBlock(w[-1], w[-1], e)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(w))):
            blocks = [EmbResBlock(2 * w[i], w[i], e)] + [EmbResBlock(w[i], w[i], e) for _ in range(cfg.blocks - 1)]
            self.up.append(nn.ModuleList(blocks))
            if i > 0:
                self.upsample.append(nn.Conv2d(w[i], w[i - 1], 3, 1, 1))
        self.head = nn.Sequential(nn.GroupNorm(8, w[0]), nn.SiLU(), nn.Conv2d(w[0], channels * p * p, 3, 1, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, z: Tensor, emb: Tensor) -> Tensor:
        h = self.stem(self.fold(z))
        skips = []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(self.mid_attn(h), emb)
        for j, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], 1)
            for block in blocks:
                h = block(h, emb)
            if j < len(self.upsample):
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.unfold(self.head(h))


class FlowPrior(nn.Module):
    """Conditional rectified-flow prior over latents of shape ``latent_shape`` (see the module docstring)."""

    def __init__(self, cfg: FlowConfig, latent_shape: tuple[int, int, int], conditions: tuple[str, ...]):
        super().__init__()
        self.cfg = cfg
        self.latent_shape = tuple(latent_shape)
        self.keys = tuple(conditions)
        e = cfg.emb_dim
        self.time = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        # condition values and their "missing" bits -> embedding
        self.cond = nn.Sequential(nn.Linear(2 * len(self.keys), e), nn.SiLU(), nn.Linear(e, e)) if self.keys else None
        self.net = VelocityUNet(latent_shape[0], cfg)

    # -- conditions ---------------------------------------------------------------------------------
    def cond_inputs(self, cond: dict[str, Tensor] | None, n: int, device: torch.device) -> Tensor | None:
        """(n, 2k): standardised values with 0 where missing, then the missing bits (1 = hidden/unknown: NaN,
        or sex 0)."""
        if not self.keys:
            return None
        values, missing = [], []
        for key in self.keys:
            v = (cond or {}).get(key)
            v = torch.full((n,), float("nan"), device=device) if v is None else v.float().to(device).expand(n)
            unknown = torch.isnan(v) | (v == 0) if key == "sex" else torch.isnan(v)  # sex 0 = unknown
            missing.append(unknown.float())
            values.append(Conditioning.standardise({key: v}, (key,))[:, 0])  # NaN -> 0
        return torch.cat([torch.stack(values, 1), torch.stack(missing, 1)], 1)

    def _hide(self, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training-time condition dropout: hide each key with p = drop_key, all keys with p = drop_all."""
        k = len(self.keys)
        u = (torch.rand(len(c), k + 1, device=c.device) if generator is None
             else torch.rand(len(c), k + 1, generator=generator, device=generator.device).to(c.device))
        hide = (u[:, :k] < self.cfg.drop_key) | (u[:, k:] < self.cfg.drop_all) | (c[:, k:] > 0)
        return torch.cat([c[:, :k].masked_fill(hide, 0.0), hide.float()], 1)

    def embedding(self, t: Tensor, c: Tensor | None) -> Tensor:
        emb = self.time(timestep_embedding(t, self.cfg.emb_dim))
        if c is not None:
            emb = emb + self.cond(c.to(emb.dtype))
        return F.silu(emb)

    def velocity(self, z: Tensor, t: Tensor, c: Tensor | None) -> Tensor:
        return self.net(z, self.embedding(t, c)).float()

    # -- training -----------------------------------------------------------------------------------
    def loss(self, z0: Tensor, cond: dict[str, Tensor] | None) -> Tensor:
        """Flow-matching loss per sample (B,): || v(z_t, t, c) - (eps - z0) ||^2 summed over the latent."""
        n = len(z0)
        t = torch.sigmoid(torch.randn(n, device=z0.device))  # logit-normal(0, 1) times
        eps = torch.randn_like(z0)
        tt = t[:, None, None, None]
        zt = (1 - tt) * z0 + tt * eps
        c = self.cond_inputs(cond, n, z0.device)
        if c is not None:
            c = self._hide(c)
        v = self.velocity(zt, t, c)
        return (v - (eps - z0)).pow(2).flatten(1).sum(1)

    # -- sampling -----------------------------------------------------------------------------------
    def guided_velocity(self, z: Tensor, t: float, c: Tensor | None, guidance: float,
                        weak: "FlowPrior | None" = None) -> Tensor:
        """The velocity at (z, t) guided with scale ``guidance``: away from the unconditional model, or with
        ``weak`` (autoguidance) away from that network under the same conditions."""
        tt = torch.full((len(z),), t, device=z.device)
        if guidance == 1.0 or (weak is None and c is None):
            return self.velocity(z, tt, c)
        if weak is not None:
            v_weak = weak.velocity(z, tt, c)
            return v_weak if guidance == 0.0 else v_weak + guidance * (self.velocity(z, tt, c) - v_weak)
        uncond = torch.cat([torch.zeros_like(c[:, :len(self.keys)]), torch.ones_like(c[:, len(self.keys):])], 1)
        if guidance == 0.0:
            return self.velocity(z, tt, uncond)
        v = self.velocity(torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([c, uncond]))  # one pass for both
        v_c, v_u = v.chunk(2)
        return v_u + guidance * (v_c - v_u)

    @torch.no_grad()
    def sample(self, n: int, cond: dict[str, Tensor] | None, generator: torch.Generator | None, device: torch.device,
               steps: int | None = None, guidance: float | None = None, solver: str | None = None,
               weak: "FlowPrior | None" = None) -> Tensor:
        """n latents (n, C, s, s): integrate from noise at t = 1 to data at t = 0 (``weak``: autoguidance)."""
        z = randn((n, *self.latent_shape), generator, device)
        return self.integrate(z, 1.0, self.cond_inputs(cond, n, device), steps, guidance, solver, weak)

    @torch.no_grad()
    def integrate(self, z: Tensor, t_start: float, c: Tensor | None, steps: int | None = None,
                  guidance: float | None = None, solver: str | None = None, weak: "FlowPrior | None" = None,
                  t_end: float = 0.0) -> Tensor:
        """Integrate dz/dt = v from ``t_start`` (z: (B, C, s, s) on the path at that time) to ``t_end`` (data at
        t = 0) in ``steps`` equal steps; ``c`` from ``cond_inputs``. Sampling starts at t = 1 (noise); restoring a
        latent moved part-way towards noise starts at that t."""
        steps = steps or self.cfg.steps
        guidance = self.cfg.guidance if guidance is None else guidance
        solver = solver or self.cfg.solver
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        ts = torch.linspace(t_start, t_end, steps + 1).tolist()
        for t, t_next in zip(ts, ts[1:]):
            v = self.guided_velocity(z, t, c, guidance, weak)
            if solver == "heun":
                v = 0.5 * (v + self.guided_velocity(z + (t_next - t) * v, t_next, c, guidance, weak))
            z = z + (t_next - t) * v
        return z

    # -- distillation -------------------------------------------------------------------------------
    def distill_loss(self, path: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        """Few-step distillation loss per sample (B,) of this network as a student sampler, and where its K steps
        land (B, C, s, s).

        ``path`` (B, K + 1, C, s, s): a teacher's sampling path at the student's times 1, 1 - 1/K, ..., 0, from
        its noise ``path[:, 0]``; ``c`` the conditions the teacher sampled under. The student takes its own K
        Euler steps from the same noise (exactly as ``sample`` with ``steps = K``, ``solver = "euler"``,
        ``guidance = 1``), each from where its previous step landed, and is pulled towards the teacher's point at
        every step: || z_k - path_k ||^2 summed over the latent, averaged over the K steps. Gradients flow through
        the whole unrolled chain, so the student learns to correct its own earlier steps (Luhman & Luhman 2021
        regress the one-step case).
        """
        k_steps = path.shape[1] - 1
        z, loss = path[:, 0], 0.0
        for k in range(k_steps):
            t, t_next = 1 - k / k_steps, 1 - (k + 1) / k_steps
            z = z + (t_next - t) * self.velocity(z, torch.full((len(z),), t, device=z.device), c)
            loss = loss + (z - path[:, k + 1]).pow(2).flatten(1).sum(1)
        return loss / k_steps, z
