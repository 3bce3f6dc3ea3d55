"""DICOM Segmentation objects (SEG) of our results, written with highdicom.

Two kinds, both referencing the source CT series instance by instance:
- BINARY: the hard label map, one segment per tissue class 1..5 (segment number = label).
- FRACTIONAL (PROBABILITY): the per-class probabilities, one segment per tissue class,
  stored as 0..max_fractional_value (255 by default, so one quantisation step is 1/255).

Each segment carries the SNOMED CT category and type codes of classes.py, its colour, and our
algorithm identification (name, version, model card summary). Frames are the source slices:
frame k of the SEG lies on the plane of source instance k (same position, orientation and
pixel spacing), so a PACS overlays it on the CT it came from.

highdicom is imported here only; Slicer does not ship it (the module asks before installing).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .. import __version__
from ..core.atomic import atomic_file, check_target
from ..core.classes import TISSUES, TissueClass
from ..core.errors import EPDError
from ..core.calibration import parameters as calibration_parameters
from ..core.field import parameters as field_parameters
from ..core.upsampling import parameters as upsampling_parameters

ALGORITHM_NAME = "EPD Segmentation"
MANUFACTURER = "EPD Segmentation"


class DicomSegError(EPDError, ValueError):
    """A DICOM SEG cannot be made from these inputs (the message says why)."""


#: Type 2 patient and study attributes a SEG copies from its source: de-identifiers often
#: remove them, and the standard allows them empty, so a missing one is written empty.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                "ReferringPhysicianName")


def _where(ds, n: int) -> str:
    name = getattr(ds, "filename", None)
    uid = ds.get("SOPInstanceUID") or "no SOP Instance UID"
    return f"source instance {n} ({name})" if isinstance(name, str) and name \
        else f"source instance {n} ({uid})"


def seg_character_set(value, where: str = "the source"):
    """The SpecificCharacterSet to write a SEG with, from the source's: None for the
    default repertoire (missing, empty, 'ISO 2022 IR 6'); a single 'ISO 2022 IR n' (code
    extensions announced but only one character set, as some scanners write) becomes the
    same set without extensions ('ISO_IR n'); a multi-valued one with an empty first value
    gets 'ISO 2022 IR 6' there. The text values were decoded by pydicom already and are
    re-encoded with the result. DicomSegError naming ``where`` and the attribute for a
    character set highdicom cannot write."""
    from highdicom.enum import SpecificCharacterSetValues

    values = [value] if isinstance(value, str) else list(value or [])
    values = [str(v).strip() for v in values]
    if not any(values):
        return None
    if len(values) == 1 and values[0].startswith("ISO 2022 IR "):
        values = ["ISO_IR " + values[0][len("ISO 2022 IR "):]]
        if values[0] == "ISO_IR 6":
            return None
    if len(values) > 1 and values[0] == "":
        values[0] = "ISO 2022 IR 6"
    known = {v.value for v in SpecificCharacterSetValues}
    bad = [v for v in values if v not in known]
    if bad:
        raise DicomSegError(f"{where}: SpecificCharacterSet {value!r} holds {bad[0]!r}, a "
                            f"character set a DICOM SEG cannot be written with")
    return values[0] if len(values) == 1 else values


def _slice_gap_mm(sources) -> Optional[float]:
    """The distance between neighbouring source slices along their normal (mm), or None
    for a single slice."""
    if len(sources) < 2:
        return None
    iop = np.asarray([float(v) for v in sources[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    pos = sorted(float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))
                 for ds in sources)
    return float(np.median(np.diff(pos)))


def _coded(code):
    import highdicom as hd

    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme,
                              meaning=code.meaning)


def parameter_value(value) -> str:
    """A model parameter as AlgorithmParameters can hold it: the attribute is
    ``key=value,key=value`` (highdicom joins and splits it so), so a value has no ',' or
    '=': numbers as written, a list's items joined by spaces, a table's rows by '; '."""
    if isinstance(value, (list, tuple)):
        rows = any(isinstance(v, (list, tuple)) for v in value)
        return ("; " if rows else " ").join(parameter_value(v) for v in value)
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace(",", ";").replace("=", ":")


def algorithm_identification(model_card: Optional[Dict] = None):
    """Our AlgorithmIdentificationSequence: name, AI family, version, model parameters
    (parameter_value; a calibrated card's class weights as ``calibration_pixel_mm`` and
    ``calibration_class_weights``, one row per pixel size; HU-guided upsampling as
    ``upsampling_*``)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    card = model_card or {}
    params = {"package_version": __version__}
    for key in ("name", "factor", "label_mode", "image_mode", "pixel_mm"):
        if key in card:
            params[key] = parameter_value(card[key])
    # the same weights calibrated, or upsampled otherwise, give other numbers
    for name, fields in (("calibration", calibration_parameters(card)),
                         ("upsampling", upsampling_parameters(card)),
                         ("field", field_parameters(card))):
        for key, value in (fields or {}).items():
            params[f"{name}_{key}"] = parameter_value(value)
    version = f"{__version__}"
    if card.get("name"):
        version += f" ({card['name']})"
    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=version[:64],
        source=MANUFACTURER, parameters=params)


