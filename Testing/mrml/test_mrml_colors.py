"""The tissue colour table is made without VTK errors (SetNamesInitialised is deprecated
in current Slicer and logs one) and names every class."""

from __future__ import annotations

import vtk

from EPDSegmentationLib.core.classes import CLASSES
from EPDSegmentationLib.mrml.nodes import tissue_color_table


def test_tissue_color_table_logs_no_vtk_error(mrml):
    window = vtk.vtkStringOutputWindow()
    previous = vtk.vtkOutputWindow.GetInstance()
    vtk.vtkOutputWindow.SetInstance(window)
    try:
        table = tissue_color_table(mrml.scene)
    finally:
        vtk.vtkOutputWindow.SetInstance(previous)
    assert window.GetOutput() == ""
    assert [table.GetColorName(c.index) for c in CLASSES] == [c.key for c in CLASSES]
    assert tissue_color_table(mrml.scene) is table
