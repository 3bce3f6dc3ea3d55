"""Tissue segments in MRML segmentation nodes: hard labels as binary labelmap segments, soft
labels as Slicer's "Fractional labelmap", label maps read back from any segmentation, and
.seg.nrrd files written and read through vtkMRMLSegmentationStorageNode.

Fractional labelmaps follow Slicer's convention (vtkPolyDataToFractionalLabelmapFilter.h):
VTK_CHAR voxels from FRACTIONAL_MIN = -108 (probability 0) to FRACTIONAL_MAX = 108
(probability 1), 216 steps, with field data "ScalarRange" (-108, 108), "ThresholdValue" (0,
the 50 % surface) and "InterpolationType" (linear), which the 2D displayable manager reads.

Two gaps in Slicer's storage node are bridged here (vtkMRMLSegmentationStorageNode.cxx):
- writing takes the file's grid from the segments' *binary* labelmaps only, so a segmentation
  with fractional segments alone is written as a 1 x 1 x 1 image. Every fractional segment
  here also carries a derived binary labelmap (one layer shared by all segments: the argmax),
  and the reference geometry is the slab the probabilities cover, so the file holds exactly
  the fractional voxels (nothing is padded with 0, which would read as probability 0.5);
- reading always makes "Binary labelmap" the source representation, then converts it to
  every representation the header lists (binary -> closed surface -> fractional, seconds per
  slice of 512 x 512, for nothing). Fractional files are written without that list, and
  ``load_segmentation`` reads the file's Segmentation_MasterRepresentation and moves the
  voxels back into fractional segments.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..core.classes import NUM_CLASSES, TISSUES, TissueClass
from ..core.fractional import (FRACTIONAL_MAX, FRACTIONAL_MIN, FRACTIONAL_STEPS,  # noqa: F401
                               decode_fractional, encode_fractional)
from ..io.seg_nrrd import class_for_segment, terminology_tag
from .nodes import InputProblem, ijk_to_ras, numpy_matrix, vtk_matrix

BINARY = "Binary labelmap"
FRACTIONAL = "Fractional labelmap"

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------- images


_VTK_TYPES = {np.dtype(np.uint8): vtk.VTK_UNSIGNED_CHAR, np.dtype(np.int8): vtk.VTK_CHAR,
              np.dtype(np.int16): vtk.VTK_SHORT, np.dtype(np.float32): vtk.VTK_FLOAT}


def oriented_image(array: np.ndarray, ijk_to_ras_matrix, k0: int = 0):
    """A vtkOrientedImageData holding a copy of ``array`` (n, J, I) as slices k0..k0+n-1 of
    the grid ``ijk_to_ras_matrix``. int8 becomes VTK_CHAR, as Slicer's fractional maps."""
    a = np.ascontiguousarray(array)
    if a.ndim != 3:
        raise ValueError(f"an image is (n, J, I); got shape {a.shape}")
    vtk_type = _VTK_TYPES.get(a.dtype)
    if vtk_type is None:
        raise ValueError(f"unsupported voxel type {a.dtype}")
    n, j, i = a.shape
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, i - 1, 0, j - 1, k0, k0 + n - 1)
    image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(a.ravel(), deep=True, array_type=vtk_type))
    image.SetImageToWorldMatrix(vtk_matrix(ijk_to_ras_matrix))
    return image


def image_array(image) -> Tuple[np.ndarray, Tuple[int, ...]]:
    """(a copy of the voxels (n, J, I), extent (i0, i1, j0, j1, k0, k1)) of an image."""
    e = tuple(image.GetExtent())
    scalars = image.GetPointData().GetScalars()
    shape = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    if scalars is None or min(shape) <= 0:
        return np.zeros((0, 0, 0), np.uint8), e
    return numpy_support.vtk_to_numpy(scalars).reshape(shape).copy(), e


def image_matrix(image) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return numpy_matrix(m)


def geometry_string(ijk_to_ras_matrix, shape_kji: Sequence[int], k_range=None) -> str:
    """Slicer's serialized image geometry (matrix and extent) of a grid, optionally only the
    slices k_range = (k0, k1) inclusive."""
    k, j, i = (int(v) for v in shape_kji)
    k0, k1 = (0, k - 1) if k_range is None else (int(k_range[0]), int(k_range[1]))
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, i - 1, 0, j - 1, k0, k1)
    image.SetImageToWorldMatrix(vtk_matrix(ijk_to_ras_matrix))
    return slicer.vtkSegmentationConverter.SerializeImageGeometry(image)


