"""The DICOM series behind a CT volume node, and DICOM SEG export of the module's results.

Slicer's DICOM module (DICOMScalarVolumePlugin.setVolumeNodeProperties in Slicer/Slicer,
Modules/Scripted/DICOMPlugins) records the SOP Instance UID of the file behind every slice
in the volume node's attribute "DICOM.instanceUIDs": space separated, the n-th UID for slice
K = n (when Slicer reverses the slices of a left-handed series it reverses this list too; a
file without a UID is listed as "Unknown"). ``slicer.dicomDatabase.fileForInstance(uid)``
gives the file of an instance ('' when the database does not hold it).

``dicom_source`` reads those instances (headers only) and checks, instance by instance, that
the node's voxels lie on the instance's pixels: each instance is placed at the slice K its
ImagePositionPatient falls on (so the UID order need not be trusted), and the in-plane axes
may be flipped or swapped relative to the frame's rows and columns (``DicomSource.frames``
reorders arrays to match). A volume resampled, cropped or moved after loading is refused.
The SEG files themselves are written by dicom_seg.write_dicom_seg (highdicom).

Only MRML/VTK classes and pydicom here; highdicom is imported when a SEG is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.classes import NUM_CLASSES, TISSUES
from ..core.calibration import parameters as calibration_parameters
from ..core.field import parameters as field_parameters
from ..core.upsampling import parameters as upsampling_parameters
from .nodes import InputProblem, ijk_to_ras, volume_array
from .segmentation import fractional_probabilities, labels_from_segmentation
from ..io.outputs import output_path

#: Volume node attribute set by Slicer's DICOM scalar volume plugin.
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
#: What the plugin lists for a file without a SOP Instance UID.
UNKNOWN_UID = "Unknown"
#: Segmentation node attribute: the model card summary of the run (JSON).
MODEL_ATTRIBUTE = "EPDSegmentation.Model"
#: Card keys kept on the segmentation for the SEG's algorithm identification.
MODEL_KEYS = ("name", "factor", "label_mode", "image_mode", "pixel_mm")
#: A voxel centre may miss its source pixel by this much (voxels) and still count as on it.
POSITION_TOL_VOXELS = 0.1
#: Direction cosines of the volume and the frames may differ by this much.
DIRECTION_TOL = 1e-3
NOT_FROM_DICOM = "DICOM SEG needs a DICOM source"
FLIP = np.diag([-1.0, -1.0, 1.0])   # LPS <-> RAS

FileForInstance = Callable[[str], Optional[str]]


# ----------------------------------------------------------------------------- sources


def instance_uids(volume_node) -> List[str]:
    """The SOP Instance UIDs Slicer recorded for the node's slices (K order), or [] when the
    node was not loaded by Slicer's DICOM module."""
    if volume_node is None:
        return []
    value = volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or ""
    return value.split()


def dicom_source_problem(volume_node) -> Optional[str]:
    """None when ``volume_node`` carries one SOP Instance UID per slice (it came from
    Slicer's DICOM module); else a sentence saying why DICOM SEG cannot be exported. Reads
    no file (the panel asks this on every update)."""
    if volume_node is None:
        return f"{NOT_FROM_DICOM}: select a CT volume loaded through the DICOM module."
    name = volume_node.GetName()
    uids = instance_uids(volume_node)
    if not uids:
        return (f"{NOT_FROM_DICOM}: '{name}' was not loaded from DICOM (it has no "
                f"{INSTANCE_UIDS_ATTRIBUTE} attribute; NRRD, NIfTI and volumes made in Slicer "
                f"have none). Load the CT series through the DICOM module and segment it to "
                f"export DICOM SEG.")
    image = volume_node.GetImageData()
    n_slices = image.GetDimensions()[2] if image is not None else 0
    if len(uids) != n_slices:
        return (f"'{name}' has {n_slices} slices but its {INSTANCE_UIDS_ATTRIBUTE} attribute "
                f"lists {len(uids)} instances (a multi-frame or resampled volume?); DICOM SEG "
                f"needs one source instance per slice.")
    if UNKNOWN_UID in uids:
        k = uids.index(UNKNOWN_UID)
        return (f"'{name}': slice {k} has no SOP Instance UID in the DICOM database "
                f"('{UNKNOWN_UID}'), so a DICOM SEG cannot reference it.")
    if len(set(uids)) != len(uids):
        return f"'{name}': its {INSTANCE_UIDS_ATTRIBUTE} attribute lists an instance twice."
    return None


