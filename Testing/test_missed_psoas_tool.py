"""Testing/tools/missed_psoas.py: per level, the psoas voxels we do not call muscle, what we
call them and their HU, on a drawn case that can be checked by hand."""

from __future__ import annotations

import numpy as np
import pytest


def test_misses_per_level_are_counted_and_named(load_tool):
    tool = load_tool("missed_psoas")
    structures = np.zeros((3, 6, 6), np.int32)
    structures[:, 1:3, 1:3] = 88                  # 4 psoas voxels a slice (left)
    structures[:, 1:3, 4:6] = 89                  # and 4 (right)
    structures[2, 0, 0] = 2                       # a kidney voxel: not psoas
    labels = np.full((3, 6, 6), 5, np.uint8)      # MSC everywhere
    labels[0, 1:3, 1:3] = 1                       # slice 0: left psoas MUS, right MSC
    labels[1, 1:3, 1:6] = 2                       # slice 1: all IMAT
    labels[2, 1, 1:3] = 4                         # slice 2: two VAT, the rest MSC
    hu = np.where(labels == 5, 30.0, 40.0).astype(np.float32)
    r = tool.misses(labels, hu, structures, ["L2", "L2", "L5"])
    assert set(r) == {"L2", "L5"}
    assert r["L2"]["voxels"] == 16 and r["L2"]["missed"] == 4
    assert r["L2"]["called"] == {5: 4}
    assert r["L2"]["hu_missed"] == pytest.approx(30.0) and r["L2"]["hu_hit"] == 40.0
    assert r["L5"]["voxels"] == 8 and r["L5"]["missed"] == 8
    assert r["L5"]["called"] == {4: 2, 5: 6} and r["L5"]["hu_hit"] is None
    assert r["L2"]["slice"] == 1 and r["L5"]["slice"] == 2