def _add_fractional_field_data(image) -> None:
    fd = image.GetFieldData()
    scalar_range = vtk.vtkDoubleArray()
    scalar_range.SetName(slicer.vtkSegmentationConverter.GetScalarRangeFieldName())
    scalar_range.InsertNextValue(FRACTIONAL_MIN)
    scalar_range.InsertNextValue(FRACTIONAL_MAX)
    fd.AddArray(scalar_range)
    threshold = vtk.vtkDoubleArray()
    threshold.SetName(slicer.vtkSegmentationConverter.GetThresholdValueFieldName())
    threshold.InsertNextValue((FRACTIONAL_MIN + FRACTIONAL_MAX) / 2.0)
    fd.AddArray(threshold)
    interpolation = vtk.vtkIntArray()
    interpolation.SetName(slicer.vtkSegmentationConverter.GetInterpolationTypeFieldName())
    interpolation.InsertNextValue(vtk.VTK_LINEAR_INTERPOLATION)
    fd.AddArray(interpolation)


# ----------------------------------------------------------------------------- segments


def terminology_entry(c: TissueClass) -> str:
    """Slicer's TerminologyEntry tag of a tissue class (SNOMED CT codes from classes.py)."""
    return terminology_tag(c)


def _segment(segment_id: str, name: str, color, label_value: int, tags: Dict[str, str]):
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.SetNameAutoGenerated(False)
    segment.SetColor(*color)
    segment.SetColorAutoGenerated(False)
    segment.SetLabelValue(int(label_value))
    for key, value in tags.items():
        segment.SetTag(key, value)
    return segment


def _tissue_spec(c: TissueClass):
    tag = slicer.vtkSegment.GetTerminologyEntryTagName()
    return (c.key, c.name, tuple(v / 255.0 for v in c.color), c.index,
            {tag: terminology_entry(c)})


def _ensure_display(seg_node, representation_2d: str) -> None:
    if seg_node.GetDisplayNode() is None:
        seg_node.CreateDefaultDisplayNodes()
    display = seg_node.GetDisplayNode()
    if display is not None:
        display.SetPreferredDisplayRepresentationName2D(representation_2d)


def fill_tissue_segmentation(seg_node, labels: np.ndarray, ijk_to_ras_matrix, *,
                             k0: int = 0, reference_volume=None) -> None:
    """Replace the segments of ``seg_node`` with the five tissue segments (MUS, IMAT, SAT,
    VAT, MSC: IDs = keys, names, colours, SNOMED CT terminology) of uint8 class ``labels``
    (n, J, I), slices k0.. of the grid ``ijk_to_ras_matrix``. All five share one binary
    labelmap layer, each segment's label value being its class index. The reference
    geometry is the reference volume (input CT) when given, so DICOM SEG export works."""
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.dtype != np.uint8:
        raise ValueError(f"labels must be uint8 (n, J, I); got {labels.dtype} {labels.shape}")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be classes 0..{NUM_CLASSES - 1}; found {labels.max()}")
    segmentation = seg_node.GetSegmentation()
    was_modifying = seg_node.StartModify()
    try:
        segmentation.RemoveAllSegments()
        segmentation.SetSourceRepresentationName(BINARY)
        if reference_volume is not None:
            seg_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        image = oriented_image(labels, ijk_to_ras_matrix, k0)
        for c in TISSUES:
            seg_id, name, color, value, tags = _tissue_spec(c)
            segment = _segment(seg_id, name, color, value, tags)
            segment.AddRepresentation(BINARY, image)
            segmentation.AddSegment(segment, seg_id)
    finally:
        seg_node.EndModify(was_modifying)
    _ensure_display(seg_node, BINARY)


def _argmax_layer(values: Sequence[np.ndarray], label_values: Sequence[int]) -> np.ndarray:
    """uint8 (n, J, I): the label value of the most probable segment of int8 fractional
    ``values``, 0 where the remainder (1 - sum) is more probable than any of them."""
    lut = np.array([0] + [int(v) for v in label_values], np.uint8)
    n = values[0].shape[0]
    out = np.empty(values[0].shape, np.uint8)
    for s in range(n):  # slice by slice: the int32 scratch stays small
        stacked = np.stack([np.asarray(v[s], np.int32) - FRACTIONAL_MIN for v in values])
        background = FRACTIONAL_STEPS - stacked.sum(axis=0)  # 1 - sum(p), in 1/216 steps
        out[s] = lut[np.argmax(np.concatenate([background[None], stacked]), axis=0)]
    return out


