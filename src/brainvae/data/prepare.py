"""``brainvae data prepare``: every volume of a dataset -> one slice store, in parallel."""

from __future__ import annotations

import os
import time
from contextlib import closing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ..config import PrepareConfig, to_dict
from ..errors import BrainVAEError, OutputExistsError
from ..io.atomic import refuse_overlap
from ..io.scan import Inventory, Scan
from ..progress import bar as progress_bar
from ..provenance import provenance
from .preprocess import PreparedVolume, prepare_volume
from .split import assign_splits
from .store import StoreWriter, write_part


def _init_worker() -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # parallelism comes from the processes


def _run_one(args: tuple[Scan, PrepareConfig, Path, str]) -> tuple[PreparedVolume, dict, np.ndarray | float] | BrainVAEError:
    """Prepare one volume and leave its pixels in ``parts`` (``store.write_part``); returns the volume without
    its pixels, the part files and the lesion fraction of each slice (NaN without a lesion mask)."""
    scan, cfg, parts, key = args
    try:
        result = prepare_volume(scan, cfg)
    except BrainVAEError as exc:  # a bad volume is reported, not fatal (unless --strict)
        return exc
    lesion_fraction = (result.lesion.reshape(len(result.lesion), -1).mean(axis=1)
                       if result.lesion is not None else np.nan)
    files = write_part(parts, key, result.slices, result.brain, result.lesion) if len(result.slices) else {}
    result.slices = result.brain = result.lesion = None  # pixels are on disk; keep the metadata
    return result, files, lesion_fraction


def prepare_dataset(inventory: Inventory, out: Path, cfg: PrepareConfig, *, workers: int | None = None,
                    strict: bool = False, force: bool = False, progress: bool = True) -> Path:
    """Preprocess all scans of ``inventory`` into the store ``out`` (see :mod:`brainvae.data.store`).

    ``out`` may not be, hold or lie inside an input (``--force`` would replace the dataset); with ``force``
    an existing store is replaced only once the new one is complete.
    """
    out = Path(out)
    refuse_overlap(out, [inventory.root, inventory.demographics, inventory.masks, inventory.lesions])
    if out.exists() and not force:  # fail before any work; StoreWriter checks again when it opens
        raise OutputExistsError(out)
    scans = inventory.scans
    problems = list(inventory.problems)
    if strict and problems:
        raise BrainVAEError("--strict: problems found in the inputs:\n  " + "\n  ".join(problems))
    problems += cohort_notes(inventory, cfg)
    workers = max(1, min(workers or os.cpu_count() or 1, len(scans)))
    start = time.perf_counter()
    kept: list[tuple[Scan, PreparedVolume, np.ndarray | float]] = []  # pixels already in the store
    with StoreWriter(out, (cfg.size, cfg.size), lesions=any(s.lesion for s in scans), force=force) as writer:
        parts = writer.parts
        jobs = [(s, cfg, parts, f"{k:06d}") for k, s in enumerate(scans)]
        # closing: on an error the workers stop before the store's temporary folder (with their parts) goes
        with closing(_map(jobs, workers, progress)) as outcomes:
            for scan, outcome in zip(scans, outcomes):
                if isinstance(outcome, BrainVAEError):
                    if strict:
                        raise outcome
                    problems.append(f"skipped: {outcome}")
                    continue
                result, files, lesion_fraction = outcome
                if len(result.slice_index) == 0:
                    problems.append(f"skipped: {scan.image}: no slice passes the slice selection")
                else:
                    writer.add_part(files, len(result.slice_index))
                    kept.append((scan, result, lesion_fraction))
        if not kept:
            raise BrainVAEError(f"{inventory.root}: no volume could be prepared:\n  " + "\n  ".join(problems))
        elapsed = time.perf_counter() - start

        subjects = pd.DataFrame([{
            "subject": s.subject, "hospital": s.hospital, "age": s.age, "sex": s.sex, "dataset": s.dataset,
            "source": str(s.image), "mask": str(s.mask) if s.mask else "", "lesion": str(s.lesion) if s.lesion else "",
            "checksum": r.checksum, "n_slices": len(r.slice_index), **r.stats,
        } for s, r, _ in kept])
        subjects["split"] = assign_splits(subjects.set_index("subject")[["sex", "age"]], cfg.split_ratios,
                                          cfg.age_bands, cfg.seed).to_numpy()
        manifest = pd.concat([pd.DataFrame({
            "subject": s.subject, "hospital": s.hospital, "age": s.age, "sex": s.sex,
            "split": split, "slice_index": r.slice_index, "position": r.position,
            "brain_fraction": r.brain_fraction,
            "lesion_fraction": lesion_fraction, "source": str(s.image), "checksum": r.checksum,
        }) for (s, r, lesion_fraction), split in zip(kept, subjects["split"])], ignore_index=True)
        info = provenance(
            source=str(inventory.root), dataset=inventory.dataset, demographics=str(inventory.demographics or ""),
            masks=str(inventory.masks or ""), n_volumes=len(scans), n_prepared=len(kept), n_slices=len(manifest),
            seconds=round(elapsed, 2), volumes_per_second=round(len(scans) / elapsed, 2), workers=workers,
            config=to_dict(cfg),
        )
        writer.finish(manifest, subjects, cfg, info, problems)
    return out


def cohort_notes(inventory: Inventory, cfg: PrepareConfig, limit: int | None = None) -> list[str]:
    """What the store will lack: subjects without age or sex, volumes that cannot be skull-stripped (no brain
    mask; BraTS volumes are already stripped). Subjects are listed, the first ``limit`` of them when given."""
    scans = inventory.scans
    source = f"in {inventory.demographics.name}" if inventory.demographics else \
        "(no demographics file found; give one with --demographics)"
    groups = [
        (f"age unknown {source}", [s.subject for s in scans if s.age is None]),
        (f"sex unknown {source}", [s.subject for s in scans if s.sex is None]),
        ("no skull stripping (no brain mask: intensities are normalised over the whole head; give masks with "
         "--masks)", [s.subject for s in scans if cfg.skull_strip and s.mask is None and s.dataset != "brats"]),
    ]
    notes = []
    for what, subjects in groups:
        if subjects:
            shown = subjects[:limit] if limit else subjects
            more = f" and {len(subjects) - len(shown)} more" if len(shown) < len(subjects) else ""
            notes.append(f"{what}: {len(subjects)} of {len(scans)} subjects: {', '.join(shown)}{more}")
    return notes


def _map(jobs: list, workers: int, progress: bool):
    """Results of ``_run_one`` in job order, as they complete, with a progress bar (counted before each result
    is handed on: the caller stops pulling after the last one)."""
    with progress_bar(total=len(jobs), unit="vol", desc="prepare", disable=not progress) as bar:
        if workers == 1:  # in this process, as in a worker (one ITK thread: the same registrations), then restored
            threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
            _init_worker()
            try:
                for job in jobs:
                    result = _run_one(job)
                    bar.update()
                    yield result
            finally:
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
            return
        pool = ProcessPoolExecutor(workers, initializer=_init_worker)
        try:
            for result in pool.map(_run_one, jobs, chunksize=1):
                bar.update()
                yield result
        finally:  # on an error or Ctrl-C, queued volumes are dropped instead of being waited for
            pool.shutdown(wait=True, cancel_futures=True)
