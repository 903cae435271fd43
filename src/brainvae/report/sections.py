"""The sections of one run: dataset, training, evaluation, anomaly detection, utility, samples, quiz.

Each renderer takes what :mod:`brainvae.report.read` read and returns HTML;
tables of every number are collapsed (``<details>``, closed), figures carry
captions that name the conditions they were made with.
"""

from __future__ import annotations

import pandas as pd

from ..conditions import SEX_CODE
from .figures import age_figure, training_curves
from .html import esc, figure_html, list_html, notice, png_bytes, table_html
from .images import image_html
from .read import PARTS, SPLITS, Grid, Run, Store
from .tables import MIN_UNITS, details, fmt, interval, kv_table, numbers_html, records_table

# Figures of `brainvae evaluate` in reading order; others follow by name.
FIGURE_ORDER = ("real_vs_sample", "reconstructions", "closest_pairs", "histograms", "age_sex_grid", "age_effect",
                "interpolation")
SLICE_FIGURES = ("real_vs_sample", "reconstructions", "closest_pairs", "age_sex_grid", "interpolation", "overlay_")
SAMPLE_WIDTH = 512  # px: sample grids are shown at least this wide
SEX_NAMES = {code: name for name, code in SEX_CODE.items()}  # +1.0 -> M, -1.0 -> F
FOLDED = ("summary", "figures", "provenance")  # not repeated in the table of every number


def absent(html: str) -> str:
    return f"<p class='absent'>{html}</p>"


def duration(seconds) -> str:
    if seconds is None:
        return "?"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def conditions_text(cond: dict) -> str:
    """{"age": 30, "sex": -1.0, "position": 0.5} -> "age 30, sex F, position 0.5"."""
    return ", ".join(f"{k} {SEX_NAMES.get(v, v) if k == 'sex' else fmt(v)}" for k, v in cond.items() if v is not None)


# ----------------------------------------------------------------------------- dataset


def split_table(m: pd.DataFrame) -> str:
    """Slices and subjects per split, with sex counts and ages of the subjects."""
    subj = m.drop_duplicates("subject")
    rows = []
    for split in [s for s in SPLITS if s in set(m["split"])] + sorted(set(m["split"]) - set(SPLITS)):
        s = subj[subj["split"] == split]
        row = {"split": split, "slices": int((m["split"] == split).sum()), "subjects": len(s)}
        if "sex" in s:
            row.update({sex: int((s["sex"] == sex).sum()) for sex in ("F", "M")})
            row["sex unknown"] = int((~s["sex"].isin(["M", "F"])).sum())
        if "age" in s:
            a = s["age"].dropna()
            row.update({"age mean": fmt(a.mean()), "age sd": fmt(a.std()), "age min": fmt(a.min()),
                        "age max": fmt(a.max()), "age unknown": int(s["age"].isna().sum())})
        rows.append(row)
    return table_html(pd.DataFrame(rows))


def dataset_html(store: Store, anchor: str) -> str:
    """One store: slices and subjects per split, sex and age per split, and its preparation settings."""
    parts = [f"<section id='{anchor}'><h3>Store <code>{esc(store.path.name)}</code></h3>"]
    m = store.manifest
    if m is not None:
        parts.append(f"<p><code>{esc(store.path)}</code>: {len(m)} slices of {store.subjects()} subjects.</p>")
        if store.simulated:
            parts.append(notice("SIMULATED DATA: this store holds brainvae phantoms, not scans of real people."))
        if "split" in m:
            parts.append(split_table(m))
            if "age" in m and (fig := age_figure(m)) is not None:
                parts.append(figure_html(png_bytes(fig, dpi=80), "Subject ages per split (stacked)."))
    if store.prepare:
        flat = {k: v for k, v in store.prepare.items() if not isinstance(v, dict)}
        for sect, vals in store.prepare.items():
            if isinstance(vals, dict):
                flat.update({f"{sect}.{k}": v for k, v in vals.items()})
        parts.append(details("Preparation settings (prepare.toml)", kv_table(flat.items())))
    if store.problems:
        parts.append(list_html(store.problems))
    parts.append("</section>")
    return "\n".join(parts)


def store_link(run: Run, store: Store | None, anchor: str | None) -> str:
    recorded = (run.provenance or {}).get("store")
    if not recorded:
        return absent("No store recorded (provenance.json absent or without \"store\").")
    if store is None:
        return absent(f"The store this run trained on, <code>{esc(recorded)}</code>, was not found (looked "
                      "relative to the working folder and to the run folder).")
    return f"<p>Trained on <a href='#{anchor}'>store <code>{esc(store.path.name)}</code></a>.</p>"


# ----------------------------------------------------------------------------- the run