def _sop_instance_uid(ds) -> str:
    value = str(ds.get("SOPInstanceUID", "") or "")
    meta = getattr(ds, "file_meta", None)
    if not value and meta is not None:
        value = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    return value


@dataclass
class FrameLayout:
    """How a volume's voxels (K, J, I) map onto its source frames (rows, columns).

    order[n]: index into the given instances of the one at slice K = n. transpose: the
    frames' rows run along I (not J). flip_rows / flip_columns: the frame's row / column
    index runs against the volume's axis."""

    order: List[int]
    transpose: bool = False
    flip_rows: bool = False
    flip_columns: bool = False

    def frames(self, array: np.ndarray) -> np.ndarray:
        """(..., K, J, I) -> (..., K, rows, columns), a view in the frames' pixel order."""
        a = np.asarray(array)
        if self.transpose:
            a = np.swapaxes(a, -1, -2)
        if self.flip_rows:
            a = np.flip(a, axis=-2)
        if self.flip_columns:
            a = np.flip(a, axis=-1)
        return a


def _frame_vectors(ds) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first pixel centre, step along a row (next column), step down a column (next row)),
    RAS mm, of a DICOM image."""
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], np.float64)
    row_mm, column_mm = (float(v) for v in ds.PixelSpacing)   # between rows, between columns
    origin = FLIP @ np.asarray([float(v) for v in ds.ImagePositionPatient], np.float64)
    return origin, FLIP @ iop[:3] * column_mm, FLIP @ iop[3:] * row_mm


def frame_layout(ijk_to_ras_matrix, shape_kji: Sequence[int], datasets: Sequence,
                 where: str = "the volume") -> FrameLayout:
    """Where each instance's pixels lie on the grid (IJK-to-RAS, shape (K, J, I)).

    Every instance must lie on one slice K (its first pixel on a corner of that slice) with
    its rows and columns along the grid's I and J axes and the same pixel size; together the
    instances must fill every slice once. InputProblem (naming the instance) otherwise."""
    m = np.asarray(ijk_to_ras_matrix, np.float64)
    K, J, I = (int(v) for v in shape_kji)
    if len(datasets) != K:
        raise InputProblem(f"{where} has {K} slices but {len(datasets)} source instances")
    to_ijk = np.linalg.inv(m)
    layouts, ks = set(), []
    for n, ds in enumerate(datasets):
        uid = _sop_instance_uid(ds) or f"instance {n}"
        try:
            origin, along_row, down_column = _frame_vectors(ds)
        except (AttributeError, ValueError, TypeError) as exc:
            raise InputProblem(f"source instance {uid} has no usable geometry "
                               f"(ImagePositionPatient, ImageOrientationPatient, PixelSpacing): "
                               f"{exc}") from None
        o = (to_ijk @ np.append(origin, 1.0))[:3]
        u = to_ijk[:3, :3] @ along_row        # one column step, in voxels
        v = to_ijk[:3, :3] @ down_column      # one row step, in voxels
        axis_u, axis_v = int(np.argmax(np.abs(u))), int(np.argmax(np.abs(v)))
        unit_u, unit_v = np.zeros(3), np.zeros(3)
        unit_u[axis_u], unit_v[axis_v] = np.sign(u[axis_u]), np.sign(v[axis_v])
        if (axis_u == 2 or axis_v == 2 or axis_u == axis_v
                or np.abs(u - unit_u).max() > DIRECTION_TOL
                or np.abs(v - unit_v).max() > DIRECTION_TOL):
            raise InputProblem(
                f"source instance {uid}: its pixel rows and columns do not run along the "
                f"voxel axes of {where} (one pixel step is ({u.round(3).tolist()}) and "
                f"({v.round(3).tolist()}) voxels); the volume was resampled, reoriented or "
                f"transformed after it was loaded from DICOM. Export DICOM SEG from the CT as "
                f"loaded.")
        k = int(np.floor(o[2] + 0.5))
        if abs(o[2] - k) > POSITION_TOL_VOXELS or not 0 <= k < K:
            raise InputProblem(
                f"source instance {uid} lies at slice position {o[2]:.2f} of {where} (slices "
                f"0..{K - 1}): not on one of its slices. The volume was resampled, cropped "
                f"or moved after it was loaded from DICOM.")
        transpose = axis_u == 1                  # columns run along J: rows along I
        rows, columns = (I, J) if transpose else (J, I)
        if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
            raise InputProblem(f"source instance {uid} is {ds.Rows} x {ds.Columns} pixels; "
                               f"{where} has {rows} x {columns} in that orientation (cropped "
                               f"or resampled after loading?)")
        flip_columns, flip_rows = unit_u[axis_u] < 0, unit_v[axis_v] < 0
        expected = np.zeros(3)
        expected[axis_u] = (columns - 1) if flip_columns else 0
        expected[axis_v] = (rows - 1) if flip_rows else 0
        if np.abs(o[:2] - expected[:2]).max() > POSITION_TOL_VOXELS:
            raise InputProblem(
                f"source instance {uid}: its first pixel lies at voxel ({o[0]:.2f}, "
                f"{o[1]:.2f}) of slice {k} of {where}, not on a corner of the slice (the "
                f"volume was cropped, padded or moved after loading from DICOM).")
        layouts.add((transpose, bool(flip_rows), bool(flip_columns)))
        ks.append(k)
    if len(layouts) != 1:
        raise InputProblem(f"the source instances of {where} are not all oriented alike")
    if sorted(ks) != list(range(K)):
        twice = sorted({k for k in ks if ks.count(k) > 1})
        raise InputProblem(f"the source instances do not fill the slices of {where} once "
                           f"each (slices {twice} have more than one instance)")
    transpose, flip_rows, flip_columns = layouts.pop()
    order = [ks.index(k) for k in range(K)]
    return FrameLayout(order, transpose, flip_rows, flip_columns)


@dataclass
class DicomSource:
    """The DICOM CT series behind a volume node.

    volume: the node; datasets: pydicom Datasets (headers, no pixel data) in K order;
    files: their paths; layout: how the node's arrays map onto the frames (``frames``);
    reordered: the geometry put the instances in another order than the node's UID list."""

    volume: Any
    datasets: List[Any]
    files: List[Path]
    layout: FrameLayout
    reordered: bool = False

    def frames(self, array: np.ndarray) -> np.ndarray:
        """(..., K, J, I) arrays on the volume's grid -> (..., K, rows, columns), frame n
        lying on ``datasets[n]``."""
        return self.layout.frames(array)


