"""The IXI dataset: file names, demographics spreadsheet and folder layout.

IXI files are named ``IXI012-HH-1211-T1.nii.gz``: subject ``IXI012``, hospital
``HH`` (Hammersmith, Philips 3T), ``Guys`` (Guy's, Philips 1.5T) or ``IOP``
(Institute of Psychiatry, GE 1.5T), scan number and modality. The simulated
cohort of :mod:`brainvae.io.phantom` uses the same pattern with hospital ``SIM``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputFileError

HOSPITALS = {
    "HH": ("Hammersmith Hospital", "Philips", 3.0),
    "Guys": ("Guy's Hospital", "Philips", 1.5),
    "IOP": ("Institute of Psychiatry", "GE", 1.5),
    "SIM": ("simulated (brainvae phantom)", "none", float("nan")),
}
MODALITIES = ("T1", "T2", "PD", "MRA", "DTI")

_NAME = re.compile(
    r"^(?P<subject>[A-Za-z]+\d+)-(?P<hospital>[A-Za-z]+)-(?P<scan>\d+)-(?P<modality>T1|T2|PD|MRA|DTI)"
    r"(?P<rest>[-_][^.]*)?\.nii(\.gz)?$"
)
SEX_COLUMN = "SEX_ID (1=m, 2=f)"
SEX_CODES = {1: "M", 2: "F"}


@dataclass(frozen=True)
class IXIName:
    subject: str  # e.g. "IXI012"
    hospital: str  # "HH", "Guys", "IOP" (or "SIM")
    scan: str
    modality: str
    suffix: str  # e.g. "_dlmuse" for derived files, "" for the image itself


def parse_ixi_name(name: str) -> IXIName | None:
    """Parse an IXI-style file name; None if it does not follow the pattern."""
    m = _NAME.match(Path(name).name)
    if not m:
        return None
    return IXIName(m["subject"], m["hospital"], m["scan"], m["modality"], m["rest"] or "")


def field_strength(hospital: str) -> float:
    return HOSPITALS.get(hospital, ("", "", float("nan")))[2]


def normalise_subject_id(value) -> str:
    """IXI.xls stores ``IXI_ID`` as an integer (12); files say ``IXI012``."""
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and float(value).is_integer()):
        return f"IXI{int(value):03d}"
    text = str(value).strip()
    return f"IXI{int(text):03d}" if text.isdigit() else text


def read_demographics(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """Read ``IXI.xls`` (or a CSV with the same columns) into ``subject, sex, age``.

    Accepted columns: ``IXI_ID`` (or ``subject``), ``SEX_ID (1=m, 2=f)`` (or
    ``sex`` as M/F) and ``AGE`` (or ``age``). Identical duplicate rows collapse;
    rows that disagree on age or sex leave that value unknown and are reported.
    Returns the table indexed by subject and a list of problems found.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "demographics file not found")
    try:
        if path.suffix.lower() in (".xls", ".xlsx"):
            raw = pd.read_excel(path, engine="calamine")
        else:
            raw = pd.read_csv(path)
    except Exception as exc:  # pandas raises many types for unreadable files
        raise InputFileError(path, f"cannot read the spreadsheet ({exc})") from None

    cols = {c.strip(): c for c in raw.columns.astype(str)}
    id_col = cols.get("IXI_ID") or cols.get("subject")
    sex_col = cols.get(SEX_COLUMN) or cols.get("sex")
    age_col = cols.get("AGE") or cols.get("age")
    missing = [n for n, c in (("IXI_ID", id_col), (SEX_COLUMN, sex_col), ("AGE", age_col)) if c is None]
    if missing:
        raise InputFileError(path, f"missing column(s) {missing}; found {list(raw.columns)}")

    table = pd.DataFrame({
        "subject": raw[id_col].map(normalise_subject_id),
        "sex": raw[sex_col].map(_parse_sex),
        "age": pd.to_numeric(raw[age_col], errors="coerce"),
    })
    problems: list[str] = []
    rows = []
    for subject, group in table.groupby("subject", sort=True):
        row = {"subject": subject, "sex": None, "age": np.nan}
        for col in ("sex", "age"):
            values = group[col].dropna().unique()
            if len(values) == 1:
                row[col] = values[0]
            elif len(values) > 1:
                shown = ", ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in values)
                problems.append(f"{path.name}: {subject} has {len(group)} rows that disagree on {col} ({shown}); {col} left unknown")
        rows.append(row)
    out = pd.DataFrame(rows).set_index("subject")
    return out, problems


def _parse_sex(value) -> str | None:
    if pd.isna(value):
        return None
    text = str(value).strip().upper()
    if text in ("1", "1.0", "M", "MALE"):
        return "M"
    if text in ("2", "2.0", "F", "FEMALE"):
        return "F"
    return None
