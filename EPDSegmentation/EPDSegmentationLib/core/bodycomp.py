"""Body-composition measures from class probabilities: per-slice and whole-range tissue areas,
volumes and HU statistics. Pure NumPy; used by the Slicer module and the command line.

    rows = tissue_measures(prediction.probabilities, hu, spacing_mm, prediction.slices)
    measures_to_csv(rows, "case01-measures.csv")

What each number means (one row per slice and tissue, then one "all" row per tissue):
- ``area_cm2``: the soft area, sum of the tissue's probabilities times the pixel area. EPD
  models predict fractions, and only the soft sum keeps thin tissues (IMAT) at their true
  area; ``hard_area_cm2`` (argmax pixels times the pixel area) is reported beside it because
  an argmax of soft maps loses thin structures (see docs/slicer.md). In an "all" row both are
  the mean area per slice over the slices measured.
- ``volume_cm3`` / ``hard_volume_cm3``: area times the slice spacing (K); summed in "all".
- ``hu_mean`` / ``hu_sd``: mean and standard deviation of HU weighted by the tissue's
  probability (population SD). ``hard_hu_mean`` / ``hard_hu_sd``: the same over the argmax
  mask. NaN where the tissue is absent.
- ``protocol_area_cm2`` / ``protocol_hu_mean`` (only when asked for: ``--protocol``, the
  panel's "HU protocol" option): the HU-protocol area and its mean HU (core/indices.py),
  beside the soft area, never in its place; empty for MSC.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .atomic import atomic_file
from .classes import NUM_CLASSES, TISSUES, class_by_key

#: (row key, column header, description) in table order; the CSV uses the row keys.
COLUMNS: Tuple[Tuple[str, str, str], ...] = (
    ("slice", "Slice", "slice index K (0-based, as Slicer's Data Probe shows it); 'all' for "
                       "the whole range"),
    ("tissue", "Tissue", "tissue class key"),
    ("name", "Name", "tissue class name"),
    ("area_cm2", "Area (cm2)", "soft area: sum of probabilities x pixel area; in 'all' rows "
                               "the mean per slice"),
    ("hard_area_cm2", "Hard area (cm2)", "argmax pixels x pixel area; in 'all' rows the mean "
                                         "per slice"),
    ("volume_cm3", "Volume (cm3)", "soft area x slice spacing; summed in 'all' rows"),
    ("hard_volume_cm3", "Hard volume (cm3)", "hard area x slice spacing; summed in 'all' rows"),
    ("hu_mean", "Mean HU", "mean HU weighted by probability"),
    ("hu_sd", "SD HU", "standard deviation of HU weighted by probability"),
    ("hard_hu_mean", "Hard mean HU", "mean HU over the argmax mask"),
    ("hard_hu_sd", "Hard SD HU", "standard deviation of HU over the argmax mask"),
)
COLUMN_KEYS = tuple(c[0] for c in COLUMNS)
#: Per-slice columns that follow COLUMNS in the CSV when the rows have them
#: (with_uncertainty; ``epdseg segment`` always adds them).
SLICE_COLUMNS: Tuple[Tuple[str, str, str], ...] = (
    ("uncertainty", "Uncertainty", "the slice's mean normalised entropy of the soft labels: "
                                   "per pixel -sum p ln p / ln 6 (entropy in nats over its "
                                   "maximum, 0 = certain .. 1 = all six classes equally "
                                   "likely), averaged over every pixel of the slice (the same "
                                   "for each tissue's row); in 'all' rows the mean over the "
                                   "slices"),
    ("correct_first", "Correct first", "1, 2, 3: the slices suggested for correcting first, "
                                       "in order (the most uncertain, at least 3 slices "
                                       "apart: core.adapt.suggest_slices); empty otherwise"),
)
SLICE_COLUMN_KEYS = tuple(c[0] for c in SLICE_COLUMNS)


def _hu(key: str) -> str:
    lo, hi = class_by_key(key).hu_range
    return f"{lo:g}..{hi:g} HU"


#: Columns that follow in the CSV and the panel's table when the rows have them
#: (indices.with_protocol): the HU-protocol measures of core/indices.py for MUS, IMAT, SAT and VAT.
PROTOCOL_COLUMNS: Tuple[Tuple[str, str, str], ...] = (
    ("protocol_area_cm2", "Protocol area (cm2)",
     f"HU-protocol area (the Alberta protocol of Slice-O-Matic): within the network's muscle "
     f"(MUS + IMAT probability) {_hu('MUS')} is MUS and {_hu('IMAT')} is IMAT; SAT within "
     f"{_hu('SAT')} and VAT within {_hu('VAT')} of their own probability; in 'all' rows the "
     f"mean per slice; empty for MSC"),
    ("protocol_hu_mean", "Protocol mean HU", "mean HU over the protocol area, weighted as it "
                                             "is"),
)
PROTOCOL_COLUMN_KEYS = tuple(c[0] for c in PROTOCOL_COLUMNS)
#: Sums kept per slice and class, so long volumes can be measured chunk by chunk.
SUM_KEYS = ("p", "p_hu", "p_hu2", "n", "n_hu", "n_hu2")
#: Probabilities may overshoot 0..1 by this much (float rounding) before they are rejected.
_TOLERANCE = 1e-3

Rows = List[Dict[str, object]]


def _check_spacing(spacing_mm: Sequence[float]) -> Tuple[float, float, float]:
    try:
        s = tuple(float(v) for v in spacing_mm)
    except (TypeError, ValueError):
        raise ValueError(f"spacing_mm must be three numbers (I, J, K) in mm; got {spacing_mm!r}")
    if len(s) != 3 or not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing_mm must be three positive numbers (I, J, K) in mm; "
                         f"got {spacing_mm!r}")
    return s


def _check_probabilities(probabilities) -> np.ndarray:
    p = np.asarray(probabilities)
    if p.ndim != 4 or p.shape[0] != NUM_CLASSES:
        raise ValueError(f"probabilities must be (C, n, J, I) with C = {NUM_CLASSES}; got shape "
                         f"{p.shape}")
    if p.dtype.kind != "f":
        raise ValueError(f"probabilities must be floating point; got dtype {p.dtype}")
    if p.size and not np.isfinite(p).all():
        raise ValueError("probabilities hold NaN or infinite values")
    if p.size and (p.min() < -_TOLERANCE or p.max() > 1 + _TOLERANCE):
        raise ValueError(f"probabilities must lie in 0..1; found {p.min():.4g}..{p.max():.4g}")
    return p


def _select(p: np.ndarray, hu, slices: Sequence[int]) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """(probabilities (C, n, J, I), HU (n, J, I), slice indices) for the measured slices."""
    h = np.asarray(hu)
    if h.ndim != 3:
        raise ValueError(f"hu must be the (K, J, I) volume; got shape {h.shape}")
    if h.dtype.kind not in "iuf":
        raise ValueError(f"hu must be numeric HU values; got dtype {h.dtype}")
    if h.shape[1:] != p.shape[2:]:
        raise ValueError(f"hu slices are {h.shape[1:]} (J, I) but probabilities are "
                         f"{p.shape[2:]}")
    idx = [int(k) for k in slices]
    if not idx:
        raise ValueError("no slices to measure")
    if len(set(idx)) != len(idx):
        raise ValueError(f"slice indices repeat: {sorted(idx)}")
    bad = [k for k in idx if not 0 <= k < h.shape[0]]
    if bad:
        raise ValueError(f"slice index {bad[0]} outside the volume's 0..{h.shape[0] - 1}")
    if p.shape[1] == len(idx):          # the Prediction layout: one plane per listed slice
        return p, h[idx], idx
    if p.shape[1] == h.shape[0]:        # probabilities for the whole volume
        return p[:, idx], h[idx], idx
    raise ValueError(f"probabilities hold {p.shape[1]} slices: neither the {len(idx)} listed "
                     f"slices nor the volume's {h.shape[0]}")


#: pixels per float32 partial sum of the soft sums (one matrix product each); on a 512 x 512
#: slice within 1.2e-7 of the float64 sums (docs/benchmarks.md)
_SOFT_CHUNK = 1024
#: the hard sums count pixels per class and HU value when the HU are integers spanning at
#: most this many values (CT's -1024..3071, extended scales to about 30,000), else they
#: sum float64 weights
_HU_BINS = 1 << 16


def soft_sums(p: np.ndarray, h: np.ndarray, out: np.ndarray) -> None:
    """out (C, 3) float64 += sum over pixels of p (C, N) times [1, h, h^2] (h (N,) HU), as
    float32 matrix products of _SOFT_CHUNK pixels each, added in float64 (the rows of
    powers laid out contiguously: no (N, 3) stack)."""
    work = p.dtype
    powers = np.empty((3, h.size), work)
    powers[0] = 1
    np.copyto(powers[1], h, casting="unsafe")
    np.multiply(powers[1], powers[1], out=powers[2])
    C, D = p.shape[0], _SOFT_CHUNK
    whole = h.size // D * D
    if whole:
        parts = np.matmul(p[:, :whole].reshape(C, -1, D).transpose(1, 0, 2),
                          powers[:, :whole].reshape(3, -1, D).transpose(1, 2, 0))
        out += parts.sum(axis=0, dtype=np.float64)
    if whole < h.size:
        out += (p[:, whole:] @ powers[:, whole:].T).astype(np.float64)


def _integer_hu(h: np.ndarray) -> Optional[Tuple[np.ndarray, int, int]]:
    """(h as int32, its minimum, maximum) when every HU in h (N,) is an integer and they span
    at most _HU_BINS values; else None."""
    if h.dtype.kind in "iu" and h.dtype.itemsize <= 2:
        hi = h.astype(np.int32)
    else:
        with np.errstate(invalid="ignore"):     # NaN or out of int32's range: not equal
            hi = h.astype(np.int32)
        if not np.array_equal(hi.astype(h.dtype), h):
            return None
    if not hi.size:
        return None
    lo, top = int(hi.min()), int(hi.max())
    return (hi, lo, top) if top - lo < _HU_BINS else None


def _hard_sums(labels: np.ndarray, h: np.ndarray, C: int, out: np.ndarray) -> None:
    """out (C, 3) float64 = pixel count, sum of HU and sum of HU^2 per class over the argmax
    labels (N,) (h (N,) HU). Integer HU (CT's): one count per class and HU value, then
    exact float64 dot products with the values; others: float64 weighted bincounts.
    Either is exact for integer HU."""
    found = _integer_hu(h)
    if found is None:
        hs = h.astype(np.float64)
        lab = labels.astype(np.intp)               # bincount's own type: converted once
        out[:, 0] = np.bincount(lab, minlength=C)
        out[:, 1] = np.bincount(lab, weights=hs, minlength=C)
        out[:, 2] = np.bincount(lab, weights=hs * hs, minlength=C)
        return
    hi, lo, top = found
    width = top - lo + 1
    key = labels.astype(np.int32)
    key *= width
    key += hi
    key -= lo
    counts = np.bincount(key, minlength=C * width).reshape(C, width).astype(np.float64)
    values = np.arange(lo, top + 1, dtype=np.float64)
    out[:] = counts @ np.stack([np.ones_like(values), values, values * values], axis=1)


def slice_sums(probabilities, hu, labels: Optional[np.ndarray] = None,
               checked: bool = False) -> Dict[str, np.ndarray]:
    """Per-slice, per-class sums (float64 (n, C) each, keys SUM_KEYS): probability mass ``p``,
    ``p_hu``, ``p_hu2`` and, over the argmax mask, pixel count ``n``, ``n_hu``, ``n_hu2``.

    probabilities: (C, n, J, I) in 0..1; hu: (n, J, I) HU of the same slices; labels: their
    argmax (n, J, I) when the caller has it already (core.stream), else computed here;
    checked: the probabilities were checked already (shape, finite, 0..1).

    float32 probabilities are summed in float32 partial sums of _SOFT_CHUNK pixels (relative
    rounding about 1e-7), added in float64, with no float64 copy of the probabilities; the
    hard sums are exact for integer HU."""
    p = np.asarray(probabilities) if checked else _check_probabilities(probabilities)
    h = np.asarray(hu)
    if h.shape != p.shape[1:]:
        raise ValueError(f"hu {h.shape} does not match probabilities {p.shape[1:]} (n, J, I)")
    n_slices, C = p.shape[1], p.shape[0]
    hard = np.argmax(p, axis=0) if labels is None else np.asarray(labels)
    work = np.float32 if p.dtype == np.float32 else np.float64
    soft = np.zeros((n_slices, C, 3), np.float64)
    counted = np.zeros((n_slices, C, 3), np.float64)
    for s in range(n_slices):  # one slice at a time keeps the scratch small
        ps = p[:, s].reshape(C, -1).astype(work, copy=False)
        soft_sums(ps, h[s].reshape(-1), soft[s])
        _hard_sums(hard[s].reshape(-1), h[s].reshape(-1), C, counted[s])
    out = {key: np.ascontiguousarray(soft[:, :, i]) for i, key in enumerate(SUM_KEYS[:3])}
    out.update((key, np.ascontiguousarray(counted[:, :, i]))
               for i, key in enumerate(SUM_KEYS[3:]))
    return out


def _mean_sd(w: float, wx: float, wx2: float) -> Tuple[float, float]:
    if w <= 0:
        return float("nan"), float("nan")
    mean = wx / w
    return mean, math.sqrt(max(0.0, wx2 / w - mean * mean))


def _row(slice_label, c, sums: Dict[str, float], pixel_cm2: float, thickness_cm: float,
         n_slices: int) -> Dict[str, object]:
    area = sums["p"] * pixel_cm2
    hard_area = sums["n"] * pixel_cm2
    hu_mean, hu_sd = _mean_sd(sums["p"], sums["p_hu"], sums["p_hu2"])
    hard_mean, hard_sd = _mean_sd(sums["n"], sums["n_hu"], sums["n_hu2"])
    return {
        "slice": slice_label,
        "tissue": c.key,
        "name": c.name,
        "area_cm2": area / n_slices,
        "hard_area_cm2": hard_area / n_slices,
        "volume_cm3": area * thickness_cm,
        "hard_volume_cm3": hard_area * thickness_cm,
        "hu_mean": hu_mean,
        "hu_sd": hu_sd,
        "hard_hu_mean": hard_mean,
        "hard_hu_sd": hard_sd,
    }


def measures_from_sums(sums: Dict[str, np.ndarray], spacing_mm: Sequence[float],
                       slices: Sequence[int]) -> Rows:
    """Rows (see COLUMNS) from ``slice_sums`` (possibly concatenated over chunks, in the order
    of ``slices``): one row per slice and tissue 1..5, then one "all" row per tissue."""
    si, sj, sk = _check_spacing(spacing_mm)
    idx = [int(k) for k in slices]
    if any(np.shape(sums[k])[0] != len(idx) for k in SUM_KEYS):
        raise ValueError(f"sums hold {np.shape(sums['p'])[0]} slices but {len(idx)} slice "
                         f"indices were given")
    if not idx:
        raise ValueError("no slices to measure")
    pixel_cm2 = si * sj / 100.0
    thickness_cm = sk / 10.0
    rows: Rows = []
    for s, k in enumerate(idx):
        for c in TISSUES:
            rows.append(_row(k, c, {key: float(sums[key][s, c.index]) for key in SUM_KEYS},
                             pixel_cm2, thickness_cm, 1))
    for c in TISSUES:
        total = {key: float(np.sum(sums[key][:, c.index])) for key in SUM_KEYS}
        rows.append(_row("all", c, total, pixel_cm2, thickness_cm, len(idx)))
    return rows


def with_uncertainty(rows: Rows, slices: Sequence[int], scores: Sequence[float],
                     suggested: Sequence[int]) -> Rows:
    """The rows with SLICE_COLUMNS added: scores (n,) is the uncertainty of each of
    ``slices`` (0..1, see SLICE_COLUMNS); suggested: slice indices to correct first, in
    order. "all" rows get the mean uncertainty and no rank. New dicts; rows are unchanged."""
    scores = np.asarray(scores, np.float64)
    if scores.shape != (len(slices),):
        raise ValueError(f"{scores.shape[0] if scores.ndim else 0} uncertainty scores for "
                         f"{len(slices)} slices")
    by_slice = {int(k): float(v) for k, v in zip(slices, scores)}
    rank = {int(k): i + 1 for i, k in enumerate(suggested)}
    mean = float(scores.mean()) if scores.size else float("nan")
    out: Rows = []
    for row in rows:
        k = row["slice"]
        extra = {"uncertainty": mean, "correct_first": None} if k == "all" else \
            {"uncertainty": by_slice.get(int(k), float("nan")), "correct_first": rank.get(int(k))}
        out.append({**row, **extra})
    return out


def concatenate_sums(parts: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Join ``slice_sums`` of consecutive chunks along the slice axis."""
    if not parts:
        return {k: np.zeros((0, NUM_CLASSES), np.float64) for k in SUM_KEYS}
    return {k: np.concatenate([part[k] for part in parts], axis=0) for k in SUM_KEYS}


def tissue_measures(probabilities, hu, spacing_mm: Sequence[float],
                    slices: Sequence[int]) -> Rows:
    """Tissue measures for the slices of a prediction.

    probabilities: float (C, n, J, I), C = 6 classes (background first), one plane per
    index in ``slices`` (as inference.Prediction gives them), or (C, K, J, I) for the whole
    volume (then the listed slices are taken; when n == K the first reading wins);
    hu: the volume (K, J, I) in HU; spacing_mm: voxel size (I, J, K) in mm; slices: the
    slice indices K to measure. Returns rows (dicts keyed by COLUMN_KEYS): per slice and
    tissue 1..5 in the order given, then the "all" rows. Units: cm^2, cm^3, HU.
    """
    p, h, idx = _select(_check_probabilities(probabilities), hu, slices)
    return measures_from_sums(slice_sums(p, h), spacing_mm, idx)


def csv_cell(value) -> str:
    """One CSV cell: empty for None and NaN, floats to 6 significant digits."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def measures_to_csv(rows: Rows, path: Union[str, os.PathLike], *,
                    overwrite: bool = False) -> Path:
    """Write rows as CSV (header = COLUMN_KEYS, then SLICE_COLUMN_KEYS and
    PROTOCOL_COLUMN_KEYS when the first row has them; NaN and None as an empty cell),
    atomically: a temporary file in the same folder, then os.replace. An existing file is
    kept unless overwrite."""
    keys = COLUMN_KEYS + (SLICE_COLUMN_KEYS if rows and SLICE_COLUMN_KEYS[0] in rows[0] else ()) \
        + (PROTOCOL_COLUMN_KEYS if rows and PROTOCOL_COLUMN_KEYS[0] in rows[0] else ())
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"row {i} lacks column(s) {', '.join(missing)}")
    with atomic_file(path, overwrite) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(keys)
            for row in rows:
                writer.writerow([csv_cell(row[k]) for k in keys])
    return Path(path)


def total_rows(rows: Rows) -> Dict[str, Dict[str, object]]:
    """The "all" rows keyed by tissue key."""
    return {str(r["tissue"]): r for r in rows if r["slice"] == "all"}


def summary_line(rows: Rows, keys: Optional[Sequence[str]] = None) -> str:
    """One line for a status bar: mean soft area per slice of each tissue, cm^2."""
    totals = total_rows(rows)
    keys = keys or [c.key for c in TISSUES]
    return ", ".join(f"{k} {float(totals[k]['area_cm2']):.1f}" for k in keys if k in totals) \
        + " cm2 per slice"
