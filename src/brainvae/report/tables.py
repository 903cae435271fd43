"""Metrics JSON as tables: cell text, key/value tables, and nested metrics flattened to one table.

Nested dictionaries become rows named by their key path (``realism › featnet ›
fd``), never headings, and every table has the same few columns, so a distance
always sits beside its real-vs-real floor::

    metric | value | floor | ratio | 95 % interval | more
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from .html import esc, table_html

MIN_UNITS = 5  # an interval over fewer subjects or cases is flagged, not presented as a result
# A dict of scalars holding one of these keys is one metric (a row); any other dict is a group of rows.
ROW_KEYS = {"value", "floor", "ratio", "mean", "median", "std", "sd", "ci_low", "ci_high", "ci95"}
VALUE_KEYS = ("value", "mean", "median")  # the first present is the row's value
COLUMNS = ("value", "floor", "ratio", "95 % interval", "more")
# Flat keys such as ``fid_floor`` join the row of ``fid``.
PAIRED_SUFFIXES = ("floor", "ratio")
SEPARATOR = " › "


def fmt(value, digits: int = 4) -> str:
    """A cell's text: floats to ``digits`` significant digits, lists joined, None and NaN empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(float(value)) else f"{float(value):.{digits}g}"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in value) and len(value) <= 12:
            return ", ".join(fmt(v, digits) for v in value)
        return json.dumps(value)[:200]
    if isinstance(value, dict):
        return json.dumps(value)[:200]
    return str(value)


def is_scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, np.integer, np.floating))


def is_records(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def kv_table(items, header=("setting", "value")) -> str:
    return table_html(pd.DataFrame([(str(k), fmt(v)) for k, v in items], columns=list(header)))


def details(summary: str, body: str) -> str:
    """A collapsed block (closed until clicked); ``summary`` is plain text, ``body`` HTML."""
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def interval(low, high, n: int | None = None) -> str:
    """``[low, high]``, or why it is not shown: bounds missing, or from fewer than MIN_UNITS subjects or cases."""
    if low is None or high is None:
        return ""
    if n is not None and n < MIN_UNITS:
        return f"not shown (n = {n})"
    return f"[{fmt(low)}, {fmt(high)}]"


def _metric_row(d: dict, units: int | None) -> dict[str, str]:
    """One metric dict -> its cells: value, floor, ratio, interval, and the other keys joined in ``more``.

    The value is the first of VALUE_KEYS present, else the first other number (e.g. ``balanced_accuracy``).
    The interval counts the dict's own ``n`` (cases or subjects), else ``units``.
    """
    interval_keys = {"ci_low", "ci_high", "ci95"}
    value_key = next((k for k in VALUE_KEYS if k in d), None) or next(
        (k for k, v in d.items() if isinstance(v, (int, float)) and k not in interval_keys | {"floor", "ratio", "n"}),
        None)
    low, high = d.get("ci_low"), d.get("ci_high")
    if isinstance(d.get("ci95"), list) and len(d["ci95"]) == 2:
        low, high = d["ci95"]
    n = d["n"] if isinstance(d.get("n"), int) else units
    ci = interval(low, high, n)
    if ci.startswith("[") and n is not None:
        ci += f" (n = {n})"
    used = {value_key, "floor", "ratio"} | interval_keys | ({"n"} if ci else set())
    more = ", ".join(f"{k} {fmt(v)}" for k, v in d.items() if k not in used)
    return {"value": fmt(d.get(value_key)), "floor": fmt(d.get("floor")), "ratio": fmt(d.get("ratio")),
            "95 % interval": ci, "more": more}


def flatten(d: dict, units: int | None = None,
            path: tuple[str, ...] = ()) -> tuple[list[dict], list[tuple[str, list[dict]]]]:
    """Rows ``{metric, value, floor, ratio, 95 % interval, more}`` of a nested metrics dict, and its lists of
    records (``[{...}, ...]``) as (key path, records) to be shown as tables of their own.

    ``units``: the subjects or cases behind the intervals of rows that do not say (see :func:`interval`).
    """
    rows: list[dict] = []
    records: list[tuple[str, list[dict]]] = []
    for key, v in d.items():
        name = SEPARATOR.join((*path, str(key)))
        if is_records(v):
            records.append((name, v))
        elif isinstance(v, dict) and set(map(str, v)) & ROW_KEYS and \
                all(is_scalar(x) or isinstance(x, list) for x in v.values()):
            rows.append({"metric": name, **_metric_row(v, units)})
        elif isinstance(v, dict):
            sub_rows, sub_records = flatten(v, units, (*path, str(key)))
            rows += sub_rows
            records += sub_records
        else:
            rows.append({"metric": name, "value": fmt(v)})
    _pair_flat_keys(rows)
    return rows, records


def _pair_flat_keys(rows: list[dict]) -> None:
    """``x_floor`` (a plain value) joins the row of ``x`` as its floor; same for ``x_ratio``."""
    by_name = {r["metric"]: r for r in rows}
    for r in list(rows):
        for suffix in PAIRED_SUFFIXES:
            base = by_name.get(r["metric"][: -len(suffix) - 1]) if r["metric"].endswith("_" + suffix) else None
            if base is not None and set(r) == {"metric", "value"} and not base.get(suffix):
                base[suffix] = r["value"]
                rows.remove(r)


def rows_table(rows: list[dict]) -> str:
    """Rows of :func:`flatten` as one table with the fixed columns; a column empty in every row is left out."""
    columns = ["metric"] + [c for c in COLUMNS if any(r.get(c) for r in rows)]
    return table_html(pd.DataFrame([[r.get(c, "") for c in columns] for r in rows], columns=columns))


def records_table(records: list[dict]) -> str:
    return table_html(pd.DataFrame([{k: fmt(v) for k, v in r.items()} for r in records]))


def numbers_html(d: dict, units: int | None = None) -> str:
    """Every number of a metrics dict: one flat table, then each list of records under its key path."""
    rows, records = flatten(d, units)
    parts = [rows_table(rows)] if rows else []
    for name, recs in records:
        parts.append(f"<p class='small'><code>{esc(name)}</code></p>{records_table(recs)}")
    return "\n".join(parts)
