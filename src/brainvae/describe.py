"""``brainvae data describe``: what is in a dataset, before anything is trained on it.

Every volume is read (in parallel) for its header as stored (shape, voxel
sizes, axis codes, dtype) and its foreground intensities; the output folder
holds ``subjects.csv`` (one row per scan), ``summary.json`` (counts, value
counts, age statistics, problems), ``problems.txt``, PNG figures and a
self-contained ``index.html``. A volume that cannot be read is listed as a
problem, not a crash.

Figures use the display convention of :mod:`brainvae.data.preprocess`: axial
slices anterior up with the patient's right on the image's left
(radiological); coronal and sagittal slices superior up; sagittal anterior on
the left.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import ndimage

from .errors import BrainVAEError, InputFileError, OutputExistsError
from .io.atomic import atomic_dir
from .io.ixi import HOSPITALS, field_strength
from .io.nifti import load_mask, load_volume, orientation
from .io.scan import Inventory, Scan
from .progress import bar as progress_bar
from .provenance import provenance
from .report.html import esc, figure_html, list_html, notice, page, png_bytes, table_html

HIST_BINS = 64
HIST_RANGE = (0.0, 1.5)  # foreground intensity divided by its 99th percentile
PLANES = ("axial", "coronal", "sagittal")
# Anatomical direction at each edge of a displayed slice: (top, bottom, left, right).
EDGE_LABELS = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}
CONVENTION = ("axial: anterior up, patient right on image left (radiological); "
              "coronal: superior up, right on left; sagittal: superior up, anterior on left")
SEX_COLOURS = {"M": "tab:blue", "F": "tab:red", "unknown": "tab:gray"}


@dataclass
class VolumeStats:
    """What describe learns from one volume."""

    shape: tuple[int, ...]  # as stored in the file
    zooms: tuple[float, float, float]  # voxel sizes in mm, as stored
    orientation: str  # axis codes of the file as stored, e.g. "PSR"
    dtype: str  # on-disk data type
    percentiles: tuple[float, float, float]  # 1st, 50th, 99th of the foreground
    brain_ml: float | None  # brain-mask volume, None without a mask
    histogram: np.ndarray  # (HIST_BINS,) density of foreground intensity / 99th percentile
    slices: dict[str, tuple[np.ndarray, float]] | None  # plane -> (2-D image, pixel aspect), montage only


def describe_volume(scan: Scan, *, with_slices: bool = False) -> VolumeStats:
    """Header facts and foreground intensity statistics of one scan.

    The foreground is the brain mask when the scan has one, else the voxels
    > 0. With ``with_slices``, also the three mid slices through the
    foreground's centre of mass, in the display convention.
    """
    volume = load_volume(scan.image)  # checks the header and data; reoriented to RAS
    header = nib.load(scan.image)  # lazy: the header as stored
    mask = load_mask(scan.mask, volume) if scan.mask is not None else None
    foreground = mask if mask is not None else volume.data > 0
    values = volume.data[foreground]
    if values.size == 0:
        raise InputFileError(scan.image, "no foreground voxel (no value > 0)")
    p1, p50, p99 = (float(p) for p in np.percentile(values, [1, 50, 99]))
    if p99 <= 0:
        raise InputFileError(scan.image, "the 99th percentile of the foreground is not positive")
    hist, _ = np.histogram(np.clip(values / p99, *HIST_RANGE), bins=HIST_BINS, range=HIST_RANGE, density=True)
    slices = None
    if with_slices:
        centre = np.round(ndimage.center_of_mass(foreground)).astype(int)
        slices = mid_slices(volume.data, volume.zooms, centre)
    return VolumeStats(
        shape=tuple(int(s) for s in header.shape),
        zooms=tuple(float(z) for z in header.header.get_zooms()[:3]),
        orientation=orientation(header),
        dtype=str(header.get_data_dtype()),
        percentiles=(p1, p50, p99),
        brain_ml=float(mask.sum() * np.prod(volume.zooms) / 1000) if mask is not None else None,
        histogram=hist.astype(np.float32),
        slices=slices,
    )


def mid_slices(data: np.ndarray, zooms: tuple[float, float, float],
               centre: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
    """Axial, coronal and sagittal slices of a RAS ``data[x, y, z]`` through ``centre``, ready to show.

    Returns plane -> (image, aspect) with rows top to bottom and the pixel
    aspect (row spacing / column spacing) for ``imshow``.
    """
    x, y, z = centre
    zx, zy, zz = zooms
    return {
        "axial": (data[::-1, ::-1, z].T, zy / zx),  # rows anterior -> posterior, cols right -> left
        "coronal": (data[::-1, y, ::-1].T, zz / zx),  # rows superior -> inferior, cols right -> left
        "sagittal": (data[x, ::-1, ::-1].T, zz / zy),  # rows superior -> inferior, cols anterior -> posterior
    }


def _describe_one(job: tuple[Scan, bool]) -> VolumeStats | str:
    """Describe one scan in a worker; a bad volume comes back as its error message, not a crash."""
    scan, with_slices = job
    try:
        return describe_volume(scan, with_slices=with_slices)
    except BrainVAEError as exc:
        return str(exc)


def _describe_all(jobs: list[tuple[Scan, bool]], workers: int, progress: bool) -> list[VolumeStats | str]:
    """Run :func:`_describe_one` over ``jobs`` in ``workers`` processes (inline for one), in order, with a bar."""
    results: list[VolumeStats | str] = []
    with progress_bar(total=len(jobs), unit="vol", desc="describe", disable=not progress) as bar, \
            (ProcessPoolExecutor(workers) if workers > 1 else nullcontext()) as pool:
        for result in (pool.map(_describe_one, jobs, chunksize=2) if pool else map(_describe_one, jobs)):
            results.append(result)
            bar.update()
    return results


def describe_dataset(inventory: Inventory, out: Path, *, force: bool = False, workers: int | None = None,
                     progress: bool = True, montage_subjects: int = 8) -> Path:
    """Describe every scan of ``inventory`` into the folder ``out`` (written atomically); return ``out``."""
    out = Path(out)
    if out.exists() and not force:  # fail before the long part
        raise OutputExistsError(out)
    scans = inventory.scans
    montage = _montage_choice(scans, montage_subjects)
    jobs = [(scan, i in montage) for i, scan in enumerate(scans)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))

    start = time.perf_counter()
    results = _describe_all(jobs, workers, progress)
    seconds = time.perf_counter() - start

    table = subjects_table(scans, results)
    problems = list(inventory.problems) + [
        f"unreadable: {r}" for r in results if isinstance(r, str)]
    simulated = is_simulated(inventory)
    summary = summarise(inventory, table, problems, simulated)
    summary["provenance"] = provenance(seconds_reading=round(seconds, 2), workers=workers)
    figures = {
        "subjects_by_hospital_sex": _plot_hospital_sex(table),
        "age_by_sex": _plot_age(table),
        "field_strength": _plot_field_strength(table),
        "geometry": _plot_geometry(table),
        "intensity_histograms": _plot_intensities(table, results),
        "montage": _plot_montage([(scans[i], results[i]) for i in montage]),
    }
    pngs = {name: png_bytes(fig) for name, fig in figures.items() if fig is not None}

    with atomic_dir(out, force) as tmp:
        table.to_csv(tmp / "subjects.csv", index=False)
        (tmp / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
        (tmp / "problems.txt").write_text("".join(f"{p}\n" for p in problems))
        for name, data in pngs.items():
            (tmp / f"{name}.png").write_bytes(data)
        (tmp / "index.html").write_text(_html(summary, table, pngs), encoding="utf-8")
    return out


def _montage_choice(scans: list[Scan], n: int) -> list[int]:
    """Indices of ``n`` scans spread evenly over the age range (unknown ages last), youngest first."""
    order = sorted(range(len(scans)), key=lambda i: (scans[i].age is None, scans[i].age or 0.0, scans[i].subject))
    if n >= len(order):
        return order
    return [order[i] for i in np.linspace(0, len(order) - 1, max(n, 0)).round().astype(int)]


def subjects_table(scans: list[Scan], results: list[VolumeStats | str]) -> pd.DataFrame:
    """One row per scan; the measured columns are empty for a volume that could not be read."""
    rows = []
    for scan, r in zip(scans, results):
        ok = isinstance(r, VolumeStats)
        rows.append({
            "subject": scan.subject,
            "hospital": scan.hospital,
            "field_strength_T": field_strength(scan.hospital),
            "modality": scan.modality,
            "age": scan.age,
            "sex": sex_label(scan.sex),
            "shape": "x".join(str(s) for s in r.shape) if ok else "",
            "voxel_size_mm": "x".join(f"{round(z, 3):g}" for z in r.zooms) if ok else "",
            "orientation": r.orientation if ok else "",
            "dtype": r.dtype if ok else "",
            "p1": r.percentiles[0] if ok else np.nan,
            "p50": r.percentiles[1] if ok else np.nan,
            "p99": r.percentiles[2] if ok else np.nan,
            "brain_ml": r.brain_ml if ok and r.brain_ml is not None else np.nan,
            "file": str(scan.image),
            "problem": "" if ok else r,
        })
    return pd.DataFrame(rows)


def sex_label(sex: object) -> str:
    """``"M"``, ``"F"`` or ``"unknown"`` (a missing sex may arrive as None or NaN)."""
    return sex if sex in ("M", "F") else "unknown"


def is_simulated(inventory: Inventory) -> bool:
    """True for the simulated cohort: hospital ``SIM``, or a ``SIMULATED`` column in the demographics."""
    if any(s.hospital == "SIM" for s in inventory.scans):
        return True
    path = inventory.demographics
    if path is None:
        return False
    if path.suffix.lower() in (".xls", ".xlsx"):
        columns = pd.read_excel(path, nrows=0, engine="calamine").columns
    else:
        columns = pd.read_csv(path, nrows=0).columns
    return any(str(c).strip().upper() == "SIMULATED" for c in columns)


def summarise(inventory: Inventory, table: pd.DataFrame, problems: list[str], simulated: bool) -> dict:
    """The numbers of ``summary.json``: counts, value counts, age statistics, problems."""
    read = table[table["problem"] == ""]
    by_hospital_sex = pd.crosstab(table["hospital"], table["sex"])
    return {
        "dataset": inventory.dataset,
        "root": str(inventory.root),
        "demographics": str(inventory.demographics) if inventory.demographics else None,
        "masks": str(inventory.masks) if inventory.masks else None,
        "simulated": simulated,
        "counts": {
            "subjects": len(table),
            "volumes_read": len(read),
            "volumes_unreadable": len(table) - len(read),
            "sex": _value_counts(table["sex"]),
            "by_hospital_sex": {h: {s: int(n) for s, n in row.items()} for h, row in by_hospital_sex.iterrows()},
            "with_age": int(table["age"].notna().sum()),
            "without_age": int(table["age"].isna().sum()),
            "without_demographics": int((table["age"].isna() & (table["sex"] == "unknown")).sum()),
            "subjects_without_images": len(inventory.subjects_without_images),
            "problems": len(problems),
        },
        "field_strength_T": {h: field_strength(h) for h in sorted(table["hospital"].unique())},
        "shapes": _value_counts(read["shape"]),
        "voxel_sizes_mm": _value_counts(read["voxel_size_mm"]),
        "orientations": _value_counts(read["orientation"]),
        "dtypes": _value_counts(read["dtype"]),
        "age_by_sex": _age_stats(table),
        "subjects_without_images": list(inventory.subjects_without_images),
        "problems": problems,
    }


def _value_counts(column: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in column.value_counts().sort_index().items()}


def _age_stats(table: pd.DataFrame) -> dict[str, dict]:
    groups = {sex: table.loc[table["sex"] == sex, "age"] for sex in sorted(table["sex"].unique())}
    groups["all"] = table["age"]
    stats = {}
    for name, ages in groups.items():
        ages = ages.dropna()
        stats[name] = {"n": len(ages), "mean": ages.mean(), "sd": ages.std(), "min": ages.min(), "max": ages.max()}
    return stats


def _json_safe(value):
    """NaN -> null and numpy scalars -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else round(float(value), 4)
    if isinstance(value, np.integer):
        return int(value)
    return value


