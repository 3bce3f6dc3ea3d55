"""Slicer segmentation files (.seg.nrrd): our tissue classes in and out.

Writing follows what Slicer's vtkMRMLSegmentationStorageNode writes (one segment per tissue
class 1..5 with our names, colours and SNOMED CT terminology from classes.py):
- hard labels: one 3D unsigned char layer, each segment's LabelValue its class index;
- probabilities (fractional=True): Slicer's "Fractional labelmap", one signed char layer per
  segment (a 4D NRRD with a leading "list" axis), value round(216 p - 108) in -108..108.
Space is LPS as Slicer writes it. Reading maps segments to classes by name (our keys and
names and common synonyms, case and punctuation ignored).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

import numpy as np

from ..core.atomic import atomic_file
from ..core.classes import CLASSES, NUM_CLASSES, TissueClass
from ..core.fractional import decode_fractional, encode_fractional
from ..core.volume import Volume
from .errors import InputError
from .nrrd_stream import nrrd_slices

FLIP = np.diag([-1.0, -1.0, 1.0])
TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

#: extra names (normalised: lower case, letters and digits only) accepted for each class
SYNONYMS = {
    "BG": ("background", "bg", "outside"),
    "MUS": ("muscle", "muscles", "skeletalmuscle", "skeletalmuscles", "sm"),
    "IMAT": ("intermuscularfat", "intermuscularadiposetissue", "intramuscularfat",
             "intermuscularandintramuscularfat"),
    "SAT": ("subcutaneousfat", "subcutaneousadiposetissue", "subcutaneousfattissue",
            "subcutaneoustissue"),
    "VAT": ("visceralfat", "visceraladiposetissue", "torsofat", "intraabdominalfat"),
    "MSC": ("other", "othertissue", "otherbodytissue", "misc", "miscellaneous", "rest"),
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _name_table() -> Dict[str, int]:
    table = {}
    for c in CLASSES:
        for name in (c.key, c.name) + SYNONYMS.get(c.key, ()):
            table[_norm(name)] = c.index
    return table


def class_for_segment(name: str) -> Optional[int]:
    """Class index for a segment name (our key, our name or a synonym), None if unknown."""
    return _name_table().get(_norm(name))


def _code(c) -> str:
    return "^^" if c is None else f"{c.scheme}^{c.value}^{c.meaning}"


def terminology_tag(c: TissueClass) -> str:
    """Slicer's TerminologyEntry tag value for a class (category, type, anatomic region)."""
    return "~".join([TERMINOLOGY_CONTEXT, _code(c.category), _code(c.type), "^^",
                     ANATOMIC_CONTEXT, _code(c.region), "^^"])


def _space_fields(ijk_to_ras: np.ndarray):
    m = np.asarray(ijk_to_ras, np.float64)
    return (FLIP @ m[:3, :3]).T, FLIP @ m[:3, 3]    # rows = I, J, K axis vectors (LPS)


def _geometry_string(ijk_to_ras: np.ndarray, shape_kji) -> str:
    k, j, i = shape_kji
    vals = [f"{v:.10g}" for v in np.asarray(ijk_to_ras, np.float64).ravel()]
    return ";".join(vals + ["0", str(i - 1), "0", str(j - 1), "0", str(k - 1)]) + ";"


def seg_nrrd_fields(ijk_to_ras, shape_kji, *, fractional: bool,
                    provenance: Optional[Dict[str, str]] = None) -> Dict[str, object]:
    """The NRRD header fields (no encoding) of a tissue .seg.nrrd on grid ijk_to_ras with
    (K, J, I) = shape_kji: hard labels, or Fractional labelmap layers (list axis first).
    provenance: extra key:=value fields (one line each; e.g. EPD_source, EPD_model)."""
    tissues = CLASSES[1:]
    dirs, origin = _space_fields(ijk_to_ras)
    k, j, i = shape_kji
    header = {
        "type": "signed char" if fractional else "unsigned char",
        "space": "left-posterior-superior",
        "space origin": origin,
    }
    if fractional:
        header["kinds"] = ["list", "domain", "domain", "domain"]
        header["space directions"] = np.vstack([np.full(3, np.nan), dirs])
    else:
        header["kinds"] = ["domain", "domain", "domain"]
        header["space directions"] = dirs
    rep = "Fractional labelmap" if fractional else "Binary labelmap"
    header["Segmentation_MasterRepresentation"] = rep
    if not fractional:
        # Slicer reads every layer as a binary labelmap; listing "Fractional labelmap" here
        # would make it convert each segment to a closed surface and back on load (seconds
        # per slice). mrml.segmentation.load_segmentation restores the fractional segments.
        header["Segmentation_ContainedRepresentationNames"] = rep + "|"
    header["Segmentation_ReferenceImageExtentOffset"] = "0 0 0"
    header["Segmentation_ConversionParameters"] = (
        "Reference image geometry|" + _geometry_string(ijk_to_ras, shape_kji)
        + "|Image geometry description string determining the geometry of the labelmap.&")
    extent = f"0 {i - 1} 0 {j - 1} 0 {k - 1}"
    for n, c in enumerate(tissues):
        pre = f"Segment{n}_"
        header[pre + "ID"] = c.key
        header[pre + "Name"] = c.name
        header[pre + "NameAutoGenerated"] = "0"
        header[pre + "Color"] = " ".join(f"{v / 255:.6f}" for v in c.color)
        header[pre + "ColorAutoGenerated"] = "0"
        header[pre + "Extent"] = extent
        header[pre + "LabelValue"] = "1" if fractional else str(c.index)
        header[pre + "Layer"] = str(n) if fractional else "0"
        header[pre + "Tags"] = f"TerminologyEntry:{terminology_tag(c)}|"
    for key, value in (provenance or {}).items():
        # one header line each, ASCII as NRRD headers are (a path's other letters escaped)
        header[key] = " ".join(str(value).split()).encode("ascii", "backslashreplace").decode()
    return header


