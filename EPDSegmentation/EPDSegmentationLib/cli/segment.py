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
``overwrite``: a case whose outputs exist is reported and skipped. Every check that can be
made before the network runs is made first (readable, CT in HU by the module's rule
volume.hu_range_problem, DICOM sources a SEG can reference); if a case still fails while
writing, the files it wrote are removed again, so a rerun is not blocked. In a batch, a bad
case (an unreadable or missing input, not CT, out of memory, even a bug: its traceback comes
with it) is reported and the others still run.
"""

from __future__ import annotations

import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..core.classes import TISSUES
from ..core.atomic import extension
from ..io.errors import InputError
from ..io.outputs import output_path, safe_stem
from ..core.volume import hu_range_problem

VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".dcm", ".ima")
MANIFEST_EXTENSIONS = (".csv", ".json")


@dataclass
class Case:
    """One input to segment: a volume file, a DICOM series folder or a single DICOM file."""

    name: str
    path: Path
    #: why this input cannot be segmented, found while listing the inputs (missing path,
    #: empty folder, bad manifest); segment_case reports it as the case's failure
    problem: Optional[str] = None


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
    #: the traceback of an error nobody expected (a bug), for the terminal; "" otherwise
    traceback: str = ""


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


def _cases_of(path: Path) -> List[Case]:
    from ..io import read_manifest

    if not path.exists():
        raise InputError(path, "no such file or folder")
    ext = extension(path)
    if path.is_file() and ext in MANIFEST_EXTENSIONS:
        return [Case(_case_name(Path(r["image"])), Path(r["image"]))
                for r in read_manifest(path, images_only=True)]
    if path.is_file() or _has_dicom(path):
        return [Case(_case_name(path), path)]
    found = [p for p in sorted(path.iterdir())
             if (p.is_file() and extension(p) in VOLUME_EXTENSIONS
                 and not p.name.lower().endswith(".seg.nrrd"))
             or (p.is_dir() and _has_dicom(p))]
    if not found:
        raise InputError(path, "holds no DICOM files, no volume files (.nii, .nii.gz, "
                               ".nrrd) and no DICOM series folders")
    return [Case(_case_name(p), p) for p in found]


def find_cases(inputs: Sequence, strict: bool = True) -> List[Case]:
    """Cases from the command line: volume files, DICOM files or series folders, manifests
    (CSV/JSON with an image column), or folders of such cases. Names are made unique.

    An input that gives no case (missing, an empty folder, an unreadable manifest) raises
    InputError when ``strict``; otherwise it becomes a Case whose ``problem`` says why, so
    a batch reports it among the results and still runs the others."""
    cases: List[Case] = []
    for raw in inputs:
        path = Path(raw)
        try:
            cases += _cases_of(path)
        except (InputError, OSError) as exc:
            if strict:
                raise
            message = str(exc) if isinstance(exc, InputError) else f"{path}: {exc}"
            cases.append(Case(_case_name(path), path, problem=message))
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


def ct_problem(vol) -> Optional[str]:
    """None when a volume read as CT can be segmented; else why not (words to follow its
    file name): no voxels, or values that are not CT in HU (volume.hu_range_problem, the
    rule of the Slicer module's input check)."""
    arr = np.asarray(vol.array)
    if arr.size == 0:
        return f"is an empty volume ({' x '.join(map(str, arr.shape))} voxels)"
    return hu_range_problem(np.min(arr), np.max(arr))


def dicom_seg_sources(vol, path) -> List:
    """The source instances (pydicom headers, K order) a DICOM SEG of this case would
    reference, checked as write_dicom_seg checks them, so that --dicom-seg fails before
    anything is written. InputError saying why not (not DICOM, no highdicom, sources a SEG
    cannot reference, e.g. de-identified with blank study/series UIDs)."""
    if vol.meta.get("format") != "dicom":
        raise InputError(path, "DICOM SEG needs a DICOM source, and this case was "
                               f"read from {vol.meta.get('format', 'a non-DICOM file')}; "
                               "segment the DICOM series itself, or drop --dicom-seg")
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise InputError(path, "DICOM SEG needs the highdicom package (pip install "
                               "highdicom); install it or drop --dicom-seg") from None
    import pydicom

    from ..io.dicom_seg import DicomSegError, prepare_sources

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in vol.meta["files"]]
    try:
        prepare_sources(sources, vol.array.shape)
    except DicomSegError as exc:
        raise InputError(path, f"DICOM SEG is not possible: {exc}. Nothing was written; "
                               f"drop --dicom-seg for the other outputs") from None
    return sources


#: Errors that say what is wrong with a case (its message is enough, no traceback).
EXPECTED_ERRORS = (InputError, ValueError, FileExistsError, OSError)


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError)
        and ("out of memory" in text or "can't allocate memory" in text))


def _failure(case: Case, exc: BaseException, seconds: float) -> CaseResult:
    """A failed CaseResult: the message of an expected error, a plain out-of-memory
    sentence with a hint, or for anything else (a bug) the error and its traceback."""
    from ..core.inference import DeviceError

    if isinstance(exc, EXPECTED_ERRORS + (DeviceError,)):
        return CaseResult(case, False, str(exc), seconds=seconds)
    if _out_of_memory(exc):
        return CaseResult(case, False, f"out of memory ({type(exc).__name__}: {exc}); try a "
                          f"smaller --batch-size, fewer --slices or another --device",
                          seconds=seconds)
    return CaseResult(case, False, f"unexpected error {type(exc).__name__}: {exc}",
                      seconds=seconds, traceback="".join(
                          traceback.format_exception(type(exc), exc, exc.__traceback__)))


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:
        try:
            Path(path).unlink()
        except FileNotFoundError:
            pass


