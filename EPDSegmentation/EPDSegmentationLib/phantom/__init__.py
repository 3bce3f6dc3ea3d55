"""A labelled CT phantom of the abdomen at L3, with the exact per-pixel class fractions.

    from EPDSegmentationLib.phantom import make_slice, subject_slices, write_dataset
    s = make_slice(seed=3)          # 512 x 512, HU, labels 0..5, true fractions (6, H, W)

Command line: ``python -m EPDSegmentationLib.phantom --help`` (contact sheet, bundled
sample, datasets, statistics).
"""

from __future__ import annotations

from .dataset import write_dataset
from .generate import PhantomSlice, make_slice, subject_slices

__all__ = ["PhantomSlice", "make_slice", "subject_slices", "write_dataset"]
