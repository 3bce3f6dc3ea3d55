"""NIfTI and NRRD volumes through SimpleITK, converted once between ITK's LPS and our RAS."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from ..core.atomic import atomic_file, extension
from ..core.volume import Volume
from .errors import InputError
from .nrrd_stream import nrrd_slices

#: LPS <-> RAS: flip the first two axes
FLIP = np.diag([-1.0, -1.0, 1.0])
IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr")


def itk_geometry(dim: int, components: int, size, spacing, origin, direction,
                 path: Union[str, Path]):
    """ITK's image facts (dimension, components per pixel, size (I, J[, K]), spacing, origin,
    direction, all LPS) -> (shape (K, J, I), ijk_to_ras (4, 4) in RAS). InputError for a
    vector image or one that is not 2D or 3D. The one conversion of read_itk and the
    streamed reader (io.sources)."""
    if components != 1:
        raise InputError(path, f"holds {components} values per voxel "
                               f"(a vector image); a scalar volume or label map is needed")
    if dim not in (2, 3):
        raise InputError(path, f"is a {dim}D image; a 2D slice or 3D volume is needed")
    shape = tuple(int(n) for n in reversed(tuple(size)))
    spacing = np.array(spacing, np.float64)
    origin = np.array(origin, np.float64)
    direction = np.array(direction, np.float64).reshape(dim, dim)
    if dim == 2:
        shape = (1,) + shape
        spacing = np.append(spacing, 1.0)
        origin = np.append(origin, 0.0)
        d3 = np.eye(3)
        d3[:2, :2] = direction
        direction = d3
    m = np.eye(4)
    m[:3, :3] = FLIP @ direction @ np.diag(spacing)
    m[:3, 3] = FLIP @ origin
    return shape, m


def itk_to_volume(image, path: Union[str, Path]) -> Volume:
    """A SimpleITK image (2D or 3D scalar) -> Volume (K, J, I) in RAS."""
    import SimpleITK as sitk

    shape, m = itk_geometry(image.GetDimension(), image.GetNumberOfComponentsPerPixel(),
                            image.GetSize(), image.GetSpacing(), image.GetOrigin(),
                            image.GetDirection(), path)
    array = sitk.GetArrayFromImage(image).reshape(shape)
    return Volume(array, m, {"source": str(path)})


def itk_error(path: Union[str, Path], exc: RuntimeError) -> InputError:
    """ITK's reading error as an InputError naming the file (its one telling line)."""
    first = str(exc).strip().splitlines()
    detail = next((line for line in first if "ERROR" in line or "rror" in line),
                  first[-1] if first else "")
    return InputError(path, f"cannot be read as a {extension(Path(path))} image "
                            f"(corrupt or not that format): {detail.strip()}")


def read_itk(path: Union[str, Path]) -> Volume:
    """Read a NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .nhdr) volume with its geometry.

    meta: source, format ('nifti'|'nrrd'), dtype, and the NRRD/NIfTI key-value pairs ITK
    exposes under 'header'."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        image = reader.Execute()
    except RuntimeError as exc:
        raise itk_error(path, exc) from None
    vol = itk_to_volume(image, path)
    vol.meta.update(format="nifti" if extension(path).startswith(".nii") else "nrrd",
                    dtype=str(vol.array.dtype),
                    header={k: image.GetMetaData(k) for k in image.GetMetaDataKeys()})
    return vol


def volume_to_itk(volume: Volume, components: Optional[np.ndarray] = None):
    """Volume -> SimpleITK image in LPS. The direction must be a rotation (no shear).

    components: optional (K, J, I, C) array on the volume's grid, written as a C-component
    vector image instead of the volume's own array."""
    import SimpleITK as sitk

    if components is None:
        image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(components), isVector=True)
    spacing = np.asarray(volume.spacing)
    direction = FLIP @ volume.directions
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in FLIP @ np.asarray(volume.origin)])
    image.SetDirection([float(v) for v in direction.ravel()])
    return image


