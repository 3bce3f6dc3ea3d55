"""``epdseg segment``: CT cases in, body-composition outputs out.

Per case (``<case>`` = file or folder name) in the output folder:

    <case>.seg.nrrd              hard labels on the input grid (Slicer segmentation: our
                                 segment names, colours and SNOMED CT terminology)
    <case>_soft.seg.nrrd         the probabilities as Slicer "Fractional labelmap" segments
    <case>_probabilities.nrrd    with --probabilities: the probabilities as one
                                 6-component float32 volume (4 x the soft file's size
                                 before compression; see docs/benchmarks.md)
    <case>_protocol.seg.nrrd     with --protocol: the HU protocol's labels (MUS/IMAT by HU
                                 within the network's muscle, SAT/VAT within their HU
                                 ranges, 0 where a pixel's HU is outside its tissue's)
    <case>_bodycomp.csv          per slice and for the range: area cm^2 (soft and hard),
                                 volume cm^3, mean and SD of HU per tissue (bodycomp.py);
                                 each slice's uncertainty and the slices to correct first
                                 (bodycomp.SLICE_COLUMNS, core.stream); with --protocol the
                                 HU-protocol area and mean HU (bodycomp.PROTOCOL_COLUMNS)
    <case>_overlay.png           one slice with the overlay, a legend and the areas
    <case>_seg.dcm, <case>_prob_seg.dcm   DICOM SEG (binary, fractional), with --dicom-seg
    <case>_provenance.json       written last: the completion marker (files, SHA-256) and
                                 the provenance (source, DICOM UIDs, model, command)

Slices not asked for stay empty (label 0, probability 0). Nothing is overwritten unless
``overwrite``: a case whose outputs exist is reported (complete or incomplete) and skipped.
The checks that need no pixels are made before the network runs (readable, the geometry,
DICOM sources a SEG can reference); those that need every voxel (CT in HU by the module's
rule volume.hu_range_problem, a mask, NaN voxels) ride along with the stream, which reads
each slice once, and are concluded before anything is written: a bad input fails with the
same message, after the network ran rather than before (docs/benchmarks.md). The outputs
are staged and committed together under a per-case lock (io/staging.py): a case that fails
or is interrupted leaves the folder as it was (old outputs included), and two runs on one
folder never touch each other's files. A DICOM SEG failure keeps the other outputs. In a batch, a bad
case (an unreadable or missing input, not CT, out of memory, even a bug: its traceback comes
with it) is reported and the others still run. Nothing the size of the scan is held: the
volume is read a slab at a time (io.sources.open_volume) and everything after reading
streams slab by slab (core.stream).
"""

from __future__ import annotations

import re
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .. import __version__
from ..core import bodycomp, calibration, inference, stream, upsampling
from ..core import field as field_of_view
from ..core.indices import protocol_from_sums, protocol_labels
from ..core.atomic import extension
from ..core.classes import NUM_CLASSES, TISSUES
from ..core.errors import EPDError, InputError
from ..core.fractional import FRACTIONAL_MIN
from ..core.volume import Volume, hu_range_problem
from ..io import overlay, read_manifest
from ..io.dicom_seg import DicomSegError, prepare_sources, write_dicom_seg
from ..io.images import probabilities_slices
from ..io.outputs import output_path, safe_stem
from ..io.seg_nrrd import seg_nrrd_slices
from ..io.sources import VolumeSource, as_source, open_volume
from ..io.staging import CaseStaging, case_state

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
    #: the series to read when ``path`` is a folder of several (chosen by find_cases)
    series_uid: Optional[str] = None
    #: facts from the input beside the image (manifest columns such as height, weight, sex)
    info: Dict[str, str] = field(default_factory=dict)


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
    #: with protocol=True: indices.protocol_from_sums (HU-protocol areas, mean HU)
    protocol: Dict[str, float] = field(default_factory=dict)


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


#: DICOM header fields read to tell series apart (pixels are not read).
_DISCOVERY_TAGS = ["SeriesInstanceUID", "Modality", "ImageOrientationPatient", "ImageType",
                   "PatientID", "SeriesNumber", "SeriesDescription"]


