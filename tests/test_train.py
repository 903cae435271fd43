"""The training engine: budgets, checkpoints, exact resume, DDP on two gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brainvae.config import RunConfig, TrainConfig, save_config
from brainvae.data.dataset import SliceBatches
from brainvae.errors import BrainVAEError, OutputExistsError
from brainvae.generate import load
from brainvae.train.engine import lr_factor, train

TINY_MODEL = {"arch": "vae", "image_size": 32, "channels": [8, 16, 16], "latent_dim": 8}


def run_cfg(**train) -> RunConfig:
    base = dict(batch_size=8, log_every=1, val_batches=2, precision="fp32", warmup_steps=2, kl_warmup_steps=4)
    return RunConfig(model=TINY_MODEL, train=TrainConfig(**{**base, **train}))


def train_losses(run: Path, key: str = "train/loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_train_writes_run_folder_and_checkpoint_rebuilds_model(tiny_store, tmp_path):
    run = tmp_path / "run"
    summary = train(run, tiny_store, run_cfg(steps=6), progress=False)
    assert summary["steps"] == 6
    for name in ("config.toml", "metrics.jsonl", "summary.json", "provenance.json",
                 "checkpoints/last.safetensors", "checkpoints/best.safetensors", "checkpoints/last.state.pt"):
        assert (run / name).exists(), name
    assert list((run / "tb").iterdir())
    model = load(run / "checkpoints" / "best.safetensors")  # the checkpoint alone rebuilds the model
    assert model.config.latent_dim == 8
    with pytest.raises(OutputExistsError):
        train(run, tiny_store, run_cfg(steps=6), progress=False)


def test_resume_after_interrupt_follows_the_uninterrupted_run(tiny_store, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(full, tiny_store, run_cfg(epochs=3), progress=False)

    cut = tmp_path / "cut"
    calls = {"n": 0}
    original = SliceBatches.batch

    def interrupting(self, idx):
        calls["n"] += 1
        if calls["n"] == 5:  # mid-epoch: step_in_epoch is restored on resume
            raise KeyboardInterrupt
        return original(self, idx)

    monkeypatch.setattr(SliceBatches, "batch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(cut, tiny_store, run_cfg(epochs=3), progress=False)
    monkeypatch.setattr(SliceBatches, "batch", original)
    train(cut, tiny_store, run_cfg(epochs=99), resume=True, progress=False)  # the run's own config wins

    a, b = train_losses(full), train_losses(cut)
    assert set(a) == set(b) and len(a) > 5
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step


def test_budget_stops_training(tiny_store, tmp_path):
    summary = train(tmp_path / "r", tiny_store, run_cfg(budget="1s", epochs=1000), progress=False)
    assert summary["seconds"] < 30 and summary["steps"] > 0


def test_patience_stops_early_and_zero_turns_it_off(tiny_store, tmp_path, monkeypatch):
    import brainvae.train.engine as engine

    monkeypatch.setattr(engine, "_validate", lambda *a, **k: {"loss": 1.0})  # validation never improves
    early = train(tmp_path / "a", tiny_store, run_cfg(epochs=6, patience=1), progress=False)
    full = train(tmp_path / "b", tiny_store, run_cfg(epochs=6, patience=0), progress=False)
    assert early["epochs"] == 2 and full["steps"] == 3 * early["steps"]  # 2 of 6 epochs, then all 6


def test_lr_schedule():
    assert lr_factor(0, 0.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(10, 0.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(50, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_resume_without_run_is_an_error(tiny_store, tmp_path):
    with pytest.raises(BrainVAEError, match="nothing to resume"):
        train(tmp_path / "none", tiny_store, run_cfg(steps=2), resume=True, progress=False)


ADVERSARIAL_MODEL = {"arch": "resvae", "image_size": 32, "channels": [8, 16, 16], "latent_channels": 2,
                     "adv_weight": 0.1, "adv_start": 2, "disc_channels": [8, 16]}


@pytest.mark.parametrize("model", [TINY_MODEL, ADVERSARIAL_MODEL], ids=["vae", "resvae-adversarial"])
def test_ddp_two_gloo_processes(model, tiny_store, tmp_path):
    cfg = tmp_path / "cfg.toml"
    save_config(RunConfig(model=model, train=run_cfg(steps=4).train), cfg)
    env = {**os.environ, "BRAINVAE_DDP_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "brainvae.cli", "train", str(cfg), "--data", str(tiny_store), "--out", str(tmp_path / "ddp"),
           "--device", "cpu", "--quiet"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    # both ranks trained the same replica: the checkpoint loads and is finite
    loaded = load(tmp_path / "ddp")
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    if model["arch"] == "resvae":  # the game started at step 2 and the discriminator was trained
        assert list(train_losses(tmp_path / "ddp", key="train/adv")) == [3, 4]  # logged after steps 2 and 3
        torch.manual_seed(0)  # the engine's seed: the discriminator's initial weights
        from brainvae.models.registry import build
        from brainvae.train.checkpoint import load_model

        fresh = build("resvae", {k: v for k, v in model.items() if k != "arch"})
        raw = load_model(tmp_path / "ddp" / "checkpoints" / "last.safetensors", prefer_ema=False)
        weights = [(a, b) for (name, a), b in zip(raw.disc.named_parameters(), fresh.disc.parameters())
                   if name.endswith("weight.original")]  # (the hinge loss can leave the last bias at 0 gradient)
        assert len(weights) == 3 and all(not torch.allclose(a, b) for a, b in weights)


def test_tune_runs_trials_and_writes_results(tiny_store, tmp_path):
    from brainvae.tune import trial_config, tune

    base = RunConfig(model=TINY_MODEL, train=TrainConfig(batch_size=8, epochs=2, val_batches=1, precision="fp32"),
                     tune={"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "model.beta": {"choices": [0.5, 1.0]}})
    result = tune(base, tiny_store, tmp_path / "study", trials=3, progress=False)
    assert result["trials"] == 3 and result["completed"] >= 1
    assert (tmp_path / "study" / "trials.csv").exists() and (tmp_path / "study" / "study.db").exists()
    assert set(result["best_params"]) == {"lr", "model.beta"}
    # a second worker joins the same study through the same storage
    again = tune(base, tiny_store, tmp_path / "study", trials=1, progress=False)
    assert again["trials"] == 4
    assert trial_config(base, {"model.beta": 0.5}).model["beta"] == 0.5
    with pytest.raises(BrainVAEError, match="section must be"):
        trial_config(base, {"data.size": 3})


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (False, False, None),  # AVX2-only CPU: bf16 would be emulated (~35x slower), so fp32
    (True, False, torch.bfloat16),
    (False, True, torch.bfloat16),
])
def test_auto_precision_follows_native_cpu_bf16(monkeypatch, avx512_bf16, amx, expected):
    from brainvae.generate import sample_images
    from brainvae.models.registry import build
    from brainvae.train import engine

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cpu = torch.device("cpu")
    assert engine.autocast_dtype("auto", cpu) is expected
    assert engine.autocast_dtype("fp32", cpu) is None
    assert engine.autocast_dtype("bf16", cpu) is torch.bfloat16  # an explicit request is honoured
    # sampling takes the same decision: fp32 sampling gives bit-identical repeats of the fp32 path
    model = build("vae", {"image_size": 32, "channels": (8, 16), "latent_dim": 4}).eval()
    auto = sample_images(model, 4, None, seed=1, precision="auto")
    fp32 = sample_images(model, 4, None, seed=1, precision="fp32")
    assert (np.array_equal(auto, fp32)) == (expected is None)


def test_auto_precision_is_fp32_when_torch_is_held_to_avx2(monkeypatch):
    from brainvae.train import engine

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert engine.autocast_dtype("auto", torch.device("cpu")) is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert engine.autocast_dtype("auto", torch.device("cpu")) is None
