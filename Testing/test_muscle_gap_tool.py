"""Testing/tools/muscle_gap.py: the split of the muscle disagreement puts each voxel we call
muscle and the reference does not in exactly one part, by a rule that can be checked by
hand on a drawn case."""

from __future__ import annotations

import numpy as np
import pytest


def _case():
    """One 24 x 24 slice, 10 mm voxels (1 cm² each): a paraspinal block (label 86) and a
    wall strip (no label) of reference muscle, and ours with known extras."""
    shape = (1, 24, 24)
    muscle = np.zeros(shape, bool)
    structures = np.zeros(shape, np.int32)
    muscle[0, 8:12, 2:6] = True
    structures[0, 8:12, 2:6] = 86
    muscle[0, 8:12, 14:16] = True                 # wall: no structure label
    fat = np.zeros(shape, bool)
    fat[0, 0:2, :] = True
    ours = muscle.copy()
    ours[0, 8:12, 14] = False                     # 4 of its voxels we miss
    ours[0, 8:12, 6] = True                       # 4 beside the paraspinal block
    ours[0, 8:12, 13] = True                      # 4 beside the wall
    ours[0, 20:22, 20:22] = True                  # 4 in a kidney
    structures[0, 20:22, 20:22] = 2
    ours[0, 0, 0] = True                          # 1 in its fat
    ours[0, 9, 8] = True                          # 1 three voxels from the block: beyond 12 mm
    ours[0, 15, 3] = True                         # 1 four voxels below the block
    return ours, muscle, fat, structures


def test_each_extra_voxel_lands_in_one_part(load_tool):
    tool = load_tool("muscle_gap")
    r = tool.decompose(*_case(), voxel_mm=10.0)
    assert r["its"] == 24 and r["its only"] == 4 and r["agree"] == 20
    assert r["ours only"] == 15 and r["ours"] == 35
    assert r["in its kidneys"] == 4 and r["in its liver"] == 0 and r["in its fat"] == 1
    assert r["ring paraspinal"] == 4 and r["ring wall"] == 4 and r["ring psoas"] == 0
    # at 10 mm voxels the 6 mm band is empty; 3 and 4 voxels out are 30 and 40 mm
    assert r["beyond the ring, to 6 mm"] == 0 and r["6 to 12 mm"] == 0
    assert r["beyond 12 mm"] == 2
    parts = [v for k, v in r.items() if k.startswith(("in its", "ring ", "beyond", "6 to"))]
    assert sum(parts) == pytest.approx(r["ours only"])
    assert r["dice"] == pytest.approx(2 * 20 / (35 + 24))
    assert r["dice without its organs' voxels"] == pytest.approx(2 * 20 / (31 + 24))
    assert r["dice without both"] == pytest.approx(2 * 20 / (23 + 24))


def test_the_bands_follow_the_voxel_size(load_tool):
    tool = load_tool("muscle_gap")
    r = tool.decompose(*_case(), voxel_mm=3.0)    # the same drawing at 3 mm voxels
    # 3 voxels (9 mm) and 4 voxels (12 mm) out now fall in the 6 to 12 mm band
    assert r["6 to 12 mm"] == pytest.approx(2 * 0.09) and r["beyond 12 mm"] == 0


def test_a_slice_without_reference_muscle_puts_ours_far_out(load_tool):
    tool = load_tool("muscle_gap")
    ours = np.zeros((1, 8, 8), bool)
    ours[0, 2:4, 2:4] = True
    none = np.zeros_like(ours)
    r = tool.decompose(ours, none, none, np.zeros(ours.shape, np.int32), voxel_mm=10.0)
    assert r["beyond 12 mm"] == 4 and r["dice"] == 0.0


def test_groups_take_the_label_holding_most_of_a_piece(load_tool):
    tool = load_tool("muscle_gap")
    _, muscle, _, structures = _case()
    g = tool.muscle_groups(muscle, structures)
    assert (g[0, 8:12, 2:6] == 1).all() and (g[0, 8:12, 14:16] == 3).all()
    assert (g[~muscle] == 0).all()
