"""The panel without Slicer: every widget the module's code touches and every
SlicerParameterName in the .ui exist and fit a parameter-node field (the same rules as
slicer.parameterNodeWrapper's GUI connectors); the .ui loads and renders offscreen."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET

import pytest

from render_panel import MODULE_PATH, UI_PATH, module_choices, parameter_fields

#: Widget class -> what parameterNodeWrapper/guiConnectors.py can bind it to.
CONNECTABLE = {
    "QCheckBox": "bool",
    "QSpinBox": "int",
    "QComboBox": "choice",
    "qMRMLNodeComboBox": "node",
    "ctkPathLineEdit": "pathlib.Path",
    "ctkDirectoryButton": "pathlib.Path",
    "QLineEdit": "str",
}
#: Fields the panel does not show (set by the code).
INTERNAL_FIELDS = {"resultSegmentation"}


@pytest.fixture(scope="module")
def ui():
    root = ET.parse(UI_PATH).getroot()
    widgets = {}
    for w in root.iter("widget"):
        props = {}
        for p in w.findall("property"):
            value = p.find("string")
            strings = [s.text for s in p.iter("string")]
            props[p.get("name")] = value.text if value is not None and len(strings) == 1 \
                else strings
        widgets[w.get("name")] = {"class": w.get("class"), "props": props}
    return widgets


@pytest.fixture(scope="module")
def module():
    source = MODULE_PATH.read_text()
    tree = ast.parse(source)
    touched = {node.attr for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
               and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
               and node.value.value.id == "self"}
    return {"tree": tree, "fields": parameter_fields(tree), "touched": touched}


def _node_classes(annotation: str):
    return sorted(set(re.findall(r"vtkMRML\w+Node", annotation)))


def test_every_widget_the_code_touches_exists(ui, module):
    assert module["touched"], "the widget code should touch the panel"
    missing = sorted(module["touched"] - set(ui))
    assert not missing, f"EPDSegmentation.py uses self.ui.{missing} that the .ui lacks"


def test_every_parameter_name_matches_a_field_it_can_bind(ui, module):
    fields = module["fields"]
    bound = {}
    for name, w in ui.items():
        param = w["props"].get("SlicerParameterName")
        if param is None:
            continue
        assert param in fields, f"{name}: SlicerParameterName {param!r} is not a field"
        assert param not in bound, f"{param!r} bound twice ({bound.get(param)}, {name})"
        bound[param] = name
        field = fields[param]
        kind = CONNECTABLE.get(w["class"])
        assert kind is not None, f"{name}: no GUI connector for a {w['class']}"
        if kind == "choice":
            assert field["choice"] is not None, f"{name}: a QComboBox needs a Choice field"
        elif kind == "node":
            classes = _node_classes(field["annotation"])
            assert classes, f"{name} is a node selector but {param} is {field['annotation']}"
            assert sorted(w["props"]["nodeTypes"]) == classes, \
                f"{name}: nodeTypes {w['props']['nodeTypes']} vs field {classes}"
        else:
            assert field["base"] == kind, f"{name} ({w['class']}) needs {kind}; " \
                                          f"{param} is {field['base']}"
    unbound = set(fields) - set(bound) - INTERNAL_FIELDS
    assert not unbound, f"fields without a widget: {sorted(unbound)}"


def test_choice_defaults_are_among_the_choices(module):
    choices = module_choices()
    for name, field in module["fields"].items():
        if field["choice"] is not None and field["default"] is not None:
            assert str(ast.literal_eval(field["default"])) in choices[name], name
    assert choices["previewClass"] == ["MUS", "IMAT", "SAT", "VAT", "MSC"]
    assert choices["device"] == ["Auto", "CUDA", "MPS", "CPU"]


def test_input_selector_excludes_label_maps(ui):
    """Label maps are scalar volumes too; the CT selector must not offer them."""
    assert ui["inputVolumeSelector"]["props"]["nodeTypes"] == ["vtkMRMLScalarVolumeNode"]
    root = ET.parse(UI_PATH).getroot()
    sel = [x for x in root.iter("widget") if x.get("name") == "inputVolumeSelector"][0]
    show_child = [p for p in sel.findall("property") if p.get("name") == "showChildNodeTypes"]
    assert show_child and show_child[0].find("bool").text == "false"


def test_panel_loads_and_renders_offscreen(module, tmp_path, monkeypatch):
    pytest.importorskip("PySide6.QtUiTools")
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtGui import QImage
    from PySide6.QtWidgets import QWidget

    from render_panel import load_panel, render

    _, widget = load_panel()
    for name in sorted(module["touched"]):
        assert widget.findChild(QWidget, name) is not None, name
    out = render(tmp_path / "panel.png", width=420)
    image = QImage(str(out))
    assert image.width() == 420 and image.height() > 600
    assert len({image.pixel(x, y) for x in range(0, 420, 7) for y in range(0, 600, 7)}) > 20


def test_extension_build_carries_the_module(tmp_path):
    """Configure EPDSegmentation/CMakeLists.txt with stand-ins for Slicer's CMake macros and
    check what a built extension would carry: every module Python file, the .ui and icon,
    and the registered self-test."""
    import shutil
    import subprocess

    from render_panel import REPO

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not installed")
    out = tmp_path / "carried.txt"
    (tmp_path / "CMakeLists.txt").write_text(f"""
