"""The MRML test helpers themselves: converter rules present, soft maps are probabilities."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer")

from EPDSegmentationLib.core.classes import NUM_CLASSES  # noqa: E402
from scene import label_stack, soft_maps  # noqa: E402


def test_scene_has_converter_rules(mrml):
    """Without the rules AddEmptySegment fails ("Unable to construct empty representation")."""
    seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert seg.GetSegmentation().AddEmptySegment("x") == "x"
    assert seg.GetSegmentation().GetSegment("x").GetRepresentation("Binary labelmap") is not None


def test_soft_maps_are_probabilities():
    p = soft_maps(label_stack(2, 32))
    assert p.shape == (NUM_CLASSES, 2, 32, 32)
    np.testing.assert_allclose(p.sum(axis=0), 1.0, atol=1e-5)
    assert 0 < np.mean((p > 0.01) & (p < 0.99)) < 0.5     # soft at the edges only