def _fill_fractional(seg_node, values: Sequence[np.ndarray], specs, ijk_to_ras_matrix,
                     k0: int) -> None:
    """Segments with Fractional labelmap source (int8 ``values`` (n, J, I) each) and one
    shared derived binary layer (see ``_argmax_layer``) that the storage node needs."""
    n, j, i = values[0].shape
    segmentation = seg_node.GetSegmentation()
    binary = oriented_image(_argmax_layer(values, [s[3] for s in specs]), ijk_to_ras_matrix, k0)
    was_modifying = seg_node.StartModify()
    try:
        segmentation.RemoveAllSegments()
        segmentation.SetSourceRepresentationName(FRACTIONAL)
        segmentation.SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            geometry_string(ijk_to_ras_matrix, (k0 + n, j, i), (k0, k0 + n - 1)))
        for v, (seg_id, name, color, value, tags) in zip(values, specs):
            image = oriented_image(np.asarray(v, np.int8), ijk_to_ras_matrix, k0)
            _add_fractional_field_data(image)
            segment = _segment(seg_id, name, color, value, tags)
            segment.AddRepresentation(FRACTIONAL, image)
            segment.AddRepresentation(BINARY, binary)
            segmentation.AddSegment(segment, seg_id)
    finally:
        seg_node.EndModify(was_modifying)
    _ensure_display(seg_node, FRACTIONAL)


def fill_fractional_segmentation(seg_node, probabilities: np.ndarray, ijk_to_ras_matrix, *,
                                 k0: int = 0, encoded: bool = False) -> None:
    """Replace the segments of ``seg_node`` with fractional tissue segments.

    probabilities: float (C, n, J, I) with C = 6 (background first, dropped) or 5 (tissues
    1..5), values in 0..1, for slices k0..k0+n-1 of the grid ``ijk_to_ras_matrix``; or,
    with encoded=True, int8 values already from ``encode_fractional``. Stored as int8
    -108..108 (step 1/216). The segmentation's reference geometry is that slab."""
    p = np.asarray(probabilities)
    if p.ndim != 4 or p.shape[0] not in (NUM_CLASSES, NUM_CLASSES - 1):
        raise ValueError(f"probabilities must be (C, n, J, I) with C = {NUM_CLASSES} or "
                         f"{NUM_CLASSES - 1}; got shape {p.shape}")
    if encoded and p.dtype != np.int8:
        raise ValueError(f"encoded fractional values must be int8; got {p.dtype}")
    tissues = p[1:] if p.shape[0] == NUM_CLASSES else p
    _fill_fractional(seg_node, [t if encoded else encode_fractional(t) for t in tissues],
                     [_tissue_spec(c) for c in TISSUES], ijk_to_ras_matrix, k0)


def fractional_probabilities(seg_node) -> Tuple[np.ndarray, np.ndarray, int]:
    """The fractional tissue segments decoded: (probabilities float32 (6, n, J, I) with
    background = 1 - sum, IJK-to-RAS, k0). Segments map to classes by name."""
    segmentation = seg_node.GetSegmentation()
    found: Dict[int, Tuple[np.ndarray, Tuple[int, ...], np.ndarray]] = {}
    for sid in _segment_ids(segmentation):
        segment = segmentation.GetSegment(sid)
        image = segment.GetRepresentation(FRACTIONAL)
        cls = class_for_segment(segment.GetName()) or class_for_segment(sid)
        if image is None or not cls:
            continue
        values, extent = image_array(image)
        found[cls] = (values, extent, image_matrix(image))
    if not found:
        raise InputProblem(f"'{seg_node.GetName()}' has no fractional tissue segments.")
    shapes = {v[0].shape for v in found.values()}
    extents = {v[1] for v in found.values()}
    if len(shapes) != 1 or len(extents) != 1:
        raise InputProblem(f"'{seg_node.GetName()}': fractional segments are on different "
                           f"grids ({sorted(extents)})")
    shape = shapes.pop()
    extent = extents.pop()
    probs = np.zeros((NUM_CLASSES,) + shape, np.float32)
    for cls, (values, _, _) in found.items():
        probs[cls] = decode_fractional(values)
    probs[0] = np.clip(1.0 - probs[1:].sum(axis=0), 0.0, 1.0)
    matrix = next(iter(found.values()))[2]
    return probs, matrix, extent[4]


