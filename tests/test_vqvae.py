"""VQ-VAE with an EMA codebook and a causal-transformer prior (tiny 32x32 models)."""

from __future__ import annotations

import pytest
import torch

import brainvae.models.vqvae as vq  # registers "vqvae" even before the registry imports it
from brainvae.errors import BrainVAEError
from brainvae.models import registry
from brainvae.models.scoring import ScoreBatch

TINY = {"image_size": 32, "channels": (8, 16, 16), "res_blocks": 1, "codebook_size": 32, "code_dim": 8,
        "prior_layers": 2, "prior_width": 32, "prior_heads": 2}


def tiny(**extra) -> vq.VQVAE:
    torch.manual_seed(0)
    return registry.build("vqvae", {**TINY, **extra})


def batch(n: int = 4, size: int = 32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) + 0.2)
    cond = {"age": torch.linspace(20, 80, n), "sex": torch.tensor([1.0, -1.0] * (n // 2)),
            "position": torch.linspace(0, 1, n)}
    return x.clamp(0, 1), cond


def test_registry_builds_and_rejects_unknown_keys():
    model = registry.build("vqvae", TINY)
    assert isinstance(model, vq.VQVAE) and model.arch == "vqvae"
    assert model.bottom == 4 and model.prior.positions == 16
    assert registry.make_config("vqvae").channels == (32, 64, 128)
    with pytest.raises(BrainVAEError, match="unknown key"):
        registry.build("vqvae", {**TINY, "codebok_size": 16})
    with pytest.raises(BrainVAEError, match="divisible"):
        registry.build("vqvae", {**TINY, "prior_width": 30, "prior_heads": 4})
    with pytest.raises(BrainVAEError, match="below 2 px"):
        registry.build("vqvae", {**TINY, "channels": (8, 8, 8, 8, 8)})


@pytest.mark.parametrize("size,bottom", [(64, 8), (128, 16)])
def test_code_map_size_follows_image_size(size, bottom):
    model = registry.build("vqvae", {"image_size": size, "prior_layers": 1, "prior_width": 32, "prior_heads": 2})
    assert model.bottom == bottom and model.prior.positions == bottom ** 2


def test_shapes_and_per_sample_losses():
    model = tiny(conditions=("age", "sex"))
    x, cond = batch()
    out = model(x, cond)
    assert out.recon.shape == x.shape and 0 <= out.recon.min() and out.recon.max() <= 1
    assert set(out.losses) == {"loss", "recon", "vq", "prior"}
    for name, v in out.losses.items():
        assert v.shape == (4,) and v.dtype == torch.float32 and torch.isfinite(v).all(), name
    total = out.losses["recon"] + out.losses["vq"] + model.config.prior_weight * out.losses["prior"]
    assert torch.allclose(out.losses["loss"], total)
    post = out.posterior
    assert post.indices.shape == (4, 4, 4) and post.mode().shape == (4, 8, 4, 4)
    assert torch.equal(post.kl(), torch.zeros(4))
    model.eval()
    assert model.reconstruct(x, cond).shape == x.shape
    nll = model.prior_nll_map(x, cond)
    assert nll.shape == x.shape and torch.isfinite(nll).all() and nll.min() >= 0
    assert torch.equal(model.scores()["prior_nll"].compute(ScoreBatch(model, x, cond)), nll)


def test_kl_scale_is_ignored():
    model = tiny().eval()
    x, _ = batch()
    a, b = model(x, None, kl_scale=0.0).losses, model(x, None, kl_scale=1.0).losses
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prior_trains_on_detached_codes():
    model = tiny()
    x, _ = batch()
    model(x).losses["prior"].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.encoder.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.prior.parameters())


def test_optimisation_lowers_loss_and_changes_weights():
    model = tiny(conditions=("age", "sex", "position"))
    x, cond = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses = []
    for _ in range(15):
        out = model(x, cond)
        loss = out.losses["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = model.state_dict()
    for prefix in ("encoder.", "decoder.", "prior.", "codebook.codes"):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    assert min(losses[-3:]) < losses[0]
    # Data-dependent init plus restarts: the batch uses many codes, not one.
    assert len(torch.unique(model.encode(x).indices)) > 1


def test_dead_codes_are_restarted_on_batch_encodings():
    model = tiny()  # train mode throughout: BatchNorm uses batch statistics, as when codes are restarted
    x, _ = batch()
    model(x)  # initialises the codebook from encodings
    cb = model.codebook
    with torch.no_grad():  # collapse: every code but 0 far away and unused
        cb.codes[1:] = 1e3
        cb.code_sum[1:] = 1e3 * cb.dead_threshold
        cb.cluster_size[1:] = 0.0
        cb.cluster_size[0] = 1e6
        assert len(torch.unique(model._quantise(model.encoder(x), update=False).indices)) == 1
    out = model(x)  # one EMA step restarts the dead codes on encodings of this batch
    assert cb.codes[1:].abs().max() < 1e2
    assert len(torch.unique(out.posterior.indices)) > 1


def test_codebook_distances_are_float32_under_bf16_autocast():
    model = tiny()
    x, _ = batch()
    model(x)
    flat = torch.randn(64, 8)
    expected = model.codebook.nearest(flat)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.codebook.nearest(flat), expected)
        out = model(x)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.losses.values())


@pytest.mark.parametrize("window", [0, 5])
def test_cached_sampling_steps_match_the_full_forward(window):
    model = tiny(conditions=("age",), prior_window=window).eval()
    prior = model.prior
    idx = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(0))
    e = model.cond({"age": torch.tensor([20.0, 50.0, 80.0])})
    with torch.no_grad():
        full = prior.logits(idx, e)  # (3, 16, K)
        cache = prior.new_cache(3)
        steps = [prior.step_logits(None if t == 0 else idx[:, t - 1], t, e, cache) for t in range(16)]
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-4)


def test_sampling_is_seeded():
    model = tiny().eval()
    a = model.sample(3, None, torch.Generator().manual_seed(0))
    b = model.sample(3, None, torch.Generator().manual_seed(0))
    c = model.sample(3, None, torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    cold = model.sample_indices(3, None, torch.Generator().manual_seed(0), temperature=1e-3)
    assert torch.equal(cold, model.sample_indices(3, None, torch.Generator().manual_seed(1), temperature=1e-3))


def test_conditional_sampling_accepts_age_and_sex():
    model = tiny(conditions=("age", "sex")).eval()
    s = model.sample(2, {"age": 70, "sex": -1}, torch.Generator().manual_seed(0))
    assert s.shape == (2, 1, 32, 32)
    young = model.sample_indices(4, {"age": 20.0, "sex": 1.0}, torch.Generator().manual_seed(0))
    old = model.sample_indices(4, {"age": 90.0, "sex": 1.0}, torch.Generator().manual_seed(0))
    assert not torch.equal(young, old)
    with pytest.raises(ValueError, match="pass cond"):
        model(batch()[0])


def test_state_dict_round_trip_keeps_codebook_and_samples():
    model = tiny()
    x, _ = batch()
    model(x)
    model.eval()
    copy = tiny().eval()
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy.encode(x).indices, model.encode(x).indices)
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    assert torch.equal(copy.sample(2, None, g()), model.sample(2, None, g()))
