"""``brainvae demo``: the whole pipeline on the embedded SIMULATED cohort, no download.

Today: simulate -> prepare -> describe. Later stages (train, sample, evaluate,
report) are added here as they land. Must stay under 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from .config import PrepareConfig
from .data.prepare import prepare_dataset
from .describe import describe_dataset
from .errors import OutputExistsError
from .io.phantom import simulate_cohort
from .io.scan import find_scans

DEMO_PREPARE = PrepareConfig(size=64, position_range=(0.2, 0.9), min_brain=0.1)


def run_demo(out: Path, *, subjects: int = 24, force: bool = False, progress: bool = True) -> None:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(out)
    t0 = time.perf_counter()

    def step(name: str) -> None:
        typer.secho(f"[{time.perf_counter() - t0:6.1f}s] {name}", fg="cyan")

    step(f"simulate {subjects} subjects (SIMULATED data from the MNI152 template)")
    cohort = out / "simulated"
    simulate_cohort(cohort, subjects, seed=0, force=True, progress=progress)
    inventory = find_scans(cohort, "T1")

    step("describe the simulated cohort")
    describe_dataset(inventory, out / "describe", force=True, progress=progress)

    step("prepare a 64x64 axial slice store")
    prepare_dataset(inventory, out / "datasets" / "sim-t1-axial", DEMO_PREPARE, force=True, progress=progress)

    step("done")
    typer.echo(f"dataset description: {out / 'describe' / 'index.html'}")
    typer.echo(f"slice store: {out / 'datasets' / 'sim-t1-axial'}")