# ----------------------------------------------------------------------------- label maps


def _segment_ids(segmentation) -> List[str]:
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def segment_classes(seg_node) -> Dict[str, int]:
    """Segment ID -> tissue class index, for segments whose name (or ID) names a class
    (our keys and names and synonyms such as "subcutaneous fat", "torso fat")."""
    segmentation = seg_node.GetSegmentation()
    out = {}
    for sid in _segment_ids(segmentation):
        name = segmentation.GetSegment(sid).GetName()
        cls = class_for_segment(name) or class_for_segment(sid)
        if cls:
            out[sid] = cls
    return out


def reference_grid(seg_node) -> Tuple[np.ndarray, Tuple[int, int, int], int]:
    """(IJK-to-RAS, shape (K, J, I), k0) of a segmentation's reference image geometry (or,
    without one, of the common geometry of its segments)."""
    segmentation = seg_node.GetSegmentation()
    geometry = segmentation.GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    if not geometry:
        geometry = segmentation.DetermineCommonLabelmapGeometry(
            slicer.vtkSegmentation.EXTENT_UNION_OF_SEGMENTS)
    if not geometry:
        raise InputProblem(f"'{seg_node.GetName()}' has no labelmap geometry (empty "
                           f"segmentation?)")
    image = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, image, False)
    e = image.GetExtent()
    shape = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    if min(shape) <= 0:
        raise InputProblem(f"'{seg_node.GetName()}' has an empty reference geometry")
    m = image_matrix(image)
    # re-base I and J so that the grid starts at index 0 in-plane; K keeps its offset
    m[:3, 3] = m[:3, :3] @ np.array([e[0], e[2], 0.0]) + m[:3, 3]
    return m, shape, e[4]


def labels_from_segmentation(seg_node, grid=None) -> Tuple[np.ndarray, np.ndarray]:
    """Tissue class labels uint8 (K, J, I) of a segmentation, and their IJK-to-RAS.

    grid: (IJK-to-RAS, shape (K, J, I)) to resample onto (nearest), e.g. the CT's; default
    the segmentation's reference geometry. Segments map to classes by name (see
    ``segment_classes``); where segments overlap, the higher class index wins."""
    classes = segment_classes(seg_node)
    segmentation = seg_node.GetSegmentation()
    if not classes:
        names = [segmentation.GetSegment(s).GetName() for s in _segment_ids(segmentation)]
        keys = ", ".join(c.key for c in TISSUES)
        raise InputProblem(f"No segment of '{seg_node.GetName()}' names a tissue class "
                           f"(segments: {', '.join(names) or 'none'}); name them {keys} or "
                           f"e.g. 'skeletal muscle', 'subcutaneous fat', 'visceral fat'.")
    if grid is None:
        m, shape, k0 = reference_grid(seg_node)
        m = m.copy()
        m[:3, 3] = m[:3, :3] @ np.array([0.0, 0.0, k0]) + m[:3, 3]
    else:
        m, shape = np.asarray(grid[0], np.float64), tuple(int(v) for v in grid[1])
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
    reference.SetImageToWorldMatrix(vtk_matrix(m))
    reference.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    labels = np.zeros(shape, np.uint8)
    for sid, cls in sorted(classes.items(), key=lambda kv: kv[1]):
        image = slicer.vtkOrientedImageData()
        if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
                seg_node, sid, image, False):
            raise InputProblem(f"segment '{sid}' of '{seg_node.GetName()}' has no binary "
                               f"labelmap")
        if image.IsEmpty():
            continue
        resampled = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, reference, resampled, False, False)
        values, _ = image_array(resampled)
        label_value = segmentation.GetSegment(sid).GetLabelValue()
        labels[values == label_value] = cls
    return labels, m


