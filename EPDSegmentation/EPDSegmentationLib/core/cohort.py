"""The cohort table's columns (one row per case), shared by ``epdseg segment --cohort`` and
the Slicer panel's cohort table, and the row the panel builds from a segmented level."""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

from .classes import TISSUES
from .indices import INDEX_KEYS, PROTOCOL_KEYS, indices

COHORT_COLUMNS: Tuple[str, ...] = (
    ("case", "status", "message", "source", "patient_id", "study_uid", "series_uid",
     "level", "level_source", "slice", "n_slices", "z_mm", "slab_mm")
    + tuple(f"area_cm2_{c.key}" for c in TISSUES)
    + tuple(f"hu_mean_{c.key}" for c in TISSUES)
    + tuple(f"protocol_area_cm2_{k}" for k in PROTOCOL_KEYS)
    + tuple(f"protocol_hu_mean_{k}" for k in PROTOCOL_KEYS)
    + ("height_m", "height_source", "weight_kg", "sex")
    + tuple(INDEX_KEYS.values())
    + tuple(f"protocol_{v}" for v in INDEX_KEYS.values())
    + ("model", "model_version", "shard"))


def row_indices(row: Dict[str, object], height_m: float, *,
                protocol: bool = False) -> Dict[str, float]:
    """SMI, IMATI, SATI, VATI (cm^2/m^2) from a cohort row's ``area_cm2_<KEY>`` and the
    height (m); with protocol, also ``protocol_SMI`` and so on from its
    ``protocol_area_cm2_<KEY>``. NaN where an area is missing."""
    out = indices({k: float(row.get(f"area_cm2_{k}", math.nan)) for k in INDEX_KEYS},
                  height_m)
    if protocol:
        out.update({f"protocol_{name}": value for name, value in indices(
            {k: float(row.get(f"protocol_area_cm2_{k}", math.nan)) for k in INDEX_KEYS},
            height_m).items()})
    return out


def level_row(case: str, measures: Sequence[Dict[str, object]], *, level: str,
              slices: Sequence[int], z_mm: float, height_m: Optional[float] = None,
              model: str = "", source: str = "", **facts) -> Dict[str, object]:
    """A cohort row from the body-composition rows of one case segmented at ``level``
    (bodycomp.tissue_measures: the "all" rows give the soft area, cm^2 per slice, and the
    mean HU per tissue; and, when they have them, the HU-protocol area and mean HU,
    indices.with_protocol). height_m: metres or None (no indices); facts: more columns
    (patient_id, study_uid, ...)."""
    totals = {str(r["tissue"]): r for r in measures if r["slice"] == "all"}
    row: Dict[str, object] = {"case": case, "status": "ok", "message": "", "source": source,
                              "level": level, "slice": slices[len(slices) // 2],
                              "n_slices": len(slices), "z_mm": float(z_mm),
                              "height_m": height_m or "", "model": model}
    for c in TISSUES:
        r = totals.get(c.key)
        if r is not None:
            row[f"area_cm2_{c.key}"] = float(r["area_cm2"])
            row[f"hu_mean_{c.key}"] = float(r["hu_mean"])
    protocol = [k for k in PROTOCOL_KEYS if "protocol_area_cm2" in totals.get(k, {})]
    for k in protocol:
        row[f"protocol_area_cm2_{k}"] = float(totals[k]["protocol_area_cm2"])
        row[f"protocol_hu_mean_{k}"] = float(totals[k]["protocol_hu_mean"])
    if height_m:
        row.update(row_indices(row, height_m, protocol=bool(protocol)))
    row.update(facts)
    return row
