"""The two-stage latent model (ldm): its flow prior, its stages in the engine, its sampling options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from typer.testing import CliRunner

from brainvae.cli import app
from brainvae.config import RunConfig, TrainConfig
from brainvae.errors import BrainVAEError
from brainvae.export import export_model, training_lines
from brainvae.generate import load, sample_images
from brainvae.models.base import DiagonalGaussian
from brainvae.models.flow import FlowConfig, FlowPrior
from brainvae.models.ldm import LatentBatches, TeacherPaths, zero_background
from brainvae.models.registry import build
from brainvae.models.scoring import ScoreBatch
from brainvae.train.engine import train

TINY_LDM = {"arch": "ldm", "image_size": 32, "conditions": ["age", "sex", "position"],
            "autoencoder": {"channels": [8, 16], "adv_weight": 0.5, "adv_start": 3},
            "prior": {"widths": [16, 32], "blocks": 1, "emb_dim": 32}}


def run_cfg(**train) -> RunConfig:
    base = dict(batch_size=8, log_every=1, val_batches=2, precision="fp32", warmup_steps=2, kl_warmup_steps=4)
    return RunConfig(model=TINY_LDM, train=TrainConfig(**{**base, **train}), stages={"prior": {"share": 0.5}})


@pytest.fixture(scope="module")
def toy_flow() -> FlowPrior:
    """A flow trained on a 1-channel 2x2 'latent' whose pixels are drawn from two clusters at +-2 (per sample,
    shared by all pixels), sampled in 20 Euler steps."""
    torch.manual_seed(0)
    prior = FlowPrior(FlowConfig(widths=(32,), blocks=2, patch=1, attention=False, emb_dim=32, steps=20),
                      (1, 2, 2), ())
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(600):
        sign = torch.where(torch.rand(128) < 0.5, -1.0, 1.0)
        z0 = sign[:, None, None, None] * 2.0 + 0.1 * torch.randn(128, 1, 2, 2)
        loss = prior.loss(z0, None).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return prior.requires_grad_(False)


def test_flow_matching_recovers_a_toy_distribution(toy_flow):
    """Samples land near the two clusters in the right proportion, not at the mean."""
    z = toy_flow.sample(400, None, torch.Generator().manual_seed(1), torch.device("cpu")).mean((1, 2, 3))
    assert (z.abs() > 1.2).float().mean() > 0.8  # bimodal: most samples near +-2, few near 0
    assert 0.3 < (z > 0).float().mean() < 0.7


def test_a_distilled_student_reaches_the_teachers_samples_in_two_steps(toy_flow):
    """The toy flow as the teacher (20 Euler steps); a copy of it trained with ``distill_loss`` on the
    teacher's paths lands, in 2 Euler steps, much nearer the teacher's samples from the same noise than the
    teacher's own 2-step sampler does."""
    import copy

    teacher = toy_flow
    torch.manual_seed(0)

    def path(eps):  # the teacher at the student's times 1, 0.5, 0: (B, 3, 1, 2, 2)
        half = teacher.integrate(eps, 1.0, None, 10, solver="euler", t_end=0.5)
        return torch.stack([eps, half, teacher.integrate(half, 0.5, None, 10, solver="euler")], 1)

    eps = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    target = path(eps)
    loss8, end8 = teacher.distill_loss(path(eps[:8]), None)
    assert loss8.shape == (8,) and torch.allclose(end8, teacher.integrate(eps[:8], 1.0, None, 2, solver="euler"))
    student = copy.deepcopy(teacher).requires_grad_(True)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(300):
        loss = student.distill_loss(path(torch.randn(128, 1, 2, 2)), None)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        distilled = student.integrate(eps, 1.0, None, 2, solver="euler")
        few_step = teacher.integrate(eps, 1.0, None, 2, solver="euler")
    err_student = (distilled - target[:, -1]).pow(2).mean()
    err_teacher = (few_step - target[:, -1]).pow(2).mean()
    assert err_student < 0.4 * err_teacher, (err_student, err_teacher)  # measured 0.045 vs 0.156
    # distill_loss follows the student's own K-step Euler sampler: on that sampler's path its loss is zero
    own = torch.stack([eps, teacher.integrate(eps, 1.0, None, 1, solver="euler", t_end=0.5),
                       teacher.integrate(eps, 1.0, None, 2, solver="euler")], 1)
    assert teacher.distill_loss(own, None)[0].abs().max() < 1e-8


