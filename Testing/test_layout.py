"""House rules that keep the module loadable inside Slicer and the layout honest."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_FILES = sorted((REPO / "EPDSegmentation").rglob("*.py"))
LIB_FILES = sorted((REPO / "EPDSegmentation" / "EPDSegmentationLib").rglob("*.py"))


@pytest.mark.parametrize("path", MODULE_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_module_code_parses_as_python_3_9(path):
    """Slicer's embedded Python may be 3.9: no match statements or newer syntax."""
    source = path.read_text()
    ast.parse(source, filename=str(path), feature_version=(3, 9))
    if source.strip() and not path.name == "__init__.py":
        assert "from __future__ import annotations" in source, \
            f"{path.name} must start with 'from __future__ import annotations'"


def _project_imports(path: Path):
    """Absolute dotted names of the EPDSegmentationLib / training modules a file imports
    (relative imports resolved), and the top-level names of everything else."""
    rel = path.relative_to(REPO)
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "EPDSegmentation" and parts[1] == "EPDSegmentationLib":
        parts = parts[1:]
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                yield ".".join(base + ([node.module] if node.module else []))
            elif node.module:
                yield node.module


#: Each layer of EPDSegmentationLib and what it may import of the project (core <- io <-
#: cli, mrml). Only mrml/ imports slicer or vtk; no layer imports Qt or training.
LAYERS = {
    "core": ("EPDSegmentationLib.core",),
    "io": ("EPDSegmentationLib.core", "EPDSegmentationLib.io"),
    "cli": ("EPDSegmentationLib.core", "EPDSegmentationLib.io", "EPDSegmentationLib.cli"),
    "mrml": ("EPDSegmentationLib.core", "EPDSegmentationLib.io", "EPDSegmentationLib.mrml"),
}
QT = {"qt", "PyQt5", "PySide2", "PySide6", "ctk", "slicer.qt"}


def test_every_library_file_is_in_a_layer():
    loose = [p.name for p in LIB_FILES if p.parent.name == "EPDSegmentationLib"
             and p.name != "__init__.py"]
    assert not loose, f"put {loose} into one of the layer folders {sorted(LAYERS)}"
    assert {p.parent.name for p in LIB_FILES} - {"EPDSegmentationLib"} == set(LAYERS)


@pytest.mark.parametrize("path", LIB_FILES, 
                         ids=lambda p: str(p.relative_to(REPO / "EPDSegmentation")))
def test_layer_imports_point_one_way(path):
    layer = path.parent.name
    if layer == "EPDSegmentationLib":
        return
    allowed = LAYERS[layer]
    for name in _project_imports(path):
        top = name.split(".")[0]
        assert top not in QT and name not in QT, f"{path.name} imports {name}: no Qt in the library"
        if top in ("slicer", "vtk"):
            assert layer == "mrml", f"{layer}/{path.name} imports {name}: only mrml/ imports slicer or vtk"
        if top == "training":
            raise AssertionError(f"{layer}/{path.name} imports {name}: the library never uses training")
        if top == "EPDSegmentationLib" and name != "EPDSegmentationLib":
            assert name in allowed or name.startswith(tuple(a + "." for a in allowed)), \
                f"{layer}/{path.name} imports {name}: {layer} may use only {', '.join(LAYERS[layer])}"


def test_module_file_uses_only_the_library():
    """EPDSegmentation.py (and so the self-test) needs nothing from training/, which Slicer
    users do not get."""
    names = list(_project_imports(REPO / "EPDSegmentation" / "EPDSegmentation.py"))
    assert not [n for n in names if n.split(".")[0] == "training"]


def test_phantom_is_not_shipped_to_slicer():
    assert not (REPO / "EPDSegmentation" / "EPDSegmentationLib" / "phantom").exists()
    assert (REPO / "training" / "phantom" / "__init__.py").is_file()


def test_core_imports_without_torch_or_slicer():
    """Importing the NumPy core must not pull in torch, Qt or slicer (Slicer may lack torch)."""
    code = ("import sys, EPDSegmentationLib.core.epd, EPDSegmentationLib.core.classes, "
            "EPDSegmentationLib.core.windowing, EPDSegmentationLib.core.volume, "
            "EPDSegmentationLib.core.model_card; "
            "bad = [m for m in ('torch', 'slicer', 'qt', 'PySide6') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_module_file_imports_no_torch():
    """What EPDSegmentation.py imports at load time must not pull in torch: Slicer starts
    the module before the PyTorch extension has installed it."""
    code = ("import sys, EPDSegmentationLib.core.inference, EPDSegmentationLib.mrml.workflow, "
            "EPDSegmentationLib.mrml.preview, EPDSegmentationLib.mrml.nodes, "
            "EPDSegmentationLib.mrml.views, EPDSegmentationLib.core.resources; "
            "sys.exit('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci
    assert "make run" in readme
