"""``brainvae demo``: the whole pipeline on the embedded SIMULATED cohort, no download.

simulate -> describe -> prepare -> train a conditional VAE -> sample by age and
sex -> reconstruct -> evaluate (realism with the real-real floor, conditional
fidelity) -> utility (does synthetic data help a sex / age-band classifier?) ->
anomaly detection on synthetic anomalies added to the test slices -> quiz ->
report.html. Must stay under 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import generate as G
from .config import PrepareConfig, RunConfig, TrainConfig
from .data.prepare import prepare_dataset
from .data.store import SliceStore
from .data.synthetic_anomalies import anomalies_store
from .describe import describe_dataset
from .errors import OutputExistsError
from .evaluate.anomaly import evaluate_anomaly
from .evaluate.run_eval import evaluate_run
from .evaluate.utility import UtilityConfig, write_utility
from .io.phantom import simulate_cohort
from .io.scan import find_scans
from .progress import say
from .report.quiz import make_quiz
from .report.report import write_report
from .rundir import RunDir, shipped_models
from .train.engine import train

DEMO_PREPARE = PrepareConfig(size=64, position_range=(0.2, 0.9), min_brain=0.1)
DEMO_MODEL = {"arch": "cvae", "image_size": 64, "latent_dim": 64}
# The demo shows the pipeline, not a good model (the shipped ixi-t1-128 is that): budgets that keep the whole
# demo within 3 minutes on 2 cores without native bf16 (fp32), where the cvae trains at ~260 img/s.
DEMO_TRAIN = TrainConfig(budget="40s", epochs=200, batch_size=32, lr=2e-3, kl_warmup_steps=300)
DEMO_EVAL_N = 300
DEMO_UTILITY = UtilityConfig(ratios=(1.0,), steps=200, image_size=32)
PRETRAINED = "ixi-t1-128"  # sampled by the demo when the package ships it (`brainvae models`)


def run_demo(out: Path, *, subjects: int = 24, force: bool = False, progress: bool = True) -> None:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(out)
    t0 = time.perf_counter()

    def step(name: str) -> None:
        say(f"[{time.perf_counter() - t0:6.1f}s] {name}", fg="cyan")

    step(f"simulate {subjects} subjects (SIMULATED data from the MNI152 template)")
    cohort = out / "simulated"
    simulate_cohort(cohort, subjects, seed=0, force=True, progress=progress)
    inventory = find_scans(cohort, "T1")

    step("describe the simulated cohort")
    describe_dataset(inventory, out / "describe", force=True, progress=progress)

    step("prepare a 64x64 axial slice store")
    prepare_dataset(inventory, out / "datasets" / "sim-t1-axial", DEMO_PREPARE, force=True, progress=progress)

    store = out / "datasets" / "sim-t1-axial"
    run = out / "runs" / "cvae"
    step(f"train a conditional VAE for {DEMO_TRAIN.budget}")
    train(run, store, RunConfig(model=DEMO_MODEL, train=DEMO_TRAIN), force=True, progress=progress)

    step("sample young/old x female/male slices and reconstruct test slices")
    model = G.load(run)
    spacing = G.spacing_of(run)
    for age, sex in ((30, "F"), (30, "M"), (75, "F"), (75, "M")):
        _sample(run, model, age, sex, run / f"samples-age{age}-{sex}", spacing)
    real, recon = G.reconstruct_split(model, SliceStore(store), "test", 8)
    G.export_reconstructions(real, recon, run / "reconstructions", spacing, {"run": str(run), "store": str(store)},
                             split="test", force=True)

    step("evaluate: reconstruction, realism against the real-vs-real floor, conditional fidelity")
    evaluate_run(run, store, RunDir(run).eval_dir, n=DEMO_EVAL_N, force=True, progress=progress)

    step("utility: a sex / age-band classifier trained on real, real + synthetic and synthetic slices")
    write_utility(run, store, run / "utility", DEMO_UTILITY, force=True, progress=progress)

    step("anomaly detection on synthetic anomalies added to the test slices")
    anomalies = out / "datasets" / "sim-t1-axial-anomalies"
    anomalies_store(SliceStore(store), anomalies, split="test", force=True)
    evaluate_anomaly(run, anomalies, RunDir(run).anomaly_dir, force=True, progress=progress)

    if PRETRAINED in shipped_models():
        step(f"sample REAL-data slices from the shipped pretrained model {PRETRAINED} (trained on IXI T1)")
        model = G.load(PRETRAINED)
        for age, sex in ((30, "F"), (75, "M")):
            _sample(PRETRAINED, model, age, sex, out / PRETRAINED / f"samples-age{age}-{sex}", G.spacing_of(PRETRAINED))

    step("blinded real-vs-synthetic quiz and the HTML report")
    make_quiz(run, store, out / "quiz", n=24, force=True)
    write_report([run], out / "report.html", force=True)

    step("done")
    say(f"report: {out / 'report.html'}   quiz: {out / 'quiz' / 'quiz.html'}")
    say(f"dataset description: {out / 'describe' / 'index.html'}")
    say(f"slice store: {store}")
    say(f"run: {run} (samples-age*/grid.png, reconstructions/grid.png; tensorboard --logdir {run / 'tb'})")


def _sample(run, model, age: float, sex: str, out: Path, spacing: float, n: int = 16) -> None:
    """n samples at position 0.5 for one age and sex, exported like `brainvae sample`."""
    cond = G.conditions(model, age, sex, 0.5)
    images = G.sample_images(model, n, cond, seed=0)
    G.export_samples(images, out, spacing, G.sample_meta(run, model, n, 0, cond, None), force=True)
