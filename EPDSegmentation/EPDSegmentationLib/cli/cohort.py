"""Cohorts: one table for all cases (``cohort.csv``), vertebral levels, indices, shards.

``epdseg segment ... --level L3`` finds L3 in each volume (core.levels), segments only
there (one slice, or ``--slab-mm`` of slices), writes ``<case>_levels.png`` (a sagittal
picture with the level found) beside the usual outputs, and one row per case in the cohort
table. ``--shard I/N`` (or the SLURM array variables) runs a deterministic share of the
cases and writes ``cohort.shard-I-of-N.csv`` with a ``.json`` list of the cases it owns;
``epdseg merge FOLDER`` joins the shards into ``cohort.csv`` and reports cases missing or
failed.

Which areas a number is: ``area_cm2_<T>`` are the network's soft areas (sum of
probabilities x pixel area, mean per slice); ``protocol_area_cm2_<T>`` (with ``--protocol``)
are the HU-protocol areas (core.indices). Indices from soft areas are SMI, IMATI, SATI,
VATI; from protocol areas ``protocol_SMI`` and so on. All areas in cm^2, indices cm^2/m^2.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..core.atomic import atomic_file
from ..core.bodycomp import csv_cell
from ..core.cohort import COHORT_COLUMNS, row_indices
from ..core.indices import HeightError, dicom_height_m, height_m
from ..core.levels import LevelError, find_levels, level_slices
from ..core.calibration import parameters as calibration_parameters
from ..core.field import parameters as field_parameters
from ..core.upsampling import parameters as upsampling_parameters
from ..io import read_volume
from ..io.level_picture import write_level_png
from .segment import EXPECTED_ERRORS, ct_problem, segment_case

SHARD_RE = re.compile(r"cohort\.shard-(\d+)-of-(\d+)\.(csv|json)$")


# ----------------------------------------------------------------------------- shards

def parse_shard(spec: Optional[str], env=None) -> Optional[Tuple[int, int]]:
    """(I, N) with 0 <= I < N from ``--shard I/N``, else from SLURM_ARRAY_TASK_ID (minus
    SLURM_ARRAY_TASK_MIN) and SLURM_ARRAY_TASK_COUNT when both are set; None for no
    sharding. ValueError with a sentence on a bad value."""
    env = os.environ if env is None else env
    if spec is None:
        if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
            return None
        try:
            i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            n = int(env["SLURM_ARRAY_TASK_COUNT"])
        except ValueError:
            raise ValueError("SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT are not integers: "
                             f"{env.get('SLURM_ARRAY_TASK_ID')!r} / "
                             f"{env.get('SLURM_ARRAY_TASK_COUNT')!r}") from None
        where = "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN"
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not m:
            raise ValueError(f"--shard {spec!r}: give I/N, e.g. 0/10 (I from 0 to N-1)")
        i, n = int(m.group(1)), int(m.group(2))
        where = "--shard"
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"{where}: shard {i} of {n} is impossible; I runs from 0 to N-1")
    return i, n


def shard_of(name: str, n: int) -> int:
    """The shard (0..n-1) a case belongs to: a hash of its name, so the split is the same on
    every machine and whatever the order in which cases are listed."""
    return int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16) % n


def select_shard(cases: Sequence, shard: Optional[Tuple[int, int]]) -> List:
    if shard is None:
        return list(cases)
    i, n = shard
    return [c for c in cases if shard_of(c.name, n) == i]


def table_name(shard: Optional[Tuple[int, int]]) -> str:
    return "cohort.csv" if shard is None else f"cohort.shard-{shard[0]}-of-{shard[1]}.csv"


# ----------------------------------------------------------------------------- table IO

def write_table(rows: Sequence[Dict[str, object]], path, *, overwrite: bool = True) -> Path:
    """The cohort table as CSV (COHORT_COLUMNS; NaN and None as empty cells), atomically."""
    with atomic_file(path, overwrite) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(COHORT_COLUMNS)
            for row in rows:
                w.writerow([csv_cell(row.get(k)) for k in COHORT_COLUMNS])
    return Path(path)


def read_table(path) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- per case

def _dicom_facts(vol) -> Dict[str, object]:
    """PatientID, PatientSize (m), PatientWeight (kg), PatientSex from the first file."""
    if vol.meta.get("format") != "dicom" or not vol.meta.get("files"):
        return {}
    import pydicom

    ds = pydicom.dcmread(vol.meta["files"][0], stop_before_pixels=True,
                         specific_tags=["PatientID", "PatientSize", "PatientWeight",
                                        "PatientSex"])
    return {"patient_id": str(getattr(ds, "PatientID", "") or ""),
            "patient_size": getattr(ds, "PatientSize", None),
            "weight_kg": getattr(ds, "PatientWeight", None) or None,
            "sex": str(getattr(ds, "PatientSex", "") or "")}


def resolve_height(cli_height: Optional[str], info: Dict[str, str], facts: Dict[str, object]
                   ) -> Tuple[Optional[float], str]:
    """(metres or None, source): --height, else a manifest column (height, height_cm,
    height_m), else DICOM PatientSize. HeightError (a sentence) on an unusable value."""
    if cli_height is not None:
        return height_m(cli_height, "--height"), "--height"
    for column, unit in (("height", ""), ("height_cm", " cm"), ("height_m", " m")):
        value = (info.get(column) or "").strip()
        if value:
            return height_m(value + unit, f"manifest column {column}"), f"manifest {column}"
    size = facts.get("patient_size")
    metres = dicom_height_m(size)
    return (metres, "DICOM PatientSize") if metres else (None, "")


def _totals(table_path: Path) -> Dict[str, float]:
    """Mean soft HU per tissue from a case's _bodycomp.csv ("all" rows)."""
    out = {}
    for r in read_table(table_path):
        if r["slice"] == "all" and r.get("hu_mean"):
            out[f"hu_mean_{r['tissue']}"] = float(r["hu_mean"])
    return out