def test_guidance_zero_is_the_unconditional_sampler_and_one_the_conditional():
    torch.manual_seed(0)
    model = build("ldm", {k: v for k, v in TINY_LDM.items() if k != "arch"}).eval()
    for p in model.flow.parameters():  # a non-trivial velocity field (the output layers start at zero)
        p.data.normal_(0, 0.2)
    cond = model.default_cond(4, {"age": 80.0, "sex": 1.0, "position": 0.3})
    cpu = torch.device("cpu")

    def latents(c, **options):  # the prior's samples (an untrained decoder would map them all to grey)
        return model.flow.sample(4, c, torch.Generator().manual_seed(3), cpu, **options)

    uncond = latents({})
    assert torch.allclose(latents(cond, guidance=0.0), uncond, atol=1e-6)
    conditional = latents(cond, guidance=1.0)
    assert not torch.allclose(conditional, uncond, atol=1e-3)
    assert not torch.allclose(latents(cond, guidance=3.0), conditional, atol=1e-3)
    assert model.sample(4, {"age": 80.0}, torch.Generator().manual_seed(3), steps=3, solver="euler").shape == (4, 1, 32, 32)


def test_stages_train_in_order_and_resume_across_the_hand_over(tiny_store, tmp_path, monkeypatch):
    full = tmp_path / "full"
    summary = train(full, tiny_store, run_cfg(steps=12), progress=False)
    assert [s["stage"] for s in summary["stages"]] == ["autoencoder", "prior"]
    assert [s["steps"] for s in summary["stages"]] == [6, 6] and summary["steps"] == 12
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert any("train/adv" in r for r in rows)  # the adversarial term started in stage 1
    assert all("train/flow" in r for r in rows if r["step"] > 6 and "train/loss" in r)

    model = load(full, "last")
    assert model.latent_std.min() > 0 and not torch.allclose(model.latent_std, torch.ones(4))
    torch.manual_seed(0)  # the prior trained away from its initial weights (the frozen autoencoder: next test)
    fresh = build("ldm", {k: v for k, v in TINY_LDM.items() if k != "arch"})
    assert not all(torch.equal(v, fresh.flow.state_dict()[k]) for k, v in model.flow.state_dict().items())

    cut = tmp_path / "cut"
    calls = {"n": 0}
    original = LatentBatches.batch

    def interrupting(self, idx):
        calls["n"] += 1
        if calls["n"] == 3:  # inside the prior stage, which trains on the encoded slices
            raise KeyboardInterrupt
        return original(self, idx)

    monkeypatch.setattr(LatentBatches, "batch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(cut, tiny_store, run_cfg(steps=12), progress=False)
    monkeypatch.setattr(LatentBatches, "batch", original)
    assert torch.load(cut / "checkpoints" / "last.state.pt", weights_only=True)["counters"]["stage"] == 1
    train(cut, tiny_store, run_cfg(steps=12), resume=True, progress=False)
    a = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    b = {json.loads(x)["step"]: json.loads(x)["train/loss"] for x in (cut / "metrics.jsonl").read_text().splitlines()
         if "train/loss" in x}
    assert set(a) == set(b)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4), step

    images = sample_images(load(cut), 5, {"age": 70.0, "sex": -1.0}, seed=0, sampler={"steps": 2})
    assert images.shape == (5, 32, 32) and np.isfinite(images).all()

    # an exported copy can change the default sampler without touching the weights
    export_model(cut, tmp_path / "exported", model_overrides={"prior": {"steps": 3, "solver": "euler"}})
    exported, original = load(tmp_path / "exported"), load(cut)
    assert exported.sampler_settings() == {"steps": 3, "solver": "euler", "guidance": 1.0, "guide": "unconditional",
                                           "sampler": "prior", "background": 0.0}
    assert original.sampler_settings()["steps"] == 16
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in exported.state_dict().items())
    assert "steps = 3" in (tmp_path / "exported" / "config.toml").read_text()