# ----------------------------------------------------------------------------- figures


def _hospital_colours(hospitals) -> dict[str, str]:
    known = list(HOSPITALS)
    ordered = sorted(hospitals, key=lambda h: (h not in known, known.index(h) if h in known else 0, h))
    return {h: f"C{i % 10}" for i, h in enumerate(ordered)}


def _plot_hospital_sex(table: pd.DataFrame) -> Figure:
    counts = pd.crosstab(table["hospital"], table["sex"])
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    width = 0.8 / len(counts.columns)
    x = np.arange(len(counts.index))
    for i, sex in enumerate(counts.columns):
        bars = ax.bar(x + (i - (len(counts.columns) - 1) / 2) * width, counts[sex], width,
                      label=sex, color=SEX_COLOURS.get(sex))
        ax.bar_label(bars)
    ax.set_xticks(x, counts.index)
    ax.set_ylabel("subjects")
    ax.set_title("Subjects per hospital by sex")
    ax.legend()
    return fig


def _plot_age(table: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    aged = table.dropna(subset=["age"])
    if aged.empty:
        ax.text(0.5, 0.5, "no ages known", ha="center", va="center", transform=ax.transAxes)
    else:
        sexes = sorted(aged["sex"].unique())
        bins = np.histogram_bin_edges(aged["age"], bins=min(20, max(5, len(aged) // 5)))
        ax.hist([aged.loc[aged["sex"] == s, "age"] for s in sexes], bins=bins, label=sexes,
                color=[SEX_COLOURS.get(s) for s in sexes])
        ax.legend()
    ax.set_xlabel("age (years)")
    ax.set_ylabel("subjects")
    ax.set_title(f"Age by sex ({len(aged)} of {len(table)} subjects with an age)")
    return fig


def _plot_field_strength(table: pd.DataFrame) -> Figure:
    labels = table["field_strength_T"].map(lambda t: "unknown" if np.isnan(t) else f"{t:g} T")
    counts = pd.crosstab(labels, table["hospital"])
    colours = _hospital_colours(counts.columns)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    bottom = np.zeros(len(counts.index))
    for hospital in counts.columns:
        ax.bar(counts.index, counts[hospital], 0.5, bottom=bottom, label=hospital, color=colours[hospital])
        bottom += counts[hospital].to_numpy()
    ax.set_xlim(-1, len(counts.index))  # keep a single bar narrow
    ax.set_ylabel("subjects")
    ax.set_title("Field strength by hospital")
    ax.legend(title="hospital")
    return fig


def _plot_geometry(table: pd.DataFrame) -> Figure | None:
    read = table[table["problem"] == ""]
    if read.empty:
        return None
    fig = Figure(figsize=(12, 3))
    for ax, (column, title) in zip(fig.subplots(1, 3), [("shape", "shape (voxels, as stored)"),
                                                         ("voxel_size_mm", "voxel size (mm, as stored)"),
                                                         ("orientation", "orientation (axis codes, as stored)")]):
        counts = read[column].value_counts().sort_index()
        bars = ax.barh(counts.index, counts.to_numpy(), height=0.5, color="tab:gray")
        ax.bar_label(bars)
        ax.set_ylim(-1, len(counts))  # keep a single bar narrow
        ax.set_xlabel("volumes")
        ax.set_title(title)
    fig.tight_layout()
    return fig


def _plot_intensities(table: pd.DataFrame, results: list[VolumeStats | str]) -> Figure | None:
    stats = [(h, r) for h, r in zip(table["hospital"], results) if isinstance(r, VolumeStats)]
    if not stats:
        return None
    colours = _hospital_colours({h for h, _ in stats})
    edges = np.linspace(*HIST_RANGE, HIST_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for hospital, r in stats:
        ax.plot(centres, r.histogram, color=colours[hospital], alpha=0.3, lw=1)
    for hospital, colour in colours.items():
        ax.plot([], [], color=colour, label=hospital)  # one legend entry per hospital
    ax.set_xlabel("intensity / 99th percentile of the foreground")
    ax.set_ylabel("density")
    ax.set_title(f"Foreground intensity histograms ({len(stats)} volumes)")
    ax.legend(title="hospital")
    return fig


def _plot_montage(chosen: list[tuple[Scan, VolumeStats | str]]) -> Figure | None:
    shown = [(s, r) for s, r in chosen if isinstance(r, VolumeStats) and r.slices is not None]
    if not shown:
        return None
    fig = Figure(figsize=(2.2 * len(shown), 7.2))
    axes = np.asarray(fig.subplots(len(PLANES), len(shown), squeeze=False))
    for col, (scan, r) in enumerate(shown):
        age = "age ?" if scan.age is None else f"{scan.age:.0f} y"
        axes[0, col].set_title(f"{scan.subject}\n{age}, {sex_label(scan.sex)}", fontsize=9)
        for row, plane in enumerate(PLANES):
            ax = axes[row, col]
            image, aspect = r.slices[plane]
            ax.imshow(image, cmap="gray", vmin=0, vmax=r.percentiles[2], aspect=aspect, interpolation="nearest")
            top, bottom, left, right = EDGE_LABELS[plane]
            for text, xy, ha, va in ((top, (0.5, 0.98), "center", "top"), (bottom, (0.5, 0.02), "center", "bottom"),
                                     (left, (0.02, 0.5), "left", "center"), (right, (0.98, 0.5), "right", "center")):
                ax.text(*xy, text, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=8,
                        fontweight="bold")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(plane)
    fig.suptitle(f"Slices through the foreground centre. {CONVENTION}", fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- HTML page

_CAPTIONS = {
    "subjects_by_hospital_sex": "Subjects per hospital by sex.",
    "age_by_sex": "Age distribution by sex.",
    "field_strength": "Scanner field strength, by hospital.",
    "geometry": "Image geometry as stored in the files (before reorientation to RAS).",
    "intensity_histograms": "Foreground intensity histograms (brain mask when given, else voxels > 0), "
                            "one line per volume, intensities divided by each volume's 99th percentile.",
    "montage": f"Mid slices of subjects spread over the age range ({CONVENTION}).",
}


def _html(summary: dict, table: pd.DataFrame, pngs: dict[str, bytes]) -> str:
    counts = summary["counts"]
    parts = []
    if summary["simulated"]:
        parts.append(notice("SIMULATED DATA: these volumes are brainvae phantoms, not scans of real people. "
                            "Nothing here describes real anatomy or a real population."))
    overview = pd.DataFrame([
        ("dataset", summary["dataset"]), ("folder", summary["root"]),
        ("demographics", summary["demographics"] or "none found"), ("brain masks", summary["masks"] or "none"),
        ("subjects with an image", counts["subjects"]), ("volumes read", counts["volumes_read"]),
        ("volumes unreadable", counts["volumes_unreadable"]), ("with age", counts["with_age"]),
        ("without age", counts["without_age"]), ("without demographics (no age, no sex)",
                                                 counts["without_demographics"]),
        ("in the spreadsheet without an image", counts["subjects_without_images"]),
        ("problems", counts["problems"]),
        ("created", summary["provenance"]["created"]),
        ("seconds reading volumes", summary["provenance"]["seconds_reading"]),
    ], columns=["", "value"])
    parts.append(table_html(overview))

    by_hospital = pd.DataFrame(counts["by_hospital_sex"]).T.fillna(0).astype(int)
    by_hospital["total"] = by_hospital.sum(axis=1)
    by_hospital.insert(0, "field strength (T)", [summary["field_strength_T"][h] for h in by_hospital.index])
    ages = pd.DataFrame(summary["age_by_sex"]).T
    parts += ["<h2>Subjects</h2>", "<h3>Per hospital and sex</h3>",
              table_html(by_hospital.rename_axis("hospital").reset_index()),
              "<h3>Age (years) by sex</h3>", table_html(ages.rename_axis("sex").reset_index())]
    parts += [figure_html(pngs[n], _CAPTIONS[n]) for n in ("subjects_by_hospital_sex", "age_by_sex", "field_strength")]

    parts.append("<h2>Images</h2>")
    for key, title in (("shapes", "Shape (as stored)"), ("voxel_sizes_mm", "Voxel size in mm (as stored)"),
                       ("orientations", "Orientation (axis codes, as stored)"), ("dtypes", "Data type")):
        values = pd.DataFrame(list(summary[key].items()), columns=[title, "volumes"])
        parts.append(table_html(values))
    parts += [figure_html(pngs[n], _CAPTIONS[n]) for n in ("geometry", "intensity_histograms", "montage")
              if n in pngs]

    parts += [f"<h2>Problems ({len(summary['problems'])})</h2>", list_html(summary["problems"], empty="No problems.")]
    missing = summary["subjects_without_images"]
    parts.append(f"<details><summary>{len(missing)} subjects in the spreadsheet without an image</summary>"
                 f"<p>{esc(', '.join(missing)) or 'none'}</p></details>")
    parts.append(f"<details><summary>All {len(table)} scans</summary>{table_html(table)}</details>")
    return page(f"Dataset description: {summary['root']}", "\n".join(parts))
