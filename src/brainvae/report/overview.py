"""The sections across runs: the one-screen summary, the side-by-side comparison, a compare folder's leaderboard."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..compare import HEADLINE
from ..compare import headline as leaderboard_row
from ..evaluate.stats import ALPHA
from .headline import Headline, headlines, lineage, warnings
from .html import esc, list_html, notice, table_html
from .images import image_html
from .read import SPLITS, Run, Store, read_json, read_png
from .sections import duration, file_caption
from .tables import MIN_UNITS, details, fmt, kv_table


def data_text(run: Run, store: Store | None) -> str:
    """Which data, in one line: store, slices, subjects per split, axis and size."""
    recorded = (run.provenance or {}).get("store")
    if store is None or store.manifest is None:
        return f"{recorded} (not found)" if recorded else "not recorded"
    cfg = (run.provenance or {}).get("store_config") or store.prepare or {}
    subjects = "/".join(str(store.subjects(s)) for s in SPLITS)
    return (f"{store.path.name}{' (SIMULATED)' if store.simulated else ''}: {len(store.manifest)} slices, "
            f"{subjects} subjects (train/val/test), {cfg.get('axis', '?')} {cfg.get('size', '?')} px")


def model_text(run: Run) -> str:
    model = (run.config or {}).get("model") or {}
    conditions = ((run.parts.get("eval") or {}).get("conditions")) or model.get("conditions")
    arch = (run.summary or {}).get("arch", model.get("arch", "?"))
    return f"{arch}, {model.get('image_size', '?')} px" + \
        (f", conditioned on {', '.join(conditions)}" if conditions else "")


def training_text(run: Run) -> str:
    s = run.summary
    if not s:
        return "not finished (no summary.json)"
    steps = f"{s['steps']:,}" if isinstance(s.get("steps"), int) else "?"
    stages = f" in {len(s['stages'])} stages" if s.get("stages") else ""
    text = f"{steps} steps{stages}, {duration(s.get('seconds'))} on {s.get('device', '?')}"
    if (s.get("init") or {}).get("source"):  # started from another model's weights: its training counts too
        total, seconds = lineage(s)
        text += (f"; {total:,} steps, {duration(seconds)} with the runs it started from" if total is not None
                 else f"; started from {s['init'].get('from', 'another model')}")
    return text


def verdict_html(h: Headline) -> str:
    flag = f" <span class='flag'>&mdash; {esc(h.flag)}</span>" if h.flag else ""
    return f"<span class='verdict {h.tone}'>{esc(h.verdict)}</span>{flag}"


def headline_table(rows: dict[str, list[Headline]]) -> str:
    """One run: measure | model | floor or baseline | verdict. Several: a row per measure, a column per run."""
    if len(rows) == 1:
        (lines,) = rows.values()
        body = "".join(f"<tr><td>{esc(h.label)}</td><td><b>{esc(h.value)}</b></td><td>{esc(h.reference)}</td>"
                       f"<td>{verdict_html(h)}</td></tr>" for h in lines)
        head = "<tr><th>measure</th><th>model</th><th>floor or baseline</th><th>verdict</th></tr>"
        return f"<table class='headline'>{head}{body}</table>"
    labels = list(dict.fromkeys(h.label for lines in rows.values() for h in lines))
    by_label = {run: {h.label: h for h in lines} for run, lines in rows.items()}
    body = ""
    for label in labels:
        cells = "".join(f"<td><b>{esc(h.value)}</b> <span class='small muted'>{esc(h.reference)}</span><br>"
                        f"{verdict_html(h)}</td>" if (h := by_label[run].get(label)) else "<td></td>" for run in rows)
        body += f"<tr><td>{esc(label)}</td>{cells}</tr>"
    head = "<tr><th>measure</th>" + "".join(f"<th>{esc(run)}</th>" for run in rows) + "</tr>"
    return f"<table class='headline'>{head}{body}</table>"


def summary_html(runs: list[Run], names: list[str], stores: list[Store | None]) -> str:
    """The first screen: data (SIMULATED in a banner), model, training length, headline numbers, warnings."""
    parts = ["<section id='summary' data-first-screen><h2>Summary</h2>"]
    simulated = [name for name, s in zip(names, stores) if s is not None and s.simulated]
    if simulated:
        which = "" if len(runs) == 1 else f" (run{'s' if len(simulated) > 1 else ''} {', '.join(simulated)})"
        parts.append(notice(f"SIMULATED DATA{which}: brainvae phantoms, not scans of real people."))
    facts = pd.DataFrame([{"run": name, "data": data_text(r, s), "model": model_text(r),
                           "training": training_text(r)} for r, name, s in zip(runs, names, stores)])
    parts.append(table_html(facts, classes="facts"))
    notes = [w if len(runs) == 1 else f"{name}: {w}" for r, name, s in zip(runs, names, stores)
             for w in warnings(r, s.subjects("test") if s is not None and s.manifest is not None else None)]
    if notes:
        parts.append("<ul class='warn'>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    rows = {name: headlines(r) for r, name in zip(runs, names)}
    if any(rows.values()):
        parts.append(headline_table(rows))
        parts.append(f"<p class='small muted'>A real-data ceiling counts only when it is significantly above chance "
                     f"(one-sided p &lt; {ALPHA}, test subjects as the unit: binomial test of each subject's majority "
                     f"vote for sex, t-test of the correlation of each subject's age with its mean prediction); intervals over fewer than {MIN_UNITS} subjects or cases are not results.</p>")
    else:
        parts.append("<p class='absent'>Not evaluated yet (made by <code>brainvae evaluate</code>).</p>")
    parts.append("</section>")
    return "\n".join(parts)


def comparison_html(runs: list[Run], names: list[str]) -> str:
    """Runs side by side: training, then the leaderboard's metrics (a row per metric, a column per run)."""
    summaries = [r.summary or {} for r in runs]
    train = pd.DataFrame([{"run": n, "arch": s.get("arch"), "steps": fmt(s.get("steps")),
                           "time": duration(s.get("seconds")), "img/s": fmt(s.get("images_per_second")),
                           "best val loss/pixel": fmt(s.get("best_val_loss_per_pixel"))}
                          for s, n in zip(summaries, names)])
    parts = ["<section id='comparison'><h2>Comparison</h2>", table_html(train)]
    values = [leaderboard_row(r.summary or {}, r.parts.get("eval")) for r in runs]
    metrics = [m for m, _, _ in HEADLINE if any(v.get(m) is not None for v in values)]
    if metrics:
        table = pd.DataFrame([[m, "higher" if higher else "lower"] + [fmt(v.get(m)) for v in values]
                              for m, _, higher in HEADLINE if m in metrics],
                             columns=["metric", "better"] + names)
        parts.append("<p class='small muted'>The numbers <code>brainvae compare</code> ranks by, from each run's "
                     "eval/metrics.json (empty where a run lacks it).</p>" + table_html(table))
    anomaly = [(n, r.parts["anomaly"]) for r, n in zip(runs, names) if r.parts.get("anomaly")]
    if anomaly:
        rows = []
        for name, an in anomaly:
            s = (an.get("scores") or {}).get(an.get("primary_score")) or {}
            rows.append({"run": name, "primary score": an.get("primary_score"),
                         "pixel AUROC": fmt(s.get("pixel_auroc")), "Dice": fmt(s.get("dice")),
                         "slice AUROC": fmt(s.get("slice_auroc")),
                         "test cases": len((an.get("cases") or {}).get("test", []))})
        parts.append("<h3>Anomaly detection</h3>" + table_html(pd.DataFrame(rows)))
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


