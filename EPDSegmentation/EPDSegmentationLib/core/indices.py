"""Body-composition indices researchers publish, and the standard HU protocol areas.

- Height: metres from DICOM PatientSize, or a value given by a person (``--height``, a
  manifest column) in metres or centimetres, detected from its size; 0, negative, ambiguous
  or implausible values are refused with a sentence saying what to pass.
- Indices: area / height^2 in cm^2/m^2: SMI (skeletal muscle), IMATI, SATI, VATI.
- Protocol areas (the Alberta protocol used with Slice-O-Matic, GUIDE section 8): within
  what the network calls muscle (MUS + IMAT probabilities), HU -29..150 is muscle and
  -190..-30 is IMAT; SAT and VAT are the network's probabilities within their HU ranges
  (classes.py: SAT -190..-30, VAT -150..-50). Reported beside the network's soft areas, in
  columns named ``protocol_*``, never in place of them: per case (protocol_from_sums), per
  slice and range in the measures rows (with_protocol), summed slice by slice as segment
  streams (protocol_plane_sums); and as labels (protocol_labels).
"""

from __future__ import annotations

import math
import re
from typing import Dict, Optional, Sequence

import numpy as np

from .bodycomp import Rows, soft_sums
from .classes import TISSUES, class_by_key

#: Adult heights accepted, metres; outside this a value is refused as implausible.
HEIGHT_RANGE_M = (1.0, 2.5)
INDEX_KEYS = {"MUS": "SMI", "IMAT": "IMATI", "SAT": "SATI", "VAT": "VATI"}
#: The tissues the HU protocol measures, in protocol_masks' order.
PROTOCOL_KEYS = ("MUS", "IMAT", "SAT", "VAT")


class HeightError(ValueError):
    """A height that cannot be used (the message says why and what to pass)."""


def height_m(value, source: str = "--height") -> float:
    """Height in metres from ``value``: a number or text, optionally with a unit ("172",
    "172 cm", "1.72", "1.72m"). Without a unit, 1.0..2.5 is metres and 100..250 is
    centimetres; anything else (0, negative, 2.5..100, > 250) raises HeightError naming
    ``source``."""
    text = str(value).strip().lower()
    m = re.fullmatch(r"([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)\s*(m|cm)?", text)
    if not m:
        raise HeightError(f"{source}: cannot read height {value!r}; give it in cm (172) "
                          f"or m (1.72)")
    number, unit = float(m.group(1)), m.group(2)
    if not math.isfinite(number) or number <= 0:
        raise HeightError(f"{source}: height {value!r} must be a positive number (cm or m)")
    if unit == "cm" or (unit is None and number >= 100):
        metres = number / 100.0
    elif unit == "m" or (unit is None and number <= HEIGHT_RANGE_M[1]):
        metres = number
    else:
        raise HeightError(f"{source}: height {value!r} is ambiguous (neither metres, 1.0 to "
                          f"2.5, nor centimetres, 100 to 250); give it with its unit, e.g. "
                          f"'172 cm' or '1.72 m'")
    lo, hi = HEIGHT_RANGE_M
    if not lo <= metres <= hi:
        raise HeightError(f"{source}: height {value!r} reads as {metres:.2f} m, outside the "
                          f"adult range {lo:g} to {hi:g} m; check the unit")
    return metres


def dicom_height_m(patient_size) -> Optional[float]:
    """Height in metres from DICOM PatientSize (0010,1020), which is in metres; None when
    absent or empty. A value in centimetres (e.g. 172) is refused with HeightError."""
    if patient_size is None or str(patient_size).strip() in ("", "0", "0.0"):
        return None
    number = float(patient_size)
    if number > HEIGHT_RANGE_M[1]:
        raise HeightError(f"DICOM PatientSize {patient_size} is not in metres (it looks like "
                          f"centimetres); pass --height to override")
    return height_m(f"{number} m", "DICOM PatientSize")


def indices(areas_cm2: Dict[str, float], height: Optional[float]) -> Dict[str, float]:
    """SMI, IMATI, SATI, VATI (cm^2/m^2) from areas (tissue key -> cm^2) and height (m);
    NaN for every index when the height is unknown."""
    out = {}
    for key, name in INDEX_KEYS.items():
        area = areas_cm2.get(key, float("nan"))
        out[name] = float(area) / (height * height) if height else float("nan")
    return out