def output_paths(out_dir: Path, name: str, *, dicom_seg: bool) -> Dict[str, Path]:
    roles = ["segmentation", "soft_segmentation", "probabilities", "table", "overlay"]
    roles += ["dicom_seg", "dicom_fractional_seg"] if dicom_seg else []
    return {role: output_path(out_dir, name, role) for role in roles}


def segment_case(case: Case, out_dir: Path, model, card: Dict, *, device: str = "auto",
                 batch_size: int = 8, slices: Optional[str] = None, overwrite: bool = False,
                 dicom_seg: bool = False, overlay_slice: Optional[int] = None,
                 series_uid: Optional[str] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> CaseResult:
    """Segment one case and write its outputs.

    Any error comes back as a failed CaseResult (an unexpected one with its traceback in
    ``traceback``), after removing the files this call had written; KeyboardInterrupt
    removes them too and is raised again."""
    from ..core import bodycomp
    from ..core import inference
    from ..io import overlay
    from ..core.epd import soft_to_labels
    from ..io import read_volume, write_probabilities, write_seg_nrrd

    t0 = time.perf_counter()
    if case.problem:
        return CaseResult(case, False, case.problem)
    paths = output_paths(out_dir, case.name, dicom_seg=dicom_seg)
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        return CaseResult(case, False, "outputs exist (use --overwrite to replace): "
                          + ", ".join(p.name for p in existing))
    written: List[Path] = []
    try:
        vol = read_volume(case.path, series_uid)
        problem = ct_problem(vol)
        if problem:
            raise InputError(case.path, problem)
        sources = dicom_seg_sources(vol, case.path) if dicom_seg else None
        k_idx = parse_slices(slices, vol.array.shape[0])
        shown = overlay_slice if overlay_slice is not None else k_idx[len(k_idx) // 2]
        if shown not in k_idx:
            raise ValueError(f"overlay slice {shown} was not segmented (slices {slices})")
        si, sj, sk = vol.spacing
        pred = inference.predict_volume(vol.array, (sj, si), model, card, device=device,
                                        batch_size=batch_size, slices=k_idx,
                                        progress=progress, ijk_to_ras=vol.ijk_to_ras)
        C = pred.probabilities.shape[0]
        probs = np.zeros((C,) + vol.array.shape, np.float32)
        probs[:, k_idx] = pred.probabilities
        labels = np.zeros(vol.array.shape, np.uint8)
        labels[k_idx] = soft_to_labels(pred.probabilities, class_axis=0)
        rows = bodycomp.tissue_measures(pred.probabilities, vol.array, vol.spacing, k_idx)

        out_dir.mkdir(parents=True, exist_ok=True)
        written.append(write_seg_nrrd(paths["segmentation"], labels, vol.ijk_to_ras,
                                      overwrite=overwrite))
        written.append(write_seg_nrrd(paths["soft_segmentation"], probs, vol.ijk_to_ras,
                                      fractional=True, overwrite=overwrite))
        written.append(write_probabilities(paths["probabilities"], probs, vol.ijk_to_ras,
                                           overwrite=overwrite))
        written.append(bodycomp.measures_to_csv(rows, paths["table"], overwrite=overwrite))
        slice_rows = {r["tissue"]: r for r in rows if r["slice"] == shown}
        areas = {key: (float(r["area_cm2"]), float(r["hard_area_cm2"]))
                 for key, r in slice_rows.items()}
        written.append(overlay.write_overlay_png(
            paths["overlay"], overlay.display_slice(vol, shown),
            overlay.display_slice(vol, shown, labels),
            areas_cm2=areas, overwrite=overwrite,
            title=f"{case.name}: slice {shown} of {vol.array.shape[0]}, "
                  f"{si:.2f} x {sj:.2f} mm pixels"))
        if dicom_seg:
            _write_dicom_segs(sources, labels, probs, card, paths, overwrite, written)
        totals = bodycomp.total_rows(rows)
        return CaseResult(case, True, "; ".join(pred.notes[1:]), written, k_idx,
                          {c.key: float(totals[c.key]["area_cm2"]) for c in TISSUES
                           if c.key in totals}, pred.device, time.perf_counter() - t0)
    except Exception as exc:
        _remove(written)
        return _failure(case, exc, time.perf_counter() - t0)
    except BaseException:           # KeyboardInterrupt: no half-written case, then stop
        _remove(written)
        raise


def _write_dicom_segs(sources, labels, probs, card, paths, overwrite,
                      written: List[Path]) -> None:
    """Both SEG files, appended to ``written`` one by one (so a failure can remove them)."""
    from ..io.dicom_seg import write_dicom_seg

    written.append(write_dicom_seg(paths["dicom_seg"], sources, labels=labels,
                                   model_card=card, overwrite=overwrite))
    written.append(write_dicom_seg(paths["dicom_fractional_seg"], sources,
                                   probabilities=probs, model_card=card, overwrite=overwrite))


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
