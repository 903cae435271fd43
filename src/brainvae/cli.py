"""The ``brainvae`` command line: parses options, builds configs, calls the library.

No logic lives here. User errors (``BrainVAEError``) print one clear line and
exit with status 1, without a traceback; Ctrl-C exits with 130 and, since every
output is written atomically, leaves nothing half-written.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from .config import PrepareConfig, load_config, load_run_config, replace
from .errors import BrainVAEError
from .io.atomic import refuse_overlap
from .rundir import RunDir

# rich_markup_mode=None: plain help text, so "[model]" and "[train]" are shown (Rich markup would eat them).
app = typer.Typer(help="Synthetic brain MR slices and anomaly detection with variational autoencoders.",
                  no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)
data_app = typer.Typer(help="Describe, simulate, download and prepare brain MRI datasets.", no_args_is_help=True,
                       rich_markup_mode=None)
app.add_typer(data_app, name="data")


def _print_version(value: bool) -> None:
    if value:
        from importlib import metadata

        typer.echo(f"brainvae {metadata.version('brainvae')}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_print_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    pass


def checked_store(run: Path, data: Path, resize: bool):
    """The store ``data``, refused when its slices differ in size from the run's without ``--resize``."""
    from .data.store import SliceStore

    store = SliceStore(data)
    RunDir.resolve(run).check_size(store, resize=resize)
    return store


def refuse_output_over(out: Path | None, run: Path | None = None, inputs: tuple = ()) -> None:
    """Before anything is read or written: an ``--out`` may lie inside the run (its default outputs do) but may
    not be, or hold, the run; it may not be, hold or lie inside an input (``--force`` would delete it)."""
    if out is None:
        return
    if run is not None:
        refuse_overlap(out, [RunDir.resolve(run).path], inside_ok=True)
    refuse_overlap(out, list(inputs))


def user_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrainVAEError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.secho("interrupted: no partial output was kept", fg="yellow", err=True)
            raise typer.Exit(130) from None
    return wrapper


Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
Workers = Annotated[Optional[int], typer.Option(help="Parallel processes (default: all cores).")]
Modality = Annotated[str, typer.Option(help="Modality to read: T1, T2, PD (IXI) or t1, t1ce, t2, flair (BraTS).")]
Demographics = Annotated[Optional[Path], typer.Option(
    help="IXI.xls, CSV or TSV with columns subject (or participant_id, subject_id, id, IXI_ID), age and sex "
         "(M/F or male/female; numeric codes only as 'sex (1=M, 2=F)'). Default: IXI.xls or demographics.csv "
         "beside the images, a BIDS dataset's participants.tsv.")]