def _dicom_series(folder: Path) -> Dict[str, List]:
    """SeriesInstanceUID -> [(file, header), ...] for the DICOM images under folder."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: Dict[str, List] = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=_DISCOVERY_TAGS)
        except (InvalidDicomError, OSError, ValueError):
            continue
        if "SeriesInstanceUID" not in ds and "ImageOrientationPatient" not in ds:
            continue                        # a DICOMDIR, a report: not an image
        series.setdefault(str(getattr(ds, "SeriesInstanceUID", "") or ""), []).append((f, ds))
    return series


def _axial_ct(items) -> bool:
    ds = items[0][1]
    if str(getattr(ds, "Modality", "CT") or "CT").upper() != "CT":
        return False
    if "LOCALIZER" in [str(t).upper() for t in (getattr(ds, "ImageType", None) or [])]:
        return False
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return False
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    return abs(normal[2]) >= 0.9


def _series_name(ds, fallback: str) -> str:
    """A case name from DICOM identifiers: PatientID, then series number (or UID tail)."""
    patient = str(getattr(ds, "PatientID", "") or "").strip()
    number = str(getattr(ds, "SeriesNumber", "") or "").strip()
    uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
    tail = f"s{number}" if number else (uid.rsplit(".", 1)[-1][-8:] if uid else "")
    return safe_stem("_".join(p for p in (patient or fallback, tail) if p))


def _describe_series(series: Dict[str, List]) -> str:
    return "; ".join(
        f"{uid or '(no SeriesInstanceUID)'} ({len(items)} files, "
        f"{str(getattr(items[0][1], 'SeriesDescription', '') or '')!r})"
        for uid, items in series.items())


def _dicom_folder_cases(folder: Path) -> List[Case]:
    """Cases of a DICOM folder. One series: the folder. Every series a single image (a batch
    of single-slice studies, one per patient): one case per image file, named from its
    DICOM identifiers. Several multi-slice series (a study): the one axial CT series, or a
    problem asking for --series-uid when there are several."""
    series = _dicom_series(folder)
    if len(series) <= 1:
        return [Case(_case_name(folder), folder)]
    if all(len(items) == 1 for items in series.values()):
        return [Case(_series_name(items[0][1], _case_name(items[0][0])), items[0][0])
                for items in series.values()]
    axial = {uid: items for uid, items in series.items() if len(items) > 1 and _axial_ct(items)}
    if len(axial) == 1:
        return [Case(_case_name(folder), folder, series_uid=next(iter(axial)))]
    if not axial:
        why = (f"holds {len(series)} series and none is an axial CT series of several "
               f"slices; pass --series-uid with one of: {_describe_series(series)}")
    else:
        why = (f"holds {len(axial)} axial CT series; pass --series-uid with one of: "
               f"{_describe_series(axial)}")
    return [Case(_case_name(folder), folder, problem=f"{folder}: {why}")]


def _cases_of(path: Path, discover: bool = True) -> List[Case]:
    if not path.exists():
        raise InputError(path, "no such file or folder")
    ext = extension(path)
    if path.is_file() and ext in MANIFEST_EXTENSIONS:
        from ..io.manifest import read_manifest_columns

        columns = read_manifest_columns(path)
        return [Case(_case_name(Path(r["image"])), Path(r["image"]), problem=r.get("problem"),
                     info=columns.get(str(Path(r["image"])), {}))
                for r in read_manifest(path, images_only=True, missing_ok=True)]
    if path.is_file():
        return [Case(_case_name(path), path)]
    if _has_dicom(path):
        return _dicom_folder_cases(path) if discover else [Case(_case_name(path), path)]
    found = [p for p in sorted(path.iterdir())
             if (p.is_file() and extension(p) in VOLUME_EXTENSIONS
                 and not p.name.lower().endswith(".seg.nrrd"))
             or (p.is_dir() and _has_dicom(p))]
    if not found:
        raise InputError(path, "holds no DICOM files, no volume files (.nii, .nii.gz, "
                               ".nrrd) and no DICOM series folders")
    out: List[Case] = []
    for p in found:
        out += _dicom_folder_cases(p) if p.is_dir() and discover else [Case(_case_name(p), p)]
    return out


def _unique_names(cases: List[Case]) -> None:
    """Give colliding names a suffix from the input's path (and series), so a case keeps its
    name whatever the order of the arguments."""
    import hashlib

    groups: Dict[str, List[Case]] = {}
    for c in cases:
        groups.setdefault(c.name, []).append(c)
    for name, group in groups.items():
        if len(group) < 2:
            continue
        for c in group:
            key = f"{Path(c.path).resolve()}|{c.series_uid or ''}"
            c.name = f"{name}_{hashlib.sha1(key.encode()).hexdigest()[:6]}"


def find_cases(inputs: Sequence, strict: bool = True, discover: bool = True) -> List[Case]:
    """Cases from the command line: volume files, DICOM files or series folders, manifests
    (CSV/JSON with an image column), or folders of such cases. A DICOM folder of several
    series is split (see _dicom_folder_cases) unless ``discover`` is False (the caller
    names the series). Names come from file names or DICOM identifiers; colliding names
    get a suffix from the input's path, the same whatever the order of ``inputs``.

    An input that gives no case (missing, an empty folder, an unreadable manifest) raises
    InputError when ``strict``; otherwise it becomes a Case whose ``problem`` says why, so
    a batch reports it among the results and still runs the others."""
    cases: List[Case] = []
    for raw in inputs:
        path = Path(raw)
        try:
            cases += _cases_of(path, discover)
        except (InputError, OSError) as exc:
            if strict:
                raise
            message = str(exc) if isinstance(exc, InputError) else f"{path}: {exc}"
            cases.append(Case(_case_name(path), path, problem=message))
    _unique_names(cases)
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
    """None when a volume read as CT (a Volume, or an io.sources.VolumeSource with the HU
    range found while opening it) can be segmented; else why not (words to follow its file
    name): no voxels, or values that are not CT in HU (volume.hu_range_problem, the rule of
    the Slicer module's input check)."""
    shape = vol.shape if isinstance(vol, VolumeSource) else np.shape(vol.array)
    if int(np.prod(shape)) == 0:
        return f"is an empty volume ({' x '.join(map(str, shape))} voxels)"
    if isinstance(vol, VolumeSource):
        return hu_range_problem(*vol.hu_range)
    arr = np.asarray(vol.array)
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

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in vol.meta["files"]]
    try:
        prepare_sources(sources, vol.shape if isinstance(vol, VolumeSource) else vol.array.shape)
    except DicomSegError as exc:
        raise InputError(path, f"DICOM SEG is not possible: {exc}. Nothing was written; "
                               f"drop --dicom-seg for the other outputs") from None
    return sources


