"""Fixtures of the MRML tests: a real vtkMRMLScene with the segmentation converter rules
(slicer-core wheel); every test in this folder skips without slicer-core."""

from __future__ import annotations

import pytest

pytest.importorskip("slicer")

from scene import Scene  # noqa: E402


@pytest.fixture
def mrml():
    s = Scene()
    yield s
    s.close()


@pytest.fixture(scope="module")
def tiny_model(tiny_model_path):
    """(model, card) of the tiny random-weight model (conftest one level up)."""
    from EPDSegmentationLib.core.model_io import load_model

    return load_model(tiny_model_path)
