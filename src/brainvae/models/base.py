"""The one model contract every brainvae architecture follows.

    posterior = model.encode(x, cond)            # x: (B, 1, H, W) in [0, 1]
    x_hat     = model.decode(z, cond)            # (B, 1, H, W) in [0, 1]
    out       = model(x, cond, kl_scale=1.0)     # Output(recon, posterior, losses)
    images    = model.generate(n, cond, generator)  # (n, 1, H, W): cond checked, then sample(n, cond, generator)
    scores    = model.scores()                   # name -> Score (models.scoring): the anomaly scores it offers
    a_map     = scores["residual"].compute(ScoreBatch(model, x, cond))  # (B, 1, H, W), higher = more abnormal

``out.losses`` holds per-sample terms, each of shape (B,), before any batch
reduction, with the training objective in ``losses["loss"]``; the same numbers
score anomalies. ``cond`` is a dict of (B,) tensors in user units (age in
years, sex as +1 male / -1 female / 0 unknown, position in the brain 0..1) or
None; a model only reads the keys named in its config's ``conditions``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..conditions import CONDITIONS, NEUTRAL, check_conditions
from ..config import check
from ..errors import BrainVAEError
from .scoring import KL_SCORES, RECONSTRUCTION_SCORES, Score

Cond = dict[str, Tensor] | None


@dataclass(frozen=True)
class BaseConfig:
    """Fields shared by every architecture."""

    image_size: int = 128  # H = W
    conditions: tuple[str, ...] = ()  # subset of CONDITIONS the model is conditioned on

    def __post_init__(self) -> None:
        check(self.image_size >= 16 and self.image_size & (self.image_size - 1) == 0,
              f"image_size must be a power of two >= 16, got {self.image_size}")
        unknown = set(self.conditions) - set(CONDITIONS)
        check(not unknown, f"unknown condition(s) {sorted(unknown)}; choose from {CONDITIONS}")


@dataclass
class Output:
    recon: Tensor | None  # (B, 1, H, W); None when the pass does not decode (a latent prior's training stage)
    posterior: object
    losses: dict[str, Tensor] = field(default_factory=dict)  # each (B,)


def randn(shape, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal noise from an explicit generator (which may live on another device)."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))); KL against N(0, I), summed per sample."""

    def __init__(self, mean: Tensor, logvar: Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        eps = randn(self.mean.shape, generator, self.mean.device).to(self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:  # (B,)
        terms = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return terms.flatten(1).sum(1)


def gaussian_nll(x: Tensor, mean: Tensor, log_sigma: Tensor | float) -> Tensor:
    """Per-sample negative log-likelihood (nats) of x under N(mean, sigma^2) per pixel: (B,)."""
    log_sigma = torch.as_tensor(log_sigma, dtype=mean.dtype, device=mean.device)
    nll = 0.5 * ((x - mean) / log_sigma.exp()).pow(2) + log_sigma + 0.5 * math.log(2 * math.pi)
    return nll.flatten(1).sum(1)


PRIORS = ("standard", "fitted")


class FittedGaussianPrior(nn.Module):
    """A Gaussian fitted to the aggregate posterior q(z) (or q(z | c) for conditioned models), for sampling.

    Exponential moving averages of E[v] and E[v v^T] over training posterior
    samples, v = z or, for a conditioned model, v = (c, z) with c the
    standardised conditions (kept as buffers, like BatchNorm's statistics, so
    they travel with the checkpoint). Sampling z = mean + scale @ eps instead
    of z = eps is ex-post density estimation with one Gaussian (Ghosh et al.
    2020, "From Variational to Deterministic Autoencoders"; the simplest second
    stage of Dai & Wipf 2019): short trainings leave q(z) far from N(0, I)
    (measured on IXI: covariance eigenvalues from 0.04 to 17 after 1,600 steps),
    and N(0, I) samples fall where the decoder never was.

    Conditioned models sample the Gaussian conditional z | c of the joint fit
    (mean mu_z + S_zc S_cc^-1 (c - mu_c), covariance S_zz - S_zc S_cc^-1 S_cz):
    the encoder also sees c, so the codes of old and young brains, or of low and
    high slices, lie in different places, and an unconditional fit would mix
    them and let the decoder ignore the requested conditions. A fresh prior is N(0, I).
    """

    def __init__(self, dim: int, decay: float = 0.99, cond_dim: int = 0):
        super().__init__()
        self.decay = decay
        self.cond_dim = cond_dim
        self.register_buffer("prior_mean", torch.zeros(cond_dim + dim))
        self.register_buffer("prior_moment", torch.eye(cond_dim + dim))

    @torch.no_grad()
    def update(self, z: Tensor, c: Tensor | None = None) -> None:
        with torch.autocast(z.device.type, enabled=False):
            v = z.detach().float().flatten(1)  # (B, D)
            if self.cond_dim:
                v = torch.cat([c.detach().float(), v], 1)  # (B, k + D)
            self.prior_mean.lerp_(v.mean(0), 1.0 - self.decay)
            self.prior_moment.lerp_(v.T @ v / len(v), 1.0 - self.decay)

    @torch.no_grad()
    def mean_and_scale(self, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean ((D,), or (B, D) given conditions c (B, k)) and a square root (D, D) of the covariance."""
        mean = self.prior_mean.double()
        cov = self.prior_moment.double() - torch.outer(mean, mean)
        k = self.cond_dim
        if k:
            gain = cov[k:, :k] @ torch.linalg.pinv(cov[:k, :k])  # (D, k) = S_zc S_cc^-1
            cov = cov[k:, k:] - gain @ cov[:k, k:]
            mean = mean[k:] + (c.double().to(mean.device) - mean[:k]) @ gain.T  # (B, D)
        vals, vecs = torch.linalg.eigh(0.5 * (cov + cov.T))
        return mean.float(), (vecs * vals.clamp(min=0).sqrt()).float()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None, device: torch.device,
               c: Tensor | None = None) -> Tensor:
        mean, scale = self.mean_and_scale(c)
        return mean + randn((n, scale.shape[0]), generator, device) @ scale.T  # (n, D)


class Conditioning(nn.Module):
    """Turns user-unit conditions into a vector: (B,) tensors -> (B, dim).

    Age is centred at 50 years and scaled by 20; unknown age (NaN) becomes 0,
    the population centre. Sex is +1 / -1 / 0. Position 0..1 maps to -1..1.
    """

    def __init__(self, keys: tuple[str, ...], dim: int):
        super().__init__()
        self.keys = tuple(keys)
        self.net = nn.Sequential(nn.Linear(len(self.keys), dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def standardise(cond: dict[str, Tensor], keys: tuple[str, ...]) -> Tensor:
        cols = []
        for key in keys:
            if key not in cond:
                raise ValueError(f"this model is conditioned on {keys}; missing {key!r}")
            v = cond[key].float()
            v = {"age": lambda a: (a - 50.0) / 20.0, "sex": lambda s: s, "position": lambda p: 2.0 * p - 1.0}[key](v)
            cols.append(torch.nan_to_num(v, nan=0.0))
        return torch.stack(cols, dim=1)

    def forward(self, cond: dict[str, Tensor]) -> Tensor:
        return self.net(self.standardise(cond, self.keys).to(self.net[0].weight.dtype))


class BrainModel(nn.Module):
    """Base class: shared helpers, no architecture. Subclasses implement encode/decode/forward."""

    arch: str = ""  # set by @register
    stochastic: bool = True  # False: encode() gives a point code (its posterior spread is unused)
    generative: bool = True  # False: a model that only localises anomalies (dae, fae): generate() refuses it
    inference_copy: bool = False  # True on the frozen copies made by for_inference()
    stages: tuple[str, ...] = ("model",)  # training stages, in order (two-stage models: autoencoder, then prior)
    optional_stages: tuple[str, ...] = ()  # stages trained only when the run config gives ``[stages.NAME]``
    # Stages whose validation loss does not choose the checkpoint (an adversarial fine-tune worsens the
    # likelihood on purpose): their ``best`` is the stage's last weights.
    unselected_stages: tuple[str, ...] = ()
    # Stage -> the prefix of the state-dict keys only that stage trains: a run that starts (``[init]``) at or
    # before the stage may take its weights from a model that lacks them (e.g. an ldm given a guide network).
    stage_owned: dict[str, str] = {}
    sample_options: tuple[str, ...] = ()  # keyword options of sample() beyond (n, cond, generator)
    # True: sample() sets a condition left out to conditions.NEUTRAL (default_cond); False: it takes only the given
    # ones (ldm: trained with conditions hidden, it marginalises the others). Samples' meta.json records which.
    fills_missing_conditions: bool = False
    fixed_sigma: float = 0.1  # per-pixel std of the likelihood decode_params assumes (models without their own)
    score_smoothing: float = 1.5  # px: Gaussian sigma applied to |dKL/dx| by the KL scores

    def __init__(self, config: BaseConfig):
        super().__init__()
        self.config = config
        self.sampler_defaults: dict = {}  # set by configure_sampler

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _embed(self, cond: Cond) -> Tensor | None:
        """The conditioning embedding (B, cond_dim), or None for an unconditioned model (``self.cond``)."""
        if getattr(self, "cond", None) is None:
            return None
        if cond is None:
            raise ValueError(f"{self.arch} is conditioned on {self.config.conditions}; pass cond")
        return self.cond(cond)

    def _cond_vector(self, cond: Cond) -> Tensor | None:
        """Standardised conditions (B, k) for the fitted prior; None for an unconditioned model."""
        if not self.config.conditions:
            return None
        return Conditioning.standardise(cond, tuple(self.config.conditions))

    def encode(self, x: Tensor, cond: Cond = None):
        raise NotImplementedError

    def decode(self, z: Tensor, cond: Cond = None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, cond: Cond = None, kl_scale: float = 1.0) -> Output:
        raise NotImplementedError

    def sample(self, n: int, cond: Cond = None, generator: torch.Generator | None = None) -> Tensor:
        """n samples (n, 1, H, W), conditions as given (unchecked: callers outside the model use ``generate``)."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, n: int, cond: dict | None = None, generator: torch.Generator | None = None,
                 **options) -> Tensor:
        """n samples (n, 1, H, W) in [0, 1]: ``sample`` after checking ``cond`` (``conditions.check_conditions``:
        sex "M" / "F" or +1 / -1 / 0, age 0..120 years, position 0..1, scalars or (n,) values, no key the model
        is not conditioned on) and the sampling ``options`` (``check_sample_options``)."""
        if not self.generative:
            raise BrainVAEError(f"{self.arch} does not generate: it localises anomalies (`brainvae anomaly`); "
                                "use ldm, resvae or cvae to generate slices")
        cond = check_conditions(cond, tuple(self.config.conditions), self.arch)
        return self.sample(n, cond, generator, **self.check_sample_options(options))

    @torch.no_grad()
    def reconstruct(self, x: Tensor, cond: Cond = None) -> Tensor:
        return self.decode(self.encode(x, cond).mode(), cond)

    def for_inference(self) -> "BrainModel":
        """A frozen copy for fast sampling: eval mode, BatchNorm folded into the convs before it, SiLU modules
        in place when no gradient is recorded (``blocks.inplace_silu``), channels-last memory (oneDNN's and
        cuDNN's preferred layout). Same outputs up to float rounding; the original is untouched. Not for
        training or saving (its parameters differ). On such a copy it returns the copy itself, so callers in a
        loop can prepare it once."""
        from .blocks import fold_batchnorm, inplace_silu

        if self.inference_copy:
            return self
        model = inplace_silu(fold_batchnorm(copy.deepcopy(self).eval()))
        model.inference_copy = True
        return model.to(memory_format=torch.channels_last).requires_grad_(False)

    def decode_params(self, z: Tensor, cond: Cond = None) -> tuple[Tensor, Tensor]:
        """The decoder's per-pixel Gaussian likelihood: mean (B, 1, H, W) and log-sigma (broadcastable to it);
        here the decoded image and the fixed ``fixed_sigma``."""
        mean = self.decode(z, cond).float()
        return mean, torch.full((1, 1, 1, 1), math.log(self.fixed_sigma), device=mean.device)

    def likelihood(self) -> str:
        """How ``decode_params`` models a pixel (reported beside the reconstruction probability)."""
        return f"fixed sigma = {self.fixed_sigma:g}"

    # -- anomaly scores ------------------------------------------------------------------------------
    def scores(self) -> dict[str, Score]:
        """The anomaly scores this model offers, by name, in report order (see ``models.scoring``): the
        reconstruction scores, and the KL-gradient scores when it has a posterior trained with a KL term."""
        return {**RECONSTRUCTION_SCORES, **(KL_SCORES if self.stochastic else {})}

    def unavailable_scores(self) -> dict[str, str]:
        """Scores of ``models.scoring`` this model cannot compute, each with the reason (reported with the results)."""
        if self.stochastic:
            return {}
        return dict.fromkeys(KL_SCORES, f"{self.arch} is deterministic (no Gaussian posterior trained with a KL "
                                        "term): no KL gradient")

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups of the current stage, each with its own optimiser; a ``"disc"`` group is trained
        with ``disc_loss``."""
        return {"model": list(self.parameters())}

    def configure_sampler(self, **options) -> "BrainModel":
        """Set default options of ``sample`` (those in ``sample_options``; None = keep); returns self."""
        options = self.check_sample_options(options)
        self.sampler_defaults = {**self.sampler_defaults, **options}
        return self

    def sampler_settings(self, **options) -> dict:
        """The options ``sample`` uses when given ``options`` (None = not given; empty for models without
        sampling options)."""
        return {**self.sampler_defaults, **self.check_sample_options(options)}

    def check_sample_options(self, options: dict | None) -> dict:
        """The given sampling options without None values; unknown ones are a BrainVAEError."""
        options = {k: v for k, v in (options or {}).items() if v is not None}
        unknown = sorted(set(options) - set(self.sample_options))
        if unknown:
            raise BrainVAEError(f"{self.arch} takes no sampling option(s) {unknown}"
                                + (f"; it takes {list(self.sample_options)}" if self.sample_options else ""))
        return options

    def set_stage(self, name: str) -> None:
        """Select the training stage (which parameters train, which loss ``forward`` returns)."""
        if name not in self.stages:
            raise ValueError(f"{self.arch} has no training stage {name!r}; its stages: {self.stages}")

    def begin_stage(self, name: str, data) -> None:
        """Called once when stage ``name`` starts (after the previous one), with the training ``SliceBatches``."""

    def stage_data(self, name: str, data, cache: Path | None = None):
        """The batches stage ``name`` trains and validates on, made from a split's ``SliceBatches`` (called after
        ``begin_stage``, and again when a run resumes inside the stage): by default the slices themselves.
        ``cache``: a folder of the run where costly stage data may be kept for a resumed run (removed when the
        run has finished)."""
        return data

    def given_cond(self, n: int, cond: Cond = None) -> dict[str, Tensor]:
        """The given (not None) values of this model's conditions, each a (n,) float32 tensor on its device."""
        out = {}
        for key in self.config.conditions:
            if cond and cond.get(key) is not None:
                v = torch.as_tensor(cond[key], dtype=torch.float32, device=self.device)
                out[key] = v.expand(n).clone() if v.dim() == 0 else v
        return out

    def default_cond(self, n: int, cond: Cond = None) -> dict[str, Tensor]:
        """Conditions for sampling: given values broadcast to n; missing ones set to ``conditions.NEUTRAL``
        (a model whose ``sample`` calls this sets ``fills_missing_conditions``)."""
        return self.given_cond(n, {**NEUTRAL, **{k: v for k, v in (cond or {}).items() if v is not None}})