Masks = Annotated[Optional[Path], typer.Option(help="Folder of brain masks matched by subject (label > 0 = brain).")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars (the start line and summary remain).")]
LogFile = Annotated[Optional[Path], typer.Option(
    help="Also append the start line, progress lines (plain, every 30 s; even with --quiet) and summary here.")]
Resize = Annotated[bool, typer.Option(
    "--resize", help="Accept a store whose slices differ in size from those the run trained on (they are "
                     "resampled to the model's size).")]


@data_app.command("describe")
@user_errors
def data_describe(
    data: Annotated[Path, typer.Argument(help="Dataset folder (IXI, BraTS or any NIfTI folder) or IXI .tar.")],
    out: Annotated[Path, typer.Option(help="Output folder for tables, figures and index.html.")] = Path("describe"),
    modality: Modality = "T1", demographics: Demographics = None, masks: Masks = None,
    workers: Workers = None, force: Force = False, quiet: Quiet = False,
) -> None:
    """Tables, plots and an HTML page describing a dataset: demographics, scanners, voxel sizes, intensities."""
    from .describe import describe_dataset
    from .io.scan import find_scans

    refuse_output_over(out, inputs=(data, demographics, masks))
    inventory = find_scans(data, modality, demographics=demographics, masks=masks)
    path = describe_dataset(inventory, out, force=force, workers=workers, progress=not quiet)
    typer.echo(f"described {len(inventory.scans)} scans -> {path / 'index.html'}")


@data_app.command("simulate")
@user_errors
def data_simulate(
    out: Annotated[Path, typer.Option(help="Output folder (IXI layout).")] = Path("simulated"),
    n: Annotated[int, typer.Option("-n", "--subjects", help="Number of simulated subjects.")] = 24,
    seed: int = 0,
    spacing: Annotated[float, typer.Option(help="Voxel size in mm.")] = 2.0,
    lesions: Annotated[float, typer.Option(help="Fraction of subjects given synthetic lesions (with masks).")] = 0.0,
    force: Force = False, quiet: Quiet = False,
) -> None:
    """Write a SIMULATED cohort (from the MNI152 template shipped with nilearn) in the IXI layout."""
    from .io.phantom import simulate_cohort

    table = simulate_cohort(out, n, seed=seed, spacing=(spacing,) * 3, lesion_fraction=lesions,
                            force=force, progress=not quiet)
    typer.echo(f"simulated {len(table)} subjects (NOT real data) -> {out}")


@data_app.command("show")
@user_errors
def data_show(
    store: Annotated[Path, typer.Argument(help="Slice store.")],
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("slices.png"),
    subject: Annotated[Optional[list[str]], typer.Option(help="Subject(s) to show (repeatable).")] = None,
    n: Annotated[int, typer.Option("-n", help="Subjects to show when none are named.")] = 4,
    columns: Annotated[int, typer.Option(help="Slices per subject.")] = 6,
) -> None:
    """Show slices of a prepared store with brain-mask and lesion outlines."""
    from .data.store import SliceStore
    from .report.figures import save_store_montage

    path = save_store_montage(SliceStore(store), out, subjects=subject, n_subjects=n, per_subject=columns)
    typer.echo(f"-> {path}")


@data_app.command("download")
@user_errors
def data_download(
    dataset: Annotated[str, typer.Argument(help="Only 'ixi' is downloadable (BraTS requires registration).")],
    modality: Annotated[str, typer.Option(help="IXI archive: T1, T2, PD, MRA or DTI.")] = "T1",
    dest: Annotated[Path, typer.Option(help="Download folder.")] = Path("data/ixi"),
    extract: Annotated[bool, typer.Option(help="Extract the archive after download.")] = True,
    force: Force = False, quiet: Quiet = False,
) -> None:
    """Download the official IXI archive and IXI.xls (resumable, size/checksum checked, safe extraction)."""
    from .io.download import download_ixi

    if dataset.lower() != "ixi":
        raise BrainVAEError(f"unknown dataset {dataset!r}; only 'ixi' can be downloaded")
    paths = download_ixi(modality, dest, extract=extract, force=force, progress=not quiet)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@data_app.command("prepare")
@user_errors
def data_prepare(
    data: Annotated[Path, typer.Argument(help="Dataset folder (BIDS, IXI, BraTS or any NIfTI folder) or IXI .tar.")],
    out: Annotated[Path, typer.Option(help="Store folder, e.g. datasets/ixi-t1-axial.")],
    config: Annotated[Optional[Path], typer.Option(help="PrepareConfig TOML; options below override it.")] = None,
    modality: Annotated[Optional[str], typer.Option(help="Modality (default T1).")] = None,
    axis: Annotated[Optional[str], typer.Option(help="axial, coronal or sagittal.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Slice size in pixels (default 128).")] = None,
    spacing: Annotated[Optional[float], typer.Option(help="Voxel size in mm (default 192 mm / size).")] = None,
    positions: Annotated[Optional[tuple[float, float]], typer.Option(
        metavar="LO HI", help="Keep slices within this fraction of the brain's extent, e.g. 0.3 0.8.")] = None,
    indices: Annotated[Optional[tuple[int, int]], typer.Option(
        metavar="LO HI", help="Keep slice indices [LO, HI) of the grid.")] = None,
    min_brain: Annotated[Optional[float], typer.Option(help="Minimum brain fraction of a kept slice.")] = None,
    skull_strip: Annotated[Optional[bool], typer.Option(help="Apply brain masks when given.")] = None,
    n4: Annotated[Optional[bool], typer.Option(help="N4 bias-field correction.")] = None,
    register: Annotated[Optional[bool], typer.Option(help="Affine registration to MNI152.")] = None,
    resolution_mm: Annotated[Optional[float], typer.Option(
        help="Smooth volumes to this effective resolution (mm FWHM) first, to match a coarser dataset.")] = None,
    split: Annotated[Optional[tuple[float, float, float]], typer.Option(
        metavar="TRAIN VAL TEST", help="Split ratios, e.g. 0.7 0.15 0.15.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Split seed.")] = None,
    demographics: Demographics = None, masks: Masks = None,
    lesions: Annotated[Optional[Path], typer.Option(help="Folder of lesion masks matched by subject.")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first bad volume instead of skipping it.")] = False,
    workers: Workers = None, force: Force = False, quiet: Quiet = False, log_file: LogFile = None,
) -> None:
    """Turn 3-D volumes into a store of normalised 2-D slices with a subject-level split.
    BIDS: sub-*/[ses-*/]anat/*_T1w.nii.gz (--modality T2 reads *_T2w), one scan per subject, participants.tsv."""
    from .data.prepare import cohort_notes, prepare_dataset
    from .data.store import SliceStore
    from .io.scan import find_scans
    from .progress import log_to, say

    refuse_overlap(out, [data, config, demographics, masks, lesions])  # before an archive is unpacked
    cfg = load_config(PrepareConfig, config) if config else PrepareConfig()
    cfg = replace(cfg, modality=modality, axis=axis, size=size, spacing=spacing, position_range=positions,
                  index_range=indices, min_brain=min_brain, skull_strip=skull_strip, n4=n4, register=register,
                  resolution_mm=resolution_mm, split_ratios=split, seed=seed)
    with log_to(log_file, out):
        inventory = find_scans(data, cfg.modality, demographics=demographics, masks=masks, lesions=lesions)
        say(f"prepare {len(inventory.scans)} {inventory.dataset} volumes of {data} ({cfg.modality}, {cfg.axis}, "
            f"{cfg.size} px) -> {out}", err=True)
        for note in cohort_notes(inventory, cfg, limit=10):
            say(f"note: {note}", err=True)
        path = prepare_dataset(inventory, out, cfg, workers=workers, strict=strict, force=force, progress=not quiet)
        store = SliceStore(path)
        counts = store.manifest.groupby("split")["subject"].nunique().to_dict()
        say(f"prepared {len(store)} slices from {len(store.subjects)} volumes (subjects per split: {counts}) -> {path}")
        if (path / "problems.txt").stat().st_size:
            say(f"problems are listed in {path / 'problems.txt'}")


Device = Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")]
Overrides = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="Override a config value (repeatable): dotted key, TOML value, e.g. "
    "--set model.beta=0.5 --set train.lr=3e-4 --set model.channels=[32,64].")]


