"""``brainvae report``: one self-contained HTML file from run and comparison folders.

The report only reads what other commands wrote; it never loads a model or
recomputes a metric. Whatever exists is rendered, and whatever is absent is
named with the command that would make it. The page, top to bottom:

    Summary      one screen: data (SIMULATED in a banner), model, training length, the headline
                 numbers beside their floors or baselines with a plain verdict, warnings (smoke test, small n)
    Leaderboard  of a ``brainvae compare`` folder (``--compare``)
    Comparison   runs side by side (two runs or more)
    Data         each store the runs trained on, once
    Run ...      per run: training, evaluation, anomaly detection, utility, samples, quiz;
                 every number of each metrics.json in a collapsed table

What a run folder holds is read through :class:`~brainvae.rundir.RunDir`
(:mod:`.read`), the summary's verdicts come from :mod:`.headline`, and the
sections from :mod:`.overview` (across runs) and :mod:`.sections` (per run).
Images are embedded as data URIs, re-encoded to keep the page within
:data:`.images.PAGE_BUDGET`: the file opens offline in any browser.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from ..errors import BrainVAEError, OutputExistsError
from ..io.atomic import atomic_write_bytes
from .html import asset, esc, page
from .images import budget_for, fit_budget
from .overview import comparison_html, leaderboard_html, summary_html
from .read import Run, Store, read_run, read_store, resolve_store
from .sections import dataset_html, run_html


def run_names(runs: list[Run]) -> list[str]:
    """Each run's folder name, numbered where two runs share one."""
    names = [r.name for r in runs]
    return names if len(set(names)) == len(names) else [f"{n} ({i + 1})" for i, n in enumerate(names)]


def find_stores(runs: list[Run]) -> tuple[list[Store | None], dict[Path, Store]]:
    """The store of each run (``None`` when not recorded or not found), and each distinct store once."""
    distinct: dict[Path, Store] = {}
    per_run: list[Store | None] = []
    for run in runs:
        recorded = (run.provenance or {}).get("store")
        found = resolve_store(str(recorded), run.path) if recorded else None
        if found is not None and found.resolve() not in distinct:
            distinct[found.resolve()] = read_store(found)
        per_run.append(distinct[found.resolve()] if found is not None else None)
    return per_run, distinct


def contents_html(runs: list[Run], names: list[str], anchors: list[str], stores: dict[Path, Store],
                  compare: Path | None) -> str:
    items = ["<li><a href='#summary'>Summary</a></li>"]
    if compare is not None:
        items.append("<li><a href='#leaderboard'>Leaderboard</a></li>")
    if len(runs) > 1:
        items.append("<li><a href='#comparison'>Comparison of the runs</a></li>")
    if stores:
        items.append("<li><a href='#data'>Data</a></li>")
    items += [f"<li><a href='#{a}'>Run {esc(n)}</a> <span class='muted small'>{esc(r.path)}</span></li>"
              for r, n, a in zip(runs, names, anchors)]
    return "<nav><ul>" + "".join(items) + "</ul></nav>"


def build_report(runs: list[Path], compare: Path | None = None) -> str:
    """The report's HTML text for run folders and an optional comparison folder."""
    if not runs and compare is None:
        raise BrainVAEError("nothing to report: give at least one run folder or --compare DIR")
    if compare is not None and not Path(compare).is_dir():
        raise BrainVAEError(f"{compare}: no such comparison folder")
    read = [read_run(r) for r in runs]
    names, anchors = run_names(read), [f"run-{i + 1}" for i in range(len(read))]
    stores, distinct = find_stores(read)
    store_anchors = {path: f"store-{i + 1}" for i, path in enumerate(distinct)}
    parts = [summary_html(read, names, stores)] if read else []
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts.append(f"<p class='muted small'>Written {esc(created)} by <code>brainvae report</code> from the folders "
                 "below; nothing was recomputed. Absent outputs are marked &#10007; with the command that makes "
                 "them.</p>")
    parts.append(contents_html(read, names, anchors, distinct, compare))
    if compare is not None:
        parts.append(leaderboard_html(Path(compare)))
    if len(read) > 1:
        parts.append(comparison_html(read, names))
    if distinct:
        parts.append("<section id='data'><h2>Data</h2>" + "".join(
            dataset_html(store, store_anchors[path]) for path, store in distinct.items()) + "</section>")
    for run, anchor, store in zip(read, anchors, stores):
        parts.append(run_html(run, anchor, store, store_anchors.get(store.path.resolve()) if store else None))
    title = "brainvae report: " + (", ".join(names) if read else Path(compare).resolve().name)
    return fit_budget(page(title, "\n".join(parts), css=asset("report.css")), budget_for(len(read)))


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