def protocol_masks(probabilities: np.ndarray, hu: np.ndarray) -> Dict[str, np.ndarray]:
    """Protocol weights per tissue, float32 (n, J, I) in 0..1: the network's compartment
    probability kept where the HU falls in the protocol's range.

    probabilities: (C, n, J, I) with classes 0 BG, 1 MUS, 2 IMAT, 3 SAT, 4 VAT, 5 MSC;
    hu: (n, J, I) HU."""
    p = np.asarray(probabilities, np.float32)
    h = np.asarray(hu, np.float32)
    if p.shape[1:] != h.shape:
        raise ValueError(f"hu {h.shape} does not match probabilities {p.shape[1:]}")

    def within(key: str) -> np.ndarray:
        lo, hi = class_by_key(key).hu_range
        return ((h >= lo) & (h <= hi)).astype(np.float32)

    muscle = p[1] + p[2]                 # what the network calls the muscle compartment
    return {"MUS": muscle * within("MUS"), "IMAT": muscle * within("IMAT"),
            "SAT": p[3] * within("SAT"), "VAT": p[4] * within("VAT")}


def protocol_labels(labels: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """The HU protocol as a label map, uint8 of ``labels``' shape (class indices, the
    network's argmax; hu: HU of the same shape): a pixel labelled MUS or IMAT becomes MUS
    within MUS's HU range and IMAT within IMAT's; SAT and VAT keep their label within their
    own range; MSC stays MSC; every other pixel, and one outside its range, is 0 (not
    counted, as Slice-O-Matic leaves it untagged). The hard counterpart of protocol_masks:
    its areas are pixel counts, the table's protocol areas probability-weighted."""
    lab = np.asarray(labels)
    h = np.asarray(hu)
    if lab.shape != h.shape:
        raise ValueError(f"hu {h.shape} does not match labels {lab.shape}")

    def within(key: str) -> np.ndarray:
        lo, hi = class_by_key(key).hu_range
        return (h >= lo) & (h <= hi)

    out = np.zeros(lab.shape, np.uint8)
    muscle = (lab == class_by_key("MUS").index) | (lab == class_by_key("IMAT").index)
    for key, where in (("MUS", muscle), ("IMAT", muscle),
                       ("SAT", lab == class_by_key("SAT").index),
                       ("VAT", lab == class_by_key("VAT").index)):
        out[where & within(key)] = class_by_key(key).index
    msc = class_by_key("MSC").index
    out[lab == msc] = msc
    return out


def protocol_plane_sums(probabilities: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """One slice's HU-protocol sums, float64 (4, 2): per tissue of protocol_masks
    (PROTOCOL_KEYS) the protocol weight (pixels) and weight x HU. probabilities: (C, J, I)
    float; hu: (J, I) HU. The masks' weights through bodycomp.soft_sums (float32 blocks
    added in float64, as the soft areas), one slice at a time so that segment's output
    threads make them beside the other outputs (a slab at a time in float64 cost 22 ms a
    512 x 512 slice, this 4.6: docs/benchmarks.md)."""
    masks = protocol_masks(np.asarray(probabilities)[:, None], np.asarray(hu)[None])
    weights = np.stack([w.reshape(-1) for w in masks.values()])
    out = np.zeros((weights.shape[0], 3), np.float64)
    soft_sums(weights, np.asarray(hu).reshape(-1), out)
    return out[:, :2]


def protocol_slice_sums(probabilities: np.ndarray, hu: np.ndarray) -> Dict[str, np.ndarray]:
    """Per tissue, float64 (n, 2): each slice's protocol weight (pixels) and weight x HU;
    what protocol_from_sums needs, so slabs can be measured as they stream past.
    probabilities (C, n, J, I), hu (n, J, I); slice by slice (protocol_plane_sums, what
    segment's output threads run)."""
    p = np.asarray(probabilities)
    h = np.asarray(hu)
    if p.shape[1:] != h.shape:
        raise ValueError(f"hu {h.shape} does not match probabilities {p.shape[1:]}")
    planes = np.stack([protocol_plane_sums(p[:, s], h[s]) for s in range(h.shape[0])]) \
        if h.shape[0] else np.zeros((0, len(PROTOCOL_KEYS), 2))
    return {key: planes[:, i] for i, key in enumerate(PROTOCOL_KEYS)}


def protocol_from_sums(sums: Sequence[Dict[str, np.ndarray]],
                       spacing_mm: Sequence[float]) -> Dict[str, float]:
    """Protocol areas (cm^2, mean per slice) and mean HU per tissue from protocol_slice_sums
    of one or more slabs: keys ``protocol_area_cm2_<KEY>`` and ``protocol_hu_mean_<KEY>``."""
    si, sj = float(spacing_mm[0]), float(spacing_mm[1])
    out: Dict[str, float] = {}
    if not sums:
        return out
    for key in sums[0]:
        both = np.concatenate([s[key] for s in sums])
        n = max(1, both.shape[0])
        mass, hu_mass = float(both[:, 0].sum()), float(both[:, 1].sum())
        out[f"protocol_area_cm2_{key}"] = mass * si * sj / 100.0 / n
        out[f"protocol_hu_mean_{key}"] = hu_mass / mass if mass > 0 else float("nan")
    return out


def with_protocol(rows: Rows, slices: Sequence[int],
                  protocol_sums: Sequence[Dict[str, np.ndarray]],
                  spacing_mm: Sequence[float]) -> Rows:
    """The rows with bodycomp.PROTOCOL_COLUMNS added. protocol_sums: protocol_slice_sums of
    consecutive slabs (tissue key -> float64 (n, 2) per slice), together one entry per index
    in ``slices``, in that order; spacing_mm: (I, J, K) mm. Each slice's values and the "all"
    rows' (the mean area per slice, as area_cm2) are protocol_from_sums of its
    slices. Tissues without protocol sums (MSC) get NaN. New dicts."""
    keys = list(protocol_sums[0]) if protocol_sums else []
    joined = {k: np.concatenate([np.asarray(part[k], np.float64).reshape(-1, 2)
                                 for part in protocol_sums]) for k in keys}
    if any(v.shape[0] != len(slices) for v in joined.values()):
        raise ValueError(f"protocol sums hold {next(iter(joined.values())).shape[0]} slices "
                         f"but {len(slices)} slice indices were given")
    measures = {"all": protocol_from_sums([joined], spacing_mm)}
    for s, k in enumerate(slices):
        measures[int(k)] = protocol_from_sums([{key: v[s:s + 1] for key, v in joined.items()}],
                                              spacing_mm)
    nan = float("nan")
    out: Rows = []
    for row in rows:
        m = measures["all" if row["slice"] == "all" else int(row["slice"])]
        key = row["tissue"]
        out.append({**row, "protocol_area_cm2": m.get(f"protocol_area_cm2_{key}", nan),
                    "protocol_hu_mean": m.get(f"protocol_hu_mean_{key}", nan)})
    return out


def protocol_measures(probabilities: np.ndarray, hu: np.ndarray,
                      spacing_mm: Sequence[float]) -> Dict[str, float]:
    """Protocol areas (cm^2, mean per slice) and mean HU per tissue over n slices:
    keys ``protocol_area_cm2_<KEY>`` and ``protocol_hu_mean_<KEY>`` for MUS, IMAT, SAT, VAT.
    probabilities (C, n, J, I), hu (n, J, I) HU; spacing_mm: (I, J, K) voxel size in mm."""
    return protocol_from_sums([protocol_slice_sums(probabilities, hu)], spacing_mm)


def soft_hu_means(probabilities: np.ndarray, hu: np.ndarray) -> Dict[str, float]:
    """Mean HU per tissue weighted by the network's probabilities: ``hu_mean_<KEY>``."""
    p = np.asarray(probabilities, np.float64)
    h = np.asarray(hu, np.float64)
    out = {}
    for c in TISSUES:
        mass = float(p[c.index].sum())
        out[f"hu_mean_{c.key}"] = float((p[c.index] * h).sum()) / mass if mass > 0 \
            else float("nan")
    return out