@app.command("configs")
@user_errors
def configs_cmd() -> None:
    """List the shipped run configs, which `train`, `tune` and `compare` accept by name."""
    from .config import config_description, shipped_configs

    shipped = shipped_configs()
    width = max(map(len, shipped))
    for name, path in shipped.items():
        typer.echo(f"{name:<{width}}  {config_description(path)}")


@app.command("models")
@user_errors
def models_cmd() -> None:
    """List the pretrained models shipped in the package (every command that takes a run takes their names)."""
    from .config import RunConfig, load_config
    from .rundir import shipped_models

    shipped = shipped_models()
    if not shipped:
        typer.echo("no pretrained models are shipped in this installation")
    for name, path in shipped.items():
        cfg = load_config(RunConfig, RunDir(path).config_file)
        typer.echo(f"{name}  {cfg.arch}, {cfg.model_config().image_size} px, conditions: "
                   f"{', '.join(cfg.model_config().conditions) or 'none'}  (card: {path / 'MODEL_CARD.md'})")


@app.command("export")
@user_errors
def export_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    out: Annotated[Path, typer.Option(help="Model folder to write (EMA weights, config, model card).")],
    name: Annotated[Optional[str], typer.Option(help="Model name in its card (default: the folder's name).")] = None,
    half: Annotated[bool, typer.Option("--half", help="Store the weights as float16 (half the size; loaded as "
                                                      "float32). Evaluate the exported folder, not the run.")] = False,
    force: Force = False,
) -> None:
    """Package a run's best checkpoint as a self-contained model folder with a generated model card."""
    from .export import export_model

    refuse_output_over(out, run)
    typer.echo(f"exported {run} -> {export_model(run, out, name=name, force=force, half=half)}")