def dicom_source(volume_node, file_for_instance: FileForInstance) -> DicomSource:
    """The DICOM series a volume node was loaded from, checked against its grid.

    file_for_instance(uid) -> file path ('' or None when unknown): inside Slicer
    ``slicer.dicomDatabase.fileForInstance``. InputProblem with a clear message when the
    node did not come from DICOM, a file is missing or is another instance, or the node's
    grid does not lie on the instances' pixels."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    problem = dicom_source_problem(volume_node)
    if problem:
        raise InputProblem(problem)
    name = volume_node.GetName()
    uids = instance_uids(volume_node)
    datasets, files = [], []
    for k, uid in enumerate(uids):
        path = file_for_instance(uid)
        if not path:
            raise InputProblem(f"'{name}' slice {k}: instance {uid} is not in the DICOM "
                               f"database (deleted or moved since loading?); re-import the "
                               f"series and load it again.")
        path = Path(path)
        if not path.is_file():
            raise InputProblem(f"'{name}' slice {k}: the file of instance {uid} is missing: "
                               f"{path}")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise InputProblem(f"'{name}' slice {k}: {path} cannot be read as DICOM "
                               f"({type(exc).__name__}: {exc})") from None
        found = _sop_instance_uid(ds)
        if found != uid:
            raise InputProblem(f"'{name}' slice {k}: {path} holds instance {found or '(none)'}, "
                               f"not {uid}")
        datasets.append(ds)
        files.append(path)
    image = volume_node.GetImageData()
    i, j, k = image.GetDimensions()
    layout = frame_layout(ijk_to_ras(volume_node), (k, j, i), datasets, f"'{name}'")
    return DicomSource(volume_node, [datasets[n] for n in layout.order],
                       [files[n] for n in layout.order], layout,
                       reordered=layout.order != list(range(len(uids))))


# ----------------------------------------------------------------------------- model card


def model_summary(card: Optional[Mapping[str, Any]], model_path=None) -> Dict[str, Any]:
    """The card entries a DICOM SEG names (MODEL_KEYS); the name defaults to the model
    file's stem."""
    card = dict(card or {})
    out = {key: card[key] for key in MODEL_KEYS if key in card}
    # the same weights calibrated, or upsampled otherwise, give other numbers
    for key, value in (("calibration", calibration_parameters(card)),
                       ("upsampling", upsampling_parameters(card)),
                       ("field", field_parameters(card))):
        if value is not None:
            out[key] = value
    if "name" not in out and model_path is not None:
        out["name"] = Path(str(model_path)).name.split(".")[0]
    return out


