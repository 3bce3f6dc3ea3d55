"""A labelled CT phantom of the abdomen at L3 (and, on request, of the torso from T11 to S1),
with the exact per-pixel class fractions.

    from training.phantom import make_slice, subject_slices, write_dataset
    s = make_slice(seed=3)          # 512 x 512, HU, labels 0..5, true fractions (6, H, W)
    t = make_slice(seed=3, level="T12")                   # upper abdomen (torso.py)
    stack = subject_slices(3, 6, 5.0, levels=("T11", "L4"))

Command line: ``python -m training.phantom --help`` (contact sheet, bundled
sample, datasets, statistics).
"""

from __future__ import annotations

from .dataset import write_dataset
from .generate import PhantomSlice, make_slice, subject_slices

__all__ = ["PhantomSlice", "make_slice", "subject_slices", "write_dataset"]
