"""``brainvae report``: one self-contained HTML file from run and comparison folders.

The report only reads what other commands wrote; it never loads a model or
recomputes a metric. Whatever exists is rendered, and whatever is absent is
named with the command that would make it. Per run folder it reads::

    RUN/config.toml           resolved run config ([model], [train])
    RUN/summary.json          steps, seconds, images/s, best validation loss
    RUN/metrics.jsonl         training and validation records -> training curves
    RUN/provenance.json       its "store" -> the store's manifest.csv, prepare.toml (dataset summary)
    RUN/eval/metrics.json     + eval/*.png      (brainvae evaluate)
    RUN/anomaly/metrics.json  + anomaly/*.png   (brainvae anomaly)
    RUN/utility/metrics.json  + utility/*.png   (brainvae utility)
    RUN/samples*/grid.png, RUN/reconstructions*/grid.png, RUN/interpolation-*/grid.png
    RUN/quiz*/*.score.json    (brainvae quiz score)

and from ``--compare DIR``: ``leaderboard.csv``, ``leaderboard.json``,
``runs.csv`` and any PNG. Nested metric dictionaries become tables with one row
per metric and columns such as value / floor / ratio, so a distance is always
shown beside its real-vs-real floor. Images are embedded as data URIs: the
file opens offline in any browser.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import BrainVAEError, OutputExistsError
from ..io.atomic import atomic_write_bytes
from .html import esc, figure_html, list_html, notice, page, png_bytes, png_data_uri, table_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Captions of the figures `brainvae evaluate` writes; any other PNG gets one from its file name.
CAPTIONS = {
    "real_vs_sample": "Real test slices beside samples drawn from the model (same display convention).",
    "reconstructions": "Test slices and their reconstructions by the model.",
    "closest_pairs": "Samples beside their closest real training slices: near-identical pairs would "
                     "indicate memorisation rather than generation.",
    "histograms": "Intensity histograms of real and synthetic slices.",
    "age_sex_grid": "Conditional samples over age and sex (conditional models only).",
    "interpolation": "Decoding a straight line in latent space between two real slices.",
    "utility": "Downstream utility: a model trained on synthetic slices, tested on real ones.",
}
# Columns that belong beside a metric's value, in this order when present.
LEADING_COLUMNS = ["value", "floor", "ratio", "mean", "std", "sd", "ci_low", "ci_high", "n"]
# A dict of scalars holding one of these keys is one metric (a row); any other dict is a group (a table).
ROW_KEYS = {"value", "floor", "ratio", "mean", "median", "std", "sd", "ci_low", "ci_high"}
FOLDED = ("provenance",)  # top-level metrics keys shown collapsed
NOT_HEADLINE = {"provenance", "summary", "figures", "feature_net", "settings", "config", "postprocess", "cases",
                "seed", "image_size", "n_requested", "closest_pairs"}
# Flat keys such as ``fid_floor`` join the row of ``fid`` as column ``floor``.
PAIRED_SUFFIXES = ("floor", "ratio", "std", "sd", "ci_low", "ci_high")
SECTIONS = (
    ("eval", "Evaluation", "brainvae evaluate"),
    ("anomaly", "Anomaly detection", "brainvae anomaly"),
    ("utility", "Downstream utility", "brainvae utility"),
)
TRAIN_EXTRA = {"img_per_s", "grad_norm", "kl_scale"}  # logged but not losses: not plotted as curves

_CSS = """
nav ul { columns: 2; } .run { border-top: 3px solid #888; margin-top: 3em; }
.present { color: #2a7a2a; } .absent { color: #a33; }
.tables { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
.small { font-size: .85em; } code { background: #f3f3f3; padding: 0 .2em; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; } .gallery figure { max-width: 48%; }
"""


# ----------------------------------------------------------------------------- reading


def _read_json(path: Path, problems: list[str]):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable JSON ({exc})")
        return None


def _read_toml(path: Path, problems: list[str]) -> dict | None:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        problems.append(f"{path}: unreadable TOML ({exc})")
        return None


def read_metrics_log(path: Path, problems: list[str]) -> pd.DataFrame:
    """``metrics.jsonl`` as one row per record (train and validation records interleaved)."""
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1  # e.g. the last line of an interrupted run
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
        else:
            bad += 1
    if bad:
        problems.append(f"{path}: {bad} line(s) could not be read and were skipped")
    return pd.DataFrame(records)


def _png(path: Path, problems: list[str]) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(f"{path}: unreadable ({exc})")
        return None
    if not data.startswith(PNG_MAGIC):
        problems.append(f"{path}: not a PNG file; not shown")
        return None
    return data


@dataclass
class Run:
    """What one run folder holds (``None`` where a file is absent)."""

    path: Path
    config: dict | None = None
    summary: dict | None = None
    log: pd.DataFrame | None = None
    provenance: dict | None = None
    parts: dict[str, dict | None] = field(default_factory=dict)  # eval/anomaly/utility -> metrics.json
    images: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)  # section -> [(name, png)]
    grids: list[tuple[str, bytes]] = field(default_factory=list)  # (folder name, grid.png)
    quiz: list[tuple[str, dict]] = field(default_factory=list)  # (file, score JSON)
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.resolve().name


def read_run(path: Path) -> Run:
    """Read everything a run folder holds; missing files stay ``None``."""
    path = Path(path)
    if not path.is_dir():
        raise BrainVAEError(f"{path}: no such run folder")
    run = Run(path)
    p = run.problems
    if (path / "config.toml").exists():
        run.config = _read_toml(path / "config.toml", p)
    if (path / "summary.json").exists():
        run.summary = _read_json(path / "summary.json", p)
    if (path / "metrics.jsonl").exists():
        run.log = read_metrics_log(path / "metrics.jsonl", p)
    if (path / "provenance.json").exists():
        run.provenance = _read_json(path / "provenance.json", p)
    for folder, _, _ in SECTIONS:
        d = path / folder
        if not d.is_dir():
            continue
        run.parts[folder] = _read_json(d / "metrics.json", p) if (d / "metrics.json").exists() else None
        known = list(CAPTIONS)
        files = sorted(d.glob("*.png"), key=lambda f: (known.index(f.stem) if f.stem in known else len(known), f.name))
        run.images[folder] = [(f.stem, data) for f in files if (data := _png(f, p))]
    for pattern in ("samples*", "reconstructions*", "interpolation*"):
        for d in sorted(path.glob(pattern)):
            if (d / "grid.png").exists() and (data := _png(d / "grid.png", p)):
                run.grids.append((d.name, data))
    for f in sorted(path.glob("quiz*/*.score.json")):
        if (score := _read_json(f, p)) is not None:
            run.quiz.append((str(f.relative_to(path)), score))
    if run.config is None and run.summary is None and run.log is None and not run.parts:
        raise BrainVAEError(f"{path}: not a brainvae run folder (no config.toml, summary.json, "
                            "metrics.jsonl or eval/)")
    return run


def resolve_store(store: str, run: Path) -> Path | None:
    """The store a run's provenance names: as given (relative to the working folder), else beside the run."""
    p = Path(store)
    candidates = [p] if p.is_absolute() else [p, run / p, run.parent / p, run.parent.parent / p]
    return next((c for c in candidates if (c / "manifest.csv").exists()), None)


# ----------------------------------------------------------------------------- formatting


def fmt(value) -> str:
    """A cell's text: floats to 4 significant digits, lists joined, None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return ""
        return f"{v:.4g}"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in value) and len(value) <= 12:
            return ", ".join(fmt(v) for v in value)
        return json.dumps(value)[:200]
    if isinstance(value, dict):
        return json.dumps(value)[:200]
    return str(value)


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, np.integer, np.floating))


def _kv_table(items, header=("", "value")) -> str:
    rows = [(str(k), fmt(v)) for k, v in items]
    return table_html(pd.DataFrame(rows, columns=list(header)))


def metric_rows(d: dict) -> tuple[pd.DataFrame | None, dict]:
    """One level of a metrics dict as a table: a row per metric, columns value/floor/ratio/....

    A scalar becomes the row's ``value``; a dict of scalars spreads over
    columns (its keys); a flat key ``x_floor`` joins the row of ``x``.
    Deeper dicts are returned separately (name -> dict) to become tables of their own.
    """
    rows: dict[str, dict] = {}
    nested: dict = {}
    for key, v in d.items():
        if _is_scalar(v) or (isinstance(v, list) and all(_is_scalar(x) for x in v)):
            rows.setdefault(str(key), {})["value"] = v
        elif isinstance(v, dict) and v and set(map(str, v)) & ROW_KEYS and \
                all(_is_scalar(x) or isinstance(x, list) for x in v.values()):
            rows.setdefault(str(key), {}).update({str(k): x for k, x in v.items()})
        else:
            nested[str(key)] = v
    for key in list(rows):  # fid_floor -> row fid, column floor
        for suffix in PAIRED_SUFFIXES:
            base = key[: -len(suffix) - 1]
            if key.endswith("_" + suffix) and base in rows and set(rows[key]) == {"value"}:
                rows[base][suffix] = rows.pop(key)["value"]
                break
    if not rows:
        return None, nested
    columns: list[str] = []
    for r in rows.values():
        columns += [c for c in r if c not in columns]
    columns = [c for c in LEADING_COLUMNS if c in columns] + [c for c in columns if c not in LEADING_COLUMNS]
    table = pd.DataFrame([[name] + [fmt(r.get(c)) for c in columns] for name, r in rows.items()],
                         columns=["metric"] + columns)
    return table, nested


def metrics_html(d, heading_level: int = 3, title: str = "", depth: int = 0) -> str:
    """Nested metrics as titled tables (see :func:`metric_rows`); lists of records as tables.

    At the top level a ``summary`` list of records comes first (the headline table) and
    ``provenance`` is folded away.
    """
    h = f"h{min(heading_level, 6)}"
    parts = [f"<{h}>{esc(title)}</{h}>"] if title else []
    if depth == 0 and isinstance(d, dict):
        d = dict(d)
        head = d.pop("summary") if _is_records(d.get("summary")) else None
        folded = {k: d.pop(k) for k in FOLDED if k in d}
        if head is not None:
            parts.append(metrics_html(head, heading_level, "summary", depth + 1))
        rest = metrics_html(d, heading_level, "", depth + 1)
        parts.append(f"<details open><summary>All metrics</summary>{rest}</details>" if head is not None else rest)
        for k, v in folded.items():
            parts.append(f"<details><summary>{esc(k)}</summary>{metrics_html(v, heading_level + 1, '', depth + 1)}"
                         "</details>")
        return "\n".join(parts)
    if isinstance(d, list):
        if d and all(isinstance(x, dict) for x in d):
            parts.append(table_html(pd.DataFrame([{k: fmt(v) for k, v in x.items()} for x in d])))
        else:
            parts.append(f"<p>{esc(fmt(d))}</p>")
        return "\n".join(parts)
    if not isinstance(d, dict):
        parts.append(f"<p>{esc(fmt(d))}</p>")
        return "\n".join(parts)
    table, nested = metric_rows(d)
    if table is not None:
        parts.append(table_html(table))
    for key, sub in nested.items():
        name = f"{title} / {key}" if title else key
        if depth >= 4:
            parts.append(f"<p><b>{esc(name)}</b>: <code>{esc(json.dumps(sub)[:500])}</code></p>")
        else:
            parts.append(metrics_html(sub, heading_level + 1, name, depth + 1))
    return "\n".join(parts)


def _is_records(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def flat_values(d, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """Numeric leaves of a metrics dict as ``a/b/c -> value`` (a metric's ``value`` key is dropped from its name).

    A top-level ``summary`` list of ``{metric, model, floor, ...}`` records, when present, is the
    headline and replaces the walk; settings and provenance are never headline numbers.
    """
    out: dict[str, float] = {}
    if depth == 0 and isinstance(d, dict) and _is_records(d.get("summary")) and \
            all("metric" in r for r in d["summary"]):
        for r in d["summary"]:
            for k, v in r.items():
                if k != "metric" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[str(r["metric"]) + ("" if k in ("model", "value") else f" ({k})")] = float(v)
        return out
    if isinstance(d, dict) and depth < 5:
        for k, v in d.items():
            if k in NOT_HEADLINE:
                continue
            name = prefix if k == "value" and prefix else (f"{prefix}/{k}" if prefix else str(k))
            if isinstance(v, dict):
                out.update(flat_values(v, name, depth + 1))
            elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                out[name] = float(v)
    return out


def image_html(data: bytes, caption: str) -> str:
    """An embedded PNG; a small one (a grid of 32-pixel slices) is shown enlarged with crisp pixels."""
    width = int.from_bytes(data[16:20], "big") if data[12:16] == b"IHDR" else 0
    if not 0 < width < 300:
        return figure_html(data, caption)
    scale = max(1, min(4, 400 // width))
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return (f'<figure><img src="{png_data_uri(data)}" alt="{esc(caption)}" '
            f'style="width: {width * scale}px; image-rendering: pixelated">{cap}</figure>')


def _caption(name: str) -> str:
    return CAPTIONS.get(name, name.replace("_", " ").replace("-", " ").capitalize() + ".")


# ----------------------------------------------------------------------------- figures


def training_curves(log: pd.DataFrame) -> Figure | None:
    """Loss components (train and validation) and the learning rate against the step."""
    if log is None or log.empty or "step" not in log:
        return None
    names: list[str] = []
    for col in log.columns:
        for split in ("train/", "val/"):
            if col.startswith(split) and (n := col[len(split):]) not in TRAIN_EXTRA and n not in names:
                names.append(n)
    names.sort(key=lambda n: (n != "loss", n))
    panels = names[:5] + (["lr"] if "lr" in log else [])
    if not panels:
        return None
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig = Figure(figsize=(4.2 * ncol, 3.0 * nrow))
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for ax, name in zip(axes, panels):
        for split, style in (("train/", dict(lw=1, alpha=0.8)), ("val/", dict(lw=2, marker="o", ms=3))):
            col = name if name == "lr" and split == "train/" else f"{split}{name}"
            if name == "lr" and split == "val/":
                continue
            if col in log:
                s = log[["step", col]].dropna()
                if not s.empty:
                    ax.plot(s["step"], s[col], label=split.rstrip("/") if name != "lr" else "lr", **style)
        _robust_ylim(ax, [log[c].dropna().to_numpy() for c in (f"train/{name}", f"val/{name}") if c in log])
        ax.set_title(name if name != "lr" else "learning rate", fontsize=10)
        ax.set_xlabel("step")
        if name != "lr":
            ax.set_ylabel("nats / pixel")
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _robust_ylim(ax, series: list[np.ndarray]) -> None:
    """Keep the first few steps' large losses from flattening the rest of the curve."""
    tails = [v[len(v) // 10:] for v in series if len(v) >= 10]
    if not tails:
        return
    allv = np.concatenate([v for v in series if len(v)])
    tail = np.concatenate(tails)
    lo, hi = float(allv.min()), float(np.percentile(tail, 99))
    if np.isfinite([lo, hi]).all() and hi > lo and float(allv.max()) > hi + (hi - lo):
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.3 * (hi - lo))


def _age_figure(manifest: pd.DataFrame) -> Figure | None:
    subj = manifest.drop_duplicates("subject")
    if "age" not in subj or subj["age"].notna().sum() == 0:
        return None
    fig = Figure(figsize=(6, 2.8))
    ax = fig.subplots()
    splits = [s for s in ("train", "val", "test") if s in set(subj["split"])]
    ages = [subj.loc[subj["split"] == s, "age"].dropna() for s in splits]
    bins = np.histogram_bin_edges(subj["age"].dropna(), bins=12)
    ax.hist(ages, bins=bins, label=splits, stacked=True)
    ax.set_xlabel("age (years)")
    ax.set_ylabel("subjects")
    ax.set_title("Age of the subjects, by split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- sections


def dataset_html(store: Path, cache: dict) -> str:
    """Slices and subjects per split, sex and age per split, and the preparation settings of a store."""
    key = str(store.resolve())
    if key in cache:
        return cache[key]
    try:
        m = pd.read_csv(store / "manifest.csv", dtype={"subject": str})
    except (OSError, ValueError) as exc:
        return f"<p class='absent'>{esc(store / 'manifest.csv')}: unreadable ({esc(exc)})</p>"
    parts = [f"<p>Store <code>{esc(store)}</code>: {len(m)} slices of {m['subject'].nunique()} subjects.</p>"]
    if "hospital" in m and (m["hospital"] == "SIM").any():
        parts.append(notice("SIMULATED DATA: this store holds brainvae phantoms, not scans of real people."))
    if "split" in m:
        subj = m.drop_duplicates("subject")
        rows = []
        for split in [s for s in ("train", "val", "test") if s in set(m["split"])] + \
                sorted(set(m["split"]) - {"train", "val", "test"}):
            s = subj[subj["split"] == split]
            row = {"split": split, "slices": int((m["split"] == split).sum()), "subjects": len(s)}
            if "sex" in s:
                for sex in ("M", "F"):
                    row[sex] = int((s["sex"] == sex).sum())
                row["sex unknown"] = int((~s["sex"].isin(["M", "F"])).sum())
            if "age" in s:
                a = s["age"].dropna()
                row.update({"age mean": a.mean(), "age sd": a.std(), "age min": a.min(), "age max": a.max(),
                            "age unknown": int(s["age"].isna().sum())})
            rows.append({k: fmt(v) if isinstance(v, float) else v for k, v in row.items()})
        parts.append(table_html(pd.DataFrame(rows)))
        if "age" in m and (fig := _age_figure(m)) is not None:
            parts.append(figure_html(png_bytes(fig, dpi=80), "Subject ages per split (stacked)."))
    if (store / "prepare.toml").exists():
        try:
            cfg = tomllib.loads((store / "prepare.toml").read_text())
            flat = {k: v for k, v in cfg.items() if not isinstance(v, dict)}
            for sect, vals in cfg.items():
                if isinstance(vals, dict):
                    flat.update({f"{sect}.{k}": v for k, v in vals.items()})
            parts.append(f"<details><summary>Preparation settings (prepare.toml)</summary>"
                         f"{_kv_table(flat.items(), ('setting', 'value'))}</details>")
        except (OSError, tomllib.TOMLDecodeError) as exc:
            parts.append(f"<p class='absent'>{esc(store / 'prepare.toml')}: unreadable ({esc(exc)})</p>")
    cache[key] = "\n".join(parts)
    return cache[key]


def _inventory(run: Run) -> str:
    """Which outputs the run folder holds, and the command for each absent one."""
    items = [
        ("config.toml", run.config is not None, "brainvae train"),
        ("summary.json", run.summary is not None, "brainvae train (written when training ends)"),
        ("metrics.jsonl", run.log is not None, "brainvae train"),
        ("provenance.json", run.provenance is not None, "brainvae train"),
    ]
    for folder, _, cmd in SECTIONS:
        items.append((f"{folder}/metrics.json", run.parts.get(folder) is not None, cmd))
    items.append(("samples*/grid.png", any(n.startswith("samples") for n, _ in run.grids), "brainvae sample"))
    lis = []
    for name, ok, cmd in items:
        if ok:
            lis.append(f"<li class='present'>&#10003; <code>{esc(name)}</code></li>")
        else:
            lis.append(f"<li class='absent'>&#10007; <code>{esc(name)}</code> absent "
                       f"<span class='muted'>(made by <code>{esc(cmd)}</code>)</span></li>")
    return f"<ul class='small'>{''.join(lis)}</ul>"


def run_html(run: Run, anchor: str, store_cache: dict) -> str:
    """One run's section: overview, dataset, training, evaluation, anomaly, utility, samples."""
    parts = [f"<section class='run' id='{anchor}'>", f"<h2>Run {esc(run.name)}</h2>",
             f"<p class='muted'>Folder <code>{esc(run.path)}</code></p>", _inventory(run)]

    model = (run.config or {}).get("model", {})
    train = (run.config or {}).get("train", {})
    tables = []
    if run.summary:
        tables.append("<div><h4>Summary</h4>" + _kv_table(
            [(k, v) for k, v in run.summary.items() if _is_scalar(v) or isinstance(v, list)]) + "</div>")
    if model:
        tables.append("<div><h4>Model</h4>" + _kv_table(model.items(), ("setting", "value")) + "</div>")
    if train:
        tables.append("<div><h4>Training</h4>" + _kv_table(train.items(), ("setting", "value")) + "</div>")
    if tables:
        parts.append("<div class='tables'>" + "".join(tables) + "</div>")
    else:
        parts.append("<p class='absent'>No config.toml or summary.json in this folder.</p>")

    parts.append("<h3>Dataset</h3>")
    store = (run.provenance or {}).get("store")
    if not store:
        parts.append("<p class='absent'>No store recorded (provenance.json absent or without \"store\").</p>")
    elif (found := resolve_store(str(store), run.path)) is None:
        parts.append(f"<p class='absent'>The store this run trained on, <code>{esc(store)}</code>, "
                     "was not found (looked relative to the working folder and to the run folder).</p>")
    else:
        parts.append(dataset_html(found, store_cache))

    parts.append("<h3>Training</h3>")
    fig = training_curves(run.log) if run.log is not None else None
    if fig is not None:
        parts.append(figure_html(png_bytes(fig, dpi=80), "Training (thin line) and validation (dots) losses "
                                 "per pixel, and the learning rate, against the optimisation step."))
        last = {k: v for k, v in run.log.ffill().iloc[-1].items() if k.startswith(("train/", "val/"))}
        if last:
            parts.append("<details><summary>Last logged values</summary>" + _kv_table(last.items()) + "</details>")
    else:
        parts.append("<p class='absent'>No training log (metrics.jsonl absent or empty).</p>")

    for folder, title, cmd in SECTIONS:
        parts.append(f"<h3>{esc(title)}</h3>")
        if folder not in run.parts:
            parts.append(f"<p class='absent'>Absent: no <code>{esc(folder)}/</code> folder "
                         f"(made by <code>{esc(cmd)}</code>).</p>")
            continue
        metrics = run.parts[folder]
        if metrics is None:
            parts.append(f"<p class='absent'>No <code>{esc(folder)}/metrics.json</code>.</p>")
        else:
            if folder == "eval":
                parts.append("<p class='small muted'>Where a distance has a <em>floor</em>, the floor is the same "
                             "distance between two disjoint sets of real slices: a model cannot be expected to "
                             "do better, and a ratio near 1 means synthetic is as close as real is to real.</p>")
            parts.append(metrics_html(metrics, heading_level=4))
        images = run.images.get(folder, [])
        if images:
            parts.append("<div class='gallery'>" if len(images) > 1 and folder != "eval" else "<div>")
            parts += [image_html(data, _caption(name)) for name, data in images]
            parts.append("</div>")
        elif metrics is not None:
            parts.append("<p class='muted'>No figures.</p>")

    parts.append("<h3>Samples</h3>")
    if run.grids:
        for name, data in run.grids:
            kind = ("Random samples from the model" if name.startswith("samples") else
                    "Originals (top) and reconstructions (bottom)" if name.startswith("reconstructions") else
                    "Latent interpolation strip")
            parts.append(image_html(data, f"{kind} ({name}/grid.png)."))
    else:
        parts.append("<p class='absent'>No samples (made by <code>brainvae sample</code>).</p>")

    if run.quiz:
        parts.append("<h3>Visual Turing test</h3>")
        for name, score in run.quiz:
            parts.append(metrics_html(score, heading_level=4, title=name))

    if run.problems:
        parts.append("<h3>Problems reading this folder</h3>" + list_html(run.problems))
    parts.append("</section>")
    return "\n".join(parts)


def headline(run: Run) -> dict:
    """The comparison row of a run: training figures plus every numeric evaluation metric."""
    s = run.summary or {}
    model = (run.config or {}).get("model", {})
    row = {"run": run.name, "arch": s.get("arch", model.get("arch")), "steps": s.get("steps"),
           "seconds": s.get("seconds"), "img/s": s.get("images_per_second"),
           "best val loss/pixel": s.get("best_val_loss_per_pixel")}
    for folder, _, _ in SECTIONS:
        values = flat_values(run.parts.get(folder) or {})
        for k, v in values.items():
            base, _, tail = k.rpartition("/") if "/" in k else k.rpartition(" (")
            tail = tail.rstrip(")")
            if base in values and tail in ("floor", "ratio", "std", "floor_std"):
                continue  # shown in the cell of ``base``
            floor = values.get(f"{k}/floor", values.get(f"{k} (floor)"))
            row[f"{folder}: {k}"] = fmt(v) + (f" (floor {fmt(floor)})" if floor is not None else "")
    return row


def comparison_html(runs: list[Run]) -> str:
    """Training numbers (a row per run) and evaluation metrics (a row per metric, a column per run)."""
    rows = [headline(r) for r in runs]
    train_cols = ["run", "arch", "steps", "seconds", "img/s", "best val loss/pixel"]
    train = pd.DataFrame([{c: fmt(r.get(c)) for c in train_cols} for r in rows])
    parts = ["<h2 id='comparison'>Comparison</h2>", table_html(train)]
    metric_names: list[str] = []
    for r in rows:
        metric_names += [k for k in r if k not in train_cols and k not in metric_names]
    if metric_names:
        names = [r["run"] for r in rows]
        if len(set(names)) < len(names):
            names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
        table = pd.DataFrame([[m] + [fmt(r.get(m)) for r in rows] for m in metric_names],
                             columns=["metric"] + names)
        parts.append("<h3>Metrics</h3><p class='small muted'>Every numeric metric of each run's eval/, anomaly/ "
                     "and utility/ folders (empty where a run lacks it), each with its real-vs-real floor when it has one.</p>")
        if len(table) > 60:
            parts.append(f"<details><summary>{len(table)} metrics</summary>{table_html(table)}</details>")
        else:
            parts.append(table_html(table))
    else:
        parts.append("<p class='muted'>No run has evaluation metrics yet.</p>")
    return "\n".join(parts)


def leaderboard_html(compare: Path) -> str:
    """The section of a ``brainvae compare`` folder: leaderboard (value with its 95 % CI), settings, runs."""
    parts = [f"<section id='leaderboard'><h2>Leaderboard</h2><p class='muted'>Folder <code>{esc(compare)}</code></p>"]
    problems: list[str] = []
    doc = _read_json(compare / "leaderboard.json", problems) if (compare / "leaderboard.json").exists() else None
    if (compare / "leaderboard.csv").exists():
        try:
            board = pd.read_csv(compare / "leaderboard.csv")
        except (OSError, ValueError) as exc:
            board = None
            problems.append(f"{compare / 'leaderboard.csv'}: unreadable ({exc})")
    elif doc and isinstance(doc.get("leaderboard"), list):
        board = pd.DataFrame(doc["leaderboard"])
    else:
        board = None
    if board is None:
        parts.append(f"<p class='absent'>No leaderboard.csv in {esc(compare)} (made by <code>brainvae compare</code>).</p>")
    else:
        if doc and doc.get("ranked_by"):
            parts.append(f"<p>Ranked by <b>{esc(doc['ranked_by'])}</b> (best first).</p>")
        parts.append(table_html(_with_ci(board)))
    if doc and isinstance(doc.get("settings"), dict):
        parts.append("<details><summary>Settings</summary>" + _kv_table(doc["settings"].items()) + "</details>")
    if (compare / "runs.csv").exists():
        try:
            per_run = pd.read_csv(compare / "runs.csv")
            parts.append("<details><summary>Every run (one row per config and seed)</summary>"
                         + table_html(per_run.map(fmt)) + "</details>")
        except (OSError, ValueError) as exc:
            problems.append(f"{compare / 'runs.csv'}: unreadable ({exc})")
    for f in sorted(compare.glob("*.png")):
        if (data := _png(f, problems)) is not None:
            parts.append(image_html(data, _caption(f.stem)))
    if problems:
        parts.append(list_html(problems))
    parts.append("</section>")
    return "\n".join(parts)


def _with_ci(board: pd.DataFrame) -> pd.DataFrame:
    """Columns ``x``, ``x_ci_low``, ``x_ci_high`` -> one column ``x`` reading ``value [low, high]``."""
    out = pd.DataFrame(index=board.index)
    for col in board.columns:
        if col.endswith(("_ci_low", "_ci_high")) and col.rsplit("_ci_", 1)[0] in board:
            continue
        lo, hi = f"{col}_ci_low", f"{col}_ci_high"
        if lo in board and hi in board:
            out[col] = [fmt(v) + (f" [{fmt(a)}, {fmt(b)}]" if pd.notna(a) and pd.notna(b) else "")
                        for v, a, b in zip(board[col], board[lo], board[hi])]
        else:
            out[col] = board[col].map(fmt)
    return out


# ----------------------------------------------------------------------------- the page


def build_report(runs: list[Path], compare: Path | None = None) -> str:
    """The report's HTML text for run folders and an optional comparison folder."""
    if not runs and compare is None:
        raise BrainVAEError("nothing to report: give at least one run folder or --compare DIR")
    if compare is not None and not Path(compare).is_dir():
        raise BrainVAEError(f"{compare}: no such comparison folder")
    read = [read_run(Path(r)) for r in runs]
    anchors = [f"run-{i + 1}" for i in range(len(read))]
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = [f"<p class='muted'>Written {esc(created)} by <code>brainvae report</code> from the folders below; "
             "nothing was recomputed. Absent outputs are marked &#10007; with the command that makes them.</p>"]
    toc = [f"<li><a href='#{a}'>Run {esc(r.name)}</a> <span class='muted small'>{esc(r.path)}</span></li>"
           for r, a in zip(read, anchors)]
    if len(read) > 1:
        toc.insert(0, "<li><a href='#comparison'>Comparison of the runs</a></li>")
    if compare is not None:
        toc.insert(0, "<li><a href='#leaderboard'>Leaderboard</a></li>")
    parts.append("<nav><ul>" + "".join(toc) + "</ul></nav>")
    if compare is not None:
        parts.append(leaderboard_html(Path(compare)))
    if len(read) > 1:
        parts.append(comparison_html(read))
    cache: dict = {}
    parts += [run_html(r, a, cache) for r, a in zip(read, anchors)]
    title = "brainvae report: " + ", ".join(r.name for r in read) if read else \
        f"brainvae report: {Path(compare).resolve().name}"
    return page(title, "\n".join(parts), css=_CSS)


def write_report(runs: list[Path], out: Path, *, compare: Path | None = None, force: bool = False) -> Path:
    """Build the report and write it atomically to ``out`` (refused if it exists, unless ``force``)."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(out)
    if out.is_dir():
        raise BrainVAEError(f"{out} is a folder; give a file name such as report.html")
    text = build_report(runs, compare)
    atomic_write_bytes(out, text.encode("utf-8"))
    return out
