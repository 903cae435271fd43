"""Find the volumes of a dataset folder: BIDS, IXI, BraTS, or any folder of NIfTI files.

``find_scans`` returns one :class:`Scan` per subject with its image, optional
brain mask and lesion mask, and age/sex joined from demographics. Problems
(duplicates, other sessions, subjects missing from the spreadsheet) are reported,
not hidden: subjects with unknown age or sex are kept.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from ..errors import BrainVAEError, InputFileError
from .demographics import read_demographics
from .ixi import parse_ixi_name
from .nifti import is_nifti, strip_nifti_suffix

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
BIDS_SUFFIXES = {"T1": "T1w", "T2": "T2w", "PD": "PDw", "FLAIR": "FLAIR"}  # --modality -> BIDS suffix


@dataclass(frozen=True)
class Scan:
    subject: str
    image: Path
    modality: str
    dataset: str  # "bids" | "ixi" | "brats" | "nifti"
    hospital: str = ""
    mask: Path | None = None  # brain mask / parcellation (label > 0 = brain)
    lesion: Path | None = None  # lesion segmentation (label > 0 = abnormal)
    age: float | None = None
    sex: str | None = None  # "M" | "F" | None


@dataclass
class Inventory:
    root: Path
    dataset: str
    scans: list[Scan]
    problems: list[str] = field(default_factory=list)
    demographics: Path | None = None
    masks: Path | None = None
    lesions: Path | None = None
    subjects_without_images: list[str] = field(default_factory=list)


def find_scans(
    root: Path,
    modality: str = "T1",
    *,
    demographics: Path | None = None,
    masks: Path | None = None,
    lesions: Path | None = None,
    cache_dir: Path | None = None,
) -> Inventory:
    """Discover the scans of ``root`` (a folder, or an official IXI ``.tar``).

    Missing optional inputs are looked up beside the images: ``IXI.xls`` or
    ``demographics.csv`` (a BIDS dataset: its ``participants.tsv``); masks in
    ``masks/`` or ``IXI-<MOD>-dlmuse/``; lesion masks in ``lesions/``.
    """
    root = Path(root)
    if not root.exists():
        raise BrainVAEError(f"{root}: no such file or folder")
    if root.is_file() and tarfile.is_tarfile(root):
        root = _extract_archive(root, cache_dir)
    elif root.is_file():
        raise InputFileError(root, "expected a folder of NIfTI volumes or an IXI .tar archive")

    finder = next((find for _, recognise, find in LAYOUTS if recognise(root)), _find_ixi_or_nifti)
    inv = finder(root, modality, masks, lesions)
    if not inv.scans:
        raise BrainVAEError(f"{root}: no {modality} NIfTI volumes found (.nii / .nii.gz, IXI names, BIDS "
                            f"sub-*/anat folders or BraTS case folders)")

    if demographics is not None:
        _join_demographics(inv, demographics, require_all=True)
    elif inv.dataset == "bids":
        if (root / "participants.tsv").exists():  # BIDS makes its age and sex columns optional
            _join_demographics(inv, root / "participants.tsv", require_all=False)
    elif found := _first_existing([d / n for d in (root, root.parent) for n in ("IXI.xls", "demographics.csv")]):
        _join_demographics(inv, found, require_all=True)
    return inv


def _bids_subjects(root: Path) -> list[Path]:
    return sorted(d for d in root.glob("sub-*") if d.is_dir())


def _find_bids(root: Path, modality: str, masks: Path | None, lesions: Path | None) -> Inventory:
    """BIDS: ``sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>][_<key>-<value>...]_<suffix>.nii[.gz]``.

    One scan per subject, named by its folder (``sub-01``): with several sessions or runs the first (sorted;
    files outside a session come first), the others reported. The suffix is the modality's (``T1`` -> ``T1w``,
    ``T2`` -> ``T2w``, ``PD`` -> ``PDw``) or a BIDS suffix given as it is. Masks and lesion masks (``--masks``,
    ``--lesions``) match an image when their name starts with its entities and ``_``
    (``sub-01_ses-1_desc-brain_mask.nii.gz`` for ``sub-01_ses-1_T1w.nii.gz``)."""
    suffix = BIDS_SUFFIXES.get(modality.upper(), modality)
    mask_files, lesion_files = (sorted(p for p in d.rglob("*") if is_nifti(p)) if d else [] for d in (masks, lesions))
    scans, problems = [], []
    for sub in _bids_subjects(root):
        files = sorted(p for p in [*sub.glob("anat/*"), *sub.glob("ses-*/anat/*")]
                       if is_nifti(p) and strip_nifti_suffix(p.name).endswith(f"_{suffix}"))
        if not files:
            problems.append(f"{sub.name}: no {suffix} image in anat/")
            continue
        image = files[0]
        if len(files) > 1:
            problems.append(f"{sub.name}: {len(files)} {suffix} images (sessions or runs); using "
                            f"{image.relative_to(sub)}, not {', '.join(str(p.relative_to(sub)) for p in files[1:])}")
        entities = strip_nifti_suffix(image.name)[:-len(suffix)]  # "sub-01_ses-1_"
        mask = next((p for p in mask_files if p.name.startswith(entities)), None)
        lesion = next((p for p in lesion_files if p.name.startswith(entities)), None)
        if masks is not None and mask is None:
            problems.append(f"{image.name}: no brain mask in {masks}")
        scans.append(Scan(sub.name, image, suffix, "bids", mask=mask, lesion=lesion))
    return Inventory(root, "bids", scans, problems, masks=masks, lesions=lesions)


def _find_ixi_or_nifti(root: Path, modality: str, masks: Path | None, lesions: Path | None) -> Inventory:
    files = sorted(p for p in root.rglob("*") if is_nifti(p))
    masks = masks or _first_existing([root / "masks", root / f"IXI-{modality}-dlmuse"])
    lesions = lesions or _first_existing([root / "lesions"])
    derived = {d.resolve() for d in (masks, lesions) if d is not None}
    images = [p for p in files if not any(d in p.resolve().parents for d in derived)]

    named = [(p, parse_ixi_name(p.name)) for p in images]
    ixi = [(p, n) for p, n in named if n is not None and n.suffix == ""]
    problems: list[str] = []
    scans: dict[str, Scan] = {}
    if ixi:
        dataset = "ixi"
        for p, n in ixi:
            if n.modality != modality:
                continue
            _add(scans, Scan(n.subject, p, n.modality, "ixi", n.hospital), problems)
    else:
        dataset = "nifti"
        for p in images:
            _add(scans, Scan(strip_nifti_suffix(p.name), p, modality, "nifti"), problems)

    out = []
    mask_files = _index_derived(masks)
    lesion_files = _index_derived(lesions)
    for s in scans.values():
        key = _derived_key(s.image.name)
        out.append(Scan(s.subject, s.image, s.modality, s.dataset, s.hospital,
                        mask=mask_files.get(key), lesion=lesion_files.get(key)))
        if masks is not None and key not in mask_files:
            problems.append(f"{s.image.name}: no brain mask in {masks}")
    return Inventory(root, dataset, out, problems, masks=masks, lesions=lesions)


def _add(scans: dict[str, Scan], scan: Scan, problems: list[str]) -> None:
    if scan.subject in scans:
        problems.append(f"duplicate subject {scan.subject}: {scans[scan.subject].image.name} and "
                        f"{scan.image.name}; using the first")
        return
    scans[scan.subject] = scan


def _derived_key(name: str) -> str:
    """Match a mask to its image: IXI subject+modality, else the file stem up to a '_' suffix."""
    n = parse_ixi_name(name)
    if n is not None:
        return f"{n.subject}-{n.modality}"
    return strip_nifti_suffix(name).split("_")[0]


def _index_derived(folder: Path | None) -> dict[str, Path]:
    if folder is None:
        return {}
    return {_derived_key(p.name): p for p in sorted(folder.rglob("*")) if is_nifti(p)}


def _brats_cases(root: Path) -> list[Path]:
    """Case folders ``<case>/<case>_{seg,t1,t1ce,t2,flair}.nii[.gz]``: with a segmentation (training releases)
    or without (validation releases); one subject per case either way."""
    dirs = [root] + sorted(d for d in root.iterdir() if d.is_dir())
    names = [f"_{kind}{ext}" for kind in ("seg", *BRATS_MODALITIES) for ext in (".nii.gz", ".nii")]
    return [d for d in dirs if any((d / f"{d.name}{name}").exists() for name in names)]


def _find_brats(root: Path, modality: str) -> Inventory:
    """BraTS case folders ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``; the seg is the lesion mask.

    BraTS volumes are skull-stripped: the brain mask is the image's non-zero
    support (``mask=None`` here; ``prepare`` derives it).
    """
    mod = modality.lower()
    if mod not in BRATS_MODALITIES:
        raise BrainVAEError(f"BraTS modality must be one of {BRATS_MODALITIES}, got {modality!r}")
    scans, problems = [], []
    for case in _brats_cases(root):
        image = _first_existing([case / f"{case.name}_{mod}.nii.gz", case / f"{case.name}_{mod}.nii"])
        seg = _first_existing([case / f"{case.name}_seg.nii.gz", case / f"{case.name}_seg.nii"])
        if image is None:
            problems.append(f"{case}: no {mod} volume")
            continue
        scans.append(Scan(case.name, image, modality.upper(), "brats", "BraTS", lesion=seg))
    return Inventory(root, "brats", scans, problems)


def _join_demographics(inv: Inventory, path: Path, *, require_all: bool) -> None:
    table, problems = read_demographics(path, require_all=require_all)
    inv.demographics = path
    inv.problems.extend(problems)
    joined = []
    for s in inv.scans:
        if s.subject in table.index:
            row = table.loc[s.subject]
            age = None if pd.isna(row["age"]) else float(row["age"])
            sex = row["sex"] if row["sex"] in ("M", "F") else None
            joined.append(Scan(s.subject, s.image, s.modality, s.dataset, s.hospital, s.mask, s.lesion, age, sex))
        else:
            joined.append(s)
            inv.problems.append(f"{s.subject}: not in {path.name}; age and sex unknown")
    inv.scans = joined
    have = {s.subject for s in inv.scans}
    inv.subjects_without_images = sorted(set(table.index) - have)


def _extract_archive(tar_path: Path, cache_dir: Path | None) -> Path:
    from .download import safe_extract

    stat = tar_path.stat()
    key = hashlib.sha1(f"{tar_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cache_dir = cache_dir or Path.home() / ".cache" / "brainvae" / "archives"
    dest = cache_dir / f"{tar_path.name.split('.')[0]}-{key}"
    if not (dest / ".complete").exists():
        safe_extract(tar_path, dest)
        (dest / ".complete").touch()
    # The spreadsheet usually sits beside the archive.
    for name in ("IXI.xls", "demographics.csv"):
        if (tar_path.parent / name).exists() and not (dest / name).exists():
            (dest / name).symlink_to((tar_path.parent / name).resolve())
    return dest


def _first_existing(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.exists()), None)


# Dataset layouts ``find_scans`` recognises, tried in order before the generic IXI / NIfTI-folder finder:
# (name, recognise(root) -> truthy, find(root, modality, masks, lesions) -> Inventory). A new format registers
# itself with ``register_layout`` (see CONTRIBUTING.md, "Adding a dataset format").
LAYOUTS: list[tuple[str, Callable, Callable]] = [
    ("bids", _bids_subjects, _find_bids),
    ("brats", _brats_cases, lambda root, modality, masks, lesions: _find_brats(root, modality)),
]


def register_layout(name: str, recognise: Callable[[Path], object], find: Callable[..., Inventory]) -> None:
    """Add a dataset layout, tried before the generic finder (and after the layouts registered before it)."""
    if name in {n for n, _, _ in LAYOUTS}:
        raise ValueError(f"dataset layout {name!r} registered twice")
    LAYOUTS.append((name, recognise, find))
