"""Render the module's panel (EPDSegmentation/Resources/UI/EPDSegmentation.ui) offscreen with
PySide6, so it can be reviewed without Slicer; and draw the module icon.

    QT_QPA_PLATFORM=offscreen .venv/bin/python Testing/render_panel.py           # docs/panel.png
    QT_QPA_PLATFORM=offscreen .venv/bin/python Testing/render_panel.py --icon    # and the icon

Slicer's and CTK's widgets are replaced by plain Qt stand-ins (a node selector by a combo box,
a collapsible button by a group box, ...), registered with QUiLoader.registerCustomWidget.
The combo boxes get the choices the parameter node gives them in Slicer; the model and device
lines show what the panel would say in this checkout (EPDSegmentationLib); node selectors
show their "none" text or an example node name.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
UI_PATH = REPO / "EPDSegmentation" / "Resources" / "UI" / "EPDSegmentation.ui"
MODULE_PATH = REPO / "EPDSegmentation" / "EPDSegmentation.py"
ICON_PATH = REPO / "EPDSegmentation" / "Resources" / "Icons" / "EPDSegmentation.png"
PANEL_PNG = REPO / "docs" / "panel.png"
#: Example node names shown in the selectors (as after loading the sample).
EXAMPLE_NODES = {"inputVolumeSelector": "EPDPhantomCT"}

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def _stand_ins():
    """Qt classes standing in for Slicer/CTK widgets, with the properties the .ui sets."""
    from PySide6.QtCore import Property
    from PySide6.QtWidgets import QComboBox, QGroupBox, QLineEdit, QPushButton, QWidget

    class qMRMLWidget(QWidget):
        pass

    class ctkCollapsibleButton(QGroupBox):
        def _get_text(self):
            return self.title()

        def _set_text(self, value):
            self.setTitle(("\u25b8 " if self.property("_collapsed") else "\u25be ") + value)

        def _get_collapsed(self):
            return bool(self.property("_collapsed"))

        def _set_collapsed(self, value):
            self.setProperty("_collapsed", bool(value))
            title = self.title()[2:] if self.title()[:1] in ("\u25b8", "\u25be") else self.title()
            self._set_text(title)
            for child in self.findChildren(QWidget):
                child.setVisible(not value)
            self.setFlat(bool(value))
            self.setMaximumHeight(24 if value else 16777215)

        text = Property(str, _get_text, _set_text)
        collapsed = Property(bool, _get_collapsed, _set_collapsed)

    class qMRMLNodeComboBox(QComboBox):
        def __init__(self, parent=None):
            super().__init__(parent)
            self._props: Dict[str, object] = {}

        def _prop(name, kind, default):
            def get(self):
                return self._props.get(name, default)

            def set_(self, value):
                self._props[name] = value
                if name == "noneDisplay" and self.count() == 0:
                    self.addItem(str(value))

            return Property(kind, get, set_)

        nodeTypes = _prop("nodeTypes", "QStringList", [])
        showChildNodeTypes = _prop("showChildNodeTypes", bool, True)
        noneEnabled = _prop("noneEnabled", bool, False)
        addEnabled = _prop("addEnabled", bool, True)
        removeEnabled = _prop("removeEnabled", bool, True)
        renameEnabled = _prop("renameEnabled", bool, False)
        editEnabled = _prop("editEnabled", bool, False)
        noneDisplay = _prop("noneDisplay", str, "None")

    class ctkPathLineEdit(QLineEdit):
        def __init__(self, parent=None):
            super().__init__(parent)
            self._filters: List[str] = []

        def _get(self):
            return self._filters

        def _set(self, value):
            self._filters = list(value)
            self.setPlaceholderText("Choose a file: " + ", ".join(self._filters))

        nameFilters = Property("QStringList", _get, _set)

    class ctkDirectoryButton(QPushButton):
        def __init__(self, parent=None):
            super().__init__(parent)
            self.setText("Choose a folder...")

    return [qMRMLWidget, ctkCollapsibleButton, qMRMLNodeComboBox, ctkPathLineEdit,
            ctkDirectoryButton]


def load_panel(ui_path: Path = UI_PATH):
    """(QApplication, the loaded top-level widget) with stand-ins for custom widgets."""
    from PySide6.QtCore import QFile, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv[:1])
    loader = QUiLoader()
    for cls in _stand_ins():
        loader.registerCustomWidget(cls)
    f = QFile(str(ui_path))
    if not f.open(QIODevice.ReadOnly):
        raise OSError(f"cannot open {ui_path}")
    try:
        widget = loader.load(f)
    finally:
        f.close()
    if widget is None:
        raise RuntimeError(f"QUiLoader could not load {ui_path}: {loader.errorString()}")
    return app, widget


def module_choices(module_path: Path = MODULE_PATH) -> Dict[str, List[str]]:
    """Field name -> choices of the parameter node's Choice fields, read from the module's
    source (which imports Slicer and cannot be imported here)."""
    from EPDSegmentationLib.core.classes import TISSUES

    tree = ast.parse(module_path.read_text())
    from EPDSegmentationLib.mrml.workflow import MODEL_SOURCES

    namespace: Dict[str, object] = {"TISSUES": TISSUES, "list": list,
                                    "MODEL_SOURCES": MODEL_SOURCES}
    for node in tree.body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            try:
                value = eval(compile(ast.Expression(node.value), "<module>", "eval"), namespace)
            except Exception:
                continue
            for t in node.targets:
                namespace[t.id] = value
    choices: Dict[str, List[str]] = {}
    for field in parameter_fields(tree).values():
        call = field["choice"]
        if call is not None:
            choices[field["name"]] = [str(c) for c in eval(
                compile(ast.Expression(call.args[0]), "<choice>", "eval"), namespace)]
    return choices


def parameter_fields(tree: ast.Module) -> Dict[str, Dict[str, object]]:
    """The annotated fields of the @parameterNodeWrapper class: name -> {annotation source,
    base type source, Choice call (or None), default source}."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper")
                for d in node.decorator_list):
            fields = {}
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    ann = stmt.annotation
                    base, choice = ann, None
                    if isinstance(ann, ast.Subscript) and ast.unparse(ann.value) == "Annotated":
                        elts = ann.slice.elts
                        base = elts[0]
                        for extra in elts[1:]:
                            if isinstance(extra, ast.Call) and ast.unparse(extra.func) == "Choice":
                                choice = extra
                    fields[stmt.target.id] = {
                        "name": stmt.target.id, "annotation": ast.unparse(ann),
                        "base": ast.unparse(base), "choice": choice,
                        "default": ast.unparse(stmt.value) if stmt.value is not None else None}
            return fields
    raise ValueError("no @parameterNodeWrapper class found")


