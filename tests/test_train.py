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
from brainvae.data.store import SliceStore
from brainvae.errors import BrainVAEError, InputFileError, OutputExistsError
from brainvae.generate import load
from brainvae.train.engine import lr_factor, train

from conftest import make_store

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
    train(cut, tiny_store, run_cfg(epochs=3), resume=True, progress=False)

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


class Killed(BaseException):
    """Stands for kill -9: nothing in the engine catches it, so no checkpoint is saved on the way out."""


def kill_at_batch(monkeypatch, n: int) -> None:
    calls = {"n": 0}
    original = SliceBatches.batch

    def batch(self, idx):
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed
        return original(self, idx)

    monkeypatch.setattr(SliceBatches, "batch", batch)


def test_resume_after_a_kill_logs_each_step_once(tiny_store, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(full, tiny_store, run_cfg(epochs=3), progress=False)
    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        kill_at_batch(m, 9)  # epoch 1 (4 steps + 2 validation/image batches) is saved; killed inside epoch 2
        with pytest.raises(Killed):
            train(cut, tiny_store, run_cfg(epochs=3), progress=False)
    assert max(train_losses(cut)) > 4  # steps after the step-4 checkpoint were logged before the kill
    train(cut, tiny_store, run_cfg(epochs=3), resume=True, progress=False)

    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == sorted(set(steps))  # no step logged twice
    assert train_losses(cut) == pytest.approx(train_losses(full), rel=1e-5)


def test_kill_between_weights_and_state_is_refused_on_resume(tiny_store, tmp_path, monkeypatch):
    import brainvae.train.checkpoint as checkpoint

    run = tmp_path / "run"
    replaced = {"n": 0}
    original = os.replace

    def replace(src, dst):
        if str(dst).endswith("last.state.pt"):
            replaced["n"] += 1
            if replaced["n"] == 2:  # the second epoch's state: its weights are already in place
                raise Killed
        return original(src, dst)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.os, "replace", replace)
        with pytest.raises(Killed):
            train(run, tiny_store, run_cfg(epochs=3), progress=False)
    with pytest.raises(InputFileError, match=r"last.state.pt: training state of step 4 .* holds step 8"):
        train(run, tiny_store, run_cfg(epochs=3), resume=True, progress=False)


def test_resume_refuses_other_options_and_another_store(tiny_store, tmp_path):
    run = tmp_path / "run"
    train(run, tiny_store, run_cfg(steps=4), progress=False)
    with pytest.raises(BrainVAEError, match="--resume continues a run exactly as it was started, but "
                                            "train.steps was 4, now 8"):
        train(run, tiny_store, run_cfg(steps=8), resume=True, progress=False)
    other = make_store(tmp_path / "other", seed=1)
    with pytest.raises(BrainVAEError, match="other: not the store .*run was trained on"):
        train(run, other, run_cfg(steps=4), resume=True, progress=False)
    moved = tiny_store.rename(tmp_path / "moved")  # the same store elsewhere is still the same store
    assert train(run, moved, run_cfg(steps=4), resume=True, progress=False)["steps"] == 4