def inventory_html(run: Run) -> str:
    """Which outputs the run folder holds, and the command that makes each absent one."""
    items = [("config.toml", run.config is not None, "brainvae train"),
             ("summary.json", run.summary is not None, "brainvae train (written when training ends)"),
             ("metrics.jsonl", run.log is not None, "brainvae train"),
             ("provenance.json", run.provenance is not None, "brainvae train")]
    items += [(f"{key}/metrics.json", run.parts.get(key) is not None, cmd) for key, _, cmd in PARTS]
    items.append(("samples*/grid.png", any(g.name.startswith("samples") for g in run.grids), "brainvae sample"))
    held = ", ".join(f"<code>{esc(name)}</code>" for name, ok, _ in items if ok)
    missing = "".join(f"<li>&#10007; <code>{esc(name)}</code> absent (made by <code>{esc(cmd)}</code>)</li>"
                      for name, ok, cmd in items if not ok)
    return (f"<p class='small present'>&#10003; {held}</p>" if held else "") + \
        (f"<ul class='small absent'>{missing}</ul>" if missing else "")


def training_html(run: Run) -> str:
    parts = ["<h3>Training</h3>"]
    s = run.summary or {}
    if s:
        parts.append(f"<p>{s.get('steps', '?')} optimiser steps, {s.get('epochs', '?')} epochs in "
                     f"{duration(s.get('seconds'))} on {esc(s.get('device', '?'))} ({esc(s.get('precision', '?'))}), "
                     f"{fmt(s.get('images_per_second'))} images/s; best validation loss "
                     f"{fmt(s.get('best_val_loss_per_pixel'))} per pixel.</p>")
    fig = training_curves(run.log) if run.log is not None else None
    if fig is not None:
        parts.append(figure_html(png_bytes(fig, dpi=80), "Training (thin line) and validation (dots) losses "
                                 "per pixel, and the learning rate, against the optimisation step."))
    else:
        parts.append(absent("No training log (metrics.jsonl absent or empty)."))
    settings = [(f"{section}.{k}", v) for section in ("model", "train") for k, v in (run.config or {}).get(section,
                                                                                                           {}).items()]
    if settings:
        parts.append(details("Model and training settings (config.toml)", kv_table(settings)))
    if s:
        parts.append(details("Training summary (summary.json)", numbers_html(s)))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- figures and their captions


def file_caption(name: str) -> str:
    """The caption of a figure the report knows nothing about: its file name in words."""
    return name.replace("_", " ").replace("-", " ").capitalize() + "."


def eval_caption(name: str, ev: dict) -> str:
    """What a figure of ``brainvae evaluate`` shows, with the conditions and settings it was made with."""
    sampler = ", ".join(f"{k} {fmt(v)}" for k, v in (ev.get("sampler") or {}).items())
    how = (f"samples drawn at {ev['sampling']}" if ev.get("sampling") else "samples") + \
        (f" (sampler: {sampler})" if sampler else "")
    seed = ev.get("seed", "?")
    at_position = ", at slice position 0.5" if "position" in (ev.get("conditions") or []) else ""
    a = ev.get("age_effect") or {}
    captions = {
        "real_vs_sample": f"Real test slices (top) and samples (bottom) at matched slice positions; {how}.",
        "reconstructions": "Test slices, their reconstructions, and the absolute residual (colour scale from 0 to "
                           "the largest residual shown).",
        "closest_pairs": "The samples most similar to a training slice, beside that slice (SSIM above each pair); "
                         "pairs above the memorisation threshold "
                         f"(SSIM {fmt((ev.get('memorisation') or {}).get('threshold_ssim'))}) would be near-copies.",
        "histograms": "In-brain intensity histograms of real test, real training and synthetic slices.",
        "age_sex_grid": f"One latent (seed {seed}) decoded at every age (columns) as F (top row) and M (bottom row)"
                        f"{at_position}.",
        "age_effect": f"In-brain CSF fraction against age: {a.get('per_age', '?')} samples at each age "
                      f"({a.get('sample_sex', '?')}, position {fmt(a.get('position'))}) and real test + validation "
                      f"slices within ±{fmt(a.get('window'))} of that position ({a.get('n_real_subjects', '?')} "
                      "subjects), each with its fitted line.",
        "interpolation": "Decoding a straight line in latent space between two real test slices.",
    }
    return captions.get(name) or file_caption(name)


def anomaly_caption(name: str, an: dict) -> str:
    if not name.startswith("overlay_"):
        return file_caption(name)
    primary = (an.get("scores") or {}).get(an.get("primary_score")) or {}
    post = an.get("postprocess") or {}
    val = ", ".join((an.get("cases") or {}).get("validation", []))
    return (f"Test case {name[len('overlay_'):]}: input with the ground-truth lesion outlined in green, "
            f"reconstruction, score map of {an.get('primary_score', '?')} (brighter = more abnormal) and the map "
            f"thresholded at {fmt(primary.get('threshold'))}, chosen on validation case(s) {val} (median filter "
            f"{fmt(post.get('median'))}, brain mask eroded by {fmt(post.get('erode'))}, components under "
            f"{fmt(post.get('min_area'))} px removed).")


