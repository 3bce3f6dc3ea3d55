"""The measures table with the patient's height: SMI, IMATI, SATI, VATI (cm2/m2) columns;
without a height the table keeps its columns."""

from __future__ import annotations

import math

import pytest

slicer = pytest.importorskip("slicer")

from EPDSegmentationLib.mrml.tables import (INDEX_COLUMNS, MEASURE_COLUMNS,  # noqa: E402
                                            fill_measures_table, index_rows, table_rows)


def _rows():
    rows = []
    for sl in ("7", "all"):
        for key, area in (("MUS", 150.0), ("IMAT", 10.0), ("SAT", 120.0), ("VAT", 90.0),
                          ("MSC", 200.0)):
            rows.append({k: 0.0 for k, _, _, _ in MEASURE_COLUMNS} |
                        {"slice": sl, "tissue": key, "name": key, "area_cm2": area})
    return rows


def test_indices_need_a_height(mrml):
    table = mrml.scene.AddNewNodeByClass("vtkMRMLTableNode")
    fill_measures_table(table, _rows())
    assert [table.GetTable().GetColumn(c).GetName() for c in
            range(table.GetNumberOfColumns())] == [k for k, _, _, _ in MEASURE_COLUMNS]
    fill_measures_table(table, _rows(), 1.60)
    got = {(r["slice"], r["tissue"]): r for r in table_rows(table)}
    assert got[("7", "MUS")]["index"] == "SMI"
    assert got[("7", "MUS")]["index_cm2_m2"] == pytest.approx(150.0 / 1.6 ** 2)
    assert got[("all", "VAT")]["index"] == "VATI"
    assert got[("all", "VAT")]["index_cm2_m2"] == pytest.approx(90.0 / 1.6 ** 2)
    assert got[("7", "MSC")]["index"] == "" and math.isnan(got[("7", "MSC")]["index_cm2_m2"])
    assert table.GetColumnTitle("index_cm2_m2") == "Index value (cm2/m2)"
    assert [k for k, _, _, _ in INDEX_COLUMNS] == ["index", "index_cm2_m2"]
    assert "index" not in _rows()[0] and index_rows(_rows(), 1.6)[0]["index"] == "SMI"
