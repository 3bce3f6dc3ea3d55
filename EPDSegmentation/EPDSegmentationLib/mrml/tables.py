"""MRML table nodes: the body-composition measures and the EPD preview's area comparison,
filled from plain rows (dicts) and written to CSV.

A table node holds one column per key, in the order given; text columns (slice, tissue,
name) are vtkStringArray, numbers vtkDoubleArray with a title, unit and description that
Slicer's table view shows. ``table_rows`` reads them back; ``table_to_csv`` writes them
atomically.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import vtk

from ..core import bodycomp
from ..core.classes import TISSUES
from .nodes import ROLE_ATTRIBUTE, unique_name
from ..core.indices import INDEX_KEYS, indices

#: (key, title, unit, description) of the preview's area table.
AREA_COLUMNS: Tuple[Tuple[str, str, str, str], ...] = (
    ("tissue", "Tissue", "", "tissue class key"),
    ("name", "Name", "", "tissue class name"),
    ("original_cm2", "Original", "cm2", "area of the label map at full resolution"),
    ("nearest_cm2", "Nearest", "cm2", "area after nearest downsampling (pixel count x "
                                      "low-resolution pixel area)"),
    ("nearest_error_pct", "Nearest error", "%", "nearest minus original, % of original"),
    ("epd_cm2", "EPD", "cm2", "area carried by the EPD fractions (each fraction x the "
                              "pixels its window covers)"),
    ("epd_error_pct", "EPD error", "%", "EPD minus original, % of original"),
)
TEXT_KEYS = ("slice", "tissue", "name", "index")
#: Added to the measures table when the patient's height is known (core/indices.py).
INDEX_COLUMNS: Tuple[Tuple[str, str, str, str], ...] = (
    ("index", "Index", "", "SMI (MUS), IMATI, SATI, VATI: area / height squared"),
    ("index_cm2_m2", "Index value", "cm2/m2", "soft area (cm2) / height (m) squared; in "
                                              "'all' rows from the mean area per slice"),
)
#: Added after INDEX_COLUMNS when the rows have the HU-protocol measures too.
PROTOCOL_INDEX_COLUMNS: Tuple[Tuple[str, str, str, str], ...] = (
    ("protocol_index_cm2_m2", "Protocol index value", "cm2/m2",
     "protocol area (cm2) / height (m) squared: the index published cut-offs were set on"),
)

Rows = List[Dict[str, object]]


def _measure_columns(columns):
    for key, header, description in columns:
        unit = ""
        if header.endswith("(cm2)"):
            unit = "cm2"
        elif header.endswith("(cm3)"):
            unit = "cm3"
        elif "HU" in header:
            unit = "HU"
        title = header.replace(" (cm2)", "").replace(" (cm3)", "")
        yield key, title, unit, description


MEASURE_COLUMNS: Tuple[Tuple[str, str, str, str], ...] = tuple(
    _measure_columns(bodycomp.COLUMNS))
#: Added after MEASURE_COLUMNS when the rows have them (indices.with_protocol).
PROTOCOL_MEASURE_COLUMNS: Tuple[Tuple[str, str, str, str], ...] = tuple(
    _measure_columns(bodycomp.PROTOCOL_COLUMNS))


def fill_table(table_node, rows: Rows, columns: Sequence[Tuple[str, str, str, str]]) -> None:
    """Replace the table's content with ``rows`` (dicts keyed by the column keys)."""
    table = vtk.vtkTable()
    arrays = []
    for key, _, _, _ in columns:
        array = vtk.vtkStringArray() if key in TEXT_KEYS else vtk.vtkDoubleArray()
        array.SetName(key)
        array.SetNumberOfValues(len(rows))
        arrays.append(array)
    for r, row in enumerate(rows):
        for array, (key, _, _, _) in zip(arrays, columns):
            value = row[key]
            if isinstance(array, vtk.vtkStringArray):
                array.SetValue(r, str(value))
            else:
                array.SetValue(r, float("nan") if value is None else float(value))
    for array in arrays:
        table.AddColumn(array)
    was_modifying = table_node.StartModify()
    table_node.SetAndObserveTable(table)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    for key, title, unit, description in columns:
        table_node.SetColumnTitle(key, title + (f" ({unit})" if unit else ""))
        if unit:
            table_node.SetColumnUnitLabel(key, unit)
        table_node.SetColumnDescription(key, description)
    table_node.SetLocked(True)  # results: edited in a spreadsheet, not in place
    table_node.EndModify(was_modifying)