def test_init_from_a_run_trains_only_the_prior_on_its_frozen_autoencoder(tiny_store, tmp_path):
    first = tmp_path / "first"
    train(first, tiny_store, run_cfg(steps=8), progress=False)
    cfg = RunConfig(model=TINY_LDM, train=run_cfg(steps=8).train, stages={"prior": {"share": 0.5}},
                    init={"from": str(first), "start": "prior"})
    summary = train(tmp_path / "second", tiny_store, cfg, progress=False)
    assert summary["stages"][0] == {"stage": "autoencoder", "from": str(first)}
    assert summary["stages"][1]["stage"] == "prior" and summary["stages"][1]["steps"] == 4
    assert summary["init"]["from"] == str(first) and summary["init"]["start"] == "prior"
    assert summary["init"]["source"]["steps"] == 8  # the lineage: the first run's training is recorded too
    card = "\n".join(training_lines(summary))
    assert f"taken as it was from `{first}`" in card and "stage autoencoder: 4 steps" in card
    before, after = load(first), load(tmp_path / "second")
    assert all(torch.equal(v, before.autoencoder.state_dict()[k]) for k, v in after.autoencoder.state_dict().items())
    assert not all(torch.equal(v, before.flow.state_dict()[k]) for k, v in after.flow.state_dict().items())
    assert torch.allclose(after.latent_std, before.latent_std)  # the same autoencoder gives the same statistics
    rows = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("train/flow" in r for r in rows if "train/loss" in r)


def test_decoder_stage_sharpens_only_the_decoder_and_keeps_its_last_weights(tiny_store, tmp_path):
    first = tmp_path / "first"
    train(first, tiny_store, run_cfg(steps=8), progress=False)
    assert RunConfig(model=TINY_LDM).stage_names() == ("autoencoder", "prior")  # optional: off unless configured
    stages = {"prior": {"share": 0.25}, "decoder": {"share": 0.25, "steps": 6, "lr": 1e-2}}
    cfg = RunConfig(model=TINY_LDM, train=run_cfg(steps=8).train, stages=stages,
                    init={"from": str(first), "start": "decoder"})
    assert [name for name, _ in cfg.stage_plan()] == ["autoencoder", "prior", "decoder"]
    summary = train(tmp_path / "second", tiny_store, cfg, progress=False)
    assert [s["stage"] for s in summary["stages"]] == ["autoencoder", "prior", "decoder"]
    assert summary["stages"][2]["steps"] == 6
    before, after = load(first), load(tmp_path / "second")
    for part in ("encoder", "to_posterior"):  # the latent is unchanged, so the prior stays valid
        old = getattr(before.autoencoder, part).state_dict()
        assert all(torch.equal(v, old[k]) for k, v in getattr(after.autoencoder, part).state_dict().items())
    assert all(torch.equal(v, before.flow.state_dict()[k]) for k, v in after.flow.state_dict().items())
    assert torch.equal(after.latent_std, before.latent_std)
    assert not torch.equal(after.autoencoder.decoder.head.weight, before.autoencoder.decoder.head.weight)
    rows = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert all("train/adv" in r for r in rows if "train/loss" in r)  # adversarial from the stage's first step
    best = load(tmp_path / "second" / "checkpoints" / "best.safetensors")
    last = load(tmp_path / "second" / "checkpoints" / "last.safetensors")
    assert all(torch.equal(v, last.state_dict()[k]) for k, v in best.state_dict().items())  # best = the last