@app.command("train")
@user_errors
def train_cmd(
    config: Annotated[str, typer.Argument(help="Shipped config name (`brainvae configs` lists them: vae, ldm...) "
                                               "or a run config TOML ([model] and [train]).")],
    data: Annotated[Path, typer.Option(help="Slice store from `brainvae data prepare`.")],
    out: Annotated[Path, typer.Option(help="Run folder, e.g. runs/vae.")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.")] = False,
    steps: Annotated[Optional[int], typer.Option(help="Train this many steps.")] = None,
    budget: Annotated[Optional[str], typer.Option(help="Wall-clock budget, e.g. 20m.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, fp32, bf16 or fp16.")] = None,
    compile: Annotated[Optional[bool], typer.Option(help="torch.compile the model.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    init: Annotated[Optional[str], typer.Option(
        "--init", help="Start from this model's weights (run folder, checkpoint or shipped name; same config).")] = None,
    start_stage: Annotated[Optional[str], typer.Option(
        help="Begin at this stage, the earlier ones taken from --init (e.g. an ldm's prior).")] = None,
    overrides: Overrides = None, device: Device = "auto", force: Force = False, quiet: Quiet = False,
    log_file: LogFile = None,
) -> None:
    """Train one architecture on a slice store (resumable; DDP under torchrun)."""
    import os

    from .progress import log_to, say
    from .train.engine import train

    init_overrides = [f"init.{k}={json.dumps(v)}" for k, v in (("from", init), ("start", start_stage)) if v]
    cfg = load_run_config(config, [*(overrides or ()), *init_overrides])
    cfg = replace(cfg, train=replace(cfg.train, steps=steps, budget=budget, epochs=epochs, precision=precision,
                                     compile=compile, seed=seed))
    with log_to(log_file if os.environ.get("RANK", "0") == "0" else None, out):  # one writer under torchrun
        try:
            summary = train(out, data, cfg, device=device, resume=resume, force=force, progress=not quiet)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from a scheduler: the last checkpoint was saved
            if not RunDir(out).last_checkpoint.exists():
                raise
            say(f"interrupted: the last checkpoint is in {out}; continue with --resume", err=True)
            raise typer.Exit(130) from None
        say(f"trained {summary['arch']}: {summary['steps']} steps in {summary['seconds']} s "
            f"({summary['images_per_second']} img/s), best val loss {summary['best_val_loss_per_pixel']:.4f} "
            f"nats/pixel -> {out}")


@app.command("tune")
@user_errors
def tune_cmd(
    config: Annotated[str, typer.Argument(help="Shipped config name or run config TOML with a [tune] search "
                                               "space.")],
    data: Annotated[Path, typer.Option(help="Slice store.")],
    out: Annotated[Path, typer.Option(help="Study folder (trials, study.db, trials.csv, best.toml).")],
    trials: Annotated[int, typer.Option(help="Trials to run in this worker.")] = 10,
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL (default sqlite in OUT).")] = None,
    study: Annotated[str, typer.Option(help="Study name (workers sharing storage join it).")] = "brainvae",
    steps: Annotated[Optional[int], typer.Option(help="Steps per trial.")] = None,
    budget: Annotated[Optional[str], typer.Option(help="Wall-clock budget per trial, e.g. 5m.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs per trial.")] = None,
    seed: int = 0, overrides: Overrides = None, device: Device = "auto", quiet: Quiet = False,
    log_file: LogFile = None,
) -> None:
    """Search hyper-parameters with Optuna (TPE sampler, median pruning on validation loss)."""
    from .progress import log_to, say
    from .tune import tune

    cfg = load_run_config(config, overrides or ())
    cfg = replace(cfg, train=replace(cfg.train, steps=steps, budget=budget, epochs=epochs))
    with log_to(log_file, out):
        result = tune(cfg, data, out, trials=trials, storage=storage, study_name=study, device=device, seed=seed,
                      progress=not quiet)
        say(f"best of {result['completed']} completed trials ({result['pruned']} pruned): "
            f"{result['best_value']:.4f} nats/pixel with {result['best_params']} -> {out / 'best.toml'}")


Age = Annotated[Optional[float], typer.Option(help="Age in years, 0 to 120 (conditional models).")]
Sex = Annotated[Optional[str], typer.Option(help="M or F, also male / female (conditional models).")]
Position = Annotated[Optional[float], typer.Option(help="Slice position in the brain, 0..1 (conditional models).")]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Prior integration steps (ldm; default from its config).")]
Guidance = Annotated[Optional[float], typer.Option(
    help="Guidance scale (ldm): 1 = the model as trained; > 1 extrapolates away from the guide; 0 = the guide "
         "itself (the unconditional model, or the weak network).")]
Solver = Annotated[Optional[str], typer.Option(help="euler or heun (ldm; default from its config).")]
Guide = Annotated[Optional[str], typer.Option(
    help="What guidance extrapolates away from (ldm): unconditional (classifier-free guidance: sharper "
         "conditions) or weak (autoguidance with the model's weak network: fewer of its errors). Default from its config.")]
Sampler = Annotated[Optional[str], typer.Option(
    help="prior (its solver, with --steps, --guidance, --solver, --guide) or student (ldm: the distilled "
         "few-step network, where the model has one). Default from its config.")]


@app.command("compare")
@user_errors
def compare_cmd(
    configs: Annotated[list[str], typer.Argument(help="Shipped config names or run config TOMLs to compare "
                                                      "(one per architecture).")],
    data: Annotated[Path, typer.Option(help="Slice store from `brainvae data prepare`.")],
    out: Annotated[Path, typer.Option(help="Comparison folder: one run per config and seed, leaderboard.")] = Path("runs/compare"),
    budget: Annotated[Optional[str], typer.Option(help="Wall-clock budget per run, e.g. 20m.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Step budget per run (instead of --budget).")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per config (confidence intervals when > 1).")] = 1,
    n: Annotated[int, typer.Option("-n", "--n", help="Samples per evaluation.")] = 1000,
    evaluate: Annotated[bool, typer.Option(help="Evaluate each run (brainvae evaluate).")] = True,
    include: Annotated[Optional[list[str]], typer.Option(
        "--include", help="A finished run or shipped model (e.g. ixi-t1-128) to evaluate on the same store and "
                          "list below the board as a reference, not trained again (repeatable).")] = None,
    overrides: Overrides = None, device: Device = "auto", force: Force = False, quiet: Quiet = False,
    log_file: LogFile = None,
) -> None:
    """Train several architectures with the same seed and budget, evaluate each, write a leaderboard.
    --set applies to every config; the overridden configs are written to OUT/configs/."""
    from .compare import compare
    from .config import resolve_run_config, save_config
    from .progress import log_to, say

    paths = [resolve_run_config(c) for c in configs]
    if overrides:  # compare reads config files: give it the overridden ones, named as the originals
        cfgs = [load_run_config(p, overrides) for p in paths]  # all validated before anything is written
        paths = [out / "configs" / p.name for p in paths]
        for cfg, path in zip(cfgs, paths):
            save_config(cfg, path)
    with log_to(log_file, out):
        board = compare(paths, data, out, budget=budget, steps=steps, seeds=seeds, n_eval=n, device=device,
                        evaluate=evaluate, force=force, progress=not quiet, log=say, include=include or [])
        say(board.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        say(f"leaderboard -> {out / 'leaderboard.csv'}")


@app.command("sample")
@user_errors
def sample_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder, checkpoint file or shipped model name (`brainvae models`).")],
    n: Annotated[int, typer.Option("-n", help="Number of slices.")] = 64,
    age: Age = None, sex: Sex = None, position: Position = None, seed: int = 0,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default RUN/samples).")] = None,
    steps: Steps = None, guidance: Guidance = None, solver: Solver = None, guide: Guide = None,
    sampler: Sampler = None,
    device: Device = "auto", force: Force = False, log_file: LogFile = None,
) -> None:
    """Generate new slices: PNG grid, one greyscale PNG each, NIfTI (images along axis 4), .npy, meta.json."""
    from . import generate as G
    from .errors import OutputExistsError
    from .progress import log_to, say
    from .train.engine import resolve_device

    out = out or RunDir.resolve(run).output("samples")
    refuse_overlap(out, [RunDir.resolve(run).path], inside_ok=True)  # --out RUN --force would delete the run
    if out.exists() and not force:
        raise OutputExistsError(out)
    with log_to(log_file, out):
        model = G.load(run, device=resolve_device(device))
        cond = G.conditions(model, age, sex, position)
        say(f"sample {n} slices from {run} ({model.arch}, seed {seed}) -> {out}", err=True)
        if warning := RunDir.resolve(run).age_warning(age):
            say(f"warning: {warning}", err=True, fg="yellow")
        options = {"steps": steps, "guidance": guidance, "solver": solver, "guide": guide, "sampler": sampler}
        images = G.sample_images(model, n, cond, seed, sampler=options)
        G.export_samples(images, out, G.spacing_of(run), G.sample_meta(run, model, n, seed, cond, options),
                         force=force)
        say(f"{n} samples -> {out}")


@app.command("reconstruct")
@user_errors
def reconstruct_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    data: Annotated[Path, typer.Option(help="Slice store.")],
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    n: Annotated[int, typer.Option("-n")] = 16, seed: int = 0,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default RUN/reconstructions).")] = None,
    device: Device = "auto", force: Force = False, resize: Resize = False,
) -> None:
    """Reconstructions beside their originals (top row real, bottom row reconstructed)."""
    from . import generate as G
    from .train.engine import resolve_device

    refuse_output_over(out, run, (data,))
    store = checked_store(run, data, resize)
    model = G.load(run, device=resolve_device(device))
    real, recon = G.reconstruct_split(model, store, split, n, seed)
    out = out or RunDir.resolve(run).output("reconstructions")
    G.export_reconstructions(real, recon, out, G.spacing_of(run),
                             {"run": str(run), "store": str(data), "split": split, "n": len(real)}, split=split,
                             force=force)
    typer.echo(f"{len(real)} reconstructions -> {out / 'grid.png'}")


