"""``epdseg segment``: CT cases in, body-composition outputs out.

Per case (``<case>`` = file or folder name) in the output folder:

    <case>.seg.nrrd              hard labels on the input grid (Slicer segmentation: our
                                 segment names, colours and SNOMED CT terminology)
    <case>_soft.seg.nrrd         the probabilities as Slicer "Fractional labelmap" segments
    <case>_probabilities.nrrd    the probabilities as one 6-component float32 volume
    <case>_bodycomp.csv          per slice and for the range: area cm^2 (soft and hard),
                                 volume cm^3, mean and SD of HU per tissue (bodycomp.py)
    <case>_overlay.png           one slice with the overlay, a legend and the areas
    <case>_seg.dcm, <case>_prob_seg.dcm   DICOM SEG (binary, fractional), with --dicom-seg

Slices not asked for stay empty (label 0, probability 0). Nothing is overwritten unless
``overwrite``: a case whose outputs exist is reported and skipped. In a batch, a bad case is
reported and the others still run.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .classes import TISSUES
from .atomic import extension
from .io.errors import InputError
from .outputs import output_path, safe_stem

VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".dcm", ".ima")
MANIFEST_EXTENSIONS = (".csv", ".json")


@dataclass
class Case:
    """One input to segment: a volume file, a DICOM series folder or a single DICOM file."""

    name: str
    path: Path


@dataclass
class CaseResult:
    case: Case
    ok: bool
    message: str = ""
    outputs: List[Path] = field(default_factory=list)
    slices: List[int] = field(default_factory=list)
    areas: Dict[str, float] = field(default_factory=dict)  # mean soft cm^2 per slice
    device: str = ""
    seconds: float = 0.0


def _case_name(path: Path) -> str:
    name = path.name
    ext = extension(path)
    if ext and not path.is_dir():
        name = name[: -len(ext)]
    return safe_stem(name)


def _has_dicom(folder: Path) -> bool:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                head = fh.read(132)
            if len(head) == 132 and head[128:132] == b"DICM":
                return True
    return False


def find_cases(inputs: Sequence) -> List[Case]:
    """Cases from the command line: volume files, DICOM files or series folders, manifests
    (CSV/JSON with an image column), or folders of such cases. Names are made unique."""
    from .io import read_manifest

    cases: List[Case] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise InputError(path, "no such file or folder")
        ext = extension(path)
        if path.is_file() and ext in MANIFEST_EXTENSIONS:
            cases += [Case(_case_name(Path(r["image"])), Path(r["image"]))
                      for r in read_manifest(path, images_only=True)]
        elif path.is_file():
            cases.append(Case(_case_name(path), path))
        elif _has_dicom(path):
            cases.append(Case(_case_name(path), path))
        else:
            found = [p for p in sorted(path.iterdir())
                     if (p.is_file() and extension(p) in VOLUME_EXTENSIONS
                         and not p.name.lower().endswith(".seg.nrrd"))
                     or (p.is_dir() and _has_dicom(p))]
            if not found:
                raise InputError(path, "holds no DICOM files, no volume files (.nii, .nii.gz, "
                                       ".nrrd) and no DICOM series folders")
            cases += [Case(_case_name(p), p) for p in found]
    seen: Dict[str, int] = {}
    for c in cases:
        n = seen.get(c.name, 0)
        seen[c.name] = n + 1
        if n:
            c.name = f"{c.name}_{n + 1}"
    return cases


def parse_slices(spec: Optional[str], n: int) -> List[int]:
    """Slice indices K (0-based) from "all", "40-60" (inclusive), "12,40-45,50" or None."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(range(n))
    out: List[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if a > b:
                raise ValueError(f"slice range {part!r} runs backwards")
            out += range(a, b + 1)
        elif part.isdigit():
            out.append(int(part))
        else:
            raise ValueError(f"cannot read slice spec {spec!r}: use all, 40-60 or 12,40-45")
    bad = [k for k in out if k >= n]
    if bad:
        raise ValueError(f"slice {bad[0]} is outside this volume's 0..{n - 1}")
    return sorted(set(out))


def output_paths(out_dir: Path, name: str, *, dicom_seg: bool) -> Dict[str, Path]:
    roles = ["segmentation", "soft_segmentation", "probabilities", "table", "overlay"]
    roles += ["dicom_seg", "dicom_fractional_seg"] if dicom_seg else []
    return {role: output_path(out_dir, name, role) for role in roles}


def segment_case(case: Case, out_dir: Path, model, card: Dict, *, device: str = "auto",
                 batch_size: int = 8, slices: Optional[str] = None, overwrite: bool = False,
                 dicom_seg: bool = False, overlay_slice: Optional[int] = None,
                 series_uid: Optional[str] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> CaseResult:
    """Segment one case and write its outputs; errors come back as a failed CaseResult."""
    from . import bodycomp
    from .epd import soft_to_labels
    from .inference import predict_volume
    from .io import read_volume, write_probabilities, write_seg_nrrd
    from .overlay import display_slice, write_overlay_png

    t0 = time.perf_counter()
    paths = output_paths(out_dir, case.name, dicom_seg=dicom_seg)
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        return CaseResult(case, False, "outputs exist (use --overwrite to replace): "
                          + ", ".join(p.name for p in existing))
    try:
        vol = read_volume(case.path, series_uid)
        if dicom_seg and vol.meta.get("format") != "dicom":
            raise InputError(case.path, "DICOM SEG needs a DICOM source, and this case was "
                                        f"read from {vol.meta.get('format', 'a non-DICOM file')}; "
                                        "segment the DICOM series itself, or drop --dicom-seg")
        k_idx = parse_slices(slices, vol.array.shape[0])
        si, sj, sk = vol.spacing
        pred = predict_volume(vol.array, (sj, si), model, card, device=device,
                              batch_size=batch_size, slices=k_idx, progress=progress)
        C = pred.probabilities.shape[0]
        probs = np.zeros((C,) + vol.array.shape, np.float32)
        probs[:, k_idx] = pred.probabilities
        labels = np.zeros(vol.array.shape, np.uint8)
        labels[k_idx] = soft_to_labels(pred.probabilities, class_axis=0)
        rows = bodycomp.tissue_measures(pred.probabilities, vol.array, vol.spacing, k_idx)

        out_dir.mkdir(parents=True, exist_ok=True)
        written = [
            write_seg_nrrd(paths["segmentation"], labels, vol.ijk_to_ras, overwrite=overwrite),
            write_seg_nrrd(paths["soft_segmentation"], probs, vol.ijk_to_ras, fractional=True,
                           overwrite=overwrite),
            write_probabilities(paths["probabilities"], probs, vol.ijk_to_ras,
                                overwrite=overwrite),
            bodycomp.measures_to_csv(rows, paths["table"], overwrite=overwrite),
        ]
        shown = overlay_slice if overlay_slice is not None else k_idx[len(k_idx) // 2]
        if shown not in k_idx:
            raise ValueError(f"overlay slice {shown} was not segmented (slices {slices})")
        slice_rows = {r["tissue"]: r for r in rows if r["slice"] == shown}
        areas = {key: (float(r["area_cm2"]), float(r["hard_area_cm2"]))
                 for key, r in slice_rows.items()}
        written.append(write_overlay_png(
            paths["overlay"], display_slice(vol, shown), display_slice(vol, shown, labels),
            areas_cm2=areas, overwrite=overwrite,
            title=f"{case.name}: slice {shown} of {vol.array.shape[0]}, "
                  f"{si:.2f} x {sj:.2f} mm pixels"))
        if dicom_seg:
            written += _write_dicom_segs(vol, labels, probs, card, paths, overwrite)
        totals = bodycomp.total_rows(rows)
        return CaseResult(case, True, "; ".join(pred.notes[1:]), written, k_idx,
                          {c.key: float(totals[c.key]["area_cm2"]) for c in TISSUES
                           if c.key in totals}, pred.device, time.perf_counter() - t0)
    except (InputError, ValueError, FileExistsError, OSError) as exc:
        return CaseResult(case, False, str(exc), seconds=time.perf_counter() - t0)


def _write_dicom_segs(vol, labels, probs, card, paths, overwrite) -> List[Path]:
    import pydicom

    from .dicom_seg import write_dicom_seg

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in vol.meta["files"]]
    return [
        write_dicom_seg(paths["dicom_seg"], sources, labels=labels, model_card=card,
                        overwrite=overwrite),
        write_dicom_seg(paths["dicom_fractional_seg"], sources, probabilities=probs,
                        model_card=card, overwrite=overwrite),
    ]


def format_summary(results: Sequence[CaseResult]) -> str:
    """The terminal table: one line per case with the mean soft area per slice."""
    keys = [c.key for c in TISSUES]
    head = f"{'case':<24} {'slices':>6} " + " ".join(f"{k:>8}" for k in keys) + "   time  status"
    lines = [head, f"{'':<24} {'':>6} " + " ".join(f"{'cm2/sl':>8}" for _ in keys)]
    for r in results:
        if r.ok:
            cells = " ".join(f"{r.areas.get(k, float('nan')):8.1f}" for k in keys)
            lines.append(f"{r.case.name[:24]:<24} {len(r.slices):6d} {cells} {r.seconds:6.1f}s  ok")
        else:
            lines.append(f"{r.case.name[:24]:<24} {'-':>6} " + " ".join(f"{'-':>8}" for _ in keys)
                         + f" {r.seconds:6.1f}s  FAILED: {r.message}")
    return "\n".join(lines)