def custom_fields(header: Dict[str, object]) -> Dict[str, str]:
    """pynrrd's custom_field_map for a header of seg_nrrd_fields: the Segment* and EPD_*
    fields are strings."""
    return {key: "string" for key in header if key.startswith(("Segment", "EPD_"))}


def write_seg_nrrd(path: Union[str, Path], labels_or_probabilities, ijk_to_ras, *,
                   fractional: bool = False, overwrite: bool = False,
                   provenance: Optional[Dict[str, str]] = None) -> Path:
    """Write tissue labels or probabilities as a Slicer .seg.nrrd (gzip), atomically.

    labels_or_probabilities: uint8 labels (K, J, I) with classes 0..5 (fractional=False), or
    probabilities float (C, K, J, I) with C = 6 (background first) or 5 (tissues 1..5),
    values in 0..1 (fractional=True). ijk_to_ras: 4 x 4, RAS mm. provenance: extra
    key:=value fields (one line each; e.g. EPD_source, EPD_model) kept in the header.
    """
    import nrrd

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ValueError(f"{path}: a Slicer segmentation file must end in .seg.nrrd")
    data = np.asarray(labels_or_probabilities)
    if fractional:
        if data.ndim != 4 or data.shape[0] not in (NUM_CLASSES, NUM_CLASSES - 1):
            raise ValueError(f"probabilities must be (C, K, J, I) with C = {NUM_CLASSES} or "
                             f"{NUM_CLASSES - 1}; got shape {data.shape}")
        if data.dtype.kind not in "fiu":
            raise ValueError(f"probabilities must be numeric; got {data.dtype}")
        probs = data[1:] if data.shape[0] == NUM_CLASSES else data
        if np.nanmin(probs) < -1e-6 or np.nanmax(probs) > 1 + 1e-6 or np.isnan(probs).any():
            raise ValueError("probabilities must lie in 0..1 (and not be NaN)")
        stored = encode_fractional(probs)
        array = np.moveaxis(stored, 0, -1)                  # (K, J, I, C): list axis fastest
        shape_kji = array.shape[:3]
    else:
        if data.ndim != 3:
            raise ValueError(f"labels must be (K, J, I); got shape {data.shape}")
        if data.dtype.kind not in "iub":
            raise ValueError(f"labels must be integers; got {data.dtype}")
        if data.size and (data.min() < 0 or data.max() >= NUM_CLASSES):
            raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1}; got "
                             f"{data.min()}..{data.max()}")
        array = data.astype(np.uint8)
        shape_kji = array.shape
    header = seg_nrrd_fields(ijk_to_ras, shape_kji, fractional=fractional, provenance=provenance)
    header["encoding"] = "gzip"
    custom = custom_fields(header)
    with atomic_file(path, overwrite) as tmp:
        nrrd.write(str(tmp), np.ascontiguousarray(array), header, index_order="C",
                   custom_field_map=custom)
    return path


@contextmanager
def seg_nrrd_slices(path: Union[str, Path], ijk_to_ras, shape_kji, *, fractional: bool = False,
                    overwrite: bool = False,
                    provenance: Optional[Dict[str, str]] = None) -> Iterator:
    """A tissue .seg.nrrd written slice by slice in K order (io.nrrd_stream.SliceWriter):
    hard labels take uint8 (n, J, I) slices; fractional ones int8 (n, J, I, 5) Slicer values
    (-108..108, tissues 1..5, core.fractional's codes with the class axis last, as
    core.stream makes them). Same header as write_seg_nrrd (provenance likewise); atomic."""
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ValueError(f"{path}: a Slicer segmentation file must end in .seg.nrrd")
    shape_kji = tuple(int(n) for n in shape_kji)
    fields = seg_nrrd_fields(ijk_to_ras, shape_kji, fractional=fractional, provenance=provenance)
    shape = shape_kji + ((NUM_CLASSES - 1,) if fractional else ())
    with nrrd_slices(path, shape, np.int8 if fractional else np.uint8, fields,
                     overwrite=overwrite) as out:
        yield out


