"""The denoising U-Net (dae): coarse training noise, restoration of a lesion as healthy tissue, no sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainvae.errors import BrainVAEError
from brainvae.models.dae import coarse_noise
from brainvae.models.registry import build
from brainvae.models.scoring import ScoreBatch

from conftest import pixel_features


def discs(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Healthy 'brains': discs of random radius and brightness with a little texture, (n, 1, size, size)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    out = []
    for _ in range(n):
        r = g.uniform(0.6, 0.85)
        out.append((xx ** 2 + yy ** 2 < r ** 2) * (g.uniform(0.5, 0.7) + 0.03 * g.standard_normal((size, size))))
    return torch.tensor(np.clip(np.stack(out), 0, 1), dtype=torch.float32)[:, None]


def test_coarse_noise_is_smooth_and_stays_inside_the_head():
    x = discs(4, size=64)
    noise = coarse_noise(x, 8, 0.2, torch.Generator().manual_seed(0))
    assert noise.shape == x.shape and (noise[x == 0] == 0).all()
    inside = noise[x > 0]
    assert 0.05 < inside.std() < 0.4
    # coarse: neighbouring pixels are nearly equal (white noise of the same std would differ by ~0.28)
    step = (noise[..., 1:] - noise[..., :-1])[(x[..., 1:] > 0) & (x[..., :-1] > 0)]
    assert step.abs().mean() < 0.05


def test_a_trained_dae_redraws_a_lesion_as_healthy_tissue():
    torch.manual_seed(0)
    model = build("dae", {"image_size": 32, "channels": (16, 32), "noise_res": 4, "noise_std": 0.25}).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = discs(64)
    for step in range(150):
        x = data[torch.randint(len(data), (16,))]
        loss = model(x).losses["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = discs(2, seed=1)
    lesion = torch.zeros_like(x, dtype=torch.bool)
    lesion[0, :, 10:17, 12:19] = True  # dark
    lesion[1, :, 16:22, 8:14] = True  # bright
    x[0][lesion[0]] = 0.15
    x[1][lesion[1]] = 0.95
    batch = ScoreBatch(model, x, features=pixel_features)
    brain = x > 0
    for name, score in model.scores().items():
        m = score.compute(batch).sum(1, keepdim=True)  # an additive score's terms, unscaled
        # the local residuals count a brighter part at BRIGHT_WEIGHT: this small net's healthy residual outweighs it
        signed = {"residual_pos": [1], "residual_neg": [0], "residual_neg_smooth": [0], "residual_local": [0],
                  "restoration_local": [0]}.get(name, [0, 1])
        for b in signed:
            healthy = brain[b] & ~lesion[b]
            assert m[b][lesion[b]].mean() > 3 * m[b][healthy].mean(), (name, b)
    one = model.restore(x, passes=1)
    assert torch.equal(one, model.reconstruct(x) * brain)  # one pass: the reconstruction, 0 outside the head
    assert torch.equal(model.restore(x, passes=2), model.restore(one, passes=1))  # each output fed back
    with pytest.raises(BrainVAEError, match="does not generate"):
        model.generate(2)
    with pytest.raises(BrainVAEError, match="noise_res"):
        build("dae", {"image_size": 32, "noise_res": 64})


def test_contrast_augmentation_changes_input_and_target_together_in_training_only():
    """gamma_std > 0: in training each slice is raised to a random power (its target too: the loss is against
    the same contrast), the background stays 0; evaluation sees the slice as it is."""
    torch.manual_seed(0)
    model = build("dae", {"image_size": 32, "channels": (8, 16), "gamma_std": 0.5})
    x = discs(8)
    seen = []
    model.net.forward = lambda h: (seen.append(h.detach().clone()), torch.zeros_like(h))[1]  # logit 0: 0.5
    model.train()
    mse = model(x).losses["mse"]  # the network answers 0.5 everywhere: the loss measures the target
    plain = (0.5 - x).pow(2).flatten(1).sum(1)
    assert not torch.allclose(mse, plain)  # the target was x raised to another power
    assert (seen[0][x == 0] == 0).all()  # the background stayed 0 (and the noise stays off it)
    model.eval()
    assert torch.allclose(model(x).losses["mse"], plain)  # no augmentation in evaluation
    with pytest.raises(BrainVAEError, match="gamma_std"):
        build("dae", {"image_size": 32, "gamma_std": -0.1})
