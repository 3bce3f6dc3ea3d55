"""The one table of tissue classes: index, names, colours, SNOMED CT codes and HU ranges.

Everything that names, colours or codes a class (the Slicer segments, the .seg.nrrd writer,
DICOM SEG, the body-composition table, figures) reads it from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM style): scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str


TISSUE = Code("SCT", "85756007", "Tissue")
ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")


@dataclass(frozen=True)
class TissueClass:
    """One class of the label maps.

    index: label value; key: short name used in files and segment IDs; name: display name;
    color: sRGB 0..255; category/type/region: SNOMED CT codes for segment terminology
    (the codes SlicerTotalSegmentator uses for the same tissues); hu_range: the HU interval
    the tissue is expected in on CT (inclusive, used for checks and thresholds), or None.
    """

    index: int
    key: str
    name: str
    color: Tuple[int, int, int]
    category: Optional[Code]
    type: Optional[Code]
    region: Optional[Code]
    hu_range: Optional[Tuple[float, float]]


FAT = Code("SCT", "55603005", "Fat")

CLASSES: Tuple[TissueClass, ...] = (
    TissueClass(0, "BG", "Background", (0, 0, 0), None, None, None, None),
    TissueClass(1, "MUS", "Skeletal muscle", (214, 69, 65), ANATOMICAL_STRUCTURE,
                Code("SCT", "127954009", "Skeletal muscle"), None, (-29.0, 150.0)),
    TissueClass(2, "IMAT", "Intermuscular adipose tissue", (110, 200, 80), ANATOMICAL_STRUCTURE,
                FAT, Code("SCT", "71616004", "Muscle"), (-190.0, -30.0)),
    TissueClass(3, "SAT", "Subcutaneous adipose tissue", (245, 210, 75), TISSUE,
                Code("SCT", "67769002", "Subcutaneous fatty tissue"), None, (-190.0, -30.0)),
    TissueClass(4, "VAT", "Visceral adipose tissue", (80, 150, 230), TISSUE,
                FAT, Code("SCT", "22943007", "Trunk"), (-150.0, -50.0)),
    TissueClass(5, "MSC", "Other body tissue", (165, 140, 190), TISSUE,
                TISSUE, None, None),
)

NUM_CLASSES = len(CLASSES)
KEYS = tuple(c.key for c in CLASSES)
#: The tissue classes proper (everything but background), in label order.
TISSUES = CLASSES[1:]


def class_by_key(key: str) -> TissueClass:
    """Look a class up by its key (case-insensitive), e.g. "sat"."""
    for c in CLASSES:
        if c.key.lower() == key.lower():
            return c
    raise KeyError(f"unknown tissue class {key!r}; known: {', '.join(KEYS)}")


def color_table(dtype=float):
    """(NUM_CLASSES, 3) colours; floats in 0..1 by default, or uint8 0..255."""
    import numpy as np

    table = np.array([c.color for c in CLASSES], dtype=np.float64)
    if np.dtype(dtype) == np.uint8:
        return table.astype(np.uint8)
    return (table / 255.0).astype(dtype)