def test_guide_stage_trains_a_weak_network_for_autoguidance_on_a_model_without_one(tiny_store, tmp_path):
    first = tmp_path / "first"
    train(first, tiny_store, run_cfg(steps=8), progress=False)
    with_guide = {**TINY_LDM, "guide": {"widths": [8, 16], "blocks": 1, "emb_dim": 16}}
    cfg = RunConfig(model=with_guide, train=run_cfg(steps=8).train, stages={"prior": {"share": 0.25},
                    "guide": {"share": 0.25, "steps": 5, "lr": 1e-2}}, init={"from": str(first), "start": "guide"})
    summary = train(tmp_path / "second", tiny_store, cfg, progress=False)
    assert [s["stage"] for s in summary["stages"]] == ["autoencoder", "prior", "guide"]
    assert summary["stages"][2]["steps"] == 5
    before, after = load(first), load(tmp_path / "second")
    assert all(torch.equal(v, before.flow.state_dict()[k]) for k, v in after.flow.state_dict().items())
    assert all(torch.equal(v, before.autoencoder.state_dict()[k]) for k, v in after.autoencoder.state_dict().items())
    assert bool(after.guide_trained) and after.guide.net.head[-1].weight.abs().sum() > 0  # trained off its zero init

    def latents(prior, **options):
        cond = after.given_cond(4, {"age": 70.0, "sex": 1.0, "position": 0.5})
        return prior.sample(4, cond, torch.Generator().manual_seed(2), torch.device("cpu"), steps=3, **options)

    # guidance 0 samples the weak network itself; 1 the prior alone; 2 extrapolates away from the weak one
    assert torch.allclose(latents(after.flow, guidance=0.0, weak=after.guide), latents(after.guide), atol=1e-5)
    assert torch.allclose(latents(after.flow, guidance=1.0, weak=after.guide), latents(after.flow), atol=1e-6)
    auto, cfg_guided = latents(after.flow, guidance=2.0, weak=after.guide), latents(after.flow, guidance=2.0)
    assert not torch.allclose(auto, cfg_guided, atol=1e-3)
    images = sample_images(after, 3, {"age": 60.0}, seed=0, sampler={"steps": 2, "guidance": 1.5, "guide": "weak"})
    assert images.shape == (3, 32, 32) and np.isfinite(images).all()
    with pytest.raises(BrainVAEError, match="weak network"):  # a model without a guide network
        sample_images(before, 2, None, seed=0, sampler={"guidance": 1.5, "guide": "weak"})
    with pytest.raises(BrainVAEError, match="guide must be one of"):
        sample_images(after, 2, None, seed=0, sampler={"guide": "strong"})
    done = CliRunner().invoke(app, ["sample", str(tmp_path / "second"), "-n", "2", "--steps", "2", "--guidance", "1.5",
                                    "--guide", "weak", "--out", str(tmp_path / "s")])
    assert done.exit_code == 0, done.output
    assert '"weak"' in (tmp_path / "s" / "meta.json").read_text()

    # weights lacking the guide are taken only by a run that trains it
    no_stage = RunConfig(model=with_guide, train=run_cfg(steps=8).train, stages={"prior": {"share": 0.5}},
                         init={"from": str(first), "start": "prior"})
    with pytest.raises(BrainVAEError, match="missing"):
        train(tmp_path / "third", tiny_store, no_stage, progress=False)


def test_distill_stage_trains_a_few_step_student_of_the_prior_sampler(tiny_store, tmp_path):
    first = tmp_path / "first"
    train(first, tiny_store, run_cfg(steps=8), progress=False)
    with_student = {**TINY_LDM, "prior": {**TINY_LDM["prior"], "steps": 4}, "student": {**TINY_LDM["prior"],
                                                                                         "steps": 2}}
    cfg = RunConfig(model={**with_student, "sampler": "student"}, train=run_cfg(steps=8).train,
                    stages={"prior": {"share": 0.25}, "distill": {"share": 0.25, "steps": 4, "lr": 1e-2}},
                    init={"from": str(first), "start": "distill"})
    summary = train(tmp_path / "second", tiny_store, cfg, progress=False)
    assert [s["stage"] for s in summary["stages"]] == ["autoencoder", "prior", "distill"]
    before, after = load(first), load(tmp_path / "second")
    assert all(torch.equal(v, before.flow.state_dict()[k]) for k, v in after.flow.state_dict().items())
    assert all(torch.equal(v, before.autoencoder.state_dict()[k]) for k, v in after.autoencoder.state_dict().items())
    # started from the prior's weights (its zero-initialised head included), then trained away from them
    assert bool(after.student_trained) and after.student.net.head[-1].weight.abs().sum() > 0
    assert not torch.equal(after.student.net.head[-1].weight, after.flow.net.head[-1].weight)
    # a run [init] from a distilled model goes on from its student, not from the prior's weights again
    trained = {k: v.clone() for k, v in after.student.state_dict().items()}
    after.begin_stage("distill", None)
    assert all(torch.equal(v, after.student.state_dict()[k]) for k, v in trained.items())
    rows = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/distill" in r for r in rows) and any("val/distill" in r for r in rows)
    assert not (tmp_path / "second" / "stage_cache").exists()  # the teacher paths kept for --resume: gone

    # the default sampler is the student's 2 Euler steps; the prior's sampler stays available
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    cond = {"age": 60.0, "sex": -1.0, "position": 0.5}
    z = after.student.sample(3, after.given_cond(3, cond), g(), torch.device("cpu"))
    assert torch.allclose(after.sample(3, cond, g()), after.decode(after._unstandardise(z)))
    assert not torch.allclose(after.sample(3, cond, g()), after.sample(3, cond, g(), sampler="prior"), atol=1e-4)
    with pytest.raises(BrainVAEError, match="own 2 Euler steps"):
        after.sample(2, cond, g(), steps=8)
    with pytest.raises(BrainVAEError, match="distilled network"):  # a model without a student
        sample_images(before, 2, None, seed=0, sampler={"sampler": "student"})
    with pytest.raises(BrainVAEError, match="sampler must be one of"):
        sample_images(after, 2, None, seed=0, sampler={"sampler": "fast"})
    done = CliRunner().invoke(app, ["sample", str(tmp_path / "second"), "-n", "2", "--out", str(tmp_path / "s")])
    assert done.exit_code == 0, done.output
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())["sampler"]
    assert meta["sampler"] == "student" and meta["steps"] == 2 and meta["distilled_from"]["steps"] == 4
    done = CliRunner().invoke(app, ["sample", str(tmp_path / "second"), "-n", "2", "--sampler", "prior",
                                    "--steps", "2", "--out", str(tmp_path / "p")])
    assert done.exit_code == 0, done.output
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())["sampler"]
    assert meta["sampler"] == "prior" and meta["steps"] == 2 and "distilled_from" not in meta