def _ras_geometry(header, path: Path):
    space = str(header.get("space", "left-posterior-superior")).lower()
    flip = {"left-posterior-superior": FLIP, "lps": FLIP,
            "right-anterior-superior": np.eye(3), "ras": np.eye(3)}.get(space)
    if flip is None:
        raise InputError(path, f"NRRD space {space!r} is not supported (need LPS or RAS)")
    dirs = np.asarray(header.get("space directions"), np.float64)
    dirs = dirs[~np.isnan(dirs).any(axis=1)]
    if dirs.shape != (3, 3):
        raise InputError(path, f"needs three spatial axes; space directions are {dirs.tolist()}")
    origin = np.asarray(header.get("space origin", np.zeros(3)), np.float64)
    m = np.eye(4)
    m[:3, :3] = flip @ dirs.T
    m[:3, 3] = flip @ origin
    return m


def read_seg_nrrd(path: Union[str, Path]) -> Volume:
    """Read a Slicer .seg.nrrd into class labels, segments mapped to classes by name.

    Returns a Volume: uint8 classes (K, J, I) on the file's grid; meta: source, format
    'seg.nrrd', segments (name, class, layer, label value), representation, extent_offset
    (Slicer's Segmentation_ReferenceImageExtentOffset, I J K) and, for a fractional file,
    fractions float32 (6, K, J, I). Where segments overlap, the later one wins.
    """
    import nrrd

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        data, header = nrrd.read(str(path), index_order="C")
    except Exception as exc:
        raise InputError(path, f"cannot be read as NRRD: {type(exc).__name__}: {exc}") from None
    kinds = [str(k) for k in header.get("kinds", [])]
    if data.ndim == 4:
        if not kinds or kinds[0] not in ("list", "vector", "complex", "point", "covariant-vector"):
            raise InputError(path, f"4D NRRD whose first axis is {kinds[:1]}, not a layer list")
        layers = np.moveaxis(data, -1, 0)                   # (L, K, J, I)
    elif data.ndim == 3:
        layers = data[None]
    else:
        raise InputError(path, f"is {data.ndim}D; a segmentation is 3D (or 4D with layers)")
    m = _ras_geometry(header, path)
    rep = str(header.get("Segmentation_MasterRepresentation",
                         header.get("Segmentation_SourceRepresentation", "Binary labelmap")))
    fractional = rep == "Fractional labelmap"
    segments: List[Dict[str, object]] = []
    n = 0
    while f"Segment{n}_ID" in header:
        name = str(header.get(f"Segment{n}_Name", header[f"Segment{n}_ID"]))
        cls = class_for_segment(name)
        if cls is None:
            cls = class_for_segment(str(header[f"Segment{n}_ID"]))
        if cls is None:
            known = ", ".join(f"{c.key} ({c.name})" for c in CLASSES)
            raise InputError(path, f"segment {name!r} does not name a tissue class; "
                                   f"known names: {known} and synonyms such as "
                                   f"'subcutaneous fat', 'torso fat'")
        segments.append({"name": name, "class": cls,
                         "layer": int(header.get(f"Segment{n}_Layer", n if data.ndim == 4 else 0)),
                         "label_value": int(header.get(f"Segment{n}_LabelValue", 1))})
        n += 1
    if not segments:
        raise InputError(path, "has no Segment0_ID: not a Slicer segmentation file (read it "
                               "as a plain label map instead)")
    shape = layers.shape[1:]
    labels = np.zeros(shape, np.uint8)
    fractions = None
    if fractional:
        fractions = np.zeros((NUM_CLASSES,) + shape, np.float32)
        for seg in segments:
            if not 0 <= seg["layer"] < len(layers):
                raise InputError(path, f"segment {seg['name']!r} is on layer {seg['layer']}, "
                                       f"but the file has {len(layers)} layer(s)")
            fractions[seg["class"]] += decode_fractional(layers[seg["layer"]])
        fractions[0] = np.clip(1 - fractions[1:].sum(axis=0), 0, 1)
        labels = np.argmax(fractions, axis=0).astype(np.uint8)
    else:
        for seg in segments:
            if not 0 <= seg["layer"] < len(layers):
                raise InputError(path, f"segment {seg['name']!r} is on layer {seg['layer']}, "
                                       f"but the file has {len(layers)} layer(s)")
            labels[layers[seg["layer"]] == seg["label_value"]] = seg["class"]
    offset = [int(v) for v in str(header.get("Segmentation_ReferenceImageExtentOffset",
                                             "0 0 0")).split()]
    meta = {"source": str(path), "format": "seg.nrrd", "segments": segments,
            "representation": rep, "extent_offset": offset}
    if fractions is not None:
        meta["fractions"] = fractions
    return Volume(labels, m, meta)
