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


def _imported_modules(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node


@pytest.mark.parametrize("path", LIB_FILES, ids=lambda p: p.name)
def test_core_never_imports_qt(path):
    for name, _ in _imported_modules(path):
        assert name not in {"qt", "PyQt5", "PySide2", "PySide6", "ctk", "slicer.qt"}, \
            f"{path.name} imports {name}: the core must run without Qt"


def test_core_imports_without_torch_or_slicer():
    """Importing the NumPy core must not pull in torch, Qt or slicer (Slicer may lack torch)."""
    code = ("import sys, EPDSegmentationLib.core.epd, EPDSegmentationLib.core.classes, "
            "EPDSegmentationLib.core.windowing, EPDSegmentationLib.core.volume; "
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