#: Errors that say what is wrong with a case (its message is enough, no traceback): ours
#: (core/errors.py; DeviceError among them) and the OS's (a full disk, a permission).
EXPECTED_ERRORS = (EPDError, ValueError, FileExistsError, OSError)


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError)
        and ("out of memory" in text or "can't allocate memory" in text))


def _failure(case: Case, exc: BaseException, seconds: float) -> CaseResult:
    """A failed CaseResult: the message of an expected error, a plain out-of-memory
    sentence with a hint, or for anything else (a bug) the error and its traceback."""
    if isinstance(exc, EXPECTED_ERRORS):
        return CaseResult(case, False, str(exc), seconds=seconds)
    if _out_of_memory(exc):
        return CaseResult(case, False, f"out of memory ({type(exc).__name__}: {exc}); try a "
                          f"smaller --batch-size, fewer --slices or another --device",
                          seconds=seconds)
    return CaseResult(case, False, f"unexpected error {type(exc).__name__}: {exc}",
                      seconds=seconds, traceback="".join(
                          traceback.format_exception(type(exc), exc, exc.__traceback__)))


def output_roles(*, dicom_seg: bool, probabilities: bool = False,
                 protocol: bool = False) -> List[str]:
    """The outputs (outputs.SUFFIXES keys) of one case, without the completion marker."""
    roles = ["segmentation", "soft_segmentation"]
    roles += ["protocol_segmentation"] if protocol else []
    roles += ["probabilities"] if probabilities else []
    roles += ["table", "overlay"]
    return roles + (["dicom_seg", "dicom_fractional_seg"] if dicom_seg else [])


