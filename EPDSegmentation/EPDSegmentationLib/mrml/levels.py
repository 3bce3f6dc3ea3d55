"""Vertebral levels in Slicer: find L3 in a volume node and jump the red view there; the
cohort table as a table node."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import vtk

from ..core.levels import LevelError, Levels, find_levels
from .nodes import ROLE_ATTRIBUTE, InputProblem, check_ct_volume, ijk_to_ras, volume_array
from .views import slice_node


def node_levels(volume_node) -> Levels:
    """core.levels.find_levels on a scalar volume node (its own IJK-to-RAS; parent
    transforms are not applied). InputProblem with the reason when they cannot be found."""
    check_ct_volume(volume_node)
    try:
        return find_levels(volume_array(volume_node), ijk_to_ras(volume_node))
    except LevelError as exc:
        raise InputProblem(f"'{volume_node.GetName()}': {exc}") from None


def go_to_level(scene, volume_node, level: str = "L3") -> Tuple[int, Levels]:
    """Find ``level`` in the volume and move the red slice view onto the centre of its
    nearest slice (RAS mm); returns (slice index K, the levels found)."""
    levels = node_levels(volume_node)
    try:
        k = levels.slice_of(level)
    except ValueError as exc:
        raise InputProblem(f"'{volume_node.GetName()}': {exc}") from None
    dims = volume_node.GetImageData().GetDimensions()
    centre = ijk_to_ras(volume_node) @ [(dims[0] - 1) / 2.0, (dims[1] - 1) / 2.0, k, 1.0]
    red = slice_node(scene, "Red")
    if red is None:
        raise InputProblem("the scene has no red slice view to move")
    red.JumpSliceByOffsetting(float(centre[0]), float(centre[1]), float(centre[2]))
    return k, levels


def fill_cohort_table(table_node, rows: Sequence[Dict[str, object]],
                      columns: Sequence[str]) -> None:
    """Replace the table's content with cohort rows: numbers as double columns (NaN when
    empty), everything else as text."""
    def numeric(key: str) -> bool:
        for row in rows:
            value = row.get(key)
            if value in (None, ""):
                continue
            try:
                float(value)
            except (TypeError, ValueError):
                return False
        return key not in ("case", "patient_id", "study_uid", "series_uid", "shard")

    table = vtk.vtkTable()
    for key in columns:
        is_num = numeric(key)
        array = vtk.vtkDoubleArray() if is_num else vtk.vtkStringArray()
        array.SetName(key)
        array.SetNumberOfValues(len(rows))
        for r, row in enumerate(rows):
            value = row.get(key)
            if is_num:
                array.SetValue(r, float("nan") if value in (None, "") else float(value))
            else:
                array.SetValue(r, "" if value is None else str(value))
        table.AddColumn(array)
    was = table_node.StartModify()
    table_node.SetAndObserveTable(table)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.SetLocked(True)
    table_node.EndModify(was)


def cohort_rows_from_table(table_node) -> List[Dict[str, object]]:
    """The rows of a table node (column name -> value), for checks and export."""
    table = table_node.GetTable()
    out = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c in range(table.GetNumberOfColumns()):
            array = table.GetColumn(c)
            value = array.GetValue(r)
            row[array.GetName()] = float(value) if isinstance(value, (float, np.floating)) \
                else value
        out.append(row)
    return out


#: Role of the panel's cohort table (one row per CT segmented at a level in this scene).
COHORT_ROLE = "cohort"


def add_cohort_row(scene, row: Dict[str, object], columns: Sequence[str]):
    """Put ``row`` into the scene's cohort table (made on first use, named "Cohort"): a row
    of the same case is replaced, others are kept. Returns the table node."""
    nodes = scene.GetNodesByClass("vtkMRMLTableNode")
    table = next((nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())
                  if nodes.GetItemAsObject(i).GetAttribute(ROLE_ATTRIBUTE) == COHORT_ROLE), None)
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", "Cohort")
        table.SetAttribute(ROLE_ATTRIBUTE, COHORT_ROLE)
    rows = [r for r in cohort_rows_from_table(table) if r.get("case") != row["case"]]
    fill_cohort_table(table, rows + [row], columns)
    return table
