"""Latent generative model: a sharp KL autoencoder with a spatial latent, and a learned flow prior over it.

    x (B,1,128,128) --autoencoder.encode--> z (B,4,32,32) --autoencoder.decode--> x_hat
    sample:  eps (n,4,32,32) --flow prior (age, sex, position; Euler/Heun, CFG)--> z --decode--> (n,1,128,128)

The two-stage recipe of latent diffusion (Rombach et al. 2022; for brain MRI
Pinaya et al. 2022), with flow matching as the prior (Lipman et al. 2023) as in
Stable Diffusion 3 (Esser et al. 2024):

1. ``autoencoder`` stage: a :class:`~brainvae.models.resvae.ResVAE` with a
   spatial latent (f = 4: 128 px -> 4 x 32 x 32 by default), a calibrated
   Gaussian likelihood (per-pixel sigma), a small KL weight (beta) so the latent
   keeps detail, and a PatchGAN hinge term with discriminator feature matching
   after ``adv_start`` (Esser et al. 2021), which keeps sulci sharp where a pure
   likelihood would average them away. It is unconditional: the latent carries the image.
2. ``prior`` stage: the autoencoder is frozen at its EMA weights; its latents,
   standardised per channel (statistics from the training split when the stage
   starts, kept as buffers), train a conditional rectified flow
   (:mod:`brainvae.models.flow`) with condition dropout for classifier-free guidance.
3. ``decoder`` stage (optional: trained when the run config has ``[stages.decoder]``): the encoder frozen,
   the decoder and discriminator train on, the adversarial term on from the first step. The latent, and
   so the prior, stay valid; only the decoded images sharpen. The stage's likelihood worsens as its images
   sharpen, so its checkpoint is its last weights, not the lowest validation loss.
4. ``guide`` stage (optional: trained when the run config has ``[stages.guide]``): a weaker flow network
   (``[model.guide]``; on IXI the prior's own network trained for a third as long worked, a smaller one made
   samples worse) on the same latents, for autoguidance at sampling (``guide = "weak"``, Karras et al. 2024):
   samples are pushed away from the weak network's errors.
5. ``distill`` stage (optional: ``[stages.distill]``): a student flow network (``[model.student]``, started from
   the prior's weights) learns to reach in K Euler steps (``steps``, e.g. 2) where the prior's own sampler (its
   ``[model.prior]`` steps, solver, guidance and guide: e.g. 8 Heun steps with autoguidance, 30 network passes)
   lands from the same noise and conditions (``TeacherPaths``). ``sampler = "student"`` samples with it.
   Regression onto the teacher's endpoints alone averages away fine texture; ``distill_adv > 0`` adds a
   conditional critic on the latent (``LatentCritic``, trained against the encoded training slices) whose hinge
   term rewards students whose samples look like real latents (adversarial distillation, Sauer et al. 2023/2024).

One registry entry, one config (``[model.autoencoder]``, ``[model.prior]``, ``[model.guide]``),
one run folder; the engine trains the stages in order (``RunConfig.stage_plan``).
``encode``/``decode``/``reconstruct`` (and so the anomaly scores) go through the
autoencoder, ``sample`` through the prior.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn

from ..config import check, from_dict
from ..errors import BrainVAEError
from ..hardware import autocast, autocast_dtype
from ..io.atomic import atomic_path
from ..progress import bar as progress_bar
from .base import BaseConfig, BrainModel, Cond, DiagonalGaussian, Output, randn
from .flow import GUIDES, FlowConfig, FlowPrior
from .registry import register
from .resvae import ResVAE, ResVAEConfig, adaptive_weight, hinge_critic_loss
from .scoring import SMOOTH_SIGMA, Score, ScoreBatch, gaussian_blur

# The autoencoder's defaults, where they differ from resvae's own (measured choices in benchmarks/README.md).
AUTOENCODER_DEFAULTS = {"channels": (64, 128), "patch": 2, "enc_blocks": 1, "dec_blocks": 2, "latent_channels": 4,
                        "beta": 0.01, "prior": "standard", "adv_weight": 0.5, "adv_start": 1500, "fm_weight": 1.0}
_FIXED = ("image_size", "conditions", "prior")  # set by the ldm itself
_FLOW_STAGES = ("prior", "guide", "distill")  # stages that train a flow network, the autoencoder frozen
SAMPLERS = ("prior", "student")  # sample with the prior's solver (steps, guidance, guide) or the distilled student
# Samples are decoded this many at a time: a 128 px decoder's activations then stay in a core's cache (and the
# allocator reuses them), 2x faster per slice than one decoder call for 256 on a 2-core AMX CPU.
DECODE_CHUNK = 16


def zero_background(x: Tensor, threshold: float, min_share: float = 0.05) -> Tensor:
    """(B, 1, H, W) slices with every pixel outside the brain set to 0.

    The brain of a slice is its connected regions of pixels above ``threshold`` (those at least ``min_share``
    of the largest one's size, so both hemispheres' lobes of a low slice count), holes filled: the step that
    makes skull-stripped training slices exactly 0 outside their brain mask. A decoder only approximates that
    hard edge, and leaves a faint haze around the brain a reader (and a two-sample classifier) can see.
    All slices are labelled in one call (4-connected within a slice, never across slices), as
    ``ndimage.binary_fill_holes`` would fill each: a hole is a region of the rest that touches no slice edge.
    """
    within = np.zeros((3, 3, 3), bool)
    within[1] = ndimage.generate_binary_structure(2, 1)  # 4-connected in-plane, never across slices
    bright = x[:, 0].float().cpu().numpy() > threshold  # (B, H, W)
    labels, n = ndimage.label(bright, within)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)  # (n + 1,) label 0: the dark pixels
    owner = np.zeros(n + 1, np.int64)
    owner[labels.ravel()] = np.repeat(np.arange(len(bright)), bright[0].size)  # the slice of each region
    largest = np.zeros(len(bright), np.int64)
    np.maximum.at(largest, owner[1:], sizes[1:])
    big = sizes >= min_share * largest[owner]
    big[0] = False
    outside, m = ndimage.label(~big[labels], within)  # the rest: background and holes
    edge = np.zeros(m + 1, bool)
    edge[np.concatenate([outside[:, [0, -1]].ravel(), outside[:, :, [0, -1]].ravel()])] = True
    edge[0] = False  # label 0 is the kept brain itself
    keep = ~edge[outside]  # (B, H, W) brain and its holes
    return x * torch.from_numpy(keep[:, None]).to(x.device, x.dtype)


class LatentCritic(nn.Module):
    """The distill stage's critic: (B, C, s, s) standardised latents and their condition inputs (B, 2k)
    (``FlowPrior.cond_inputs``, hidden keys included) -> (B, s/4 * s/4) real-vs-fake logits, one per 4 x 4 patch of
    the latent (16 x 16 px at f = 4). Spectral-norm convolutions (Miyato et al. 2018), no normalisation layers,
    and the conditions projected onto the last features (projection discriminator, Miyato & Koyama 2018), so a
    sample that looks real but not of its age, sex or position is still told apart."""

    def __init__(self, channels: int, n_cond: int, widths: tuple[int, ...] = (64, 128, 256)):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers: list[nn.Module] = [sn(nn.Conv2d(channels, widths[0], 3, 1, 1)), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [sn(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.head = sn(nn.Conv2d(widths[-1], 1, 3, 1, 1))
        self.embed = sn(nn.Linear(n_cond, widths[-1])) if n_cond else None

    def forward(self, z: Tensor, c: Tensor | None) -> Tensor:
        h = self.body(z)  # (B, W, s/4, s/4)
        logits = self.head(h)[:, 0]  # (B, s/4, s/4)
        if self.embed is not None and c is not None:
            logits = logits + (self.embed(c.to(h.dtype))[:, :, None, None] * h).sum(1)
        return logits.flatten(1).float()


class LatentBatches:
    """A split's slices encoded once by the frozen autoencoder, for the prior stage (``LDM.stage_data``).

    Holds each slice's posterior mean and std (N, C, s, s) in memory (4 x 32 x 32 x 2 float32 = 32 KiB a slice);
    ``batch(rows)`` returns a fresh posterior sample z (B, C, s, s) and the conditions, as the prior stage's
    ``forward`` would have drawn from the images, without running the encoder at every step.
    ``flip``: also encode each slice mirrored left-right; ``batch`` then draws each row from the slice or its
    mirror at random (the same conditions): twice the distinct latents for the prior.
    """

    def __init__(self, data, encode, batch_size: int = 64, flip: bool = False):
        self.source = data  # the SliceBatches (images) behind the latents
        self.cond, self.device = data.cond, data.device
        views = 2 if flip else 1  # view 0: the slices; view 1: their mirrors
        means, stds = [[] for _ in range(views)], [[] for _ in range(views)]
        for start in range(0, len(data), batch_size):
            x, _ = data.batch(np.arange(start, min(start + batch_size, len(data))))
            for v in range(views):
                posterior = encode(x.flip(-1) if v else x)
                means[v].append(posterior.mean.float())
                stds[v].append(torch.exp(0.5 * posterior.logvar.float()))
        self.mean = torch.stack([torch.cat(m) for m in means])  # (V, N, C, s, s)
        self.std = torch.stack([torch.cat(sd) for sd in stds])

    def __len__(self) -> int:
        return self.mean.shape[1]

    def batch(self, idx) -> tuple[Tensor, dict[str, Tensor]]:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        view = torch.randint(len(self.mean), (len(idx),)) if len(self.mean) > 1 else torch.zeros_like(idx)
        mean = self.mean[view, idx]  # (B, C, s, s)
        z = mean + self.std[view, idx] * torch.randn_like(mean)
        return z.to(self.device), {k: v[idx].to(self.device) for k, v in self.cond.items()}

    def epoch_order(self, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
        return self.source.epoch_order(seed, epoch, rank, world)


class TeacherPaths:
    """The distill stage's data (``LDM.stage_data``): the teacher sampler's paths, made once when the stage
    starts (fixed seeds) and kept in ``cache`` (a file; None: not kept), where a resumed run finds them when
    they are still the same teacher's (``LDM.teacher_key``) instead of making them again (~30 min for 40,000).

    Each of the split's slices gives ``repeats`` rows: its conditions, each hidden as in the prior's training
    (``drop_key`` / ``drop_all``, so the student also learns the marginal samplers), a fresh noise draw, and the
    teacher's path from that noise at the student's times 1, 1 - 1/K, ..., 0: (K + 1, C, s, s) per row.
    ``batch(rows)`` returns the paths (B, K + 1, C, s, s) and the conditions as a cond dict, a hidden value
    unknown (age and position NaN, sex 0), which ``FlowPrior.cond_inputs`` turns back into the same inputs.
    With a critic (``distill_adv > 0``) each row also carries a posterior sample of its own slice's latent,
    standardised, for the critic's real side: ``batch`` then returns (B, K + 2, C, s, s), that latent last.
    """

    def __init__(self, data, model: "LDM", repeats: int, seed: int, batch_size: int = 128,
                 cache: Path | None = None):
        self.source, self.device = data, data.device
        # the slices' own latents for the critic (encoded again each time: ~30 s, and not the teacher's)
        self.real = LatentBatches(data, model.autoencoder.encode) if model.student_critic is not None else None
        self._standardise = model._standardise
        digest = model.teacher_key(data, repeats, seed)
        saved = torch.load(cache, weights_only=True) if cache is not None and cache.exists() else None
        if saved is not None and saved["key"] == digest:
            self.cond, self.paths = saved["cond"], saved["paths"]
            return
        flow, n = model.flow, len(data)
        g = torch.Generator().manual_seed(seed)
        rows = np.tile(np.arange(n), repeats)
        cond = {k: data.cond[k][rows].clone() for k in flow.keys}  # (N * repeats,) raw values
        c = flow._hide(flow.cond_inputs(cond, len(rows), torch.device("cpu")), g) if flow.keys else None
        for i, key in enumerate(flow.keys):  # record what is hidden in the raw values
            cond[key] = cond[key].masked_fill(c[:, len(flow.keys) + i] > 0, 0.0 if key == "sex" else float("nan"))
        self.cond = cond
        eps = torch.randn((len(rows), *flow.latent_shape), generator=g)
        paths = []
        for start in progress_bar(range(0, len(rows), batch_size), desc=f"teacher paths ({data.split})", unit="batch"):
            part = slice(start, start + batch_size)
            paths.append(model.teacher_path(eps[part].to(self.device),
                                            None if c is None else c[part].to(self.device)).cpu())
        self.paths = torch.cat(paths).half()  # (N * repeats, K + 1, C, s, s), float16: half the memory and file
        if cache is not None:
            with atomic_path(cache) as tmp:  # a per-process temporary name: DDP ranks each write the same data
                torch.save({"key": digest, "cond": self.cond, "paths": self.paths}, tmp)

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, idx) -> tuple[Tensor, dict[str, Tensor]]:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        paths = self.paths[idx].float().to(self.device)  # (B, K + 1, C, s, s)
        if self.real is not None:  # row i is slice i % N's (rows tile the split ``repeats`` times)
            real = self._standardise(self.real.batch(idx % len(self.real))[0])  # (B, C, s, s)
            paths = torch.cat([paths, real[:, None]], 1)
        return paths, {k: v[idx].to(self.device) for k, v in self.cond.items()}

    def epoch_order(self, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """A permutation fixed by (seed, epoch); with DDP each rank takes every world-th element."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=g).numpy()[rank::world]


