"""The IXI dataset: file names, subject ids and hospitals (``IXI.xls`` is read by :mod:`.demographics`).

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

HOSPITALS = {
    "HH": ("Hammersmith Hospital", "Philips", 3.0),
    "Guys": ("Guy's Hospital", "Philips", 1.5),
    "IOP": ("Institute of Psychiatry", "GE", 1.5),
    "SIM": ("simulated (brainvae phantom)", "none", float("nan")),
}

_NAME = re.compile(
    r"^(?P<subject>[A-Za-z]+\d+)-(?P<hospital>[A-Za-z]+)-(?P<scan>\d+)-(?P<modality>T1|T2|PD|MRA|DTI)"
    r"(?P<rest>[-_][^.]*)?\.nii(\.gz)?$"
)


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