#: Every output a case can have, whatever was asked this time: what a re-run looks for
#: before it writes, and what --overwrite replaces (no stale file of an earlier setting).
#: every output a case can have: what an earlier run left is looked for and replaced by these
ALL_ROLES = output_roles(dicom_seg=True, probabilities=True, protocol=True) + ["levels"]


def output_paths(out_dir: Path, name: str, *, dicom_seg: bool,
                 probabilities: bool = False) -> Dict[str, Path]:
    return {role: output_path(out_dir, name, role)
            for role in output_roles(dicom_seg=dicom_seg, probabilities=probabilities)}


def _existing_message(state: str, present: Sequence[Path], name: str) -> str:
    names = ", ".join(p.name for p in present)
    if state == "complete":
        return f"outputs exist from a complete earlier run (use --overwrite to replace): {names}"
    return (f"INCOMPLETE outputs of an earlier run (no valid completion marker "
            f"{name}_provenance.json: it was interrupted or failed); use --overwrite to "
            f"replace them: {names}")


def segment_case(case: Case, out_dir: Path, model, card: Dict, *, device: str = "auto",
                 batch_size: int = 8, slices: Optional[str] = None, overwrite: bool = False,
                 dicom_seg: bool = False, overlay_slice: Optional[int] = None,
                 series_uid: Optional[str] = None,
                 progress: Optional[Callable[[int, int], None]] = None,
                 provenance: Optional[Dict] = None, probabilities: bool = False,
                 slab_slices: Optional[int] = None, volume=None,
                 protocol: bool = False, mirror: bool = True,
                 extra_outputs: Optional[Callable[[Callable[[str], Path]], None]] = None
                 ) -> CaseResult:
    """Segment one case and write its outputs.

    The volume is opened with io.sources.open_volume, its checks deferred: they are made
    on each slab as it is read, completed on the slices not selected at the end, and a
    failed check is reported in place of any error it caused; each slab of selected
    slices is read, predicted, upsampled and measured on the device, and appended to the
    .seg.nrrd files (and, with ``probabilities``, the float32 probability NRRD), so memory
    does not grow with the scan. ``volume``: a Volume (or source) the caller already read
    (the cohort finds its level on it first), used instead of opening the file. With
    ``dicom_seg`` the labels and the selected slices' probabilities are held for
    highdicom, which takes whole arrays. ``protocol``: the HU-protocol areas and mean HU
    too (core.indices), summed from the same slabs, in the result's ``protocol`` and the
    table, and the protocol's labels as <case>_protocol.seg.nrrd.
    ``mirror``: mirror averaging (inference.forward), recorded in the provenance's model.
    ``extra_outputs(path_of)``: writes the caller's own outputs of this case (the cohort's
    levels picture) at ``path_of(role)``, staged and committed with the others.

    The outputs are written into a staging folder under the case's lock (io/staging.py)
    and moved into ``out_dir`` together only when all succeeded, the completion marker
    <case>_provenance.json last; ``overwrite`` replaces an earlier run's files only then.
    Any error comes back as a failed CaseResult (an unexpected one with its traceback in
    ``traceback``) and leaves ``out_dir`` as it was; KeyboardInterrupt (SIGINT, and SIGTERM
    through cli.main) does too and is raised again. A DICOM SEG that fails does not take
    the other outputs with it: they are committed and the case is reported failed."""
    t0 = time.perf_counter()
    if case.problem:
        return CaseResult(case, False, case.problem)
    roles = output_roles(dicom_seg=dicom_seg, probabilities=probabilities, protocol=protocol)
    vol = None
    try:     # the case's lock and staging folder; nothing else is touched
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        stage = CaseStaging(out_dir, case.name, overwrite=overwrite).open()
    except (EPDError, OSError) as exc:
        return CaseResult(case, False, str(exc))
    try:
        state, present = case_state(out_dir, case.name, ALL_ROLES)
        if state != "absent" and not overwrite:
            return CaseResult(case, False, _existing_message(state, present, case.name))
        paths = {role: stage.path(role) for role in roles}
        # volume: the case already read by the caller (the cohort finds its level first)
        # the file's checks ride along with the stream (each slice read once) and are
        # completed before anything is written out; an empty volume fails at once
        vol = as_source(volume) if volume is not None else open_volume(
            case.path, case.series_uid or series_uid, defer_checks=True)
        if int(np.prod(vol.shape)) == 0:
            raise InputError(case.path, ct_problem(vol))
        sources = dicom_seg_sources(vol, case.path) if dicom_seg else None
        k_idx = parse_slices(slices, vol.shape[0])
        shown = overlay_slice if overlay_slice is not None else k_idx[len(k_idx) // 2]
        if shown not in k_idx:
            raise ValueError(f"overlay slice {shown} was not segmented (slices {slices})")
        si, sj, sk = vol.spacing
        grid = vol.shape
        predict = inference.slab_predictor(vol, (sj, si), model, card, device=device,
                                           batch_size=network_batch(batch_size, card),
                                           ijk_to_ras=vol.ijk_to_ras, mirror=mirror)
        acc = stream.Accumulator()
        held = _Held(grid, len(k_idx)) if dicom_seg else None
        shown_job = None
        prov = case_provenance(case, vol, card, provenance, mirror=mirror)
        header = nrrd_provenance(prov)
        with ExitStack() as files:
            # the overlay is drawn in a thread as soon as its slice is out, beside the
            # outputs of the next slab rather than after the stream (docs/benchmarks.md)
            drawer = files.enter_context(ThreadPoolExecutor(1, thread_name_prefix="epd-overlay"))
            files.enter_context(_input_problems_first(vol, case.path))
            hard = files.enter_context(seg_nrrd_slices(
                paths["segmentation"], vol.ijk_to_ras, grid, provenance=header))
            soft = files.enter_context(seg_nrrd_slices(
                paths["soft_segmentation"], vol.ijk_to_ras, grid, fractional=True,
                provenance=header))
            prot = files.enter_context(seg_nrrd_slices(
                paths["protocol_segmentation"], vol.ijk_to_ras, grid, provenance=header)) \
                if protocol else None
            prob = files.enter_context(probabilities_slices(
                paths["probabilities"], vol.ijk_to_ras, grid, NUM_CLASSES)) \
                if probabilities else None
            next_k = 0
            for slab in stream.stream_slabs(
                    vol, k_idx, predict, slab_slices=slab_slices or stream.SLAB_SLICES,
                    probabilities=probabilities or dicom_seg, protocol=protocol,
                    accumulator=acc, progress=progress):
                for s, k in enumerate(slab.slices):
                    gap = k - next_k
                    hard.fill(gap, 0)
                    soft.fill(gap, FRACTIONAL_MIN)
                    # the slab's own arrays, never changed after: compressed in place
                    hard.write(slab.labels[s:s + 1], frozen=True)
                    if prot is not None:
                        prot.fill(gap, 0)
                        prot.write(protocol_labels(slab.labels[s:s + 1], slab.hu[s:s + 1]),
                                   frozen=True)
                    soft.write(np.moveaxis(slab.codes[:, s:s + 1], 0, -1), frozen=True)
                    if prob is not None:
                        prob.fill(gap, 0.0)
                        prob.write(np.moveaxis(slab.probabilities[:, s:s + 1], 0, -1))
                    next_k = k + 1
                    if k == shown:
                        shown_job = drawer.submit(
                            _write_overlay, paths["overlay"], vol, slab, s, k, grid,
                            f"{case.name}: slice {shown} of {grid[0]}, "
                            f"{si:.2f} x {sj:.2f} mm pixels")
                if held is not None:
                    held.add(slab)
            for writer, value in ((hard, 0), (soft, FRACTIONAL_MIN), (prob, 0.0), (prot, 0)):
                if writer is not None:
                    writer.fill(grid[0] - next_k, value)
            _input_problem_first(vol, case.path)
            shown_job.result()
        rows = acc.rows(vol.spacing)
        bodycomp.measures_to_csv(rows, paths["table"])
        seg_failure = None
        if dicom_seg:
            seg_failure = _write_dicom_segs(sources, held.labels, held.probabilities(k_idx),
                                            card, paths)
            if seg_failure is not None:
                prov["dicom_seg_error"] = seg_failure.message
        if extra_outputs is not None:
            extra_outputs(stage.path)
        written = stage.commit(prov, old_roles=ALL_ROLES)
        totals = bodycomp.total_rows(rows)
        result = CaseResult(case, True, "; ".join(acc.notes[1:]), written, k_idx,
                            {c.key: float(totals[c.key]["area_cm2"]) for c in TISSUES
                             if c.key in totals}, acc.device, time.perf_counter() - t0,
                            protocol=protocol_from_sums(acc.protocol, vol.spacing)
                            if protocol else {})
        if seg_failure is not None:
            result.ok = False
            result.message = (f"DICOM SEG not written ({seg_failure.message}); the "
                              f"other outputs were written")
            result.traceback = seg_failure.traceback
        return result
    except Exception as exc:
        return _failure(case, exc, time.perf_counter() - t0)
    finally:     # after a commit: the empty staging folder and the lock; else all staged
        stage.abort()
        if vol is not None:
            vol.close()


def _write_overlay(path: Path, vol, slab: stream.Slab, s: int, k: int, grid, title: str) -> None:
    """The overlay PNG of slice k (the slab's s-th), with its soft and hard tissue areas
    (its rows of bodycomp.measures_from_sums, the same as the CSV's) and, when the slab has
    them, its HU-protocol areas (indices.protocol_from_sums, the CSV's too)."""
    sums = {key: value[s:s + 1] for key, value in slab.sums.items()}
    areas = {r["tissue"]: (float(r["area_cm2"]), float(r["hard_area_cm2"]))
             for r in bodycomp.measures_from_sums(sums, vol.spacing, [k]) if r["slice"] == k}
    protocol = None
    if slab.protocol is not None:
        found = protocol_from_sums([{key: v[s:s + 1] for key, v in slab.protocol.items()}],
                                   vol.spacing)
        protocol = {key: found[f"protocol_area_cm2_{key}"] for key in slab.protocol}
    shown = Volume(slab.hu[s][None], vol.ijk_to_ras)        # its geometry for the display
    overlay.write_overlay_png(path, overlay.display_slice(shown, 0),
                              overlay.display_slice(shown, 0, slab.labels[s][None]),
                              areas_cm2=areas, protocol_cm2=protocol, title=title)


@contextmanager
def _input_problems_first(vol, path):
    """On an error (not an interrupt), report the input's own problem instead if it has one
    (a mask, NaN voxels, not CT: what made the network's output bad)."""
    try:
        yield
    except Exception:
        _input_problem_first(vol, path)
        raise


def _input_problem_first(vol, path) -> None:
    """Complete the source's checks (io.sources: the slices not streamed are read now) and
    raise InputError if the volume cannot be segmented: not CT in HU, a mask, NaN voxels,
    as read_volume and the CT check say it at opening."""
    if isinstance(vol, VolumeSource):
        vol.complete_checks()
    problem = ct_problem(vol)
    if problem:
        raise InputError(path, problem)


def network_batch(batch_size: int, card: Dict) -> int:
    """Slices per network batch: ``batch_size`` counts slices at factor 1; a factor-k input
    has k^2 times fewer pixels, so k^2 times as many slices take the same memory (a slab,
    stream.SLAB_SLICES, caps it). At factor 4 on the CPU the network alone ran 48 slices in
    4.9 s in batches of 16 against 7.6 s in batches of 8 (docs/benchmarks.md): the small
    layers' fixed costs are shared."""
    return int(batch_size) * int(card.get("factor", 1)) ** 2


class _Held:
    """What DICOM SEG needs whole (highdicom takes whole arrays): the hard labels (K, J, I)
    uint8 and the selected slices' probabilities (C, n, J, I) float32."""

    def __init__(self, grid, n_selected: int):
        self.labels = np.zeros(grid, np.uint8)
        self._probs = np.zeros((NUM_CLASSES, n_selected) + tuple(grid[1:]), np.float32)
        self._n = 0

    def add(self, slab) -> None:
        self.labels[slab.slices] = slab.labels
        self._probs[:, self._n:self._n + len(slab.slices)] = slab.probabilities
        self._n += len(slab.slices)

    def probabilities(self, k_idx: Sequence[int]) -> np.ndarray:
        """(C, K, J, I) float32 on the whole grid; slices not segmented hold 0."""
        full = np.zeros((NUM_CLASSES,) + self.labels.shape, np.float32)
        full[:, list(k_idx)] = self._probs
        return full


def _write_dicom_segs(sources, labels, probs, card, paths) -> Optional[CaseResult]:
    """Both SEG files into the staging folder; on failure remove both and return the
    failure (a CaseResult carrying the message and, for a bug, the traceback) instead of
    raising, so the case's other outputs are still committed."""
    try:
        write_dicom_seg(paths["dicom_seg"], sources, labels=labels, model_card=card)
        write_dicom_seg(paths["dicom_fractional_seg"], sources, probabilities=probs,
                        model_card=card)
    except Exception as exc:
        for role in ("dicom_seg", "dicom_fractional_seg"):
            try:
                paths[role].unlink()
            except FileNotFoundError:
                pass
        return _failure(Case("", Path()), exc, 0.0)
    return None


def case_provenance(case: Case, vol, card: Dict, extra: Optional[Dict] = None,
                    mirror: bool = True) -> Dict:
    """Where a case's outputs came from: the source path, its DICOM UIDs, the model's name
    and factor and how it was applied (mirror averaging or not), this package's version,
    plus ``extra`` (the command line)."""
    meta = vol.meta
    prov = {"software": f"EPD Segmentation {__version__}",
            "source": str(Path(case.path).resolve()),
            "source_format": meta.get("format", ""),
            "model": {k: card.get(k) for k in ("name", "version", "factor", "label_mode",
                                                "pixel_mm") if k in card}}
    prov["model"]["mirror"] = bool(mirror)
    # the same weights calibrated, or upsampled otherwise, give other numbers
    for key, value in (("calibration", calibration.parameters(card)),
                       ("upsampling", upsampling.parameters(card)),
                       ("field", field_of_view.parameters(card))):
        if value is not None:
            prov["model"][key] = value
    if meta.get("format") == "dicom":
        prov["dicom"] = {"study_instance_uid": meta.get("study_uid", ""),
                         "series_instance_uid": meta.get("series_uid", ""),
                         "frame_of_reference_uid": meta.get("frame_of_reference_uid", ""),
                         "sop_instance_uids": list(meta.get("sop_instance_uids", []))}
    prov.update(extra or {})
    return prov


def nrrd_provenance(prov: Dict) -> Dict[str, str]:
    """The provenance as NRRD key:value fields (one line each, no SOP instance list)."""
    import json

    out = {"EPD_software": prov["software"], "EPD_source": prov["source"],
           "EPD_model": json.dumps(prov["model"], sort_keys=True)}
    dicom = prov.get("dicom")
    if dicom:
        out["EPD_study_instance_uid"] = dicom["study_instance_uid"]
        out["EPD_series_instance_uid"] = dicom["series_instance_uid"]
    if "command" in prov:
        out["EPD_command"] = str(prov["command"])
    return out


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
