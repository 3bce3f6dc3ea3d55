"""Vertebral levels without a network (core/levels.py): synthetic spines with known levels,
the sagittal picture, and the shared real CT (its TotalSegmentator vertebra labels are used
only to measure, never as input)."""

from __future__ import annotations

import numpy as np
import pytest

from EPDSegmentationLib.core.levels import LevelError, find_levels, level_slices
from EPDSegmentationLib.core.volume import ijk_to_ras_matrix

BODY_MM = 28.0      # vertebral body height
DISC_MM = 9.0       # disc height
L5_BOTTOM_MM = 60.0  # above the bottom of the volume
CREST_MM = L5_BOTTOM_MM + BODY_MM + 0.5 * DISC_MM + 10.0   # crest at the L4 body's bottom


def level_centre_mm(i_from_l5: int) -> float:
    """z (mm above the volume's bottom) of the middle of L5 (0), L4 (1), L3 (2), ..."""
    return L5_BOTTOM_MM + i_from_l5 * (BODY_MM + DISC_MM) + BODY_MM / 2


def synthetic_ct(slice_mm: float, pixel_mm: float, z_mm=(0.0, 260.0), pelvis=True,
                 rng_seed=0) -> tuple:
    """A torso (K, J, I) in HU with a lumbar spine of known levels, J posterior->anterior,
    K inferior->superior; iliac wings below CREST_MM when ``pelvis``; thin ribs above L1."""
    rng = np.random.default_rng(rng_seed)
    zs = np.arange(z_mm[0], z_mm[1], slice_mm) + slice_mm / 2
    n = int(round(360 / pixel_mm))
    x = (np.arange(n) - n / 2 + 0.5) * pixel_mm                 # mm, left-right
    y = (np.arange(n) - n / 2 + 0.5) * pixel_mm                 # mm, posterior->anterior
    X, Y = np.meshgrid(x, y)                                   # (J, I)
    out = np.full((len(zs), n, n), -1000.0, np.float32)
    body = (X / 160) ** 2 + (Y / 115) ** 2 <= 1
    inner = (X / 145) ** 2 + (Y / 100) ** 2 <= 1
    spine_y = -45.0                                            # body centre, mm
    vb = (X / 22) ** 2 + ((Y - spine_y) / 16) ** 2 <= 1
    vb_in = (X / 19) ** 2 + ((Y - spine_y) / 13) ** 2 <= 1
    post = (np.abs(X) < 6) & (Y < spine_y - 22) & (Y > spine_y - 50)
    period = BODY_MM + DISC_MM
    for k, z in enumerate(zs):
        s = out[k]
        s[body] = -100
        s[inner] = 40
        rel = (z - L5_BOTTOM_MM) % period
        level = (z - L5_BOTTOM_MM) // period
        if z >= L5_BOTTOM_MM - DISC_MM and level < 7:
            if rel < BODY_MM:                                  # a vertebral body
                s[vb] = 400
                s[vb_in] = 140
                s[post] = 500
            else:                                              # a disc
                s[vb] = 80
        elif z < L5_BOTTOM_MM - DISC_MM:                       # the sacrum
            s[vb] = 300
        if pelvis and z < CREST_MM:
            wing = (np.abs(X) > 70) & (np.abs(X) < 120) & (np.abs(Y + 20) < 12)
            s[wing] = 450
        if z > level_centre_mm(5) - 20:                        # rib cross-sections
            for sign in (-1, 1):
                for cx, cy in ((95, -40), (130, 10), (110, 60)):
                    s[((X - sign * cx) ** 2 + (Y - cy) ** 2) <= 25] = 450
    out += rng.normal(0, 12, out.shape).astype(np.float32)
    m = ijk_to_ras_matrix((pixel_mm, pixel_mm, slice_mm), (0.0, y[0], zs[0]))
    return out, m, zs


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
