"""Generation from a trained run: prior/conditional sampling, reconstructions, interpolation, export.

    model = brainvae.load("runs/vae")               # EMA weights of the best checkpoint
    x = model.sample(16, {"age": 70, "sex": -1})    # (16, 1, H, W) in [0, 1]

Exports: a PNG grid, one PNG per slice, a NIfTI stack (slices along the third
axis, with the store's spacing, so it opens in ITK-SNAP / FSLeyes in the
display orientation) and a .npy array.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig, load_config
from .data.dataset import SliceBatches
from .data.store import SliceStore
from .errors import BrainVAEError
from .io.atomic import atomic_dir
from .io.nifti import save_nifti
from .rundir import RunDir
from .train.checkpoint import load_model

SEX_VALUES = {"m": 1.0, "male": 1.0, "+1": 1.0, "1": 1.0, "f": -1.0, "female": -1.0, "-1": -1.0}


def checkpoint_path(run: str | Path, which: str = "best") -> Path:
    """The weights file of a run folder, a checkpoint file or a shipped model's name."""
    return RunDir.resolve(run).checkpoint(which)


def load(run: str | Path, which: str = "best", device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of a run folder, a checkpoint file or a shipped model (``ixi-t1-128``), with EMA weights, in eval mode."""
    return load_model(checkpoint_path(run, which), device=device)


def parse_sex(sex: str | float | None) -> float | None:
    """M / male / +1 -> +1.0, F / female / -1 -> -1.0 (any case); numbers pass through (see check_conditions)."""
    if sex is None or not isinstance(sex, str):
        return sex
    value = SEX_VALUES.get(sex.strip().lower())
    if value is None:
        raise BrainVAEError(f"sex must be M or F (also male / female, +1 / -1), got {sex!r}")
    return value


# Valid values per condition in user units (ends included); sex: +1 male, -1 female, 0 unknown.
CONDITION_RANGES = {"age": (0.0, 120.0), "position": (0.0, 1.0)}


def check_conditions(cond: dict | None, allowed: tuple[str, ...], arch: str = "model") -> dict | None:
    """Validated sampling conditions in user units; keys the model is not conditioned on are refused.

    Values are scalars or (n,) arrays / tensors (sample i gets the i-th; NaN = unknown, allowed only in
    arrays, which come from data). Age in 0..120 years, position in 0..1, sex "M" / "F" (-> +1 / -1) or
    +1 / -1 / 0. None values are dropped; returns None when nothing is left."""
    if cond is None:
        return None
    if not isinstance(cond, dict):
        raise BrainVAEError(f"conditions must be a dict such as {{'age': 70, 'sex': 'F'}}, got {cond!r}")
    given = {k: v for k, v in cond.items() if v is not None}
    extra = sorted(set(given) - set(allowed))
    if extra:
        raise BrainVAEError(f"this {arch} model is not conditioned on {extra} "
                            f"(its conditions: {list(allowed) or 'none'})")
    out = {}
    for key, value in given.items():
        if key == "sex":
            value = parse_sex(value)
        try:
            arr = value.detach().double().cpu().numpy() if isinstance(value, torch.Tensor) \
                else np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise BrainVAEError(f"{key} must be a number or an array of numbers, got {value!r}") from None
        if key == "sex":
            ok, what = np.isin(arr, (-1.0, 0.0, 1.0)), "M or F (+1 male, -1 female, 0 unknown)"
        else:
            lo, hi = CONDITION_RANGES[key]
            ok, what = (arr >= lo) & (arr <= hi), f"within {lo:g}..{hi:g}" + (" years" if key == "age" else "")
        ok |= np.isnan(arr) & (arr.ndim > 0)
        if not ok.all():
            raise BrainVAEError(f"{key} must be {what}, got {arr[~ok].flat[0].item() if arr.ndim else value!r}")
        out[key] = float(arr) if arr.ndim == 0 else value
    return out or None


def conditions(model, age: float | None, sex: str | float | None, position: float | None) -> dict | None:
    """User options -> validated cond dict (see check_conditions); refuses conditions the model was not
    trained with."""
    return check_conditions({"age": age, "sex": sex, "position": position}, tuple(model.config.conditions),
                            model.arch)


@torch.no_grad()
def sample_images(model, n: int, cond: dict | None, seed: int, batch_size: int = 256,
                  precision: str = "auto", sampler: dict | None = None) -> np.ndarray:
    """n samples as (n, H, W) float32, reproducible from ``seed`` (one generator for all batches;
    autocast as ``autocast_dtype(precision)``: bf16 only where it is native). A condition is one value for all samples or n values
    (sample i gets the i-th). Runs on the model's inference copy (BatchNorm folded, channels-last).
    ``sampler``: options of a model with a learned prior (``model.sample_options``: e.g. steps, guidance, solver)."""
    from .train.engine import autocast_dtype

    sampler = model.check_sample_options(sampler)

    g = torch.Generator(device=model.device).manual_seed(seed)
    dtype = autocast_dtype(precision, model.device)
    model = model.for_inference()
    # (n,) per condition; numpy input is copied: pandas hands out read-only arrays, which torch warns about
    per_sample = {k: torch.as_tensor(np.array(v, np.float32) if isinstance(v, np.ndarray) else v,
                                     dtype=torch.float32, device=model.device)
                  for k, v in (cond or {}).items() if np.ndim(v)}
    out = []
    with torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None):
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            c = None if cond is None else {k: per_sample[k][start:stop] if k in per_sample else v
                                           for k, v in cond.items()}
            out.append(model.sample(stop - start, c, g, **sampler).float().clamp(0, 1)[:, 0].cpu().numpy())
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
    from matplotlib import image as mpimg

    mpimg.imsave(path, np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1)


def spacing_of(run: str | Path) -> float:
    """In-plane spacing (mm) of the store the run trained on, rescaled to the model's image size."""
    rd = RunDir.resolve(run)
    store_cfg = rd.provenance().get("store_config", {})
    if not store_cfg or not rd.config_file.exists():
        return 1.0
    size = load_config(RunConfig, rd.config_file).model_config().image_size
    fov = store_cfg.get("spacing", store_cfg.get("fov_mm", 192.0) / store_cfg.get("size", 128)) * store_cfg.get("size", 128)
    return fov / size


def export(images: np.ndarray, out: Path, spacing: float, meta: dict, *, force: bool = False, ncol: int | None = None) -> Path:
    """Write grid.png, png/NNNN.png, slices.nii.gz, slices.npy and meta.json atomically into ``out``."""
    with atomic_dir(out, force=force) as tmp:
        save_png(tmp / "grid.png", grid(images, ncol))
        (tmp / "png").mkdir()
        for i, img in enumerate(images):
            save_png(tmp / "png" / f"{i:04d}.png", img)
        # (n, H, W) display arrays -> (W, H, n): i runs to patient left, j to posterior, k = slice
        affine = np.diag([-spacing, -spacing, spacing, 1.0])
        save_nifti(np.ascontiguousarray(images.transpose(2, 1, 0)), affine, tmp / "slices.nii.gz")
        np.save(tmp / "slices.npy", images)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return Path(out)


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