@app.command("interpolate")
@user_errors
def interpolate_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    a: Annotated[int, typer.Argument(help="First slice (row of the store's manifest).")],
    b: Annotated[int, typer.Argument(help="Second slice.")],
    data: Annotated[Path, typer.Option(help="Slice store.")],
    steps: int = 8,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default RUN/interpolation-A-B).")] = None,
    device: Device = "auto", force: Force = False, resize: Resize = False,
) -> None:
    """A latent interpolation strip between two real slices."""
    from . import generate as G
    from .train.engine import resolve_device

    refuse_output_over(out, run, (data,))
    store = checked_store(run, data, resize)
    model = G.load(run, device=resolve_device(device))
    strip = G.interpolate(model, store, a, b, steps)
    out = out or RunDir.resolve(run).output(f"interpolation-{a}-{b}")
    G.export(strip, out, G.spacing_of(run), {"run": str(run), "store": str(data), "a": a, "b": b}, force=force,
             ncol=steps, description=f"axis 4: {steps} decoded points from store slice {a} to slice {b}")
    typer.echo(f"interpolation strip -> {out / 'grid.png'}")


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder or shipped model name (`brainvae models`).")],
    data: Annotated[Path, typer.Option(help="Slice store with a test split (the one the run trained on).")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default RUN/eval).")] = None,
    n: Annotated[int, typer.Option("-n", "--n", help="Samples, and real slices per set (capped by the test split).")] = 1000,
    seed: int = 0,
    extractor: Annotated[Optional[Path], typer.Option(help="TorchScript feature extractor (.pt) for one more "
                                                           "feature space.")] = None,
    featnet_steps: Annotated[Optional[int], typer.Option(help="Training steps of the store's feature network "
                                                               "(default 300; trained once per store, cached).")] = None,
    predictor_steps: Annotated[Optional[int], typer.Option(help="Training steps of the store's age / sex predictors "
                                                                 "(default 300; cached).")] = None,
    split: Annotated[str, typer.Option(help="Real slices to measure against: test (to report) or val (to tune; "
                                            "default output RUN/eval-val).")] = "test",
    steps: Steps = None, guidance: Guidance = None, solver: Solver = None, guide: Guide = None,
    sampler: Sampler = None,
    device: Device = "auto", force: Force = False, quiet: Quiet = False, log_file: LogFile = None, resize: Resize = False,
) -> None:
    """Samples and reconstructions against real test slices (FD, KID, PRDC, memorisation...), each beside its floor."""
    from .evaluate.run_eval import evaluate_run
    from .progress import log_to, say
    from .train.engine import resolve_device

    refuse_output_over(out, run, (data, extractor))
    out = out or RunDir.resolve(run).output("eval" if split == "test" else f"eval-{split}")
    store = checked_store(run, data, resize)
    warning = RunDir.resolve(run).other_store_warning(store, split)  # an error when it holds training subjects

    def cell(v) -> str:
        return "" if v is None else f"{v:.4g}"

    with log_to(log_file, out):
        if warning:
            say(f"warning: {warning}", err=True, fg="yellow")
        say(f"evaluate {run} on {data} ({split} split, n = {n}) -> {out}", err=True)
        metrics = evaluate_run(run, store, out, n=n, seed=seed, extractor=extractor, force=force,
                               progress=not quiet, featnet_steps=featnet_steps, predictor_steps=predictor_steps,
                               device=resolve_device(device), split=split,
                               sampler={"steps": steps, "guidance": guidance, "solver": solver, "guide": guide,
                                        "sampler": sampler})
        say(f"{'metric':<34} {'model':>10} {'floor':>10} {'ratio':>8}")
        for row in metrics["summary"]:
            say(f"{row['metric']:<34} {cell(row['model']):>10} {cell(row['floor']):>10} {cell(row['ratio']):>8}")
        say(f"floor = real train vs real {split} slices (n = {metrics['n']}); -> {out / 'metrics.json'}")


