"""The structural feature autoencoder (fae): its pretext corruptions, its stages, its feature-SSIM score."""

from __future__ import annotations

import pytest
import torch

from brainvae.errors import BrainVAEError
from brainvae.models.fae import CORRUPTIONS, corrupt, ssim_map
from brainvae.models.registry import build
from brainvae.models.scoring import ScoreBatch

from test_dae import discs


def test_corruptions_change_only_the_slices_they_name():
    x = discs(8, size=32)
    labels = torch.arange(8) % len(CORRUPTIONS)
    out = corrupt(x, labels)
    for i, name in enumerate(CORRUPTIONS * 2):
        changed = not torch.equal(out[i], x[i])
        assert changed == (name != "none"), name
    paste = labels == CORRUPTIONS.index("cutpaste")
    assert ((out[paste] - x[paste]).abs() > 0).float().mean() < 0.1  # a local patch, not the whole slice


def test_ssim_map_is_one_for_equal_features_and_lower_where_they_differ():
    a = torch.randn(2, 3, 16, 16)
    assert torch.allclose(ssim_map(a, a, 5), torch.ones_like(a), atol=1e-5)
    b = a.clone()
    b[:, :, 4:8, 4:8] = torch.randn(2, 3, 4, 4)
    s = ssim_map(a, b, 5)
    assert s[:, :, 5:7, 5:7].mean() < 0.5 < s[:, :, 12:, 12:].mean()


def test_a_trained_fae_scores_a_lesion_above_healthy_tissue():
    torch.manual_seed(0)
    model = build("fae", {"image_size": 64, "channels": (16, 32, 32), "ae_channels": (32, 8)})
    data = discs(64, size=64)
    position = torch.rand(64)
    for stage, steps in (("features", 40), ("autoencoder", 150)):
        model.set_stage(stage)
        model.train()
        opt = torch.optim.AdamW(model.optimizer_groups()["model"], lr=3e-3)
        for _ in range(steps):
            idx = torch.randint(len(data), (16,))
            loss = model(data[idx], {"position": position[idx]}).losses["loss"].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    x = discs(2, size=64, seed=1)
    lesion = torch.zeros_like(x, dtype=torch.bool)
    lesion[:, :, 18:28, 18:28] = True  # upper left; the far side of the disc stays healthy
    x[lesion] = 0.1
    far = torch.zeros_like(lesion)
    far[:, :, 36:46, 36:46] = True
    m = model.scores()["feature_ssim"].compute(ScoreBatch(model, x))
    assert m.shape == x.shape
    assert m[lesion].mean() > 1.3 * m[far].mean()  # (a tiny model trained seconds: a clear margin, not a wide one)
    with pytest.raises(BrainVAEError, match="does not generate"):
        model.generate(1)