def test_distill_stage_with_a_critic_trains_it_against_the_slices_own_latents(tiny_store, tmp_path):
    """distill_adv > 0: the student's samples meet a conditional latent critic. Each teacher-path row carries its
    own slice's latent; the critic and the student both train, the adversarial term is logged, the stage keeps
    its last weights (the critic's term moves the student off the regression optimum), and the run samples."""
    first = tmp_path / "first"
    train(first, tiny_store, run_cfg(steps=8), progress=False)
    model_cfg = {**TINY_LDM, "prior": {**TINY_LDM["prior"], "steps": 4}, "student": {**TINY_LDM["prior"], "steps": 2},
                 "distill_repeats": 2, "distill_adv": 0.5, "sampler": "student"}
    cfg = RunConfig(model=model_cfg, train=run_cfg(steps=8).train,
                    stages={"prior": {"share": 0.25}, "distill": {"share": 0.25, "steps": 6, "lr": 1e-2}},
                    init={"from": str(first), "start": "distill"})
    summary = train(tmp_path / "second", tiny_store, cfg, progress=False)
    assert [s["stage"] for s in summary["stages"]] == ["autoencoder", "prior", "distill"]
    after = load(tmp_path / "second")
    fresh = build("ldm", {k: v for k, v in model_cfg.items() if k != "arch"})
    assert after.unselected_stages == ("decoder", "distill")
    assert any(not torch.equal(v, fresh.student_critic.state_dict()[k])
               for k, v in after.student_critic.state_dict().items() if v.dtype.is_floating_point)
    rows = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train/adv", 0) != 0 for r in rows)
    assert after.sample(2, {"age": 40.0}, torch.Generator().manual_seed(0)).shape == (2, 1, 32, 32)

    # a batch: each row's teacher path, then a posterior sample of its own slice's latent, standardised
    from brainvae.data.dataset import SliceBatches
    from brainvae.data.store import SliceStore

    data = SliceBatches(SliceStore(tiny_store), "train", 32)
    paths = TeacherPaths(data, after.eval(), repeats=2, seed=0)
    n = len(data)
    x, _ = paths.batch(np.arange(2 * n))
    assert x.shape == (2 * n, 4, *after.flow.latent_shape)  # K + 1 = 3 path points, then the real latent
    with torch.no_grad():
        posterior = after.autoencoder.encode(data.batch(np.arange(n))[0])
    own = after._standardise(posterior.mean)
    spread = (0.5 * posterior.logvar).exp() / after.latent_std[:, None, None]
    for rows in (slice(0, n), slice(n, 2 * n)):  # both repeats: within 5 posterior stds of the slice's own mean
        assert ((x[rows, -1] - own).abs() <= 5 * spread + 1e-4).float().mean() > 0.99
    # the critic's loss: hinge on real latents vs the student's samples
    after.set_stage("distill")
    d = after.disc_loss(x[:4], x[:4, -2], {k: v[:4] for k, v in paths.cond.items()})
    assert d.shape == (4,) and torch.isfinite(d).all()


