"""Vertebral levels without a network (core/levels.py): synthetic spines with known levels,
the sagittal picture, and the shared real CT (its TotalSegmentator vertebra labels are used
only to measure, never as input)."""

from __future__ import annotations

import numpy as np
import pytest

from EPDSegmentationLib.core.levels import LevelError, find_levels, level_slices
from spine import level_centre_mm, synthetic_ct

@pytest.mark.parametrize("slice_mm,pixel_mm", [(3.0, 3.0), (1.0, 1.5)])
def test_synthetic_spine_levels(slice_mm, pixel_mm):
    ct, m, zs = synthetic_ct(slice_mm, pixel_mm)
    lv = find_levels(ct, m)
    for i, name in enumerate(("L4", "L3", "L2")):
        err = (zs[0] + lv.centres[name] * slice_mm) - level_centre_mm(i + 1)
        assert abs(err) <= 5.0, (name, err, lv.notes)


def test_superior_first_volume_gives_the_same_slice():
    ct, m, zs = synthetic_ct(3.0, 3.0)
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, len(zs) - 1
    lv = find_levels(ct[::-1], m @ flip)
    ref = find_levels(ct, m)
    assert lv.slice_of("L3") == len(zs) - 1 - ref.slice_of("L3")


def test_no_pelvis_is_refused_with_a_reason():
    ct, m, _ = synthetic_ct(3.0, 3.0, z_mm=(120.0, 300.0), pelvis=False)
    with pytest.raises(LevelError, match="iliac crests"):
        find_levels(ct, m)


def test_level_outside_the_scan_is_refused():
    ct, m, _ = synthetic_ct(3.0, 3.0, z_mm=(0.0, 150.0))
    lv = find_levels(ct, m)
    with pytest.raises(LevelError, match="not covered"):
        lv.slice_of("L1")


def test_oblique_volume_is_refused():
    ct, m, _ = synthetic_ct(3.0, 3.0, z_mm=(0.0, 60.0))
    r = np.eye(4)
    r[1:3, 1:3] = [[0.6, -0.8], [0.8, 0.6]]
    with pytest.raises(LevelError, match="not axial"):
        find_levels(ct, r @ m)


def test_slab_slices():
    ct, m, _ = synthetic_ct(3.0, 3.0)
    lv = find_levels(ct, m)
    k = lv.slice_of("L3")
    assert level_slices(lv, "L3", len(ct), 3.0) == [k]
    slab = level_slices(lv, "L3", len(ct), 3.0, slab_mm=10.0)
    assert k in slab and 3 <= len(slab) <= 4 and slab == list(range(slab[0], slab[-1] + 1))
    with pytest.raises(ValueError, match="slab"):
        level_slices(lv, "L3", len(ct), 3.0, slab_mm=-1)


def test_level_picture(tmp_path):
    from PIL import Image

    from EPDSegmentationLib.io.level_picture import write_level_png

    ct, m, _ = synthetic_ct(3.0, 3.0)
    lv = find_levels(ct, m)
    path = write_level_png(tmp_path / "c_levels.png", lv.sagittal, (3.0, 3.0), lv, "L3")
    rgb = np.asarray(Image.open(path).convert("RGB"))
    assert ((rgb[..., 0] == 255) & (rgb[..., 1] == 60)).any()      # the chosen level's line
    with pytest.raises(FileExistsError):
        write_level_png(path, lv.sagittal, (3.0, 3.0), lv, "L3")


def _truth_k(structures: np.ndarray, label: int) -> float:
    """Centre K of a vertebral body: the mean K of the anterior half of the label."""
    z, j, _ = np.nonzero(structures == label)
    return float(z[j > np.median(j)].mean())


def test_real_ct_l3_within_half_a_body(totalseg_dir):
    from EPDSegmentationLib.io import read_volume
    from EPDSegmentationLib.io.images import read_itk

    ct = read_volume(totalseg_dir / "ct_abdomen_pelvis.nii.gz")
    truth = read_itk(totalseg_dir / "ct_abdomen_pelvis_structures.nii.gz").array
    lv = find_levels(ct.array, ct.ijk_to_ras)
    sk = ct.spacing[2]
    assert abs(lv.centres["L3"] - _truth_k(truth, 29)) * sk <= 10.0      # measured 6.2 mm
    assert abs(lv.centres["L4"] - _truth_k(truth, 28)) * sk <= 10.0
    short = read_volume(totalseg_dir / "ct_t11_l2.nii.gz")
    with pytest.raises(LevelError, match="iliac crests"):
        find_levels(short.array, short.ijk_to_ras)
