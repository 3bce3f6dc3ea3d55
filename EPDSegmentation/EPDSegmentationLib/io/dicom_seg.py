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

ALGORITHM_NAME = "EPD Segmentation"
MANUFACTURER = "EPD Segmentation"


class DicomSegError(ValueError):
    """A DICOM SEG cannot be made from these inputs (the message says why)."""


def _coded(code):
    import highdicom as hd

    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme,
                              meaning=code.meaning)


def algorithm_identification(model_card: Optional[Dict] = None):
    """Our AlgorithmIdentificationSequence: name, AI family, version, model parameters."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    card = model_card or {}
    params = {"package_version": __version__}
    for key in ("name", "factor", "label_mode", "image_mode", "pixel_mm"):
        if key in card:
            params[key] = json.dumps(card[key]) if not isinstance(card[key], str) else card[key]
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
        where = f"source instance {n} ({ds.get('SOPInstanceUID') or 'no SOP Instance UID'})"
        for key in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                    "FrameOfReferenceUID"):
            if not ds.get(key):
                raise DicomSegError(
                    f"{where} has no {key} (the series looks de-identified without new UIDs); "
                    f"a DICOM SEG must reference its source by UID")
        if (int(ds.Rows), int(ds.Columns)) != (j, i):
            raise DicomSegError(f"{where} is {ds.Rows} x {ds.Columns}, the segmentation "
                                f"{j} x {i}: the grid must be the source's")
        out.append(ds)
    if len({ds.SeriesInstanceUID for ds in out}) != 1:
        raise DicomSegError("the source instances belong to more than one series")
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
    )
    seg.SeriesDescription = (series_description or f"EPD body composition {kind.lower()}")[:64]
    with atomic_file(path, overwrite) as tmp:
        seg.save_as(tmp)
    return path
