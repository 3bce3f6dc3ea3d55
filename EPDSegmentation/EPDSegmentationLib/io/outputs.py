"""File names of a case's results: one scheme for ``epdseg segment`` and the Slicer export.

    <stem>.seg.nrrd                  hard labels (Slicer segmentation)
    <stem>_soft.seg.nrrd             probabilities as fractional-labelmap segments
    <stem>_protocol.seg.nrrd         the HU protocol's labels (core.indices.protocol_labels)
    <stem>_probabilities.nrrd        probabilities as one 6-component volume (command line)
    <stem>_probability_<KEY>.nrrd    one probability volume per tissue (Slicer export)
    <stem>_bodycomp.csv              the body-composition table
    <stem>_overlay.png               a slice with the overlay (command line)
    <stem>_levels.png                the vertebral levels found (cohort with --level)
    <stem>_seg.dcm                   DICOM SEG, binary
    <stem>_prob_seg.dcm              DICOM SEG, fractional (probability)
    <stem>_provenance.json           command line: written last, the case's completion
                                     marker (its files, their SHA-256 and provenance)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Union

SUFFIXES = {
    "segmentation": ".seg.nrrd",
    "soft_segmentation": "_soft.seg.nrrd",
    "protocol_segmentation": "_protocol.seg.nrrd",
    "probabilities": "_probabilities.nrrd",
    "table": "_bodycomp.csv",
    "overlay": "_overlay.png",
    "levels": "_levels.png",
    "dicom_seg": "_seg.dcm",
    "dicom_fractional_seg": "_prob_seg.dcm",
    "provenance": "_provenance.json",
}


def safe_stem(name: str, default: str = "case") -> str:
    """A case or node name made safe for a file name (letters, digits, '.', '_', '-')."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return stem or default


def output_path(folder: Union[str, Path], stem: str, role: str) -> Path:
    """Path of one result (a key of SUFFIXES) for a case called ``stem``."""
    return Path(folder) / f"{safe_stem(stem)}{SUFFIXES[role]}"


def probability_volume_path(folder: Union[str, Path], stem: str, key: str) -> Path:
    """Path of one tissue's probability volume (tissue key, e.g. 'IMAT')."""
    return Path(folder) / f"{safe_stem(stem)}_probability_{key}.nrrd"
