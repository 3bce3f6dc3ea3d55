"""Testing/tools/kidney_probe.py: the scan edits its numbers rest on (fat beyond a distance,
the kidney alone smoothed, the regions of the integrated gradients) do what they say."""

from __future__ import annotations

import numpy as np


def test_fat_beyond_keeps_the_near_scan_and_the_air(load_tool):
    tool = load_tool("kidney_probe")
    hu = np.full((1, 10, 10), 40.0, np.float32)
    hu[0, :, 0] = -1000.0                          # air at the left edge
    dist = np.tile(np.arange(10, dtype=np.float32) * 3.0, (1, 10, 1))    # mm, by column
    out = tool.fat_beyond(hu, dist, 12.0, np.random.default_rng(0))
    assert (out[0, :, 1:5] == 40.0).all()          # within 12 mm: unchanged
    assert (out[0, :, 0] == -1000.0).all()         # air stays air
    far = out[0, :, 5:]
    assert abs(far.mean() - tool.FAT_HU) < 5.0 and 8.0 < far.std() < 20.0
    assert (hu[0, :, 5:] == 40.0).all()            # the input is not changed


def test_smooth_inside_changes_only_the_mask(load_tool):
    tool = load_tool("kidney_probe")
    rng = np.random.default_rng(1)
    hu = rng.normal(30.0, 15.0, (2, 12, 12)).astype(np.float32)
    mask = np.zeros(hu.shape, bool)
    mask[:, 4:8, 4:8] = True
    out = tool.smooth_inside(hu, mask)
    assert (out[~mask] == hu[~mask]).all()
    assert out[mask].std() < 0.6 * hu[mask].std()


def test_regions_follow_the_masks_over_the_hu(load_tool):
    tool = load_tool("kidney_probe")
    hu = np.array([[[50.0, -100.0, 50.0, 50.0, 50.0, 50.0]]], np.float32)
    structures = np.array([[[0, 0, 0, 5, 20, 30]]], np.int32)   # -, -, -, liver, colon, L2
    masks = {"skeletal_muscle": np.array([[[False, False, True, False, False, False]]]),
             "subcutaneous_fat": np.zeros((1, 1, 6), bool),
             "torso_fat": np.zeros((1, 1, 6), bool)}
    r = tool.region_map(hu, structures, masks)
    names = [tool.REGIONS[i] for i in r.ravel()]
    assert names == ["unlabelled, -30 to 150 HU", "unlabelled, other HU", "its muscle",
                     "liver", "bowel and stomach", "bone"]