def write_volume(volume: Volume, path: Union[str, Path], *, overwrite: bool = False,
                 dtype: Optional[Union[str, np.dtype]] = None) -> Path:
    """Write a volume as NRRD (.nrrd, gzip) or NIfTI (.nii / .nii.gz), chosen by extension.

    Atomic (a temporary file in the same folder, then os.replace); refuses to replace an
    existing file unless overwrite=True. dtype: cast on the way out (e.g. 'int16' for HU,
    after rounding when the array is floating point and dtype is an integer type).
    """
    import SimpleITK as sitk

    path = Path(path)
    ext = extension(path)
    if ext not in (".nrrd", ".nii", ".nii.gz"):
        raise ValueError(f"{path}: write_volume writes .nrrd, .nii or .nii.gz; got '{ext}'")
    if ext == ".nrrd" and path.name.lower().endswith(".seg.nrrd"):
        raise ValueError(f"{path}: use write_seg_nrrd for Slicer segmentations")
    arr = np.asarray(volume.array)
    if dtype is not None:
        dt = np.dtype(dtype)
        if dt.kind in "iu" and arr.dtype.kind == "f":
            info = np.iinfo(dt)
            arr = np.clip(np.round(arr), info.min, info.max)
        arr = arr.astype(dt)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    image = volume_to_itk(Volume(arr, volume.ijk_to_ras))
    with atomic_file(path, overwrite) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=(ext != ".nii"))
    return path


def write_probabilities(path: Union[str, Path], probabilities: np.ndarray, ijk_to_ras, *,
                        overwrite: bool = False) -> Path:
    """Per-class probability maps (C, K, J, I) in 0..1 as one C-component float32 NRRD
    (gzip) on the grid ijk_to_ras, component c = class c (classes.py order). Slicer loads it
    as a vector volume; each component is one class's probability. Atomic."""
    import SimpleITK as sitk

    path = Path(path)
    if extension(path) != ".nrrd" or path.name.lower().endswith(".seg.nrrd"):
        raise ValueError(f"{path}: probability maps are written as a plain .nrrd")
    probs = np.asarray(probabilities, np.float32)
    if probs.ndim != 4:
        raise ValueError(f"probabilities must be (C, K, J, I); got shape {probs.shape}")
    grid = Volume(np.zeros(probs.shape[1:], np.uint8), ijk_to_ras)
    image = volume_to_itk(grid, np.moveaxis(probs, 0, -1))
    with atomic_file(path, overwrite) as tmp:
        # gzip level 1: float maps barely compress better at 9, and take twice as long
        sitk.WriteImage(image, str(tmp), useCompression=True, compressionLevel=1)
    return path


@contextmanager
def probabilities_slices(path: Union[str, Path], ijk_to_ras, shape_kji, num_classes: int, *,
                         overwrite: bool = False) -> Iterator:
    """The probability NRRD of write_probabilities (C-component float32 vector volume on the
    grid ijk_to_ras, LPS, gzip) written slice by slice in K order: the writer takes float32
    (n, J, I, C) slices (io.nrrd_stream.SliceWriter). Atomic."""
    path = Path(path)
    if extension(path) != ".nrrd" or path.name.lower().endswith(".seg.nrrd"):
        raise ValueError(f"{path}: probability maps are written as a plain .nrrd")
    m = np.asarray(ijk_to_ras, np.float64)
    fields = {"space": "left-posterior-superior", "space origin": FLIP @ m[:3, 3],
              "space directions": np.vstack([np.full(3, np.nan), (FLIP @ m[:3, :3]).T]),
              "kinds": ["vector", "domain", "domain", "domain"]}
    shape = tuple(int(n) for n in shape_kji) + (int(num_classes),)
    with nrrd_slices(path, shape, np.float32, fields, overwrite=overwrite) as out:
        yield out