cmake_minimum_required(VERSION 3.16)
project(stub NONE)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/qt-scripted-modules)
set(BUILD_TESTING ON)
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${{ARGN}})
  foreach(s ${{MY_SCRIPTS}})
    file(APPEND {out} "SCRIPT ${{s}}\\n")
  endforeach()
  foreach(r ${{MY_RESOURCES}})
    file(APPEND {out} "RESOURCE ${{r}}\\n")
  endforeach()
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${{ARGN}})
  file(APPEND {out} "UNITTEST ${{MY_SCRIPT}}\\n")
endmacro()
add_subdirectory({REPO / 'EPDSegmentation'} ${{CMAKE_BINARY_DIR}}/module)
""")
    done = subprocess.run([cmake, "-S", str(tmp_path), "-B", str(tmp_path / "build")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = out.read_text().splitlines()
    scripts = {l.split(" ", 1)[1] for l in lines if l.startswith("SCRIPT ")}
    module_dir = REPO / "EPDSegmentation"
    expected = {str(p.relative_to(module_dir)) for p in module_dir.rglob("*.py")
                if "Testing" not in p.parts and "__pycache__" not in p.parts}
    assert scripts == expected
    for line in lines:
        if line.startswith("RESOURCE "):
            assert (module_dir / line.split(" ", 1)[1]).is_file(), line
    assert {"Resources/UI/EPDSegmentation.ui", "Resources/Icons/EPDSegmentation.png"} <= {
        l.split(" ", 1)[1] for l in lines if l.startswith("RESOURCE ")}
    unittests = [l.split(" ", 1)[1] for l in lines if l.startswith("UNITTEST ")]
    assert unittests == [str(module_dir / "EPDSegmentation.py")]
    top = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert f"set({key} " in top
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert "docs/panel.png" in top


def test_dicom_seg_option_is_in_export_and_starts_disabled(ui, module):
    """The DICOM SEG checkbox sits in the Export section, starts disabled with the reason as
    its tooltip (the widget enables it only for a CT from DICOM) and binds to a bool field."""
    root = ET.parse(UI_PATH).getroot()
    export = [w for w in root.iter("widget") if w.get("name") == "exportCollapsibleButton"][0]
    inside = {w.get("name") for w in export.iter("widget")}
    assert {"exportDicomSegCheckBox", "exportButton"} <= inside
    box = ui["exportDicomSegCheckBox"]
    assert box["class"] == "QCheckBox"
    assert box["props"]["SlicerParameterName"] == "exportDicomSeg"
    assert module["fields"]["exportDicomSeg"]["base"] == "bool"
    assert module["fields"]["exportDicomSeg"]["default"] == "False"
    sel = [w for w in export.iter("widget") if w.get("name") == "exportDicomSegCheckBox"][0]
    enabled = [p for p in sel.findall("property") if p.get("name") == "enabled"]
    assert enabled and enabled[0].find("bool").text == "false"
    assert box["props"]["toolTip"].startswith("DICOM SEG needs a DICOM source")
    assert "exportDicomSegCheckBox" in module["touched"]
