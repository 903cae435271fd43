"""Generation from a trained run: prior/conditional sampling, reconstructions, interpolation, export.

    model = brainvae.load("runs/vae")                # EMA weights of the best checkpoint
    x = model.generate(16, {"age": 70, "sex": "F"})  # (16, 1, H, W) in [0, 1]

Exports: a PNG grid and one PNG per image (8-bit greyscale), a NIfTI file, a
.npy array and meta.json. The NIfTI holds the images along its 4th axis,
(W, H, 1, n) with the store's in-plane spacing: they are separate 2-D images,
not slices of one volume, so no spacing between them is claimed; its header
description and meta.json say what they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .conditions import NEUTRAL, check_conditions
from .config import RunConfig, load_config
from .data.dataset import SliceBatches
from .data.store import SliceStore
from .errors import BrainVAEError
from .io.atomic import atomic_dir
from .io.nifti import save_nifti
from .rundir import RunDir
from .train.checkpoint import load_model


def checkpoint_path(run: str | Path, which: str = "best") -> Path:
    """The weights file of a run folder, a checkpoint file or a shipped model's name."""
    return RunDir.resolve(run).checkpoint(which)


def load(run: str | Path, which: str = "best", device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of a run folder, a checkpoint file or a shipped model (``ixi-t1-128``), with EMA weights, in eval mode."""
    return load_model(checkpoint_path(run, which), device=device)


def conditions(model, age: float | None, sex: str | float | None, position: float | None) -> dict | None:
    """User options -> validated cond dict (``conditions.check_conditions``); refuses conditions the model was
    not trained with."""
    return check_conditions({"age": age, "sex": sex, "position": position}, tuple(model.config.conditions),
                            model.arch)


@torch.no_grad()
def sample_images(model, n: int, cond: dict | None, seed: int, batch_size: int = 256,
                  precision: str = "auto", sampler: dict | None = None) -> np.ndarray:
    """n samples as (n, H, W) float32, reproducible from ``seed`` (one generator for all batches;
    autocast as ``autocast_dtype(precision)``: bf16 only where it is native). A condition is one value for all samples or n values
    (sample i gets the i-th). Runs on the model's inference copy (BatchNorm folded, channels-last), through
    ``model.generate``, which checks the conditions and the ``sampler`` options (those of a model with a learned
    prior, ``model.sample_options``: e.g. steps, guidance, solver)."""
    from .hardware import autocast, autocast_dtype

    g = torch.Generator(device=model.device).manual_seed(seed)
    dtype = autocast_dtype(precision, model.device)
    model = model.for_inference()
    # (n,) per condition; numpy input is copied: pandas hands out read-only arrays, which torch warns about
    per_sample = {k: torch.as_tensor(np.array(v, np.float32) if isinstance(v, np.ndarray) else v,
                                     dtype=torch.float32, device=model.device)
                  for k, v in (cond or {}).items() if np.ndim(v)}
    out = []
    with autocast(model.device, dtype):
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            c = None if cond is None else {k: per_sample[k][start:stop] if k in per_sample else v
                                           for k, v in cond.items()}
            out.append(model.generate(stop - start, c, g, **(sampler or {})).float().clamp(0, 1)[:, 0].cpu().numpy())
    return np.concatenate(out)


def grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """(n, H, W) -> one (rows * (H + pad), cols * (W + pad)) mosaic, row-major."""
    n, h, w = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    canvas = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad), np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return canvas


def save_png(path: Path, image: np.ndarray) -> None:
    """An 8-bit greyscale PNG of an image in [0, 1] (0 black, 1 white)."""
    from PIL import Image

    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


def spacing_of(run: str | Path) -> float:
    """In-plane spacing (mm) of the store the run trained on, rescaled to the model's image size."""
    rd = RunDir.resolve(run)
    store_cfg = rd.provenance().get("store_config", {})
    if not store_cfg or not rd.config_file.exists():
        return 1.0
    size = load_config(RunConfig, rd.config_file).model_config().image_size
    fov = store_cfg.get("spacing", store_cfg.get("fov_mm", 192.0) / store_cfg.get("size", 128)) * store_cfg.get("size", 128)
    return fov / size


def export(images: np.ndarray, out: Path, spacing: float, meta: dict, *, description: str, force: bool = False,
           ncol: int | None = None) -> Path:
    """Write grid.png, png/NNNN.png, slices.nii.gz, slices.npy and meta.json atomically into ``out``.

    ``description`` (at most 80 characters) says what the images are, e.g. which are real and which
    reconstructed; it goes into the NIfTI header and meta.json."""
    with atomic_dir(out, force=force) as tmp:
        save_png(tmp / "grid.png", grid(images, ncol))
        (tmp / "png").mkdir()
        for i, img in enumerate(images):
            save_png(tmp / "png" / f"{i:04d}.png", img)
        # (n, H, W) display arrays -> (W, H, 1, n): i runs to patient left, j to posterior, image n along axis 4
        affine = np.diag([-spacing, -spacing, spacing, 1.0])
        save_nifti(np.ascontiguousarray(images.transpose(2, 1, 0)[:, :, None]), affine, tmp / "slices.nii.gz",
                   description)
        np.save(tmp / "slices.npy", images)
        (tmp / "meta.json").write_text(json.dumps({"images": description, **meta}, indent=2))
    return Path(out)


def sample_meta(run: str | Path, model, n: int, seed: int, cond: dict | None, sampler: dict | None) -> dict:
    """meta.json of sampled images: the checkpoint (path, SHA-256, step), the seed, ``cond``: each condition of
    the model as used: the value given (sex "M" / "F"), or for one left out "not given (set to 0.5)" where the
    model sets it to ``conditions.NEUTRAL`` (``fills_missing_conditions``), else "not given (marginalised)"
    (ldm); and the sampler settings used."""
    from .train.checkpoint import describe_checkpoint

    cond = cond or {}
    sexes = {1.0: "M", -1.0: "F", 0.0: "unknown"}

    def shown(key: str, value: float):
        return sexes[value] if key == "sex" else value

    def left_out(key: str) -> str:
        if model.fills_missing_conditions:
            return f"not given (set to {shown(key, NEUTRAL[key])})"
        return "not given (marginalised)"

    used = {k: shown(k, cond[k]) if k in cond else left_out(k) for k in model.config.conditions}
    return {"run": str(run), "checkpoint": describe_checkpoint(checkpoint_path(run)), "n": n, "seed": seed,
            "cond": used, "sampler": model.sampler_settings(**(sampler or {}))}


def export_samples(images: np.ndarray, out: Path, spacing: float, meta: dict, *, force: bool = False) -> Path:
    """Independent samples (see ``export`` and ``sample_meta``)."""
    return export(images, out, spacing, meta, force=force,
                  description=f"{len(images)} independent samples along axis 4 (not slices of one volume)")


def export_reconstructions(real: np.ndarray, recon: np.ndarray, out: Path, spacing: float, meta: dict, *,
                           split: str, force: bool = False) -> Path:
    """Real slices (top row; images 0..n-1) above their reconstructions (bottom row; n..2n-1), see ``export``."""
    n = len(real)
    return export(np.concatenate([real, recon]), out, spacing, meta, force=force, ncol=n,
                  description=f"axis 4: 0-{n - 1} real {split} slices, {n}-{2 * n - 1} their reconstructions")


@torch.no_grad()
def reconstruct_split(model, store: SliceStore, split: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random slices of a split and their mean reconstructions, each (n, H, W)."""
    data = SliceBatches(store, split, model.config.image_size, model.device)
    idx = np.sort(np.random.default_rng(seed).choice(len(data), size=min(n, len(data)), replace=False))
    x, cond = data.batch(idx)
    recon = model.reconstruct(x, cond if model.config.conditions else None)
    return x[:, 0].float().cpu().numpy(), recon[:, 0].float().clamp(0, 1).cpu().numpy()


@torch.no_grad()
def interpolate(model, store: SliceStore, a: int, b: int, steps: int = 8) -> np.ndarray:
    """Decode a straight line between the latent means of store rows a and b: (steps, H, W)."""
    data = SliceBatches(store, None, model.config.image_size, model.device)
    for r in (a, b):
        if not 0 <= r < len(data):
            raise BrainVAEError(f"slice {r} is not in {store.path} (it has {len(data)} slices)")
    x, cond = data.batch(np.array([a, b]))
    cond = cond if model.config.conditions else None
    z = model.encode(x, cond).mode()  # (2, ...)
    if x.shape[0] == 2 and data.rows[a] > data.rows[b]:  # batch() sorts rows; restore a, b order
        z = z.flip(0)
        cond = {k: v.flip(0) for k, v in cond.items()} if cond else None
    t = torch.linspace(0, 1, steps, device=z.device).view(-1, *([1] * (z.dim() - 1)))
    zs = (1 - t) * z[:1] + t * z[1:]
    c = {k: (1 - t.flatten()) * v[0] + t.flatten() * v[1] for k, v in cond.items()} if cond else None
    return model.decode(zs, c)[:, 0].float().clamp(0, 1).cpu().numpy()