def test_teacher_paths_keep_the_conditions_the_teacher_sampled_under(tiny_store):
    from brainvae.data.dataset import SliceBatches
    from brainvae.data.store import SliceStore

    config = {k: v for k, v in TINY_LDM.items() if k != "arch"}
    model = build("ldm", {**config, "prior": {**config["prior"], "drop_key": 0.5, "steps": 2},
                          "student": {**config["prior"], "steps": 2}}).eval()
    seen = []

    def teacher_path(eps, c):  # records what the teacher was asked to sample
        seen.append(c)
        return torch.stack([eps, eps, eps], 1)

    model.teacher_path = teacher_path
    data = SliceBatches(SliceStore(tiny_store), "train", 32)
    paths = TeacherPaths(data, model, repeats=2, seed=0, batch_size=5)
    assert len(paths) == 2 * len(data) and paths.paths.shape[1:] == (3, 4, 8, 8)
    rows = np.arange(len(paths))
    x, cond = paths.batch(rows)
    asked = torch.cat(seen)
    assert torch.equal(model.flow.cond_inputs(cond, len(rows), torch.device("cpu")), asked)
    k = len(model.flow.keys)
    assert 0 < asked[:, k:].mean() < 1  # some conditions hidden, not all
    assert not torch.equal(x[:len(data), 0], x[len(data):, 0])  # each repeat draws its own noise
    again = TeacherPaths(data, model, repeats=2, seed=0, batch_size=7)  # made again: the same paths
    assert torch.equal(again.paths, paths.paths)
    assert all(torch.equal(again.cond[key].nan_to_num(-9), paths.cond[key].nan_to_num(-9)) for key in paths.cond)


def test_teacher_paths_are_kept_for_a_resumed_run_while_the_teacher_is_the_same(tiny_store, tmp_path):
    from brainvae.data.dataset import SliceBatches
    from brainvae.data.store import SliceStore

    config = {k: v for k, v in TINY_LDM.items() if k != "arch"}
    model = build("ldm", {**config, "prior": {**config["prior"], "steps": 2},
                          "student": {**config["prior"], "steps": 2}}).eval()
    data = SliceBatches(SliceStore(tiny_store), "train", 32)
    cache = tmp_path / "cache" / "paths.pt"
    made = TeacherPaths(data, model, repeats=1, seed=0, cache=cache)
    assert cache.exists() and made.paths.dtype == torch.float16 and made.batch([0])[0].dtype == torch.float32
    model.teacher_path = None  # a resumed run reads the paths; it does not sample them again
    read = TeacherPaths(data, model, repeats=1, seed=0, cache=cache)
    assert torch.equal(read.paths, made.paths)
    assert all(torch.equal(read.cond[k].nan_to_num(-9), made.cond[k].nan_to_num(-9)) for k in made.cond)
    with pytest.raises(TypeError, match="not callable"):  # other repeats: another key, so made again
        TeacherPaths(data, model, repeats=2, seed=0, cache=cache)
    del model.teacher_path
    with torch.no_grad():
        model.flow.net.head[-1].bias.add_(0.1)  # another teacher (its zero head moved): made again, file replaced
    fresh = TeacherPaths(data, model, repeats=1, seed=0, cache=cache)
    assert not torch.equal(fresh.paths, made.paths)
    assert torch.equal(torch.load(cache, weights_only=True)["paths"], fresh.paths)


def test_student_config_errors_are_clear():
    prior = {**TINY_LDM["prior"], "steps": 8}
    with pytest.raises(BrainVAEError, match="needs a distilled network"):
        RunConfig(model={**TINY_LDM, "sampler": "student"})
    with pytest.raises(BrainVAEError, match="must divide"):
        RunConfig(model={**TINY_LDM, "prior": prior, "student": {"steps": 3}})
    with pytest.raises(BrainVAEError, match="cannot set"):
        RunConfig(model={**TINY_LDM, "prior": prior, "student": {"guidance": 2.0}})
    with pytest.raises(BrainVAEError, match="\\[model.student\\]"):
        build("ldm", {k: v for k, v in TINY_LDM.items() if k != "arch"}).set_stage("distill")


def test_weak_guide_config_needs_a_guide_network():
    with pytest.raises(BrainVAEError, match="needs a weak network"):
        RunConfig(model={**TINY_LDM, "prior": {**TINY_LDM["prior"], "guide": "weak"}})
    with pytest.raises(BrainVAEError, match="guide must be one of"):
        RunConfig(model={**TINY_LDM, "prior": {**TINY_LDM["prior"], "guide": "strong"}})
    model = build("ldm", {**{k: v for k, v in TINY_LDM.items() if k != "arch"}, "guide": {"widths": [8, 16]}})
    with pytest.raises(BrainVAEError, match="untrained"):
        model.sample(2, None, steps=2, guidance=1.5, guide="weak")
    with pytest.raises(BrainVAEError, match="\\[model.guide\\]"):
        build("ldm", {k: v for k, v in TINY_LDM.items() if k != "arch"}).set_stage("guide")