def _read_board(compare: Path, doc: dict | None, problems: list[str]) -> pd.DataFrame | None:
    if (compare / "leaderboard.csv").exists():
        try:
            return pd.read_csv(compare / "leaderboard.csv")
        except (OSError, ValueError) as exc:
            problems.append(f"{compare / 'leaderboard.csv'}: unreadable ({exc})")
            return None
    if doc and isinstance(doc.get("leaderboard"), list):
        return pd.DataFrame(doc["leaderboard"])
    return None


def leaderboard_html(compare: Path) -> str:
    """The section of a ``brainvae compare`` folder: leaderboard (value with its 95 % CI), settings, runs."""
    parts = [f"<section id='leaderboard'><h2>Leaderboard</h2><p class='muted'>Folder <code>{esc(compare)}</code></p>"]
    problems: list[str] = []
    doc = read_json(compare / "leaderboard.json", problems) if (compare / "leaderboard.json").exists() else None
    board = _read_board(compare, doc, problems)
    if board is None:
        parts.append(f"<p class='absent'>No leaderboard.csv in {esc(compare)} (made by <code>brainvae compare</code>)."
                     "</p>")
    else:
        if doc and doc.get("ranked_by"):
            parts.append(f"<p>Ranked by <b>{esc(doc['ranked_by'])}</b> (best first); intervals: 95 % over seeds.</p>")
        parts.append(table_html(_with_ci(board)))
    if doc and isinstance(doc.get("settings"), dict):
        parts.append(details("Settings", kv_table(doc["settings"].items())))
    if (compare / "runs.csv").exists():
        try:
            parts.append(details("Every run (one row per config and seed)",
                                 table_html(pd.read_csv(compare / "runs.csv").map(fmt))))
        except (OSError, ValueError) as exc:
            problems.append(f"{compare / 'runs.csv'}: unreadable ({exc})")
    for f in sorted(compare.glob("*.png")):
        if (data := read_png(f, problems)) is not None:
            parts.append(image_html(data, file_caption(f.stem)))
    if problems:
        parts.append(list_html(problems))
    parts.append("</section>")
    return "\n".join(parts)