def record_model(segmentation_node, card: Optional[Mapping[str, Any]], model_path=None) -> None:
    """Keep the model's summary on the run's segmentation (saved with the scene)."""
    segmentation_node.SetAttribute(MODEL_ATTRIBUTE,
                                   json.dumps(model_summary(card, model_path), sort_keys=True))


def recorded_model(segmentation_node) -> Dict[str, Any]:
    """The model summary ``record_model`` kept ({} when none or unreadable)."""
    text = segmentation_node.GetAttribute(MODEL_ATTRIBUTE) if segmentation_node else None
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


# ----------------------------------------------------------------------------- SEG files


def dicom_seg_paths(folder: Union[str, Path], base: str, *,
                    fractional: bool = False) -> Dict[str, Path]:
    """role -> path of the SEG files an export writes (outputs.py names: <stem>_seg.dcm,
    binary, and <stem>_prob_seg.dcm, fractional)."""
    out = {"dicom_seg": output_path(folder, base, "dicom_seg")}
    if fractional:
        out["dicom_fractional_seg"] = output_path(folder, base, "dicom_fractional_seg")
    return out


def source_volume(segmentation_node):
    """The CT a run's segmentation was made from (its reference geometry volume), or None."""
    if segmentation_node is None:
        return None
    return segmentation_node.GetNodeReference(
        segmentation_node.GetReferenceImageGeometryReferenceRole())


def slab_start(slab_matrix, slab_shape, grid_matrix, grid_shape) -> Optional[int]:
    """The first slice K of a grid (IJK-to-RAS (4, 4), shape (K, J, I)) where a slab of its
    slices lies (a probability volume of the segmented slices only), or None when the slab
    is not on that grid."""
    slab_matrix, grid_matrix = np.asarray(slab_matrix), np.asarray(grid_matrix)
    n = slab_shape[0]
    if tuple(slab_shape[1:]) != tuple(grid_shape[1:]) or \
            not np.allclose(slab_matrix[:3, :3], grid_matrix[:3, :3], atol=1e-6):
        return None
    step = grid_matrix[:3, 2]
    offset = float(np.dot(slab_matrix[:3, 3] - grid_matrix[:3, 3], step) / np.dot(step, step))
    k0 = int(round(offset))
    if abs(offset - k0) > 1e-4 or k0 < 0 or k0 + n > grid_shape[0] or not np.allclose(
            slab_matrix[:3, 3], grid_matrix[:3, 3] + k0 * step, atol=1e-4):
        return None
    return k0