@app.command("demo")
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path("demo_out"),
    subjects: Annotated[int, typer.Option(help="Simulated subjects.")] = 24,
    force: Force = False, quiet: Quiet = False, log_file: LogFile = None,
) -> None:
    """Run the whole pipeline on the embedded SIMULATED data (no download)."""
    from .demo import run_demo
    from .progress import log_to

    with log_to(log_file, out):
        run_demo(out, subjects=subjects, force=force, progress=not quiet)


@app.command("report")
@user_errors
def report_cmd(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="Run folder(s) to report on.")] = None,
    compare: Annotated[Optional[Path], typer.Option(help="Folder written by `brainvae compare` (leaderboard).")] = None,
    out: Annotated[Path, typer.Option(help="HTML file to write.")] = Path("report.html"),
    force: Force = False,
) -> None:
    """One self-contained HTML report (figures embedded) from run and comparison folders; recomputes nothing."""
    from .report.report import write_report

    path = write_report(runs or [], out, compare=compare, force=force)
    typer.echo(f"report on {len(runs or [])} run(s){' and ' + str(compare) if compare else ''} -> {path}")


quiz_app = typer.Typer(help="Blinded visual Turing test: readers tell real from synthetic slices.",
                       no_args_is_help=True, rich_markup_mode=None)
app.add_typer(quiz_app, name="quiz")


