"""A CT volume or label map with its geometry, the way Slicer holds it.

``array`` is indexed (K, J, I) = (slice, row, column), as slicer.util.arrayFromVolume gives;
``ijk_to_ras`` is the 4 x 4 matrix from voxel index (I, J, K, 1) to RAS millimetres, as
vtkMRMLVolumeNode.GetIJKToRASMatrix gives. Readers convert LPS files (DICOM, NIfTI via ITK)
to this convention once, so no other code deals with LPS.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

#: A CT of the body holds fat and air; no voxel at or below this means the values are not HU.
HU_CEILING_OF_MINIMUM = -100.0
#: No CT scanner writes values above this (the top of the 16-bit extended CT scale); more
#: means padding outside the scan field not marked as such, or unsigned data misread.
HU_MAXIMUM = 30720.0


def hu_range_problem(lo: float, hi: float) -> Optional[str]:
    """None when voxel values spanning lo..hi can be CT in Hounsfield units; else why not,
    as words to follow the image's name ("'T1' ..." in Slicer, "path: ..." on the command
    line). The one "is this CT?" rule of the module and the command line: every voxel the
    same value is an empty image; no voxel at or below HU_CEILING_OF_MINIMUM (fat, air) means
    MR, PET or CT stored without its rescale slope/intercept; a voxel above HU_MAXIMUM is
    padding the header does not mark, or unsigned data misread (it would change areas)."""
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return (f"holds values that are not finite numbers ({lo:g}..{hi:g}); a CT in "
                f"Hounsfield units is needed")
    if lo == hi:
        return (f"is an empty image: every voxel is {lo:g}; a CT in Hounsfield units is "
                f"needed")
    if lo > HU_CEILING_OF_MINIMUM:
        return (f"does not look like CT in Hounsfield units: its values span {lo:g}..{hi:g}, "
                f"with nothing at or below {HU_CEILING_OF_MINIMUM:g} HU (fat, air). MR, PET or "
                f"CT stored without its rescale slope/intercept cannot be segmented.")
    if hi > HU_MAXIMUM:
        return (f"holds values up to {hi:g} HU, above the {HU_MAXIMUM:g} HU no CT scanner "
                f"writes: padding outside the scan field that the header does not mark "
                f"(DICOM PixelPaddingValue), or unsigned data read with the wrong rescale. "
                f"Mark or remove the padding first; these values would change the areas.")
    return None


def ijk_to_ras_matrix(spacing: Sequence[float], origin: Sequence[float],
                      directions=None) -> np.ndarray:
    """Build IJK-to-RAS from spacing (I, J, K) in mm, origin (RAS mm of voxel 0) and the
    direction cosines (3 x 3, columns = unit I, J, K axes in RAS; identity by default)."""
    d = np.eye(3) if directions is None else np.asarray(directions, np.float64).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d * np.asarray(spacing, np.float64)[None, :]
    m[:3, 3] = np.asarray(origin, np.float64)
    return m


def downsampled_ijk_to_ras(ijk_to_ras: np.ndarray, factors_ijk: Sequence[int]) -> np.ndarray:
    """Geometry of a grid downsampled by (kI, kJ, kK) windows.

    Spacing grows k times and the origin moves by (k - 1) / 2 input voxels along each axis, so
    every low-resolution voxel centre sits at the centre of its window."""
    k = np.asarray(factors_ijk, np.float64)
    if k.shape != (3,) or np.any(k < 1):
        raise ValueError(f"factors_ijk must be three factors >= 1; got {factors_ijk!r}")
    m = np.array(ijk_to_ras, np.float64)
    out = m.copy()
    out[:3, :3] = m[:3, :3] * k[None, :]
    out[:3, 3] = m[:3, :3] @ ((k - 1) / 2.0) + m[:3, 3]
    return out


@dataclass
class Volume:
    """array (K, J, I) with ijk_to_ras (4, 4); meta holds reader facts (file, series UID...)."""

    array: np.ndarray
    ijk_to_ras: np.ndarray = field(default_factory=lambda: np.eye(4))
    meta: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, np.float64)
        if self.ijk_to_ras.shape != (4, 4):
            raise ValueError(f"ijk_to_ras must be 4 x 4; got {self.ijk_to_ras.shape}")
        if np.asarray(self.array).ndim != 3:
            raise ValueError(f"a volume array is (K, J, I); got shape {np.shape(self.array)}")

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """Voxel size (I, J, K) in mm."""
        return tuple(float(s) for s in np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0))

    @property
    def origin(self) -> Tuple[float, float, float]:
        """RAS position (mm) of the centre of voxel (0, 0, 0)."""
        return tuple(float(v) for v in self.ijk_to_ras[:3, 3])

    @property
    def directions(self) -> np.ndarray:
        """3 x 3 direction cosines, columns = I, J, K axes in RAS."""
        return self.ijk_to_ras[:3, :3] / np.asarray(self.spacing)[None, :]

    @property
    def pixel_area_mm2(self) -> float:
        """In-plane area of one voxel (I by J), mm^2."""
        si, sj, _ = self.spacing
        return si * sj

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same geometry with other voxel values (same shape)."""
        if np.shape(array) != np.shape(self.array):
            raise ValueError(f"shape {np.shape(array)} does not match {np.shape(self.array)}")
        return replace(self, array=array, meta=dict(self.meta))

    def downsampled_geometry(self, factor: int) -> np.ndarray:
        """IJK-to-RAS of this volume downsampled in-plane by k (slices kept)."""
        return downsampled_ijk_to_ras(self.ijk_to_ras, (factor, factor, 1))