def segment_descriptions(model_card: Optional[Dict] = None,
                         tissues: Sequence[TissueClass] = TISSUES) -> List:
    """One SegmentDescription per tissue class; segment number = class index."""
    import highdicom as hd

    algorithm = algorithm_identification(model_card)
    out = []
    for c in tissues:
        out.append(hd.seg.SegmentDescription(
            segment_number=c.index,
            segment_label=c.name,
            segmented_property_category=_coded(c.category),
            segmented_property_type=_coded(c.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=c.key,
            tracking_uid=hd.UID(),
            anatomic_regions=[_coded(c.region)] if c.region else None,
            display_color=hd.color.CIELabColor.from_rgb(*c.color)))
    return out


def prepare_sources(sources: Sequence, shape: Sequence[int]) -> List:
    """Check the source instances against the grid and return copies ready for highdicom.

    An empty SOP Class/Instance UID in the data set (some de-identifiers blank them) is taken
    from the file meta information, which records the same UIDs. Missing study or series
    UIDs cannot be recovered: the SEG could not reference its source, so that is an error.
    Missing type 2 patient/study attributes (TYPE2_COPIED) are set empty; a missing
    SliceThickness becomes the spacing between the slices (a SEG's pixel measures need one;
    a lone slice without it is an error); the character set is checked (seg_character_set).
    Every error names the source file and the attribute.
    """
    if len(sources) == 0:
        raise DicomSegError(
            "DICOM SEG needs the source DICOM series: this input has no DICOM instances "
            "(it was read from NIfTI or NRRD). Segment the DICOM series itself to export SEG.")
    k, j, i = shape
    if len(sources) != k:
        raise DicomSegError(f"the segmentation has {k} slices but {len(sources)} source "
                            f"instances were given; they must match one to one")
    out = []
    for n, ds in enumerate(sources):
        ds = copy.deepcopy(ds)  # Dataset.copy() is shallow: it would edit the caller's
        meta = getattr(ds, "file_meta", None)
        if not ds.get("SOPClassUID") and meta is not None:
            ds.SOPClassUID = meta.get("MediaStorageSOPClassUID", "")
        if not ds.get("SOPInstanceUID") and meta is not None:
            ds.SOPInstanceUID = meta.get("MediaStorageSOPInstanceUID", "")
        where = _where(ds, n)
        for key in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                    "FrameOfReferenceUID"):
            if not ds.get(key):
                raise DicomSegError(
                    f"{where} has no {key} (the series looks de-identified without new UIDs); "
                    f"a DICOM SEG must reference its source by UID")
        for key in ("Rows", "Columns", "ImageOrientationPatient", "ImagePositionPatient",
                    "PixelSpacing"):
            if ds.get(key) in (None, ""):
                raise DicomSegError(f"{where} has no {key}; a DICOM SEG needs the source's "
                                    f"geometry")
        if (int(ds.Rows), int(ds.Columns)) != (j, i):
            raise DicomSegError(f"{where} is {ds.Rows} x {ds.Columns}, the segmentation "
                                f"{j} x {i}: the grid must be the source's")
        for key in TYPE2_COPIED:
            if key not in ds:
                setattr(ds, key, "")
        seg_character_set(ds.get("SpecificCharacterSet"), f"{where}")
        out.append(ds)
    if len({ds.SeriesInstanceUID for ds in out}) != 1:
        raise DicomSegError("the source instances belong to more than one series")
    gap = None
    for n, ds in enumerate(out):
        if ds.get("SliceThickness") in (None, ""):
            gap = _slice_gap_mm(out) if gap is None else gap
            if not gap or gap <= 0:
                raise DicomSegError(f"{_where(ds, n)} has no SliceThickness and no neighbour "
                                    f"slice to take the spacing from; a DICOM SEG needs it")
            ds.SliceThickness = f"{gap:.6g}"
    return out