def index_rows(rows: Rows, height_m: float) -> Rows:
    """Copies of the measure rows with ``index`` (SMI, IMATI, SATI, VATI; "" for MSC) and
    ``index_cm2_m2`` = area_cm2 / height_m^2 (NaN for MSC), and for rows with the protocol
    area ``protocol_index_cm2_m2`` from it the same way. height_m: metres, already checked
    (core.indices.height_m)."""
    out = []
    for row in rows:
        key = str(row["tissue"])
        name = INDEX_KEYS.get(key, "")

        def index(area) -> float:
            return indices({key: float(area)}, height_m).get(name, float("nan"))

        extra = {"index": name, "index_cm2_m2": index(row["area_cm2"])}
        if "protocol_area_cm2" in row:
            extra["protocol_index_cm2_m2"] = index(row["protocol_area_cm2"])
        out.append(dict(row, **extra))
    return out


def fill_measures_table(table_node, rows: Rows, height_m: Optional[float] = None) -> None:
    """The body-composition rows of bodycomp.tissue_measures, one row per slice and tissue
    and the "all" rows, with the HU-protocol columns when the rows have them
    (indices.with_protocol); with the height (m) also the indices (INDEX_COLUMNS, and
    PROTOCOL_INDEX_COLUMNS with the protocol)."""
    protocol = bool(rows) and "protocol_area_cm2" in rows[0]
    columns = MEASURE_COLUMNS + (PROTOCOL_MEASURE_COLUMNS if protocol else ())
    if height_m:
        columns += INDEX_COLUMNS + (PROTOCOL_INDEX_COLUMNS if protocol else ())
        rows = index_rows(rows, height_m)
    fill_table(table_node, rows, columns)


def area_rows(original: np.ndarray, nearest: np.ndarray, epd: np.ndarray) -> Rows:
    """Rows of the preview table from per-class areas (C,) in cm^2."""
    rows = []
    for c in TISSUES:
        o, n, e = float(original[c.index]), float(nearest[c.index]), float(epd[c.index])
        rows.append({
            "tissue": c.key, "name": c.name, "original_cm2": o, "nearest_cm2": n,
            "nearest_error_pct": 100.0 * (n - o) / o if o > 0 else float("nan"),
            "epd_cm2": e, "epd_error_pct": 100.0 * (e - o) / o if o > 0 else float("nan"),
        })
    return rows


def fill_area_table(table_node, rows: Rows) -> None:
    fill_table(table_node, rows, AREA_COLUMNS)


def table_rows(table_node) -> Rows:
    """The table's rows as dicts keyed by column name (text or float)."""
    table = table_node.GetTable()
    out: Rows = []
    names = [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
    for r in range(table.GetNumberOfRows()):
        row: Dict[str, object] = {}
        for c, name in enumerate(names):
            column = table.GetColumn(c)
            if isinstance(column, vtk.vtkStringArray):
                row[name] = column.GetValue(r)
            else:
                row[name] = float(column.GetValue(r))
        out.append(row)
    return out


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def table_to_csv(table_node, path: Union[str, os.PathLike], *, overwrite: bool = False) -> Path:
    """Write a table node as CSV (header = column names, NaN as an empty cell) atomically: a
    temporary file in the same folder, then os.replace. Existing files are kept unless
    overwrite."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow "
                              f"replacing it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    table = table_node.GetTable()
    names = [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
    rows = table_rows(table_node)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(names)
            for row in rows:
                writer.writerow([_cell(row[n]) for n in names])
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def new_table(scene, name: str, role: Optional[str] = None):
    """A new table node with a unique name."""
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", unique_name(scene, name))
    if role:
        node.SetAttribute(ROLE_ATTRIBUTE, role)
    return node
