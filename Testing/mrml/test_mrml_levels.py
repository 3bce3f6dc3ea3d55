"""Go to L3 in Slicer (mrml/levels.py) on a real MRML scene (slicer-core): the red view
moves onto the level found; a volume without the pelvis is refused with the reason; the
cohort table as a table node."""

from __future__ import annotations

import numpy as np
import pytest

import slicer

from EPDSegmentationLib.core.cohort import COHORT_COLUMNS
from EPDSegmentationLib.core.levels import find_levels
from EPDSegmentationLib.mrml.levels import cohort_rows_from_table, fill_cohort_table, go_to_level
from EPDSegmentationLib.mrml.nodes import InputProblem, vtk_matrix
from EPDSegmentationLib.mrml.views import red_slice_ras
from spine import synthetic_ct


def _add(scene, ct, m, name="spine"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.rint(ct).astype(np.int16))
    node.SetIJKToRASMatrix(vtk_matrix(m))
    return node


def test_go_to_l3_moves_the_red_view(mrml):
    mrml.add_views()
    ct, m, zs = synthetic_ct(3.0, 3.0)
    node = _add(mrml.scene, ct, m)
    k, levels = go_to_level(mrml.scene, node, "L3")
    assert k == find_levels(np.rint(ct), m).slice_of("L3")
    assert red_slice_ras(mrml.scene)[2] == pytest.approx(zs[k])


def test_go_to_l3_refuses_a_chest_scan(mrml):
    mrml.add_views()
    ct, m, _ = synthetic_ct(3.0, 3.0, z_mm=(120.0, 300.0), pelvis=False)
    node = _add(mrml.scene, ct, m, "chest")
    with pytest.raises(InputProblem, match="'chest'.*iliac crests"):
        go_to_level(mrml.scene, node, "L3")


def test_cohort_table_node(mrml):
    table = mrml.scene.AddNewNodeByClass("vtkMRMLTableNode", "Cohort")
    rows = [{"case": "a", "status": "ok", "SMI": 41.5, "level": "L3"},
            {"case": "b", "status": "failed", "message": "no crest"}]
    fill_cohort_table(table, rows, COHORT_COLUMNS)
    back = cohort_rows_from_table(table)
    assert back[0]["case"] == "a" and back[0]["SMI"] == pytest.approx(41.5)
    assert np.isnan(back[1]["SMI"]) and back[1]["message"] == "no crest"
    assert table.GetTable().GetNumberOfColumns() == len(COHORT_COLUMNS)