def test_decoder_stage_needs_a_discriminator(tiny_store, tmp_path):
    values = {k: v for k, v in TINY_LDM.items() if k != "arch"}
    model = build("ldm", {**values, "autoencoder": {"channels": [8, 16], "adv_weight": 0.0}})
    with pytest.raises(BrainVAEError, match="adv_weight"):
        model.set_stage("decoder")


def test_init_errors_are_clear():
    with pytest.raises(BrainVAEError, match="give \\[init\\] from"):
        RunConfig(model=TINY_LDM, init={"start": "prior"})
    with pytest.raises(BrainVAEError, match="not a stage of this ldm run"):
        RunConfig(model=TINY_LDM, init={"from": "x", "start": "denoiser"})
    with pytest.raises(BrainVAEError, match="not a stage of this ldm run"):  # optional, and not configured
        RunConfig(model=TINY_LDM, init={"from": "x", "start": "decoder"})
    with pytest.raises(BrainVAEError, match="takes 'from' and 'start'"):
        RunConfig(model=TINY_LDM, init={"form": "x"})


def test_stage_config_errors_are_clear():
    with pytest.raises(BrainVAEError, match="not stages of ldm"):
        RunConfig(model=TINY_LDM, stages={"denoiser": {"lr": 1e-3}})
    with pytest.raises(BrainVAEError, match="share"):
        RunConfig(model=TINY_LDM, stages={"prior": {"share": 1.5}})
    with pytest.raises(BrainVAEError, match="cannot set"):
        RunConfig(model={**TINY_LDM, "autoencoder": {"image_size": 64}})
    with pytest.raises(BrainVAEError, match="stages"):
        RunConfig(model={"arch": "vae"}, stages={"prior": {}})


def test_sample_options_are_refused_by_models_without_them():
    model = build("vae", {"image_size": 32, "channels": (8, 16), "latent_dim": 4})
    with pytest.raises(BrainVAEError, match="guidance"):
        sample_images(model, 2, None, seed=0, sampler={"guidance": 2.0})


def test_zero_background_keeps_the_brain_with_its_dark_holes_and_zeroes_the_haze_around_it():
    yy, xx = np.mgrid[:32, :32]
    r = np.hypot(yy - 16, xx - 16)
    image = np.where(r < 10, 0.6, 0.02)  # a brain in a faint haze
    image[(r < 3)] = 0.05  # a dark ventricle inside: below the threshold but enclosed
    image[2:4, 2:4] = 0.5  # a speck of noise: far smaller than the brain
    x = torch.tensor(image, dtype=torch.float32)[None, None]
    out = zero_background(x, 0.1)[0, 0].numpy()
    assert np.all(out[r >= 10] == 0)  # haze and speck gone
    assert np.allclose(out[r < 10], image[r < 10])  # the brain and its ventricle untouched


def test_zero_background_treats_each_slice_of_a_batch_on_its_own():
    yy, xx = np.mgrid[:32, :32]
    r = np.hypot(yy - 16, xx - 16)
    big = np.where(r < 12, 0.6, 0.0)  # slice 0: a large brain
    small = np.where(r < 2, 0.6, 0.0)  # slice 1: only a small region, its own largest: kept
    ring = np.where((r > 5) & (r < 12), 0.6, 0.0)  # slice 2: a ring; its dark centre is a hole of this slice
    ring[16, :] = np.where(np.abs(np.arange(32) - 16) < 12, 0.0, ring[16, :])  # ...cut open: no hole any more
    x = torch.tensor(np.stack([big, small, ring]), dtype=torch.float32)[:, None]
    x[:, :, 0, 0] = 0.3  # a one-pixel speck in every slice's corner
    out = zero_background(x, 0.1)[:, 0].numpy()
    assert np.allclose(out[0], big)  # the speck is under 5 % of this slice's largest region: gone
    assert np.allclose(out[1][r < 2], 0.6) and out[1][0, 0] == 0.3  # 1 pixel >= 5 % of 13: kept here
    assert np.allclose(out[2], ring)  # the two halves kept, the open centre not filled, the speck gone