def choose_slices(case, vol, level: Optional[str], slab_mm: Optional[float]
                  ) -> Tuple[List[int], Dict[str, object], Optional[Callable]]:
    """Slices K to segment for ``level`` (all when None), the row's level columns and the
    levels picture to write (a function of segment_case's ``path_of``, for its
    ``extra_outputs``: the picture is staged and committed with the case's other outputs,
    so a case that fails leaves none), or None. LevelError when the level cannot be found."""
    n = vol.array.shape[0]
    if level is None:
        return list(range(n)), {"level": "", "level_source": "all slices"}, None
    if n == 1:                  # a single-slice study: the slice is the level it was taken at
        return [0], {"level": level, "level_source": "input (a single slice)"}, None
    levels = find_levels(vol.array, vol.ijk_to_ras)
    k_idx = level_slices(levels, level, n, vol.spacing[2], slab_mm)
    centre = levels.centres[level.upper()]
    if not 0 <= centre <= n - 1:
        raise LevelError(f"level {level} lies outside the scan")

    def picture(path_of: Callable[[str], Path]) -> None:
        write_level_png(path_of("levels"), levels.sagittal, (vol.spacing[1], vol.spacing[2]),
                        levels, level, k_up=vol.ijk_to_ras[2, 2] > 0,
                        title=f"{case.name}: {level} at slice {levels.slice_of(level)}")

    return k_idx, {"level": level.upper(), "level_source": "found (core.levels)"}, picture


def cohort_row(case, shard: Optional[Tuple[int, int]], model_name: str, model_version: str
               ) -> Dict[str, object]:
    return {"case": case.name, "source": str(case.path), "status": "failed",
            "model": model_name, "model_version": model_version,
            "shard": "" if shard is None else f"{shard[0]}/{shard[1]}"}


def run_case(case, out_dir: Path, model, card: Dict, *, level: Optional[str] = None,
             slab_mm: Optional[float] = None, height: Optional[str] = None,
             protocol: bool = False, device: str = "auto", batch_size: int = 8,
             overwrite: bool = False, series_uid: Optional[str] = None,
             shard: Optional[Tuple[int, int]] = None, model_version: str = "",
             progress=None, dicom_seg: bool = False, probabilities: bool = False,
             provenance: Optional[Dict] = None, mirror: bool = True):
    """Segment one case for the cohort: (CaseResult or None, cohort row). Never raises for
    a bad case: the row's status is "failed" (or "warning" when the areas are there but an
    index is not, e.g. an unusable height) and its message says why. dicom_seg,
    probabilities, provenance, mirror: as segment_case (the same outputs as without the table)."""
    row = cohort_row(case, shard, str(card.get("name", "")), model_version)
    if case.problem:
        row["message"] = case.problem
        return None, row
    try:
        vol = read_volume(case.path, case.series_uid or series_uid)
        problem = ct_problem(vol)
        if problem:
            raise ValueError(f"{case.path}: {problem}")
        row.update(study_uid=vol.meta.get("study_uid", ""),
                   series_uid=vol.meta.get("series_uid", ""))
        facts = _dicom_facts(vol)
        row.update(patient_id=facts.get("patient_id", "") or case.info.get("subject", ""),
                   weight_kg=facts.get("weight_kg") or case.info.get("weight", ""),
                   sex=facts.get("sex") or case.info.get("sex", ""))
        k_idx, level_cols, picture = choose_slices(case, vol, level, slab_mm)
        row.update(level_cols)
    except EXPECTED_ERRORS as exc:
        row["message"] = str(exc)
        return None, row
    result = segment_case(case, out_dir, model, card, device=device, batch_size=batch_size,
                          slices=",".join(str(k) for k in k_idx), overwrite=overwrite,
                          series_uid=series_uid, progress=progress, volume=vol,
                          protocol=protocol, dicom_seg=dicom_seg, probabilities=probabilities,
                          provenance=provenance, mirror=mirror, extra_outputs=picture)
    if not result.ok:
        row["message"] = result.message
        return result, row
    centre = k_idx[len(k_idx) // 2]
    z = vol.ijk_to_ras @ [0.0, 0.0, float(centre), 1.0]
    row.update(status="ok", message="", slice=centre, n_slices=len(k_idx), z_mm=float(z[2]),
               slab_mm=(len(k_idx) * vol.spacing[2]) if len(k_idx) > 1 else "")
    row.update({f"area_cm2_{k}": v for k, v in result.areas.items()})
    table = Path(out_dir) / f"{case.name}_bodycomp.csv"
    if table.is_file():
        row.update(_totals(table))
    row.update(result.protocol)     # summed from segment's own slabs: no second pass
    try:
        metres, source = resolve_height(height, case.info, facts)
    except HeightError as exc:
        metres, source = None, ""
        row.update(status="warning", message=f"{exc}; indices not computed")
    row.update(height_m=metres, height_source=source)
    if metres:
        row.update(row_indices(row, metres, protocol=protocol))
    return result, row


# ----------------------------------------------------------------------------- merge

def write_shard_plan(out_dir: Path, shard: Tuple[int, int], names: Sequence[str]) -> Path:
    """``cohort.shard-I-of-N.json``: the cases this shard owns (so merge can name those that
    never got a row, e.g. when the job was killed)."""
    path = Path(out_dir) / f"cohort.shard-{shard[0]}-of-{shard[1]}.json"
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps({"shard": list(shard), "cases": list(names)}, indent=1))
    return path