def labels_from_labelmap(node) -> Tuple[np.ndarray, np.ndarray]:
    """Tissue class labels uint8 (K, J, I) of a label map volume node, and its IJK-to-RAS.
    InputProblem when it holds values other than the classes 0..5."""
    array = slicer.util.arrayFromVolume(node)
    if array.size == 0:
        raise InputProblem(f"'{node.GetName()}' is empty")
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi >= NUM_CLASSES:
        raise InputProblem(f"'{node.GetName()}' holds label values {lo}..{hi}; a tissue label "
                           f"map has classes 0..{NUM_CLASSES - 1} ("
                           + ", ".join(f"{c.index} {c.key}" for c in TISSUES)
                           + "). Convert it to a segmentation with named segments instead.")
    return array.astype(np.uint8), ijk_to_ras(node)


# ----------------------------------------------------------------------------- files


def _fractional_images(seg_node, representation: str):
    """(segment IDs, int8 values (n, J, I) per segment, IJK-to-RAS, k0) of the segments'
    ``representation`` images, which must share one grid."""
    segmentation = seg_node.GetSegmentation()
    ids = _segment_ids(segmentation)
    values, extents, matrix = [], set(), None
    for sid in ids:
        image = segmentation.GetSegment(sid).GetRepresentation(representation)
        if image is None:
            raise InputProblem(f"segment '{sid}' of '{seg_node.GetName()}' has no "
                               f"{representation}")
        v, e = image_array(image)
        values.append(np.clip(v, FRACTIONAL_MIN, FRACTIONAL_MAX).astype(np.int8))
        extents.add(e)
        matrix = image_matrix(image)
    if len(extents) != 1:
        raise InputProblem(f"'{seg_node.GetName()}': fractional segments lie on different "
                           f"grids ({sorted(extents)}); they cannot be stored together")
    return ids, values, matrix, extents.pop()[4]


def _set_shared_binary(seg_node, ids, values, matrix, k0: int) -> None:
    segmentation = seg_node.GetSegmentation()
    labels = [segmentation.GetSegment(s).GetLabelValue() for s in ids]
    if len(set(labels)) != len(labels) or min(labels) < 1 or max(labels) > 255:
        labels = list(range(1, len(ids) + 1))
        for sid, value in zip(ids, labels):
            segmentation.GetSegment(sid).SetLabelValue(value)
    binary = oriented_image(_argmax_layer(values, labels), matrix, k0)
    for sid in ids:
        segmentation.GetSegment(sid).AddRepresentation(BINARY, binary)


def _ensure_binary_geometry(seg_node) -> None:
    """Give fractional segments the shared binary layer the storage node needs to find the
    file's grid (Slicer drops it whenever the fractional source is modified)."""
    segmentation = seg_node.GetSegmentation()
    if segmentation.GetSourceRepresentationName() != FRACTIONAL:
        return
    ids = _segment_ids(segmentation)
    if all(segmentation.GetSegment(s).GetRepresentation(BINARY) is not None for s in ids):
        return
    ids, values, matrix, k0 = _fractional_images(seg_node, FRACTIONAL)
    _set_shared_binary(seg_node, ids, values, matrix, k0)


def _restore_fractional(seg_node) -> None:
    """After the storage node read a fractional file: its voxels sit in binary labelmaps.
    Move them into fractional labelmaps (segments keep their IDs, names, colours, tags)."""
    ids, values, matrix, k0 = _fractional_images(seg_node, BINARY)
    segmentation = seg_node.GetSegmentation()
    was_modifying = seg_node.StartModify()
    try:
        for sid, v in zip(ids, values):
            image = oriented_image(v, matrix, k0)
            _add_fractional_field_data(image)
            segmentation.GetSegment(sid).AddRepresentation(FRACTIONAL, image)
        segmentation.SetSourceRepresentationName(FRACTIONAL)  # drops the binary copies
        n, j, i = values[0].shape
        segmentation.SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            geometry_string(matrix, (k0 + n, j, i), (k0, k0 + n - 1)))
        _set_shared_binary(seg_node, ids, values, matrix, k0)
    finally:
        seg_node.EndModify(was_modifying)
    _ensure_display(seg_node, FRACTIONAL)


def read_as_fractional(seg_node) -> bool:
    """Whether ``seg_node`` was just read from a file written with a Fractional labelmap
    source but holds binary labelmaps (what vtkMRMLSegmentationStorageNode always reads)."""
    segmentation = seg_node.GetSegmentation()
    storage = seg_node.GetStorageNode()
    if segmentation.GetSourceRepresentationName() == FRACTIONAL or storage is None \
            or not segmentation.GetNumberOfSegments():
        return False
    path = storage.GetFileName()
    if not path or not os.path.isfile(path):
        return False
    try:
        header = read_nrrd_header(path)
    except (InputProblem, OSError):
        return False
    return header.get("Segmentation_MasterRepresentation") == FRACTIONAL