def test_force_checks_everything_before_replacing_the_old_run(tiny_store, tmp_path):
    run = tmp_path / "run"
    train(run, tiny_store, run_cfg(steps=2), progress=False)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    bad_init = RunConfig(model=TINY_MODEL, train=run_cfg(steps=2).train, init={"from": str(tmp_path / "nowhere")})
    for args in [(tmp_path / "no-store", run_cfg(steps=2)), (tiny_store, bad_init)]:
        with pytest.raises(BrainVAEError):
            train(run, *args, force=True, progress=False)
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    with pytest.raises(BrainVAEError, match="the output folder holds the input"):
        train(tmp_path, tiny_store, run_cfg(steps=2), force=True, progress=False)  # would delete the store
    with pytest.raises(BrainVAEError, match="the output is the input"):
        train(tiny_store, tiny_store, run_cfg(steps=2), force=True, progress=False)
    init_self = RunConfig(model=TINY_MODEL, train=run_cfg(steps=2).train, init={"from": str(run)})
    with pytest.raises(BrainVAEError, match="the output is the input"):
        train(run, tiny_store, init_self, force=True, progress=False)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert train(run, tiny_store, run_cfg(steps=3), force=True, progress=False)["steps"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_new_run_leaves_nothing_that_blocks_the_rerun(tiny_store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    failing = {"n": 0}
    original = SliceBatches.batch

    def batch(self, idx):
        if failing["n"]:
            raise BrainVAEError("bad batch")
        return original(self, idx)

    monkeypatch.setattr(SliceBatches, "batch", batch)
    failing["n"] = 1
    with pytest.raises(BrainVAEError, match="bad batch"):
        train(run, tiny_store, run_cfg(steps=2), progress=False)
    assert not run.exists()
    failing["n"] = 0
    assert train(run, tiny_store, run_cfg(steps=2), progress=False)["steps"] == 2

    # --force over that run, failing before its first checkpoint: the old run is put back as it was
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    failing["n"] = 1
    with pytest.raises(BrainVAEError, match="bad batch"):
        train(run, tiny_store, run_cfg(steps=3), force=True, progress=False)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "store"]
    failing["n"] = 0
    assert train(run, tiny_store, run_cfg(steps=3), force=True, progress=False)["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "store"]  # the old run is gone now


def test_checkpoints_are_readable_by_others(tiny_store, tmp_path):
    mask = os.umask(0o022)
    try:
        train(tmp_path / "run", tiny_store, run_cfg(steps=2), progress=False)
    finally:
        os.umask(mask)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755


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
    from brainvae import hardware
    from brainvae.generate import sample_images
    from brainvae.models.registry import build

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cpu = torch.device("cpu")
    assert hardware.autocast_dtype("auto", cpu) is expected
    assert hardware.autocast_dtype("fp32", cpu) is None
    assert hardware.autocast_dtype("bf16", cpu) is torch.bfloat16  # an explicit request is honoured
    # sampling takes the same decision: fp32 sampling gives bit-identical repeats of the fp32 path
    model = build("vae", {"image_size": 32, "channels": (8, 16), "latent_dim": 4}).eval()
    auto = sample_images(model, 4, None, seed=1, precision="auto")
    fp32 = sample_images(model, 4, None, seed=1, precision="fp32")
    assert (np.array_equal(auto, fp32)) == (expected is None)


def test_auto_precision_is_fp32_when_torch_is_held_to_avx2(monkeypatch):
    from brainvae import hardware

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert hardware.autocast_dtype("auto", torch.device("cpu")) is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert hardware.autocast_dtype("auto", torch.device("cpu")) is None


EPOCHS = 12  # a few seconds of training: long enough to be signalled at epoch 2, short enough to resume


def _start_training(tmp_path: Path, store: Path, run: Path, *extra: str) -> subprocess.Popen:
    """``brainvae train`` in its own process (a tiny vae, many epochs), as a user or a scheduler starts it."""
    cfg = tmp_path / "tiny.toml"
    save_config(run_cfg(epochs=EPOCHS), cfg)
    return subprocess.Popen([sys.executable, "-m", "brainvae.cli", "train", str(cfg), "--data", str(store),
                             "--out", str(run), "--quiet", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoints(proc: subprocess.Popen, run: Path, epochs: int, timeout: float = 120.0) -> None:
    """Until the run has logged ``epochs`` validations (each followed by a checkpoint)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        log = run / "metrics.jsonl"
        if log.exists() and sum('"val/loss"' in line for line in log.read_text().splitlines()) >= epochs:
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not reach {epochs} epochs: {proc.communicate()[1][-2000:]}")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_killed_training_process_resumes_where_its_checkpoint_left_off(tiny_store, tmp_path, how):
    """A real process, a real signal: SIGTERM (a scheduler pre-empting the job) saves the last checkpoint and
    says how to continue; SIGKILL keeps the last epoch's checkpoint. Both resume to the full run's steps."""
    import signal

    run = tmp_path / "run"
    proc = _start_training(tmp_path, tiny_store, run)
    _wait_for_checkpoints(proc, run, epochs=2)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)
    state = torch.load(run / "checkpoints" / "last.state.pt", weights_only=False)["counters"]
    if how == "SIGTERM":
        assert proc.returncode == 130 and "continue with --resume" in err
        assert state["step"] == max(train_losses(run))  # saved at the step it was stopped at
    else:
        assert proc.returncode == -signal.SIGKILL
        assert state["step_in_epoch"] == 0 and state["epoch"] >= 1  # an epoch's end checkpoint
    assert state["epoch"] < EPOCHS  # stopped early
    done = subprocess.run([sys.executable, "-m", "brainvae.cli", "train", str(tmp_path / "tiny.toml"), "--data",
                           str(tiny_store), "--out", str(run), "--quiet", "--resume"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    steps_per_epoch = len(SliceBatches(SliceStore(tiny_store), "train", 32)) // 8
    assert summary["steps"] == EPOCHS * steps_per_epoch
    steps = [s for s in train_losses(run)]
    assert steps == sorted(set(steps)) and max(steps) == summary["steps"]  # each step logged once