def utility_caption(name: str, ut: dict) -> str:
    if name != "utility":
        return file_caption(name)
    n = min((t.get("n_test_subjects") or 0 for t in (ut.get("tasks") or {}).values()), default=None)
    flag = f" The intervals come from {n} test subjects (< {MIN_UNITS}): not results." \
        if n is not None and n < MIN_UNITS else ""
    return ("Balanced accuracy on the real test subjects of a classifier trained on each mix of real and "
            f"synthetic slices, with 95 % subject-bootstrap intervals; dashed: chance.{flag}")


CAPTIONS = {"eval": eval_caption, "anomaly": anomaly_caption, "utility": utility_caption}


def gallery(run: Run, key: str, metrics: dict) -> str:
    """The figures of one output folder, in reading order, captioned."""
    images = sorted(run.images.get(key, []), key=lambda item: (
        FIGURE_ORDER.index(item[0]) if item[0] in FIGURE_ORDER else len(FIGURE_ORDER), item[0]))
    if not images:
        return "<p class='muted'>No figures.</p>"
    figs = [image_html(data, CAPTIONS[key](name, metrics),
                       axis=run.axis if name.startswith(SLICE_FIGURES) else None) for name, data in images]
    return f"<div class='gallery {key}'>{''.join(figs)}</div>"


# ----------------------------------------------------------------------------- evaluate, anomaly, utility


def realism_table(realism: dict) -> str:
    """Feature spaces side by side: a row per distance, a column per space, each cell ``value (floor)``."""
    spaces = {name: d for name, d in realism.items() if isinstance(d, dict)}
    metrics = list(dict.fromkeys(m for d in spaces.values() for m, v in d.items() if isinstance(v, dict)))
    rows = [[m] + [f"{fmt(v['value'])} ({fmt(v['floor'])})" if isinstance(v := d.get(m), dict) else ""
                   for d in spaces.values()] for m in metrics]
    return table_html(pd.DataFrame(rows, columns=["distance"] + list(spaces)))


def eval_body(ev: dict) -> tuple[str, int | None]:
    """Realism in each feature space, then the other rows of the evaluation's summary (model, floor, ratio)."""
    spaces = tuple(ev.get("realism") or {})
    others = [r for r in ev.get("summary") or [] if isinstance(r, dict) and not str(r.get("metric")).startswith(spaces)]
    return ("<p class='small muted'>The <em>floor</em> of a distance is the same distance between real training "
            "and real test slices (other subjects): a model cannot be expected to do better, and a ratio near 1 "
            "means the samples are as close to the test set as other real slices are. Cells: value (floor).</p>"
            + (realism_table(ev["realism"]) if spaces else "") + (records_table(others) if others else ""), None)


def scorers_table(an: dict, cases: int) -> str:
    """Anomaly scorers × metrics: one row per score (model, baseline run, brightness baselines)."""
    rows = []
    for key, s in (an.get("scores") or {}).items():
        per_case = (s.get("per_case_mean") or {}).get("dice") or {}
        low, high = (per_case.get("ci95") or [None, None])
        rows.append({"score": key + (" (primary)" if key == an.get("primary_score") else ""),
                     "pixel AUROC": fmt(s.get("pixel_auroc")), "pixel AUPRC": fmt(s.get("pixel_auprc")),
                     "Dice": fmt(s.get("dice")), "best Dice (upper bound)": fmt(s.get("best_dice_upper_bound")),
                     "slice AUROC": fmt(s.get("slice_auroc")), "per-case Dice": fmt(per_case.get("mean")),
                     "95 % interval": interval(low, high, per_case.get("n", cases))})
    return table_html(pd.DataFrame(rows))


def anomaly_body(an: dict) -> tuple[str, int | None]:
    cases = an.get("cases") or {}
    n_test = len(cases.get("test", []))
    first = next(iter((an.get("scores") or {}).values()), {})
    intro = (f"<p class='small muted'>Threshold chosen on validation case(s) "
             f"{esc(', '.join(cases.get('validation', [])))}; measured on {n_test} test case(s) "
             f"{esc(', '.join(cases.get('test', [])))}. Calling the whole brain abnormal scores Dice "
             f"{fmt(first.get('dice_all_brain'))}; the best Dice is chosen on the test cases themselves (an upper "
             "bound, not a result).</p>")
    return intro + scorers_table(an, n_test), n_test


