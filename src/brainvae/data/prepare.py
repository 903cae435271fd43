"""``brainvae data prepare``: every volume of a dataset -> one slice store, in parallel."""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..config import PrepareConfig, to_dict
from ..errors import BrainVAEError
from ..io.scan import Inventory, Scan
from ..provenance import provenance
from .preprocess import PreparedVolume, prepare_volume
from .split import assign_splits
from .store import write_store


def _init_worker() -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # parallelism comes from the processes


def _run_one(args: tuple[Scan, PrepareConfig]) -> PreparedVolume | BrainVAEError:
    scan, cfg = args
    try:
        return prepare_volume(scan, cfg)
    except BrainVAEError as exc:  # a bad volume is reported, not fatal (unless --strict)
        return exc


def prepare_dataset(inventory: Inventory, out: Path, cfg: PrepareConfig, *, workers: int | None = None,
                    strict: bool = False, force: bool = False, progress: bool = True) -> Path:
    """Preprocess all scans of ``inventory`` into the store ``out`` (see :mod:`brainvae.data.store`)."""
    out = Path(out)
    if out.exists() and not force:
        from ..errors import OutputExistsError

        raise OutputExistsError(out)
    scans = inventory.scans
    problems = list(inventory.problems)
    if strict and problems:
        raise BrainVAEError("--strict: problems found in the inputs:\n  " + "\n  ".join(problems))
    workers = max(1, min(workers or os.cpu_count() or 1, len(scans)))
    start = time.perf_counter()
    jobs = [(s, cfg) for s in scans]
    bar = tqdm(total=len(jobs), unit="vol", desc="prepare", disable=not progress)
    results: list[PreparedVolume | BrainVAEError] = []
    if workers == 1:
        _init_worker()
        for job in jobs:
            results.append(_run_one(job))
            bar.update()
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
            for result in pool.map(_run_one, jobs, chunksize=1):
                results.append(result)
                bar.update()
    bar.close()
    elapsed = time.perf_counter() - start

    kept: list[tuple[Scan, PreparedVolume]] = []
    for scan, result in zip(scans, results):
        if isinstance(result, BrainVAEError):
            if strict:
                raise result
            problems.append(f"skipped: {result}")
        elif len(result.slices) == 0:
            problems.append(f"skipped: {scan.image}: no slice passes the slice selection")
        else:
            kept.append((scan, result))
    if not kept:
        raise BrainVAEError(f"{inventory.root}: no volume could be prepared:\n  " + "\n  ".join(problems))

    subjects = pd.DataFrame([{
        "subject": s.subject, "hospital": s.hospital, "age": s.age, "sex": s.sex, "dataset": s.dataset,
        "source": str(s.image), "mask": str(s.mask) if s.mask else "", "lesion": str(s.lesion) if s.lesion else "",
        "checksum": r.checksum, "n_slices": len(r.slices), **r.stats,
    } for s, r in kept])
    subjects["split"] = assign_splits(subjects.set_index("subject")[["sex", "age"]], cfg.split_ratios,
                                      cfg.age_bands, cfg.seed).to_numpy()
    manifest = pd.concat([pd.DataFrame({
        "subject": s.subject, "hospital": s.hospital, "age": s.age, "sex": s.sex,
        "split": split, "slice_index": r.slice_index, "position": r.position,
        "brain_fraction": r.brain_fraction,
        "lesion_fraction": (r.lesion.reshape(len(r.lesion), -1).mean(axis=1) if r.lesion is not None else np.nan),
        "source": str(s.image), "checksum": r.checksum,
    }) for (s, r), split in zip(kept, subjects["split"])], ignore_index=True)

    arrays = {
        "images": np.concatenate([r.slices for _, r in kept]),
        "brain": np.concatenate([r.brain for _, r in kept]),
    }
    if any(r.lesion is not None for _, r in kept):
        arrays["lesion"] = np.concatenate([
            r.lesion if r.lesion is not None else np.zeros_like(r.brain) for _, r in kept])
    info = provenance(
        source=str(inventory.root), dataset=inventory.dataset, demographics=str(inventory.demographics or ""),
        masks=str(inventory.masks or ""), n_volumes=len(scans), n_prepared=len(kept), n_slices=len(manifest),
        seconds=round(elapsed, 2), volumes_per_second=round(len(scans) / elapsed, 2), workers=workers,
        config=to_dict(cfg),
    )
    return write_store(out, arrays, manifest, subjects, cfg, info, problems, force=force)