@dataclass(frozen=True)
class LDMConfig(BaseConfig):
    autoencoder: dict = field(default_factory=dict)  # ResVAEConfig fields for stage 1 (over AUTOENCODER_DEFAULTS)
    prior: dict = field(default_factory=dict)  # FlowConfig fields for stage 2
    stats_batches: int = 32  # training batches that set the latent standardisation when the prior stage starts
    # Sampling: zero every pixel outside the brain of a decoded sample (``zero_background``), as the skull-stripped
    # training slices are exactly 0 there; the brain is the regions above this intensity (0 = off).
    background: float = 0.0
    # Prior stage: train on each slice or, at random, its left-right mirror (``LatentBatches(flip=True)``):
    # twice the distinct latents for a prior that overfits 6,450 training slices; brains are near-symmetric.
    flip: bool = False
    # Anomaly restoration (``LDM.restore``): each slice's latent moved to these path times t (0 = data, 1 = noise)
    # and integrated back by the prior with Heun steps of at most ``restore_step``; scores average over the levels.
    restore_levels: tuple[float, ...] = (0.3, 0.45, 0.6)
    restore_step: float = 0.1
    # The weak network for autoguidance (FlowConfig network fields: give the prior's, and train it for fewer steps).
    # Empty: no guide network. Trained by the optional ``guide`` stage ([stages.guide] in the run).
    guide: dict = field(default_factory=dict)
    # The distilled few-step sampler (FlowConfig network fields and ``steps``, its K Euler steps; default 2).
    # Empty: none. Trained by the optional ``distill`` stage ([stages.distill]) on ``distill_repeats`` teacher
    # paths per training slice; ``sampler`` chooses what ``sample`` uses by default.
    student: dict = field(default_factory=dict)
    distill_repeats: int = 1
    # Distill stage: weight of a conditional latent critic's hinge term on the student's samples (``LatentCritic``,
    # against the training slices' latents), relative to the regression term by the norms of their gradients at
    # the student's output (VQGAN's adaptive weight, Esser et al. 2021). 0: regression only, no critic.
    distill_adv: float = 0.0
    sampler: str = "prior"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.restore_levels) >= 1 and all(0 < t <= 1 for t in self.restore_levels),
              f"restore_levels must be path times in (0, 1], got {self.restore_levels}")
        check(0 < self.restore_step <= 1, f"restore_step must be in (0, 1], got {self.restore_step}")
        fixed = sorted(set(self.autoencoder) & set(_FIXED))
        check(not fixed, f"[model.autoencoder] cannot set {fixed}: the ldm sets them")
        check(self.stats_batches >= 1, "stats_batches must be >= 1")
        check(0.0 <= self.background < 1.0, f"background must be in [0, 1), got {self.background}")
        self.autoencoder_config()
        prior = self.prior_config()
        check(prior.guide != "weak" or self.guide, "[model.prior] guide = \"weak\" needs a weak network: give "
              "[model.guide] (e.g. the prior's widths) and train it with [stages.guide]")
        if self.guide:
            self.guide_config()
        check(self.sampler in SAMPLERS, f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        check(self.sampler != "student" or self.student, "sampler = \"student\" needs a distilled network: give "
              "[model.student] and train it with [stages.distill]")
        check(self.distill_repeats >= 1, "distill_repeats must be >= 1")
        check(self.distill_adv >= 0, f"distill_adv must be >= 0, got {self.distill_adv}")
        check(self.distill_adv == 0 or self.student, "distill_adv > 0 trains a critic for the distilled student: "
              "give [model.student]")
        if self.student:
            fixed = sorted(set(self.student) & {"solver", "guidance", "guide"})
            check(not fixed, f"[model.student] cannot set {fixed}: the student takes plain Euler steps")
            student = self.student_config()
            check(prior.steps % student.steps == 0, f"the student's steps ({student.steps}) must divide the "
                  f"prior's ({prior.steps}): it learns the prior's path at its own step times")

    def autoencoder_config(self) -> ResVAEConfig:
        values = {**AUTOENCODER_DEFAULTS, **self.autoencoder, "image_size": self.image_size}
        return from_dict(ResVAEConfig, values, "[model.autoencoder]")

    def prior_config(self) -> FlowConfig:
        return from_dict(FlowConfig, dict(self.prior), "[model.prior]")

    def guide_config(self) -> FlowConfig:
        return from_dict(FlowConfig, dict(self.guide), "[model.guide]")

    def student_config(self) -> FlowConfig:
        values = {"steps": 2, **self.student, "solver": "euler", "guidance": 1.0, "guide": "unconditional"}
        return from_dict(FlowConfig, values, "[model.student]")


@register("ldm", LDMConfig)
class LDM(BrainModel):
    config: LDMConfig
    stages = ("autoencoder", "prior", "decoder", "guide", "distill")
    optional_stages = ("decoder", "guide", "distill")
    stage_owned = {"guide": "guide", "distill": "student"}
    unselected_stages = ("decoder",)
    sample_options = ("steps", "guidance", "solver", "guide", "sampler")
    fills_missing_conditions = False  # trained with conditions hidden, it marginalises those left out

    def __init__(self, config: LDMConfig):
        super().__init__(config)
        self.autoencoder = ResVAE(config.autoencoder_config())
        shape = tuple(self.autoencoder.latent_shape())  # (C, s, s)
        self.flow = FlowPrior(config.prior_config(), shape, tuple(config.conditions))
        self.guide = FlowPrior(config.guide_config(), shape, tuple(config.conditions)) if config.guide else None
        if self.guide is not None:  # set when the guide stage starts: an untrained guide would steer at random
            self.register_buffer("guide_trained", torch.tensor(False))
        self.student = FlowPrior(config.student_config(), shape, tuple(config.conditions)) if config.student else None
        if self.student is not None:  # set when the distill stage starts
            self.register_buffer("student_trained", torch.tensor(False))
        # named student_*: the distill stage owns it (``stage_owned``), as it does the student
        self.student_critic = (LatentCritic(shape[0], 2 * len(config.conditions))
                               if self.student is not None and config.distill_adv > 0 else None)
        if self.student_critic is not None:  # a critic's term moves the student off the regression optimum:
            self.unselected_stages = ("decoder", "distill")  # keep the distill stage's last weights
        self.register_buffer("latent_mean", torch.zeros(shape[0]))
        self.register_buffer("latent_std", torch.ones(shape[0]))
        self.stage = "autoencoder"
        self.set_stage("autoencoder")

    # -- stages -------------------------------------------------------------------------------------
    def set_stage(self, name: str) -> None:
        super().set_stage(name)
        if name == "decoder" and self.autoencoder.disc is None:
            raise BrainVAEError("the ldm decoder stage sharpens the decoder adversarially: set "
                                "[model.autoencoder] adv_weight > 0")
        if name == "guide" and self.guide is None:
            raise BrainVAEError("the ldm guide stage trains the weak network of [model.guide]: give it "
                                "(e.g. the prior's widths)")
        if name == "distill" and self.student is None:
            raise BrainVAEError("the ldm distill stage trains the student of [model.student]: give it "
                                "(e.g. steps = 2)")
        self.stage = name
        self.autoencoder.requires_grad_(name in ("autoencoder", "decoder"))
        for frozen in self._encoder_side():
            frozen.requires_grad_(name == "autoencoder")
        self.flow.requires_grad_(name == "prior")
        if self.guide is not None:
            self.guide.requires_grad_(name == "guide")
        if self.student is not None:
            self.student.requires_grad_(name == "distill")
        if self.student_critic is not None:
            self.student_critic.requires_grad_(name == "distill")
        self.step = self.step  # the decoder stage's adversarial term is on from its first step
        self.train(self.training)

    def _encoder_side(self) -> tuple[nn.Module, ...]:
        return self.autoencoder.encoder, self.autoencoder.to_posterior

    def train(self, mode: bool = True) -> "LDM":
        super().train(mode)
        if self.stage in _FLOW_STAGES:  # the frozen autoencoder (and prior) keep their statistics
            self.autoencoder.eval()
        if self.stage == "decoder":  # so does the frozen encoder
            for frozen in self._encoder_side():
                frozen.eval()
        return self

    @torch.no_grad()
    def begin_stage(self, name: str, data) -> None:
        """Prior stage: per-channel mean and std of the latents of ``stats_batches`` training batches. Guide
        stage: the guide counts as trained from here on. Distill stage: the student starts from the prior's
        weights (when its network has the prior's shape: at t = 1 the prior already points at the mean latent),
        unless it was trained before (a run ``[init] from`` a distilled model goes on from its student), and
        counts as trained from here on."""
        if name == "guide":
            self.guide_trained.fill_(True)
        if name == "distill":
            prior, student = self.flow.state_dict(), self.student.state_dict()
            same_shape = {k: v.shape for k, v in prior.items()} == {k: v.shape for k, v in student.items()}
            if same_shape and not self.student_trained:  # a student trained before ([init] from it) goes on
                self.student.load_state_dict(prior)
            self.student_trained.fill_(True)
        if name != "prior":
            return
        was = self.training
        self.eval()
        g = torch.Generator().manual_seed(0)  # the same statistics for the same autoencoder and data
        rows = torch.randperm(len(data), generator=g).numpy()
        zs = []
        for b in range(min(self.config.stats_batches, -(-len(data) // 32))):
            x, _ = data.batch(rows[b * 32:(b + 1) * 32])
            zs.append(self.autoencoder.encode(x).sample(g).float())
        z = torch.cat(zs).transpose(0, 1).flatten(1)  # (C, N * s * s)
        self.latent_mean.copy_(z.mean(1))
        self.latent_std.copy_(z.std(1).clamp(min=1e-6))
        self.train(was)

    @torch.no_grad()
    def stage_data(self, name: str, data, cache: Path | None = None):
        """Prior and guide stages: the split encoded once (``LatentBatches``), so a step costs only the velocity
        network. Distill stage: the teacher's sampling paths from the split's conditions (``TeacherPaths``; the
        validation split draws once per slice, from another seed), made under bf16 autocast where it is native
        and kept in the ``cache`` folder."""
        if name not in _FLOW_STAGES:
            return data
        was = self.training
        self.eval()
        if name == "distill":  # validation: one noise draw per slice
            training = data.split == "train"
            with autocast(self.device, autocast_dtype("auto", self.device)):
                out = TeacherPaths(data, self, self.config.distill_repeats if training else 1, 1 if training else 2,
                                   cache=None if cache is None else Path(cache) / f"teacher-paths-{data.split}.pt")
        else:
            out = LatentBatches(data, self.autoencoder.encode, flip=self.config.flip)
        self.train(was)
        return out

    def teacher_key(self, data, repeats: int, seed: int) -> str:
        """A SHA-256 of everything ``TeacherPaths`` depends on: the prior's (and guide's) weights and sampler
        settings, the student's steps, the split's conditions, ``repeats`` and ``seed``."""
        h = hashlib.sha256(json.dumps([asdict(self.flow.cfg), self.student.cfg.steps, repeats, seed, len(data)],
                                      default=str).encode())
        for net in (self.flow, self.guide) if self.guide is not None else (self.flow,):
            for k, v in net.state_dict().items():
                h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
        for k in self.flow.keys:
            h.update(data.cond[k].cpu().numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def teacher_path(self, eps: Tensor, c: Tensor | None) -> Tensor:
        """The prior's own sampler (``[model.prior]`` steps, solver, guidance, guide) from noise ``eps``
        (B, C, s, s) under inputs ``c``, kept at the student's K + 1 times 1, ..., 0: (B, K + 1, C, s, s)."""
        k_steps = self.student.cfg.steps
        weak = self._weak(self.flow.cfg.guide)
        path, z = [eps], eps
        for k in range(k_steps):
            z = self.flow.integrate(z, 1 - k / k_steps, c, self.flow.cfg.steps // k_steps, weak=weak,
                                    t_end=1 - (k + 1) / k_steps)
            path.append(z)
        return torch.stack(path, 1)

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        if self.stage == "distill" and self.student_critic is not None:
            return {"model": list(self.student.parameters()), "disc": list(self.student_critic.parameters())}
        if self.stage in _FLOW_STAGES:
            return {"model": list(self._stage_flow().parameters())}
        groups = self.autoencoder.optimizer_groups()
        return {g: [p for p in params if p.requires_grad] for g, params in groups.items()}

    @property
    def step(self) -> int:
        return self.autoencoder.step

    @step.setter
    def step(self, value: int) -> None:
        """The engine's optimiser step; in the decoder stage at least ``adv_start`` (the adversarial term on)."""
        start = self.autoencoder.config.adv_start if self.stage == "decoder" else 0
        self.autoencoder.step = max(int(value), start)

    def _stage_flow(self) -> FlowPrior:
        return {"guide": self.guide, "distill": self.student}.get(self.stage, self.flow)

    def disc_loss(self, x: Tensor, recon: Tensor, cond: Cond = None) -> Tensor:
        """Hinge loss per sample (B,) of the autoencoder's discriminator (images x, reconstructions recon) or, in
        the distill stage, of the student's critic (x: a TeacherPaths batch, its last entry the slices' own
        latents; recon: the student's samples from the same conditions)."""
        if self.stage != "distill":
            return self.autoencoder.disc_loss(x, recon)
        c = self.student.cond_inputs(cond, len(x), x.device)
        real, fake = self.student_critic(x[:, -1], c), self.student_critic(recon.detach(), c)
        return hinge_critic_loss(real, fake)

    # -- latent standardisation -------------------------------------------------------------------
    def _standardise(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def _unstandardise(self, z: Tensor) -> Tensor:
        return z * self.latent_std[:, None, None] + self.latent_mean[:, None, None]

    # -- the contract -------------------------------------------------------------------------------
    def encode(self, x: Tensor, cond: Cond = None) -> DiagonalGaussian:
        return self.autoencoder.encode(x)  # (B, C, s, s); the autoencoder is unconditional

    def decode(self, z: Tensor, cond: Cond = None) -> Tensor:
        return self.autoencoder.decode(z)

    def forward(self, x: Tensor, cond: Cond = None, kl_scale: float = 1.0) -> Output:
        if self.stage not in _FLOW_STAGES:  # the autoencoder's loss (its frozen parts get no gradient)
            return self.autoencoder(x, None, kl_scale)
        if self.stage == "distill":  # x: teacher paths (B, K + 1 [+ 1 real latent], C, s, s) from TeacherPaths
            return self._distill(x, cond)
        posterior = None
        if tuple(x.shape[1:]) == self.flow.latent_shape:  # latent samples from stage_data (LatentBatches)
            z = x
        else:  # images (B, 1, H, W)
            with torch.no_grad():
                posterior = self.autoencoder.encode(x)
                z = posterior.sample()
        flow = self._stage_flow().loss(self._standardise(z), cond)  # (B,)
        return Output(None, posterior, {"loss": flow, "flow": flow})

    def _distill(self, x: Tensor, cond: Cond) -> Output:
        """The distill stage's losses (B,): regression onto the teacher's path, plus (with a critic, in training)
        the critic's hinge term on the student's samples, weighted by ``distill_adv`` x the ratio of the two
        terms' gradient norms at those samples. ``recon``: the student's samples (B, C, s, s), for the critic."""
        c = self.student.cond_inputs(cond, len(x), x.device)
        critic = self.student_critic
        distill, z = self.student.distill_loss(x[:, :-1] if critic is not None else x, c)
        losses = {"distill": distill}
        if critic is not None and self.training and torch.is_grad_enabled():
            adv = -critic(z, c).mean(1)  # (B,)
            losses["adv"] = self.config.distill_adv * adaptive_weight(distill.sum(), adv.sum(), z) * adv
        return Output(z, None, {"loss": sum(losses.values()), **losses})

    @torch.no_grad()
    def sample(self, n: int, cond: Cond = None, generator: torch.Generator | None = None, steps: int | None = None,
               guidance: float | None = None, solver: str | None = None, guide: str | None = None,
               sampler: str | None = None) -> Tensor:
        """n slices (n, 1, H, W); conditions left out are marginalised (see :mod:`brainvae.models.flow`).
        Options not given come from ``configure_sampler``, then from the config (``sampler``, ``[model.prior]``).
        ``sampler = "student"``: the distilled network's own K Euler steps (steps, guidance, solver and guide are
        the prior's sampler's options, and are refused with it)."""
        given = {"steps": steps, "guidance": guidance, "solver": solver, "guide": guide, "sampler": sampler}
        options = {**self.sampler_defaults, **{k: v for k, v in given.items() if v is not None}}
        cond = self.given_cond(n, cond)
        if self._sampler(options.pop("sampler", self.config.sampler)) == "student":
            if options:
                raise BrainVAEError(f"the distilled student takes its own {self.student.cfg.steps} Euler steps: "
                                    f"{sorted(options)} apply to sampler \"prior\" only")
            z = self.student.sample(n, cond, generator, self.device)
        else:
            weak = self._weak(options.pop("guide", self.flow.cfg.guide))
            z = self.flow.sample(n, cond, generator, self.device, **options, weak=weak)
        parts = []
        for part in self._unstandardise(z).split(DECODE_CHUNK):  # (<= DECODE_CHUNK, C, s, s) each
            x = self.decode(part)  # (b, 1, H, W)
            parts.append(zero_background(x, self.config.background) if self.config.background > 0 else x)
        return torch.cat(parts)

    def _sampler(self, name: str) -> str:
        """``name`` checked: "prior", or "student" when this model has a trained one."""
        if name not in SAMPLERS:
            raise BrainVAEError(f"sampler must be one of {SAMPLERS}, got {name!r}")
        if name == "student":
            self._trained("student", "sampler \"student\" needs the model's distilled network, trained by the ldm "
                                     "distill stage ([model.student] and [stages.distill])")
        return name

    def _weak(self, guide: str) -> FlowPrior | None:
        """The network guidance extrapolates away from besides the unconditional model: None, or the guide."""
        if guide not in GUIDES:
            raise BrainVAEError(f"guide must be one of {GUIDES}, got {guide!r}")
        if guide == "unconditional":
            return None
        return self._trained("guide", "guide \"weak\" (autoguidance) needs the model's weak network, trained by "
                                      "the ldm guide stage ([model.guide] and [stages.guide])")

    def _trained(self, name: str, needs: str) -> FlowPrior:
        """The optional flow network ``name`` (guide, student), refused (``needs``: why it is needed) when the
        model has none or its stage never started (buffer ``<name>_trained``)."""
        network = getattr(self, name)
        if network is None or not bool(getattr(self, f"{name}_trained")):
            raise BrainVAEError(f"{needs}; this model has " + ("none" if network is None else "an untrained one"))
        return network

    # -- anomaly scores: restoration with the prior ------------------------------------------------------
    @torch.no_grad()
    def restore(self, x: Tensor, cond: Cond = None, t: float = 0.45, generator: torch.Generator | None = None,
                ) -> Tensor:
        """The healthy version of x (B, 1, H, W) the prior finds nearby: x's latent (posterior mean, standardised)
        moved to path time t, z_t = (1 - t) z_0 + t eps, integrated back to t = 0 under x's conditions (those given;
        unknown ones marginalised), decoded: (B, 1, H, W). The pDDPM / AnoDDPM idea (Behrendt et al. 2023;
        Wyatt et al. 2022) in the latent: noise hides what is abnormal, the prior redraws it as healthy anatomy,
        and what it keeps of x below the noise keeps the rest of the slice in place."""
        z0 = self._standardise(self.autoencoder.encode(x).mode().float())
        zt = (1 - t) * z0 + t * randn(z0.shape, generator, z0.device)
        c = self.flow.cond_inputs(self.given_cond(len(x), cond), len(x), z0.device)
        steps = max(1, int(np.ceil(t / self.config.restore_step - 1e-9)))
        z = self.flow.integrate(zt, t, c, steps, guidance=1.0, solver="heun")
        return self.decode(self._unstandardise(z)).float()

    def restorations(self, b: ScoreBatch) -> Tensor:
        """``restore`` at every ``restore_levels`` time, computed once per batch: (L, B, 1, H, W)."""
        if "restorations" not in b.shared:
            b.shared["restorations"] = torch.stack([self.restore(b.x, b.cond, t, b.generator)
                                                    for t in self.config.restore_levels])
        return b.shared["restorations"]

    def scores(self) -> dict[str, Score]:
        levels = ", ".join(f"{t:g}" for t in self.config.restore_levels)
        return {**super().scores(),
                "restoration": Score(lambda b: (b.x - b.model.restorations(b)).abs().mean(0),
                                     f"|x - restoration| averaged over the prior's restorations from path times "
                                     f"{levels} (pDDPM-style, in the latent)"),
                "restoration_neg_smooth": Score(
                    lambda b: torch.stack([gaussian_blur(r - b.x, SMOOTH_SIGMA) for r in b.model.restorations(b)])
                    .clamp_min(0).mean(0),
                    f"(G * (restoration - x))+ averaged over path times {levels}: darker than the prior's healthy "
                    f"restoration, the signed residual smoothed (sigma {SMOOTH_SIGMA:g} px) first")}

    def sampler_settings(self, **options) -> dict:
        options = {"sampler": self.config.sampler, **super().sampler_settings(**options)}
        if self._sampler(options["sampler"]) == "student":  # what the student distilled: the prior's own sampler
            cfg, student = self.flow.cfg, self.student.cfg
            return {**options, "steps": student.steps, "solver": student.solver,
                    "distilled_from": {"steps": cfg.steps, "solver": cfg.solver, "guidance": cfg.guidance,
                                       "guide": cfg.guide}, "background": self.config.background}
        cfg = self.flow.cfg
        return {"steps": cfg.steps, "solver": cfg.solver, "guidance": cfg.guidance, "guide": cfg.guide,
                **options, "background": self.config.background}