def result_arrays(volume_node, segmentation_node, soft_segmentation=None,
                  probability_volumes: Sequence[Any] = ()):
    """(labels uint8 (K, J, I), probabilities float32 (6, K, J, I) or None) of a run on the
    volume's grid: labels from the segmentation as it is now (edits included), the
    probabilities from the probability volumes when all five are there (exact), else from
    the fractional segmentation (steps of 1/216); slices a run did not cover are 0."""
    m = ijk_to_ras(volume_node)
    i, j, k = volume_node.GetImageData().GetDimensions()
    labels, _ = labels_from_segmentation(segmentation_node, (m, (k, j, i)))
    probs = None
    volumes = list(probability_volumes)
    if len(volumes) == len(TISSUES):
        probs = np.zeros((NUM_CLASSES, k, j, i), np.float32)
        for c, vol in zip(TISSUES, volumes):
            array = volume_array(vol)
            k0 = slab_start(ijk_to_ras(vol), array.shape, m, (k, j, i))
            if k0 is None:
                raise InputProblem(f"'{vol.GetName()}' is not on the grid of "
                                   f"'{volume_node.GetName()}'; cannot export it as DICOM SEG")
            probs[c.index, k0:k0 + array.shape[0]] = np.clip(array, 0.0, 1.0)
    elif soft_segmentation is not None:
        soft, sm, k0 = fractional_probabilities(soft_segmentation)
        n = soft.shape[1]
        if soft.shape[2:] != (j, i) or k0 < 0 or k0 + n > k:
            raise InputProblem(f"'{soft_segmentation.GetName()}' does not lie on the grid of "
                               f"'{volume_node.GetName()}'")
        # the fractional images' matrix is the grid's: K offset by the image extent
        if not np.allclose(sm, m, atol=1e-6):
            raise InputProblem(f"'{soft_segmentation.GetName()}' is not on the grid of "
                               f"'{volume_node.GetName()}'; cannot export it as DICOM SEG")
        probs = np.zeros((NUM_CLASSES, k, j, i), np.float32)
        probs[:, k0:k0 + n] = soft
    if probs is not None:
        probs[0] = np.clip(1.0 - probs[1:].sum(axis=0), 0.0, 1.0)
    return labels, probs


def write_dicom_segs(paths: Mapping[str, Path], source: DicomSource, labels: np.ndarray,
                     probabilities: Optional[np.ndarray] = None, *,
                     model_card: Optional[Mapping[str, Any]] = None,
                     series_description: Optional[str] = None,
                     overwrite: bool = False) -> List[Path]:
    """Write the binary SEG (``paths['dicom_seg']``) and, with probabilities, the fractional
    one (``paths['dicom_fractional_seg']``) through dicom_seg.write_dicom_seg, frame n on
    source instance n. labels (K, J, I) and probabilities (6, K, J, I) on the volume's grid.
    """
    from ..io.dicom_seg import write_dicom_seg

    written = [write_dicom_seg(paths["dicom_seg"], source.datasets,
                               labels=np.ascontiguousarray(source.frames(labels)),
                               model_card=dict(model_card or {}),
                               series_description=series_description, overwrite=overwrite)]
    if probabilities is not None:
        written.append(write_dicom_seg(
            paths["dicom_fractional_seg"], source.datasets,
            probabilities=np.ascontiguousarray(source.frames(probabilities)),
            model_card=dict(model_card or {}),
            series_description=(series_description + " probabilities")
            if series_description else None, overwrite=overwrite))
    return written


def check_dicom_seg_possible(source: DicomSource) -> None:
    """Refuse up front (before any file is written) what write_dicom_seg would refuse about
    the sources, e.g. a series de-identified without new study/series UIDs."""
    from ..io.dicom_seg import DicomSegError, prepare_sources

    i, j, k = source.volume.GetImageData().GetDimensions()
    shape = source.frames(np.empty((k, j, i), np.uint8)).shape
    try:
        prepare_sources(source.datasets, shape)
    except DicomSegError as exc:
        raise InputProblem(f"DICOM SEG of '{source.volume.GetName()}' is not possible: "
                           f"{exc}") from None