def merge(folder: Path, output: Optional[Path] = None, *, overwrite: bool = False
          ) -> Tuple[Path, Dict[str, List[str]]]:
    """Join ``cohort.shard-I-of-N.{csv,json}`` in folder into one table (default
    folder/cohort.csv), rows sorted by case. Returns (path, report) with report keys
    "missing_shards" (I of N with no plan nor table), "missing" (cases planned but without a
    row), "failed" and "warning" (case: message). ValueError when there is nothing to merge
    or the shards disagree on N."""
    folder = Path(folder)
    found: Dict[Tuple[int, int], Dict[str, Path]] = {}
    for p in sorted(folder.iterdir()):
        m = SHARD_RE.match(p.name)
        if m:
            found.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = p
    if not found:
        raise ValueError(f"{folder}: no cohort.shard-I-of-N.csv files to merge")
    counts = {n for _, n in found}
    if len(counts) != 1:
        raise ValueError(f"{folder}: shards of different splits ({sorted(counts)} shards); "
                         f"merge the files of one run only")
    n = counts.pop()
    rows: Dict[str, Dict[str, str]] = {}
    planned: List[str] = []
    for (i, _), files in sorted(found.items()):
        if "json" in files:
            planned += json.loads(files["json"].read_text())["cases"]
        if "csv" in files:
            for r in read_table(files["csv"]):
                rows[r["case"]] = r
    report = {
        "missing_shards": [f"{i}/{n}" for i in range(n) if (i, n) not in found],
        "missing": sorted(set(planned) - set(rows)),
        "failed": [f"{c}: {r.get('message', '')}" for c, r in sorted(rows.items())
                   if r.get("status") == "failed"],
        "warning": [f"{c}: {r.get('message', '')}" for c, r in sorted(rows.items())
                    if r.get("status") == "warning"],
    }
    output = Path(output) if output is not None else folder / "cohort.csv"
    write_table([rows[c] for c in sorted(rows)], output, overwrite=overwrite)
    return output, report


def format_merge_report(path: Path, report: Dict[str, List[str]], n_rows: int) -> str:
    lines = [f"{path}: {n_rows} case(s)"]
    if report["missing_shards"]:
        lines.append(f"shards with no output at all: {', '.join(report['missing_shards'])} "
                     f"(their cases are unknown here; rerun those array tasks)")
    for key, what in (("missing", "missing (planned, no row: the job stopped?)"),
                      ("failed", "failed"), ("warning", "warnings")):
        if report[key]:
            lines.append(f"{len(report[key])} {what}:")
            lines += [f"  {item}" for item in report[key]]
    return "\n".join(lines)


def model_version(path: Path, with_calibration: bool = True) -> str:
    """The first 12 hex digits of a SHA-256 of the weights and, when the card beside them
    carries class weights (core/calibration.py) or HU-guided upsampling
    (core/upsampling.py), of those too: which exact model made a number (the same weights
    calibrated or upsampled otherwise give other numbers). ``with_calibration`` False: the
    weights alone."""
    import json

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    card = path.with_suffix(".json")
    if with_calibration and card.is_file():
        fields = json.loads(card.read_text())
        for key, value in ((b"calibration", calibration_parameters(fields)),
                           (b"upsampling", upsampling_parameters(fields)),
                           (b"field", field_parameters(fields))):
            if value is not None:      # other priors or other boundaries, other areas
                h.update(b"\n" + key + b":" + json.dumps(value, sort_keys=True).encode())
    return "sha256:" + h.hexdigest()[:12]
