"""The model contract, checked for every registered architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brainvae.conditions import NEUTRAL
from brainvae.errors import BrainVAEError, InputFileError
from brainvae.models.blocks import NoGradInplaceSiLU
from brainvae.models.registry import architectures, build, make_config
from brainvae.models.scoring import ScoreBatch
from brainvae.train.checkpoint import load_model, load_weights, save_weights

from conftest import pixel_features

ARCHS = architectures()


def tiny(arch: str, **extra):
    """A 32x32 model with few channels, conditioned when the architecture supports it."""
    cfg = make_config(arch)
    values = {"image_size": 32, **extra}
    if hasattr(cfg, "channels"):
        values["channels"] = tuple(min(c, 16) for c in cfg.channels[:3])
    return build(arch, values)


def batch(n=4, size=32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, generator=g)
    cond = {"age": torch.tensor([25.0, 50.0, 75.0, float("nan")])[:n], "sex": torch.tensor([1.0, -1.0, 0.0, 1.0])[:n],
            "position": torch.linspace(0, 1, n)}
    return x, cond


def test_registry_lists_the_issue_architectures():
    assert {"vae", "cvae", "vqvae", "cevae", "resvae", "ae"} <= set(ARCHS)


def test_ae_is_deterministic_and_has_no_kl():
    model = tiny("ae").train()
    x, _ = batch()
    a, b = model(x), model(x)
    assert torch.equal(a.recon, b.recon)  # no latent sampling
    assert torch.all(a.losses["kl"] == 0) and torch.allclose(a.losses["loss"], a.losses["recon"])
    assert not model.stochastic and tiny("vae").stochastic
    with pytest.raises(BrainVAEError, match="beta must be 0"):
        make_config("ae", {"beta": 1.0})


@pytest.mark.parametrize("arch", ARCHS)
def test_contract_shapes_and_losses(arch):
    torch.manual_seed(0)
    model = tiny(arch)
    x, cond = batch()
    out = model(x, cond)
    assert out.recon is None or out.recon.shape == x.shape  # None: the stage decodes no image (fae's features)
    assert "loss" in out.losses
    for name, v in out.losses.items():
        assert v.shape == (4,), name
        assert torch.isfinite(v).all(), name
    model.eval()
    assert model.reconstruct(x, cond).shape == x.shape
    c = {"age": 60.0, "sex": 1.0, "position": 0.5} if model.config.conditions else None
    if model.generative:
        s = model.sample(3, c, torch.Generator().manual_seed(1))
        assert s.shape == (3, 1, 32, 32) and s.min() >= 0 and s.max() <= 1
    else:  # a restoration model (dae) says so, through the public entry point too
        with pytest.raises(BrainVAEError, match="does not generate"):
            model.generate(3, c)
    scores = ScoreBatch(model, x, cond, n_samples=2, generator=torch.Generator().manual_seed(2),
                        features=pixel_features)
    for name, score in model.scores().items():
        amap = score.compute(scores)  # one map, or an additive score's terms
        assert amap.shape == (4, max(1, len(score.terms)), 32, 32) and torch.isfinite(amap).all(), name


@pytest.mark.parametrize("arch", ARCHS)
def test_training_step_changes_weights_and_lowers_loss(arch):
    torch.manual_seed(0)
    model = tiny(arch)
    x, cond = batch()
    opt = torch.optim.AdamW(model.optimizer_groups()["model"], lr=2e-3)
    before = [p.detach().clone() for p in model.optimizer_groups()["model"]]
    losses = []
    for _ in range(15):
        loss = model(x, cond).losses["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.optimizer_groups()["model"]))
    assert min(losses[-3:]) < losses[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    torch.manual_seed(0)
    model = tiny(arch).eval()
    path = tmp_path / "m.safetensors"
    save_weights(path, model, None)
    loaded = load_model(path)
    x, cond = batch()
    assert type(loaded) is type(model) and loaded.config == model.config
    assert torch.allclose(loaded.reconstruct(x, cond), model.reconstruct(x, cond))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    c = {"age": 40.0, "sex": -1.0, "position": 0.3} if model.config.conditions else None
    if model.generative:
        assert torch.allclose(loaded.sample(2, c, g1), model.sample(2, c, g2))


@pytest.mark.parametrize("arch", ARCHS)
def test_inference_copy_folds_batchnorm_and_keeps_outputs(arch):
    torch.manual_seed(0)
    model = tiny(arch).train()
    x, cond = batch()
    for _ in range(3):
        model(x, cond)  # BatchNorm running statistics move away from (0, 1)
    model.eval()
    trainable = [p.requires_grad for p in model.parameters()]  # (a two-stage model freezes its other stage)
    fast = model.for_inference()
    assert fast is not model and fast.for_inference() is fast  # a copy, prepared once
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn > 0 and not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn  # the original is untouched
    assert [p.requires_grad for p in model.parameters()] == trainable and any(trainable)
    assert torch.allclose(fast.reconstruct(x, cond), model.reconstruct(x, cond), atol=1e-5)
    c = {"age": 40.0, "sex": -1.0, "position": 0.3} if model.config.conditions else None
    if model.generative:
        a = fast.sample(2, c, torch.Generator().manual_seed(3))
        assert torch.allclose(a, model.sample(2, c, torch.Generator().manual_seed(3)), atol=1e-5)
    # SiLU modules work in place without gradients; with them (the KL-gradient scores) the gradients still agree
    n_silu = sum(type(m) is nn.SiLU for m in model.modules())
    assert sum(isinstance(m, NoGradInplaceSiLU) for m in fast.modules()) == n_silu
    if model.stochastic and n_silu:
        grads = []
        for m in (model, fast):
            x_in = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(m.encode(x_in, cond).kl().sum(), x_in)
            grads.append(grad)
        assert torch.allclose(grads[0], grads[1], atol=1e-4)


def test_vqvae_patch_sets_the_code_map():
    model = build("vqvae", {"image_size": 64, "channels": (16, 16, 16), "patch": 4}).eval()
    x = torch.rand(2, 1, 64, 64)
    assert model.encode(x).indices.shape == (2, 4, 4)  # 64 / (4 * 2**2)
    assert model(x).recon.shape == x.shape and model.sample(2).shape == (2, 1, 64, 64)
    with pytest.raises(BrainVAEError, match="below 2 px"):
        make_config("vqvae", {"image_size": 32, "channels": (16, 16, 16), "patch": 8})
    with pytest.raises(BrainVAEError, match="power of two"):
        make_config("vqvae", {"patch": 3})


def test_sampling_is_seeded():
    model = tiny("vae").eval()
    a = model.sample(2, None, torch.Generator().manual_seed(0))
    b = model.sample(2, None, torch.Generator().manual_seed(0))
    c = model.sample(2, None, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_conditional_model_uses_its_conditions():
    torch.manual_seed(0)
    model = tiny("cvae").eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    young = model.sample(2, {"age": 20.0, "sex": 1.0, "position": 0.5}, g())
    old = model.sample(2, {"age": 80.0, "sex": 1.0, "position": 0.5}, g())
    assert not torch.allclose(young, old)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ("dae", "fae")])  # dae, fae do not generate
def test_conditions_left_out_are_handled_as_the_model_declares(arch):
    """``fills_missing_conditions`` is what samples' meta.json reports ("not given (set to 0.5)" or
    "(marginalised)"): a model that declares it samples with ``conditions.NEUTRAL`` in place of a left-out key."""
    model = tiny(arch, conditions=("age", "sex", "position")).eval()
    if not model.fills_missing_conditions:
        # marginalises (trained with conditions hidden); an untrained one cannot show it, and a new model must choose
        assert arch == "ldm"
        return
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    given = {"age": 70.0, "sex": -1.0}  # position left out
    neutral = model.sample(2, {**given, "position": NEUTRAL["position"]}, g())
    assert torch.equal(model.sample(2, given, g()), neutral)
    assert not torch.equal(model.sample(2, {**given, "position": 0.9}, g()), neutral)  # position matters


def test_loud_errors(tmp_path):
    with pytest.raises(BrainVAEError, match="unknown architecture 'transformer'"):
        build("transformer")
    with pytest.raises(BrainVAEError, match="unknown key"):
        build("vae", {"latent_dimm": 3})
    with pytest.raises(BrainVAEError, match="unknown condition"):
        build("vae", {"conditions": ("height",)})
    path = tmp_path / "vae.safetensors"
    save_weights(path, tiny("vae"), None)
    with pytest.raises(InputFileError, match="architecture 'vae', not 'cevae'"):
        load_weights(path, tiny("cevae"))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(InputFileError, match="junk.safetensors"):
        load_model(tmp_path / "junk.safetensors")


def test_every_shipped_config_is_valid():
    from brainvae.config import RunConfig, load_config, shipped_configs

    files = list(shipped_configs().values())  # the package's configs/*.toml
    assert len(files) >= 5
    archs = {load_config(RunConfig, f).model_config().__class__.__name__ for f in files}
    assert len(archs) >= 5


def test_fitted_prior_samples_the_conditional_of_the_codes():
    from brainvae.models.base import FittedGaussianPrior

    g = torch.Generator().manual_seed(0)
    prior = FittedGaussianPrior(2, decay=0.0, cond_dim=1)  # decay 0: the fit is the last batch
    c = torch.randn(4000, 1, generator=g)
    z = torch.cat([3.0 * c + 0.1 * torch.randn(4000, 1, generator=g), torch.randn(4000, 1, generator=g)], 1)
    prior.update(z, c)
    at = prior.sample(2000, g, torch.device("cpu"), torch.full((2000, 1), 1.0))
    assert at[:, 0].mean().item() == pytest.approx(3.0, abs=0.05)  # follows the condition
    assert at[:, 0].std().item() == pytest.approx(0.1, abs=0.03)  # with the conditional spread
    assert at[:, 1].std().item() == pytest.approx(1.0, abs=0.1)
    fresh = FittedGaussianPrior(3, cond_dim=2).sample(2000, g, torch.device("cpu"), torch.ones(2000, 2))
    assert fresh.mean().abs().item() < 0.1 and fresh.std().item() == pytest.approx(1.0, abs=0.1)  # N(0, I)
