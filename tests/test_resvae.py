"""The ResNet VAE: learned-variance likelihood, spatial/flat latent, conditioning, adversarial groups."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import brainvae.models.resvae  # noqa: F401  (registers "resvae" even while the registry is being edited)
from brainvae.errors import BrainVAEError
from brainvae.models.registry import build, make_config
from brainvae.models.resvae import ResVAE, ResVAEConfig
from brainvae.models.scoring import ScoreBatch

COND = ("age", "sex", "position")


def tiny(**extra) -> ResVAE:
    torch.manual_seed(0)
    return ResVAE(ResVAEConfig(**{"image_size": 32, "channels": (8, 16, 16), "latent_dim": 16, **extra}))


def batch(n: int = 4, size: int = 32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, generator=g) * (torch.rand(n, 1, size, size, generator=g) > 0.3)
    cond = {"age": torch.tensor([25.0, 50.0, 75.0, float("nan")])[:n], "sex": torch.tensor([1.0, -1.0, 0.0, 1.0])[:n],
            "position": torch.linspace(0, 1, n)}
    return x, cond


@pytest.mark.parametrize("extra", [{}, {"latent_channels": 0}, {"conditions": COND},
                                   {"conditions": COND, "latent_channels": 2, "free_bits": 0.1}])
def test_shapes_and_per_sample_losses(extra):
    model = tiny(**extra)
    x, cond = batch()
    out = model(x, cond, kl_scale=0.5)
    assert out.recon.shape == x.shape and out.recon.dtype == torch.float32
    assert 0 <= out.recon.min() and out.recon.max() <= 1
    assert set(out.losses) == {"loss", "recon", "kl"}
    for name, v in out.losses.items():
        assert v.shape == (4,) and torch.isfinite(v).all(), name
    if not extra.get("free_bits"):
        assert torch.allclose(out.losses["loss"], out.losses["recon"] + 0.5 * out.losses["kl"])
    mean, log_sigma = model.decode_params(out.posterior.mode(), cond)
    assert mean.shape == log_sigma.shape == x.shape
    assert (log_sigma >= math.log(model.config.sigma_min) - 1e-6).all()
    model.eval()
    assert model.reconstruct(x, cond).shape == x.shape
    scores = ScoreBatch(model, x, cond)
    assert torch.equal(model.scores()["residual"].compute(scores), (x - model.reconstruct(x, cond)).abs())
    assert model.likelihood() == "learned per-pixel sigma (decode_params)"


def test_sigma_starts_at_sigma_init_and_kl_scale_and_beta_weight_the_kl():
    model = tiny(beta=2.0)
    x, _ = batch()
    _, log_sigma = model.decode_params(model.encode(x).mode())
    assert torch.allclose(log_sigma, torch.full_like(log_sigma, math.log(0.1)), atol=1e-5)
    torch.manual_seed(1)
    out = model(x, kl_scale=0.25)
    assert torch.allclose(out.losses["loss"], out.losses["recon"] + 0.5 * out.losses["kl"])


def test_works_at_64_and_under_bf16_autocast():
    model = tiny(image_size=64, conditions=COND)
    x, cond = batch(size=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, cond)
    assert out.recon.shape == (4, 1, 64, 64) and out.recon.dtype == torch.float32
    for v in out.losses.values():
        assert v.dtype == torch.float32 and torch.isfinite(v).all()
    out.losses["loss"].mean().backward()


def test_training_steps_lower_the_loss_and_change_weights():
    model = tiny(conditions=COND)
    x, cond = batch()
    params = model.optimizer_groups()["model"]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(x, cond).losses["loss"].mean() / x[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(not torch.equal(a, b) for a, b in zip(before, params)) > len(params) // 2
    assert min(losses[-3:]) < losses[0]


def test_no_discriminator_without_adversarial_weight():
    model = tiny()
    assert model.disc is None and list(model.optimizer_groups()) == ["model"]
    with pytest.raises(RuntimeError, match="no discriminator"):
        model.disc_loss(*batch())


def test_adversarial_groups_and_losses():
    model = tiny(adv_weight=0.5, adv_start=3, disc_channels=(8, 16))
    groups = model.optimizer_groups()
    ids = {k: {id(p) for p in v} for k, v in groups.items()}
    assert set(groups) == {"model", "disc"} and ids["disc"]
    assert not ids["model"] & ids["disc"]
    assert ids["model"] | ids["disc"] == {id(p) for p in model.parameters()}
    assert len(groups["model"]) + len(groups["disc"]) == len(list(model.parameters()))

    x, cond = batch()
    opts = {k: torch.optim.AdamW(v, lr=1e-3) for k, v in groups.items()}
    for step in range(5):  # the engine's order: set step, generator step, discriminator step
        model.step = step
        out = model(x, cond)
        assert ("adv" in out.losses) == (step >= 3)
        opts["model"].zero_grad(set_to_none=True)
        out.losses["loss"].mean().backward()
        opts["model"].step()
        d = model.disc_loss(x, out.recon.detach(), cond)
        assert d.shape == (4,) and torch.isfinite(d).all()
        opts["disc"].zero_grad(set_to_none=True)
        d.mean().backward()
        if step < 3:  # before adv_start the discriminator is untouched
            assert float(d.detach().sum()) == 0 and all(p.grad is None for p in groups["disc"])
        else:
            assert float(d.detach().min()) > 0 and all(p.grad is not None for p in groups["disc"])
            assert torch.isfinite(out.losses["adv"]).all() and out.losses["adv"].shape == (4,)
        opts["disc"].step()
    model.eval()  # evaluation losses never include the adversarial term
    assert "adv" not in model(x, cond).losses


def test_fitted_prior_tracks_the_aggregate_posterior():
    model = tiny(prior_decay=0.5)
    x, _ = batch()
    model.eval()
    model(x)
    assert not model.prior.prior_mean.any() and torch.equal(model.prior.prior_moment, torch.eye(len(model.prior.prior_moment)))
    model.train()
    model(x)
    assert model.prior.prior_mean.any()
    mean, scale = model.prior.mean_and_scale()
    cov = model.prior.prior_moment - torch.outer(model.prior.prior_mean, model.prior.prior_mean)
    assert torch.allclose(mean, model.prior.prior_mean) and torch.allclose(scale @ scale.T, cov, atol=1e-5)
    model.eval()
    standard = ResVAE(dataclasses.replace(model.config, prior="standard")).eval()
    missing, unexpected = standard.load_state_dict(model.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == ["prior.prior_mean", "prior.prior_moment"]  # no (D, D) buffer kept
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert not torch.allclose(model.sample(2, None, g()), standard.sample(2, None, g()))


def test_sampling_is_deterministic_per_generator_seed():
    for extra in ({}, {"latent_channels": 0}, {"prior": "standard"}):
        model = tiny(**extra).eval()
        a = model.sample(3, None, torch.Generator().manual_seed(0))
        b = model.sample(3, None, torch.Generator().manual_seed(0))
        c = model.sample(3, None, torch.Generator().manual_seed(1))
        assert a.shape == (3, 1, 32, 32) and 0 <= a.min() and a.max() <= 1
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_conditional_sampling_accepts_age_sex_position():
    model = tiny(conditions=COND).eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    young = model.sample(2, {"age": 20.0, "sex": 1.0, "position": 0.5}, g())
    old = model.sample(2, {"age": 80.0, "sex": 1.0, "position": 0.5}, g())
    per_sample = model.sample(2, {"age": torch.tensor([30.0, 60.0]), "sex": torch.tensor([1.0, -1.0]),
                                  "position": torch.tensor([0.2, 0.8])}, g())
    defaults = model.sample(2, None, g())
    assert young.shape == old.shape == per_sample.shape == defaults.shape == (2, 1, 32, 32)
    assert not torch.allclose(young, old)
    with pytest.raises(ValueError, match="pass cond"):
        model(batch()[0])


def test_registry_build_and_validation():
    model = build("resvae", {"image_size": 32, "channels": [8, 16], "latent_channels": 0})
    assert isinstance(model, ResVAE) and model.arch == "resvae" and model.config.channels == (8, 16)
    assert make_config("resvae").image_size == 128
    with pytest.raises(BrainVAEError, match="unknown key"):
        build("resvae", {"latent_dimm": 3})
    with pytest.raises(BrainVAEError, match="sigma_min"):
        build("resvae", {"sigma_min": 0.5, "sigma_init": 0.1})
    with pytest.raises(BrainVAEError, match="below 2 px"):
        build("resvae", {"image_size": 16})
    with pytest.raises(BrainVAEError, match="prior must be one of"):
        build("resvae", {"prior": "vamp"})
    with pytest.raises(BrainVAEError, match="unknown condition"):
        build("resvae", {"conditions": ("height",)})