@quiz_app.command("make")
@user_errors
def quiz_make(
    run: Annotated[Path, typer.Argument(help="Run folder, checkpoint file or shipped model name (`brainvae models`).")],
    data: Annotated[Path, typer.Option(help="Slice store; real images come from its test split.")],
    n: Annotated[int, typer.Option("-n", "--n", help="Images in the quiz (half real, half synthetic).")] = 40,
    seed: int = 0,
    out: Annotated[Path, typer.Option(help="Folder for quiz.html, key.csv and meta.json.")] = Path("quiz"),
    device: Device = "auto", force: Force = False, resize: Resize = False, log_file: LogFile = None,
) -> None:
    """Write quiz.html (give it to readers) and its hidden key.csv (keep it)."""
    from .progress import log_to, say
    from .report.quiz import make_quiz
    from .train.engine import resolve_device

    refuse_output_over(out, run, (data,))
    checked_store(run, data, resize)
    with log_to(log_file, out):
        say(f"quiz make: {n - n // 2} samples of {run}, {n // 2} real test slices of {data} -> {out}", err=True)
        path = make_quiz(run, data, out, n=n, seed=seed, device=resolve_device(device), force=force)
        say(f"quiz of {n} images -> {path / 'quiz.html'} (give only this file to readers; "
            f"the key is {path / 'key.csv'})")


@quiz_app.command("score")
@user_errors
def quiz_score(
    answers: Annotated[Path, typer.Argument(help="Answers CSV exported from quiz.html.")],
    key: Annotated[Optional[Path], typer.Option(help="key.csv (default: beside the answers, else quiz/key.csv).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="JSON to write (default ANSWERS.score.json).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95 % intervals.")] = 2000,
    seed: int = 0, force: Force = False,
) -> None:
    """Accuracy, sensitivity, specificity (synthetic = positive) and AUC, with bootstrap 95 % intervals."""
    from .report.quiz import default_score_path, score_answers, score_lines, write_score

    result = score_answers(answers, key, n_boot=bootstrap, seed=seed)
    path = write_score(result, out or default_score_path(answers), force=force)
    for line in score_lines(result):
        typer.echo(line)
    typer.echo(f"-> {path}")


@data_app.command("anomalies")
@user_errors
def data_anomalies(
    store: Annotated[Path, typer.Argument(help="Healthy slice store.")],
    out: Annotated[Path, typer.Option(help="New store with synthetic anomalies and lesion.npy.")],
    split: Annotated[str, typer.Option(help="Split to copy: train, val, test or all.")] = "test",
    fraction: Annotated[float, typer.Option(help="Fraction of slices given one anomaly.")] = 0.5,
    kinds: Annotated[str, typer.Option(help="Comma-separated kinds: bright, dark, fpi, noise.")] = "bright,dark,fpi,noise",
    seed: int = 0, force: Force = False,
) -> None:
    """Paste SYNTHETIC anomalies (intensity-shifted ellipses, foreign patches, noise) into a healthy store."""
    from .data.synthetic_anomalies import anomalies_store

    new = anomalies_store(store, out, split=split, fraction=fraction, seed=seed, force=force,
                          kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()))
    counts = new.manifest["anomaly"].dropna().value_counts().to_dict()  # untouched slices read as NaN
    typer.echo(f"{len(new)} slices, {sum(counts.values())} with a synthetic anomaly {counts} -> {out}")


@app.command("anomaly")
@user_errors
def anomaly_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder (or shipped model name) trained on healthy slices.")],
    data: Annotated[Path, typer.Option(help="Store with lesion masks (e.g. BraTS, or `brainvae data anomalies`).")],
    val_cases: Annotated[Optional[str], typer.Option(help="Comma-separated validation cases (subjects).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Else: seeded random fraction of cases for validation.")] = 0.3,
    baseline: Annotated[Optional[list[Path]], typer.Option(help="Another run scored the same way (e.g. an `ae` "
                                                                 "run); repeat for several.")] = None,
    score: Annotated[str, typer.Option(help="The recommended score (primary_score, in the overlays): auto (the "
                                             "highest Dice on the validation cases), ensemble, or a model score: "
                                             "residual, residual_neg_smooth, recon_prob, kl_combined, restoration, "
                                             "...")] = "auto",
    ensemble: Annotated[int, typer.Option(help="Scores combined by the ensemble (the best on validation; "
                                                "0 = no ensemble).")] = 3,
    healthy: Annotated[Optional[Path], typer.Option(help="Store of healthy subjects (e.g. the training store): "
                                                         "label-free thresholds from its val split, case-level "
                                                         "detection against its test split.")] = None,
    fpr: Annotated[float, typer.Option(help="Label-free threshold: share of healthy brain pixels flagged.")] = 0.01,
    features: Annotated[Optional[Path], typer.Option(help="A fae run: its in-domain encoder's first level feeds "
                                                          "the perceptual scores (perceptual, perceptual_neg, "
                                                          "restoration_perceptual).")] = None,
    healthy_slices: Annotated[int, typer.Option(help="Healthy slices scored per split (evenly spaced, in "
                                                     "windows of --across slices).")] = 300,
    precision: Annotated[str, typer.Option(help="Autocast while scoring: auto (bf16 where the CPU has it "
                                                "natively), fp32, bf16 or fp16.")] = "auto",
    split: Annotated[Optional[str], typer.Option(help="Only this split of the store (default: all slices).")] = None,
    samples: Annotated[int, typer.Option(help="Posterior samples for the reconstruction probability.")] = 8,
    erode: Annotated[int, typer.Option(help="Brain-mask erosion (px).")] = 3,
    median: Annotated[int, typer.Option(help="Median filter size (px; 1 = off).")] = 5,
    across: Annotated[int, typer.Option(help="Mean over this many neighbouring slices of a case (through-plane; "
                                             "1 = off).")] = 1,
    min_area: Annotated[int, typer.Option(help="Smallest connected component kept after thresholding (px).")] = 10,
    nifti: Annotated[bool, typer.Option(help="Write each case's primary score and mask as NIfTI on its source "
                                             "scan (OUT/maps/).")] = True,
    batch_size: int = 64,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default RUN/anomaly).")] = None,
    seed: int = 0, device: Device = "auto", force: Force = False, quiet: Quiet = False, resize: Resize = False,
    log_file: LogFile = None,
) -> None:
    """Anomaly localisation: pixel AUROC/AUPRC, Dice at a validation threshold, slice AUROC, overlays."""
    from .data.store import SliceStore
    from .evaluate.anomaly import AnomalyConfig, evaluate_anomaly, require_lesions, summary_lines
    from .evaluate.anomaly_scores import PostProcess
    from .progress import log_to, say
    from .train.engine import resolve_device

    require_lesions(SliceStore(data))  # the data's own problem first, as evaluate_anomaly reports it
    refuse_output_over(out, run, (data, healthy, features, *(baseline or ())))
    checked_store(run, data, resize)
    if healthy is not None:
        checked_store(run, healthy, resize)

    cases = tuple(c.strip() for c in val_cases.split(",") if c.strip()) if val_cases else None
    cfg = AnomalyConfig(baselines=tuple(baseline or ()), val_cases=cases, val_fraction=val_fraction, primary=score,
                        ensemble=ensemble, healthy=healthy, fpr=fpr, features=features,
                        healthy_slices=healthy_slices, nifti=nifti,
                        precision=precision, split=split, n_samples=samples,
                        post=PostProcess(erode=erode, median=median, across=across, min_area=min_area),
                        batch_size=batch_size, seed=seed)
    target = out or RunDir.resolve(run).output("anomaly")
    with log_to(log_file, target):
        say(f"anomaly {run} on {data}{f' ({split} split)' if split else ''} -> {target}", err=True)
        summary = evaluate_anomaly(run, data, out, cfg, device=resolve_device(device), force=force,
                                   progress=not quiet)
        if not quiet:
            for line in summary_lines(summary):
                say(line)
        say(f"{len(summary['cases']['test'])} test cases, threshold from {len(summary['cases']['validation'])} "
            f"validation cases -> {summary['out']}/metrics.json")