def write_dicom_seg(path, sources: Sequence, *, labels: Optional[np.ndarray] = None,
                    probabilities: Optional[np.ndarray] = None,
                    model_card: Optional[Dict] = None, series_number: int = 900,
                    series_description: Optional[str] = None,
                    max_fractional_value: int = 255, overwrite: bool = False) -> Path:
    """Write a BINARY (``labels``) or FRACTIONAL (``probabilities``) DICOM SEG file.

    path: the .dcm file to write (atomically; an existing file is kept unless ``overwrite``).
    sources: pydicom Datasets of the source CT, one per slice, in the volume's K order (as
        read, pixel data not needed).
    labels: uint8 (K, J, I) classes 0..5, on the source grid (J = row, I = column).
    probabilities: float (C, K, J, I) in 0..1 with C = len(classes) (background first); the
        tissue classes 1..5 become segments.
    Returns the path written.
    """
    import highdicom as hd

    if (labels is None) == (probabilities is None):
        raise DicomSegError("give exactly one of labels (BINARY) or probabilities (FRACTIONAL)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_target(path, overwrite)  # fail before the work, not after
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 3 or labels.dtype.kind not in "iu":
            raise DicomSegError(f"labels must be an integer (K, J, I) array; got "
                                f"{labels.dtype} {labels.shape}")
        if labels.min() < 0 or labels.max() > TISSUES[-1].index:
            raise DicomSegError(f"labels must lie in 0..{TISSUES[-1].index}; got "
                                f"{labels.min()}..{labels.max()}")
        sources = prepare_sources(sources, labels.shape)
        pixels = labels.astype(np.uint8)
        seg_type = hd.seg.SegmentationTypeValues.BINARY
        kind = "BINARY"
    else:
        probs = np.asarray(probabilities, np.float32)
        if probs.ndim != 4 or probs.shape[0] != len(TISSUES) + 1:
            raise DicomSegError(f"probabilities must be (C={len(TISSUES) + 1}, K, J, I); got "
                                f"{probs.shape}")
        if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
            raise DicomSegError("probabilities must be finite and within 0..1")
        sources = prepare_sources(sources, probs.shape[1:])
        # (frames, rows, columns, segments), segments in class order 1..5
        pixels = np.moveaxis(probs[1:], 0, -1)
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
        kind = "FRACTIONAL"
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=seg_type,
        segment_descriptions=segment_descriptions(model_card),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=(model_card or {}).get("name", "EPDBodyComp")[:64],
        software_versions=__version__,
        device_serial_number="0",
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=max_fractional_value,
        content_description=(series_description or f"Body composition ({kind.lower()})")[:64],
        content_label="BODYCOMP" if kind == "BINARY" else "BODYPROB",
        content_creator_name="EPD^Segmentation",
        omit_empty_frames=False,
        specific_character_set=seg_character_set(sources[0].get("SpecificCharacterSet"),
                                                 _where(sources[0], 0)),
    )
    seg.SeriesDescription = (series_description or f"EPD body composition {kind.lower()}")[:64]
    with atomic_file(path, overwrite) as tmp:
        seg.save_as(tmp)
        check_seg_file(tmp, sources, kind)
    return path


def check_seg_file(path, sources: Sequence, kind: str) -> None:
    """Read a written SEG back with pydicom and highdicom and check what a viewer relies on:
    the segmentation type, five segments, one frame per source slice and segment, and every
    frame referencing a source instance. DicomSegError (naming the file) if not."""
    import highdicom as hd
    import pydicom

    try:
        raw = pydicom.dcmread(path)
        seg = hd.seg.segread(path)
    except Exception as exc:
        raise DicomSegError(f"{path}: the DICOM SEG just written cannot be read back "
                            f"({type(exc).__name__}: {exc})") from None
    problems = []
    if raw.get("SegmentationType") != kind:
        problems.append(f"SegmentationType {raw.get('SegmentationType')!r}, not {kind}")
    if seg.number_of_segments != len(TISSUES):
        problems.append(f"{seg.number_of_segments} segments, not {len(TISSUES)}")
    if int(raw.NumberOfFrames) != len(sources) * len(TISSUES):
        problems.append(f"{raw.NumberOfFrames} frames, not {len(sources) * len(TISSUES)}")
    refs = {uid for _, _, uid in seg.get_source_image_uids()}
    missing = {str(ds.SOPInstanceUID) for ds in sources} - refs
    if missing:
        problems.append(f"{len(missing)} source instance(s) not referenced")
    if problems:
        raise DicomSegError(f"{path}: the DICOM SEG read back is not valid: "
                            + "; ".join(problems))