def fill_example(widget, expand_all: bool = True) -> None:
    """Put in what the panel shows in Slicer: Choice items, example node names, and the
    model and device lines as this checkout would report them. expand_all opens the
    sections that start collapsed (EPD preview, Export), so the picture shows them."""
    from PySide6.QtWidgets import QComboBox, QGroupBox, QLabel, QWidget

    if expand_all:
        for box in widget.findChildren(QGroupBox):
            if box.property("collapsed"):
                box.setProperty("collapsed", False)
    # as the widget's _updateGui leaves them for "All slices" and the bundled model
    for name in ("firstSliceSpinBox", "lastSliceSpinBox", "modelPathLineEdit"):
        widget.findChild(QWidget, name).setEnabled(False)

    choices = module_choices()
    fields = parameter_fields(ast.parse(MODULE_PATH.read_text()))
    for child in widget.findChildren(QWidget):
        name = child.property("SlicerParameterName")
        if name in choices and type(child) is QComboBox:
            child.clear()
            child.addItems(choices[name])
            default = fields[name]["default"]
            if default is not None:       # the parameter node starts at the default
                child.setCurrentText(str(ast.literal_eval(default)))
        elif isinstance(child, QComboBox) and child.count() == 0:
            child.addItem("None")
    for obj, text in EXAMPLE_NODES.items():
        combo = widget.findChild(QComboBox, obj)
        combo.clear()
        combo.addItem(text)
    summary = widget.findChild(QLabel, "modelSummaryLabel")
    device = widget.findChild(QLabel, "deviceStatusLabel")
    try:
        from EPDSegmentationLib.mrml.workflow import device_line, model_status
    except ImportError as exc:  # slicer-core missing: leave the .ui's own text
        summary.setText(f"({exc})")
    else:
        summary.setText(model_status("Bundled model")[0])
        device.setText(device_line("auto"))
    widget.findChild(QLabel, "statusLabel").setText("Select a CT volume (or load the sample CT).")


def render(out: Path = PANEL_PNG, width: int = 420, expand_all: bool = True) -> Path:
    """Render the panel to ``out`` (PNG)."""
    app, widget = load_panel()
    fill_example(widget, expand_all)
    widget.setFixedWidth(width)
    widget.show()
    app.processEvents()
    # wrapped labels need the height for this width, which sizeHint does not give
    height = widget.layout().totalHeightForWidth(width) if widget.layout().hasHeightForWidth() \
        else widget.sizeHint().height()
    widget.setFixedHeight(max(height, widget.minimumSizeHint().height()))
    app.processEvents()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not widget.grab().save(str(out)):
        raise OSError(f"could not write {out}")
    widget.close()
    return out


def draw_icon(out: Path = ICON_PATH, size: int = 128) -> Path:
    """The module icon: EPD soft labels of the built-in label map at 1/8, tissue colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from EPDSegmentationLib.core.classes import color_table
    from EPDSegmentationLib.core.epd import epd_labels
    from EPDSegmentationLib.core.example import example_labels

    labels = example_labels((512, 512))[96:416, 40:472]
    soft = epd_labels(labels, 6, 8)
    rgb = np.einsum("chw,cd->hwd", soft, color_table())
    alpha = 1.0 - soft[0]
    fig = plt.figure(figsize=(1, 1), dpi=size)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(np.dstack([rgb, alpha]), interpolation="nearest", aspect="auto")
    ax.axis("off")
    fig.savefig(out, dpi=size, transparent=True)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PANEL_PNG)
    parser.add_argument("--icon", action="store_true", help="also draw the module icon")
    args = parser.parse_args(argv)
    print(render(args.out))
    if args.icon:
        print(draw_icon())
    return 0


if __name__ == "__main__":
    sys.exit(main())