def test_ldm_samples_are_zero_outside_the_brain_when_background_is_set():
    torch.manual_seed(0)
    model = build("ldm", {**{k: v for k, v in TINY_LDM.items() if k != "arch"}, "background": 0.1}).eval()
    images = model.sample(3, None, torch.Generator().manual_seed(0), steps=2)
    assert images.shape == (3, 1, 32, 32)
    kept = zero_background(images, 0.1)
    assert torch.equal(images, kept)  # already stripped: stripping again changes nothing
    assert model.sampler_settings()["background"] == 0.1
    with pytest.raises(BrainVAEError, match="background"):
        build("ldm", {"image_size": 32, "background": 1.5})


def test_flipped_latents_are_the_mirrored_slices_drawn_at_random(tiny_store):
    from types import SimpleNamespace

    from brainvae.data.dataset import SliceBatches
    from brainvae.data.store import SliceStore

    data = SliceBatches(SliceStore(tiny_store), "train", 32)
    encode = lambda x: SimpleNamespace(mean=x, logvar=torch.full_like(x, -60.0))  # noqa: E731  z = x exactly
    plain, flipped = LatentBatches(data, encode), LatentBatches(data, encode, flip=True)
    assert len(flipped) == len(plain) == len(data)
    rows = np.arange(4)
    x, cond = data.batch(rows)
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        z, c = flipped.batch(rows)
        assert all(torch.equal(c[k], cond[k]) for k in cond)
        for i in range(len(rows)):
            same, mirror = torch.allclose(z[i], x[i]), torch.allclose(z[i], x[i].flip(-1))
            assert same or mirror
            seen.add("same" if same else "mirror")
    assert seen == {"same", "mirror"}
    z, _ = plain.batch(rows)
    assert torch.allclose(z, x)


def test_restoration_redraws_a_lesion_as_the_prior_sees_health():
    """An oracle prior that knows one healthy latent (the velocity of a point mass: v = (z_t - z_h) / t)
    brings a noised latent back to it from any level, so the restoration is the healthy slice and the
    restoration scores light up the lesion, not the rest of the brain."""
    model = build("ldm", {k: v for k, v in TINY_LDM.items() if k != "arch"}).eval()
    size = 32
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    healthy = torch.tensor((xx ** 2 + yy ** 2 < 0.6) * 0.6, dtype=torch.float32)[None, None]
    x = healthy.clone()
    lesion = torch.zeros_like(x, dtype=torch.bool)
    lesion[..., 12:19, 10:17] = True
    x[lesion] = 0.15  # a dark (T1-like) lesion
    # an autoencoder that keeps the image (latent = the image, 1 x 32 x 32) and a prior whose only brain is `healthy`
    model.autoencoder.encode = lambda im: DiagonalGaussian(im.float(), torch.zeros_like(im.float()))
    model.autoencoder.decode = lambda z: z
    model.latent_mean, model.latent_std = torch.tensor([0.3]), torch.tensor([0.5])  # standardisation round-trips
    z_h = (healthy - 0.3) / 0.5
    model.flow.velocity = lambda z, t, c: (z - z_h) / t.clamp_min(0.05)[:, None, None, None]  # (at t = 0: z = z_h)
    model.flow.latent_shape = (1, size, size)
    for t in model.config.restore_levels:
        restored = model.restore(x, None, t, torch.Generator().manual_seed(0))
        # exact but for the last Heun step, where the oracle's velocity is singular (t = 0, clamped)
        assert (restored - healthy).abs().mean() < 0.03 and (restored - healthy)[lesion].mean() < 0.03, t
    batch = ScoreBatch(model, x, None, generator=torch.Generator().manual_seed(0))
    for name in ("restoration", "restoration_neg_smooth"):
        m = model.scores()[name].compute(batch)
        assert m.shape == x.shape
        assert m[lesion].mean() > 10 * m[~lesion].mean() and lesion.flatten()[m.argmax()], name
    assert "restorations" in batch.shared  # both scores shared one set of restorations
    with pytest.raises(BrainVAEError, match="restore_levels"):
        build("ldm", {"image_size": 32, "restore_levels": (0.0, 0.5)})


def test_unknown_sex_is_a_missing_condition_for_the_prior():
    model = build("ldm", {k: v for k, v in TINY_LDM.items() if k != "arch"})
    c = model.flow.cond_inputs({"age": torch.tensor([40.0, float("nan")]), "sex": torch.tensor([0.0, -1.0]),
                                "position": torch.tensor([0.5, 0.5])}, 2, torch.device("cpu"))
    missing = c[:, 3:]  # (age, sex, position) missing bits
    assert missing.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
