"""read_volume and read_labels: one entry point for every input the CLI and training take."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..core.atomic import extension
from ..core.classes import NUM_CLASSES
from ..core.volume import Volume
from .dicom import read_dicom
from .errors import InputError
from .images import IMAGE_EXTENSIONS, read_itk
from .seg_nrrd import read_seg_nrrd

#: how far two grids may differ and still count as the same (mm, and for directions)
GRID_TOL_MM = 1e-3


def _is_dicom_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


#: how far from orthogonal the axes of an image may be (cosine of the angle between two)
ORTHOGONAL_TOL = 1e-4


def _check_axes(ijk_to_ras: np.ndarray, path: Path) -> None:
    """InputError for a sheared grid (axes not at right angles): pixel areas and the 2D
    slices the network sees would be wrong."""
    m = np.asarray(ijk_to_ras, np.float64)
    d = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)[None, :]
    gram = d.T @ d
    off = np.abs(gram - np.diag(np.diag(gram))).max()
    if off > ORTHOGONAL_TOL:
        angle = float(np.degrees(np.arcsin(min(off, 1.0))))    # away from 90 degrees
        raise InputError(path, f"has axes that are not at right angles (sheared by "
                               f"{angle:.2f} degrees; space directions "
                               f"{np.round(m[:3, :3], 4).tolist()}): areas and "
                               f"volumes would be wrong. Resample it onto an orthogonal grid")


def nonfinite_error(path: Path, bad: int) -> InputError:
    """The error for a NIfTI holding ``bad`` NaN or infinite voxels."""
    return InputError(path, f"holds {bad} voxel(s) that are not finite numbers "
                            f"(NaN or infinity), which the NIfTI reader would turn "
                            f"into 0 HU; a CT in Hounsfield units is needed")


def looks_like_mask(kind: str, lo, hi, n_values: int) -> bool:
    """Whether stored values (NumPy dtype kind, min, max, number of distinct values, which
    only matters for integers within 0..255) are a mask or label map rather than CT."""
    return kind == "b" or (kind in "iu" and lo >= 0 and hi <= 255 and n_values <= 64)


def mask_error(path: Path, n_values: int, lo, hi) -> InputError:
    return InputError(path, f"holds only {n_values} distinct values in {lo}..{hi}: a mask "
                            f"or label map, not CT in HU")


def input_kind(path: Path) -> str:
    """'dicom' (a folder or DICOM file) or 'image' (NIfTI, NRRD) for a volume path;
    InputError for a missing, unreadable, segmentation or unknown file."""
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        return "dicom"
    ext = extension(path)
    if ext in (".seg.nrrd", ".seg.nhdr"):
        raise InputError(path, "is a Slicer segmentation, not an image; read it with "
                               "read_labels")
    if ext in IMAGE_EXTENSIONS:
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise InputError(path, f"cannot be read ({exc.strerror or type(exc).__name__}); "
                                   f"check its permissions") from None
        return "image"
    if ext in (".dcm", ".ima", "") or _is_dicom_file(path):
        return "dicom"
    raise InputError(path, f"unknown file type '{ext}'; expected a DICOM folder or file, "
                           f".nii, .nii.gz, .nrrd or .nhdr")


_NIFTI_FLOAT = {16: "f4", 64: "f8"}


def nifti_header(head: bytes):
    """The fields of a NIfTI-1 or NIfTI-2 header (its first 540 bytes) that the readers use:
    (byte order '<' or '>', header size 348 or 540, dims int64 (8,), datatype code, offset of
    the voxels, scl_slope, scl_inter); None when ``head`` is not a NIfTI header."""
    for end in "<>":
        size = int(np.frombuffer(head[:4], end + "i4")[0]) if len(head) >= 4 else 0
        if size in (348, 540):
            break
    else:
        return None
    if size == 348:
        dims = np.frombuffer(head[40:56], end + "i2").astype(np.int64)
        code = int(np.frombuffer(head[70:72], end + "i2")[0])
        offset = int(np.frombuffer(head[108:112], end + "f4")[0])
        slope, inter = (float(v) for v in np.frombuffer(head[112:120], end + "f4"))
    else:
        dims = np.frombuffer(head[16:80], end + "i8")
        code = int(np.frombuffer(head[12:14], end + "i2")[0])
        offset = int(np.frombuffer(head[168:176], end + "i8")[0])
        slope, inter = (float(v) for v in np.frombuffer(head[176:192], end + "f8"))
    return end, size, dims, code, offset, slope, inter


def nifti_nonfinite_count(path: Union[str, Path]) -> int:
    """How many voxels of a float NIfTI-1/-2 file are NaN or infinite, read from the file
    itself (SimpleITK's reader returns them as 0). 0 for integer data."""
    import gzip

    path = Path(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        header = nifti_header(fh.read(540))
        if header is None:
            return 0
        end, size, dims, dtype_code, offset, _, _ = header
        if dtype_code not in _NIFTI_FLOAT or not 1 <= dims[0] <= 7:
            return 0
        n = int(np.prod(dims[1:dims[0] + 1]))
        dtype = np.dtype(end + _NIFTI_FLOAT[dtype_code])
        fh.seek(max(offset, size))
        data = np.frombuffer(fh.read(n * dtype.itemsize), dtype)
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def read_volume(path: Union[str, Path], series_uid: Optional[str] = None) -> Volume:
    """Read a CT volume in HU: a DICOM series folder, a single DICOM file, NIfTI (.nii,
    .nii.gz) or NRRD (.nrrd, .nhdr).

    Returns a Volume with float32 HU (K, J, I) and ijk_to_ras in RAS mm. meta: source,
    format, modality, series_uid (DICOM: also files, sop_instance_uids, ...).
    Raises InputError naming the file and the problem.
    """
    path = Path(path)
    if input_kind(path) == "dicom":
        return read_dicom(path, series_uid)
    vol = read_itk(path)
    _check_axes(vol.ijk_to_ras, path)
    if extension(path) in (".nii", ".nii.gz"):
        bad = nifti_nonfinite_count(path)
        if bad:
            raise nonfinite_error(path, bad)
    arr = vol.array
    if arr.size and arr.dtype.kind in "biu":
        lo, hi = arr.min(), arr.max()
        # np.unique only where it can matter: integers within 0..255
        if looks_like_mask(arr.dtype.kind, lo, hi, 0):
            n_values = len(np.unique(arr))
            if looks_like_mask(arr.dtype.kind, lo, hi, n_values):
                raise mask_error(path, n_values, lo, hi)
    vol.array = arr.astype(np.float32, copy=False)
    vol.meta.setdefault("modality", "CT")
    vol.meta.setdefault("series_uid", None)
    return vol


def same_grid(a: Volume, b: Volume, tol_mm: float = GRID_TOL_MM) -> Optional[str]:
    """None when a and b share shape and geometry; else a sentence saying how they differ."""
    if a.array.shape[-3:] != b.array.shape[-3:]:
        return f"grid {tuple(a.array.shape[-3:])} (K, J, I) differs from {tuple(b.array.shape[-3:])}"
    if not np.allclose(a.spacing, b.spacing, atol=tol_mm):
        return f"spacing {np.round(a.spacing, 4).tolist()} mm differs from {np.round(b.spacing, 4).tolist()}"
    if not np.allclose(a.directions, b.directions, atol=1e-4):
        return f"orientation differs ({np.round(a.directions, 3).tolist()} vs {np.round(b.directions, 3).tolist()})"
    if not np.allclose(a.origin, b.origin, atol=max(tol_mm, 1e-3 * max(a.spacing))):
        return f"origin {np.round(a.origin, 3).tolist()} mm differs from {np.round(b.origin, 3).tolist()}"
    return None


def _place_on(labels: Volume, like: Volume) -> Optional[Volume]:
    """Put a cropped label grid (as Slicer writes .seg.nrrd) into like's grid, or None when
    the two grids are not the same lattice."""
    if not (np.allclose(labels.spacing, like.spacing, atol=GRID_TOL_MM)
            and np.allclose(labels.directions, like.directions, atol=1e-4)):
        return None
    offset = np.linalg.solve(like.ijk_to_ras, np.append(labels.origin, 1.0))[:3]  # (i, j, k)
    if np.abs(offset - np.round(offset)).max() > 1e-3:
        return None
    oi, oj, ok = (int(v) for v in np.round(offset))
    k, j, i = labels.array.shape
    K, J, I = like.array.shape
    if oi < 0 or oj < 0 or ok < 0 or oi + i > I or oj + j > J or ok + k > K:
        return None
    out = np.zeros((K, J, I), np.uint8)
    out[ok:ok + k, oj:oj + j, oi:oi + i] = labels.array
    meta = dict(labels.meta, placed_at=(oi, oj, ok))
    meta.pop("fractions", None)
    return Volume(out, like.ijk_to_ras.copy(), meta)


def read_labels(path: Union[str, Path], like: Optional[Volume] = None) -> Volume:
    """Read a label map: uint8 classes 0..5 (K, J, I) with geometry.

    .seg.nrrd: segments mapped to classes by name (a cropped Slicer file is placed into
    like's grid); NIfTI/NRRD label maps: integer values 0..5. like: the image the labels
    belong to; the label grid must match it (shape, spacing, orientation, origin).
    Raises InputError naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "label file not found")
    ext = extension(path)
    if ext == ".seg.nrrd":
        vol = read_seg_nrrd(path)
        if like is not None and same_grid(vol, like) is not None:
            placed = _place_on(vol, like)
            if placed is None:
                raise InputError(path, f"label grid does not match the image "
                                       f"{like.meta.get('source', '')}: {same_grid(vol, like)}")
            vol = placed
        return vol
    if ext not in IMAGE_EXTENSIONS:
        raise InputError(path, f"unknown label file type '{ext}'; expected .seg.nrrd, .nii, "
                               f".nii.gz, .nrrd or .nhdr")
    vol = read_itk(path)
    arr = vol.array
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError(path, "holds non-integer values: a label map must hold whole "
                                   "class numbers 0..5 (is this an image?)")
    if arr.size:
        values = np.unique(arr)
        bad = values[(values < 0) | (values >= NUM_CLASSES)]
        if len(bad):
            shown = ", ".join(str(v) for v in bad[:8].tolist())
            raise InputError(path, f"holds label values {shown}{' ...' if len(bad) > 8 else ''} "
                                   f"outside the classes 0..{NUM_CLASSES - 1}")
    vol.array = arr.astype(np.uint8)
    if like is not None:
        why = same_grid(vol, like)
        if why is not None:
            raise InputError(path, f"label grid does not match the image "
                                   f"{like.meta.get('source', '')}: {why}")
    return vol