def restore_soft_labels(scene) -> List[Any]:
    """Soft labels back after a saved scene (.mrml folder or .mrb) is re-opened: every
    segmentation node read from a fractional .seg.nrrd gets its fractional segments back
    (the storage node reads them as binary labelmaps of -108..108). Returns those nodes.
    Call on the scene's EndImportEvent."""
    restored = []
    nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if read_as_fractional(node):
            _restore_fractional(node)
            restored.append(node)
    return restored


def save_segmentation(seg_node, path: PathLike, *, overwrite: bool = False) -> Path:
    """Write a segmentation node to .seg.nrrd through vtkMRMLSegmentationStorageNode,
    atomically (a temporary .seg.nrrd in the same folder, then os.replace). Binary and
    fractional sources are both kept (see the module notes)."""
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ValueError(f"{path}: a segmentation file must end in .seg.nrrd")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow "
                              f"replacing it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    if seg_node.GetSegmentation().GetNumberOfSegments() == 0:
        raise ValueError(f"'{seg_node.GetName()}' has no segments to save")
    _ensure_binary_geometry(seg_node)
    tmp = path.parent / f".{path.name[:-len('.seg.nrrd')]}.{uuid.uuid4().hex[:8]}.tmp.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(tmp))
    storage.SetUseCompression(True)
    fixed = tmp.with_name(tmp.name.replace(".tmp.", ".hdr."))
    try:
        if not storage.WriteData(seg_node) or not tmp.is_file():
            raise OSError(f"could not write {path}: "
                          f"{storage.GetUserMessages().GetAllMessagesAsString()}")
        if seg_node.GetSegmentation().GetSourceRepresentationName() == FRACTIONAL:
            _drop_header_field(tmp, fixed, CONTAINED_KEY)
            os.replace(fixed, path)
        else:
            os.replace(tmp, path)
    finally:
        for p in (tmp, fixed):
            if p.exists():
                p.unlink()
    return path


CONTAINED_KEY = "Segmentation_ContainedRepresentationNames"


def _drop_header_field(src: Path, dst: Path, key: str) -> None:
    """Copy a NRRD file without the header line ``key:=...`` (the data is copied as is)."""
    prefix = (key + ":=").encode("latin-1")
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for line in iter(fin.readline, b""):
            if not line.startswith(prefix):
                fout.write(line)
            if line in (b"\n", b"\r\n"):   # end of the header
                break
        shutil.copyfileobj(fin, fout, 1 << 20)


def read_nrrd_header(path: PathLike) -> Dict[str, str]:
    """The text header of a NRRD file: field -> value (key:=value pairs included)."""
    fields: Dict[str, str] = {}
    with open(path, "rb") as f:
        magic = f.readline()
        if not magic.startswith(b"NRRD"):
            raise InputProblem(f"{path}: not a NRRD file")
        for raw in f:
            line = raw.decode("latin-1").rstrip("\r\n")
            if not line:
                break
            if line.startswith("#"):
                continue
            if ":=" in line:
                key, value = line.split(":=", 1)
            elif ": " in line:
                key, value = line.split(": ", 1)
            else:
                continue
            fields[key.strip()] = value.strip()
    return fields


def load_segmentation(scene, path: PathLike, name: Optional[str] = None):
    """A new segmentation node read from a .seg.nrrd (through the storage node). A file
    written with a Fractional labelmap source gets fractional segments back (the storage
    node alone would read them as binary labelmaps of -108..108)."""
    path = Path(path)
    if not path.is_file():
        raise InputProblem(f"{path}: file not found")
    header = read_nrrd_header(path)
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                       scene.GenerateUniqueName(name or path.name.split(".")[0]))
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(seg_node):
        scene.RemoveNode(seg_node)
        raise InputProblem(f"{path}: not a readable segmentation "
                           f"({storage.GetUserMessages().GetAllMessagesAsString().strip()})")
    if header.get("Segmentation_MasterRepresentation") == FRACTIONAL and \
            seg_node.GetSegmentation().GetNumberOfSegments():
        try:
            _restore_fractional(seg_node)
        except InputProblem:
            scene.RemoveNode(seg_node)
            raise
    else:
        _ensure_display(seg_node, BINARY)
    return seg_node
