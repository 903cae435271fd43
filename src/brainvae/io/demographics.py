"""Demographics tables -> one row per subject: ``subject``, ``sex`` ("M" / "F" / None), ``age`` (years or NaN).

Read: ``IXI.xls``, a CSV or TSV (``--demographics FILE``) and a BIDS ``participants.tsv``.
Columns are found by name, in any case:

- subject: ``participant_id`` (BIDS, ``sub-`` added when missing), ``subject``, ``subject_id``, ``id``
  or ``IXI_ID`` (IXI's integer 12 -> ``IXI012``);
- age: ``age`` (years);
- sex: ``sex`` or ``gender``, written ``M`` / ``F`` or ``male`` / ``female``. Numeric codes (1/2, 0/1)
  mean different things in different studies and are refused unless their coding is documented, in the
  column name (``sex (1=M, 2=F)``, IXI's ``SEX_ID (1=m, 2=f)``) or in a BIDS sidecar beside the table
  (``participants.json``: ``{"sex": {"Levels": {"1": "male", "2": "female"}}}``).

Other sex values (``O``, ``other``...) and missing ones (``n/a``) leave sex unknown; identical duplicate rows
collapse, rows that disagree leave the value unknown; both are reported as problems.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..conditions import SEX_WORDS
from ..errors import InputFileError
from .ixi import normalise_subject_id

ID_COLUMNS = ("participant_id", "subject", "subject_id", "id", "ixi_id")
_SEX_COLUMN = re.compile(r"^(sex|gender)(_id)?\s*(\((?P<coding>[^)]*)\))?$", re.IGNORECASE)
EXPECTED = ("a subject column (participant_id, subject, subject_id, id or IXI_ID), age (years) and sex "
            "(M / F or male / female; a numeric code only with its coding, e.g. a column named 'sex (1=M, 2=F)')")


def read_demographics(path: Path, *, require_all: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """The table indexed by subject with columns ``sex`` and ``age``, and the problems found.

    A missing subject column is always an error naming the expected columns; so are missing age and sex
    columns when ``require_all`` (a file the user gave), else (a ``participants.tsv`` found in a BIDS
    dataset, where they are optional) they are reported and left unknown."""
    path = Path(path)
    raw = _read_table(path)
    columns = {str(c).strip().lower(): c for c in raw.columns}
    id_col = next((columns[n] for n in ID_COLUMNS if n in columns), None)
    age_col = columns.get("age")
    sex_col = next((c for c in raw.columns if _SEX_COLUMN.match(str(c).strip())), None)
    missing = [what for what, col in (("subject", id_col), ("age", age_col), ("sex", sex_col))
               if col is None and (require_all or what == "subject")]
    if missing:
        raise InputFileError(path, f"missing column(s) {', '.join(missing)}; expected {EXPECTED}; "
                                   f"found columns {[str(c) for c in raw.columns]}")
    problems = [f"{path.name}: no {what} column; {what} unknown for every subject"
                for what, col in (("age", age_col), ("sex", sex_col)) if col is None]
    table = pd.DataFrame({
        "subject": [_subject_id(v, str(id_col).strip().lower()) for v in raw[id_col]],
        "sex": _sexes(raw[sex_col], sex_col, path, problems) if sex_col is not None else None,
        "age": pd.to_numeric(raw[age_col], errors="coerce") if age_col is not None else np.nan,
    }).dropna(subset=["subject"])
    return _one_row_per_subject(table, path, problems), problems


def _read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise InputFileError(path, "demographics file not found")
    try:
        if path.suffix.lower() in (".xls", ".xlsx"):
            return pd.read_excel(path, engine="calamine")
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        return pd.read_csv(path, sep=sep, na_values=["n/a"], skipinitialspace=True)
    except Exception as exc:  # pandas raises many types for unreadable files
        raise InputFileError(path, f"cannot read the spreadsheet ({' '.join(str(exc).split())})") from None


def _code(value) -> str:
    """A cell as text; 2.0 (a numeric column with gaps) -> "2"."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value).strip()


def _subject_id(value, column: str) -> str | None:
    if pd.isna(value):
        return None
    if column == "ixi_id":
        return normalise_subject_id(value)
    text = _code(value)
    return f"sub-{text}" if column == "participant_id" and not text.startswith("sub-") else text


def _sexes(values: pd.Series, column, path: Path, problems: list[str]) -> list[str | None]:
    """Each cell as "M" / "F" / None; undocumented numeric codes are an error."""
    coding = _sex_coding(column, path)
    out, unknown = [], {}
    for value in values:
        if pd.isna(value) or _code(value) == "":
            out.append(None)
            continue
        code = _code(value)
        sex = coding.get(code.lower()) or SEX_WORDS.get(code.lower())
        if sex is None and re.fullmatch(r"[+-]?\d+(\.\d*)?", code):
            raise InputFileError(path, f"column {str(column)!r} holds numeric codes "
                                       f"({', '.join(sorted({_code(v) for v in values.dropna()}))}) whose meaning "
                                       f"is not documented; write M / F, or give the coding in the column name, "
                                       f"e.g. 'sex (1=M, 2=F)'")
        if sex is None:
            unknown[code] = unknown.get(code, 0) + 1
        out.append(sex)
    problems.extend(f"{path.name}: {n} row(s) with sex {code!r} (neither M nor F); sex left unknown"
                    for code, n in unknown.items())
    return out


def _sex_coding(column, path: Path) -> dict[str, str]:
    """code -> "M" / "F" documented in the column name or, for a TSV, in its BIDS sidecar (``TABLE.json``)."""
    pairs = re.findall(r"(\w+)\s*=\s*(\w+)", _SEX_COLUMN.match(str(column).strip())["coding"] or "")
    sidecar = path.with_suffix(".json")
    if path.suffix.lower() == ".tsv" and sidecar.exists():
        try:
            levels = json.loads(sidecar.read_text()).get(str(column), {}).get("Levels", {})
        except (ValueError, AttributeError):
            raise InputFileError(sidecar, f"not a BIDS sidecar (JSON with a {str(column)!r} entry)") from None
        pairs += [(str(code), str(meaning)) for code, meaning in levels.items()]
    return {code.lower(): SEX_WORDS[meaning.lower()] for code, meaning in pairs if meaning.lower() in SEX_WORDS}


def _one_row_per_subject(table: pd.DataFrame, path: Path, problems: list[str]) -> pd.DataFrame:
    rows = []
    for subject, group in table.groupby("subject", sort=True):
        row = {"subject": subject, "sex": None, "age": np.nan}
        for col in ("sex", "age"):
            values = group[col].dropna().unique()
            if len(values) == 1:
                row[col] = values[0]
            elif len(values) > 1:
                shown = ", ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in values)
                problems.append(f"{path.name}: {subject} has {len(group)} rows that disagree on {col} ({shown}); "
                                f"{col} left unknown")
        rows.append(row)
    return pd.DataFrame(rows, columns=["subject", "sex", "age"]).set_index("subject")
