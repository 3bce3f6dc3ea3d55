"""A real CT as a patient with spinal screws, or a cachectic one, would give it: the training
randomisation's metal (metal.add_metal, screws) or thin subcutaneous fat
(randomize.thin_sat) drawn on each axial slice of a real scan, with the reference masks
changed to match. ``evaluate-real --simulate`` uses it to measure what the phantom-only
training of these did to a real patient's anatomy: the anatomy stays real, only what is drawn
is ours.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np
from EPDSegmentationLib.core.orientation import network_flips

from .metal import METAL_HU, add_metal
from .phantom.stats import body_mask
from .randomize import MSC, SAT, thin_sat

SIMULATIONS = ("metal", "cachexia")


def simulate(ct, what: str, seed: int, sat: Optional[np.ndarray] = None):
    """ct: a Volume (array float32 (K, J, I) HU, ijk_to_ras); sat: bool (K, J, I), the
    subcutaneous fat (a reference mask; needed by cachexia). Returns (a new Volume, lost:
    bool (K, J, I), the voxels the drawing took from the patient's tissue, which every
    reference mask and structure map must lose).

    metal: two pedicle screws with their head and rod, and their streaks, on every slice
    with a vertebra, drawn from ``seed`` alike on every slice (the same hardware's place
    relative to each slice's vertebra); lost: the metal.
    cachexia: the subcutaneous fat over the front and flanks cut down to 1..6 mm under a new
    skin on every slice, drawn from ``seed`` alike on every slice; lost: what is cut off or
    turned into skin. Slices go through in the training orientation (anterior up) and come
    back as stored."""
    if what not in SIMULATIONS:
        raise ValueError(f"--simulate is one of {', '.join(SIMULATIONS)}; got {what!r}")
    if what == "cachexia" and sat is None:
        raise ValueError("--simulate cachexia needs a --mask for SAT (the subcutaneous fat "
                         "to cut down)")
    flip_rows, flip_cols, _ = network_flips(ct.ijk_to_ras)
    si, sj, _ = ct.spacing
    pixel_mm = float(np.sqrt(si * sj))

    def turn(a):
        return a[::-1 if flip_rows else 1, ::-1 if flip_cols else 1]

    array = np.array(ct.array, np.float32)
    lost = np.zeros(array.shape, bool)
    for k in range(array.shape[0]):
        hu = np.ascontiguousarray(turn(array[k]))
        labels = np.where(body_mask(hu, pixel_mm), MSC, 0).astype(np.uint8)
        rng = np.random.default_rng(seed)
        if what == "metal":
            new_hu, new_labels = add_metal(hu, labels, rng, pixel_mm, kind="screws")
            gone = (new_hu >= METAL_HU[0]) & ~(hu >= METAL_HU[0])
        else:
            labels[turn(sat[k]) & (labels > 0)] = SAT
            new_hu, new_labels = thin_sat(hu, labels, rng, pixel_mm)
            gone = new_labels != labels
        array[k] = turn(new_hu)
        lost[k] = turn(gone)
    return replace(ct, array=array), lost