@app.command("utility")
@user_errors
def utility_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder of a model conditioned on age and sex (e.g. cvae).")],
    data: Annotated[Path, typer.Option(help="Slice store (train split for training, test split for scoring).")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default RUN/utility).")] = None,
    ratios: Annotated[str, typer.Option(help="Synthetic:real ratios of the mixed arms, comma-separated.")] = "0.5,1,2",
    steps: Annotated[int, typer.Option(help="Classifier training steps, the same for every arm.")] = 400,
    repeats: Annotated[int, typer.Option(help="Classifier seeds per arm (scores are averaged).")] = 1,
    seed: int = 0, device: Device = "auto", force: Force = False, quiet: Quiet = False, log_file: LogFile = None,
) -> None:
    """Does synthetic data help? Sex and age-band classifiers on real, real+synthetic and synthetic slices."""
    from .evaluate.utility import UtilityConfig, format_table, parse_ratios, write_utility
    from .progress import log_to, say

    refuse_output_over(out, run, (data,))
    cfg = UtilityConfig(ratios=parse_ratios(ratios), steps=steps, repeats=repeats, seed=seed)
    out = out or RunDir.resolve(run).output("utility")
    with log_to(log_file, out):
        say(f"utility of {run} on {data}: synthetic:real ratios {', '.join(f'{r:g}' for r in cfg.ratios)}, "
            f"{steps} steps x {repeats} seed(s) per arm -> {out}", err=True)
        path, metrics = write_utility(run, data, out, cfg, device=device, force=force, progress=not quiet)
        say(format_table(metrics))
        say(f"balanced accuracy on {metrics['tasks']['sex']['n_test_subjects']} real test subjects, "
            f"{int(100 * cfg.level)} % subject-bootstrap CI -> {path / 'metrics.json'}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
