"""A small built-in axial label map with every tissue class, for the demo and quick checks.

Drawn from ellipses and thin streaks (no randomness), 0.78 mm pixels: a body with a
subcutaneous fat ring, an abdominal wall and back muscles with intermuscular fat streaks, a
visceral fat core with organs in it. A stand-in until the realistic phantom is used.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

PIXEL_MM = 0.78


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    y, x = yy - cy, xx - cx
    u, v = x * c + y * s, -x * s + y * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def example_labels(shape: Tuple[int, int] = (512, 512)) -> np.ndarray:
    """uint8 labels (H, W) with classes 0..5 (see classes.py), scaled to ``shape``."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy, xx = yy * 512.0 / h, xx * 512.0 / w  # draw in 512 x 512 units
    lab = np.zeros(shape, np.uint8)
    body = _ellipse(yy, xx, 260, 256, 150, 205)
    lab[body] = 3  # SAT
    inner = _ellipse(yy, xx, 262, 256, 128, 180)
    lab[inner] = 1  # muscle wall
    cavity = _ellipse(yy, xx, 258, 256, 112, 162)
    lab[cavity] = 4  # VAT
    for cy, cx, ry, rx in ((215, 200, 40, 45), (220, 318, 38, 42), (290, 180, 28, 22),
                           (290, 332, 28, 22), (240, 256, 22, 30)):
        lab[_ellipse(yy, xx, cy, cx, ry, rx)] = 5  # organs
    # back muscles and psoas, with the spine between them
    for cx in (200, 312):
        lab[_ellipse(yy, xx, 345, cx, 32, 45)] = 1
    for cx in (225, 287):
        lab[_ellipse(yy, xx, 300, cx, 20, 16)] = 1
    lab[_ellipse(yy, xx, 305, 256, 24, 26)] = 5  # vertebral body
    lab[_ellipse(yy, xx, 350, 256, 28, 10)] = 5  # posterior elements
    # intermuscular fat: thin streaks and small islands inside muscle
    muscle = lab == 1
    streak = np.zeros(shape, bool)
    for i, angle in enumerate(np.linspace(0.2, 2.9, 9)):
        cy, cx = 345 if i % 2 else 262, 200 + 14 * i
        streak |= _ellipse(yy, xx, cy, cx, 1.2, 14, angle)
    for cy, cx in ((338, 190), (352, 322), (300, 230), (140, 256), (380, 256)):
        streak |= _ellipse(yy, xx, cy, cx, 3, 4)
    lab[streak & muscle] = 2
    return lab