def utility_body(ut: dict) -> tuple[str, int | None]:
    """Arms × tasks: balanced accuracy and its difference to training on real slices only."""
    tasks = ut.get("tasks") or {}
    n = min((t.get("n_test_subjects") or 0 for t in tasks.values()), default=None)
    rows = []
    for arm, scores in (ut.get("arms") or {}).items():
        row = {"training data": arm}
        for task in tasks:
            s = scores.get(task) or {}
            row[f"{task}: balanced accuracy"] = fmt(s.get("balanced_accuracy"))
            row[f"{task}: 95 % interval"] = interval(s.get("ci_low"), s.get("ci_high"), n)
            row[f"{task}: vs real"] = fmt(s.get("delta_vs_real"))
        rows.append(row)
    return (f"<p class='small muted'>Classifiers trained on each mix, tested on the real test subjects ({n}); "
            "intervals: cluster bootstrap over subjects.</p>" + table_html(pd.DataFrame(rows)), n)


BODIES = {"eval": eval_body, "anomaly": anomaly_body, "utility": utility_body}


def part_html(run: Run, key: str, title: str, cmd: str) -> str:
    """One output folder: its key table, its figures, then every number and its provenance (collapsed)."""
    head = f"<h3>{esc(title)}</h3>"
    if key not in run.parts:
        return head + absent(f"Absent: no <code>{esc(key)}/</code> folder (made by <code>{esc(cmd)}</code>).")
    metrics = run.parts[key]
    if metrics is None:
        return head + absent(f"No <code>{esc(key)}/metrics.json</code>.") + gallery(run, key, {})
    body, units = BODIES[key](metrics)
    numbers = numbers_html({k: v for k, v in metrics.items() if k not in FOLDED}, units)
    parts = [head, body, gallery(run, key, metrics), details(f"Every number in {key}/metrics.json", numbers)]
    if isinstance(metrics.get("provenance"), dict):
        parts.append(details(f"Provenance of {key}/", numbers_html(metrics["provenance"])))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- samples and quiz


def grid_caption(grid: Grid) -> str:
    meta = grid.meta
    if grid.name.startswith("samples"):
        cond = meta.get("cond") if "cond" in meta else {k: meta[k] for k in ("age", "sex", "position") if k in meta}
        sampler = ", ".join(f"{k} {fmt(v)}" for k, v in (meta.get("sampler") or {}).items())
        return (f"Random samples at {conditions_text(cond)}" if cond else "Random samples from the prior") + \
            (f" (seed {meta['seed']})" if "seed" in meta else "") + (f", sampler {sampler}" if sampler else "") + \
            f" ({grid.name}/)."
    if grid.name.startswith("reconstructions"):
        split = meta.get("split", "store").capitalize()
        return f"{split} slices (top) and their reconstructions (bottom) ({grid.name}/)."
    return f"Latent interpolation between store rows {meta.get('a', '?')} and {meta.get('b', '?')} ({grid.name}/)."


def samples_html(run: Run) -> str:
    if not run.grids:
        return "<h3>Samples</h3>" + absent("No samples (made by <code>brainvae sample</code>).")
    figs = "".join(image_html(g.png, grid_caption(g), axis=run.axis, min_width=SAMPLE_WIDTH) for g in run.grids)
    return f"<h3>Samples</h3><div class='gallery'>{figs}</div>"


def quiz_scores_html(run: Run) -> str:
    """Readers of a visual Turing test: accuracy, sensitivity, specificity and AUC with intervals over items."""
    if not run.quiz:
        return ""
    rows = []
    for name, score in run.quiz:
        for reader, r in (score.get("readers") or {}).items():
            row = {"answers": name, "reader": reader, "answered": r.get("n_answered")}
            for metric in ("accuracy", "sensitivity", "specificity", "auc"):
                m = r.get(metric) or {}
                row[metric] = fmt(m.get("value"))
                row[f"{metric} 95 % interval"] = interval(m.get("ci_low"), m.get("ci_high"), r.get("n_answered"))
            rows.append(row)
    return ("<h3>Visual Turing test</h3><p class='small muted'>Accuracy and AUC near 0.5: the reader could not tell "
            "synthetic from real (synthetic = positive).</p>" + table_html(pd.DataFrame(rows)))


def run_html(run: Run, anchor: str, store: Store | None, store_anchor: str | None) -> str:
    """One run's section: what the folder holds, training, evaluation, anomaly, utility, samples, quiz."""
    parts = [f"<section class='run' id='{anchor}'>", f"<h2>Run {esc(run.name)}</h2>",
             f"<p class='muted'>Folder <code>{esc(run.path)}</code></p>", inventory_html(run),
             store_link(run, store, store_anchor), training_html(run)]
    parts += [part_html(run, key, title, cmd) for key, title, cmd in PARTS]
    parts += [samples_html(run), quiz_scores_html(run)]
    if run.problems:
        parts.append("<h3>Problems reading this folder</h3>" + list_html(run.problems))
    parts.append("</section>")
    return "\n".join(parts)
