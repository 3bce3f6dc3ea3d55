"""Testing/tools/field_of_view.py: the tight crop it scores is the body's box and margin,
and its Dice leaves out classes absent from both."""

from __future__ import annotations

import numpy as np


def test_tight_box_is_the_body_and_its_margin_within_the_image(load_tool):
    tool = load_tool("field_of_view")
    labels = np.zeros((40, 50), np.uint8)
    labels[10:20, 5:45] = 3
    assert tool.tight_box(labels, 1.0, margin_mm=5.0) == (5, 25, 0, 50)   # clipped at the edge
    assert tool.tight_box(labels, 2.5, margin_mm=5.0) == (8, 22, 3, 47)   # 2 pixels of 2.5 mm


def test_dice_of_absent_classes_is_nan_not_zero(load_tool):
    tool = load_tool("field_of_view")
    a = np.array([[1, 1, 3], [3, 5, 5]])
    b = np.array([[1, 2, 3], [3, 5, 0]])
    assert tool.dice(a, b, (1, 2)) == 1.0
    assert np.isclose(tool.dice(a, b, (5,)), 2 / 3)
    assert np.isnan(tool.dice(a, b, (4,)))
