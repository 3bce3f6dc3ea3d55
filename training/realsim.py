"""A real CT as a patient with spinal screws, a cachectic one, or one with fattier muscle
would give it: the training randomisation's metal (metal.add_metal, screws) or thin
subcutaneous fat (randomize.thin_sat) drawn on each axial slice of a real scan, with the
reference masks changed to match; or the reference's own muscle darkened (myosteatosis),
the masks unchanged. ``evaluate-real --simulate`` uses it to measure what the phantom-only
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

SIMULATIONS = ("metal", "cachexia", "myosteatosis")

#: myosteatosis: every muscle voxel this much darker (HU), and fatty patches up to
#: MYOSTEATOSIS_PATCH_HU darker still: a patient whose muscle averages 30 HU (common at L3)
#: then averages about 5 HU, as in severe myosteatosis (older, cancer and ICU patients)
MYOSTEATOSIS_SHIFT_HU = 20.0
MYOSTEATOSIS_PATCH_HU = 30.0


def fattier_muscle(hu: np.ndarray, muscle: np.ndarray, rng: np.random.Generator,
                   pixel_mm: float) -> np.ndarray:
    """hu float32 (H, W) HU; muscle bool (H, W). A copy with the muscle darker by
    MYOSTEATOSIS_SHIFT_HU and patches (blobs about 5 to 15 mm across) darker by up to
    MYOSTEATOSIS_PATCH_HU more, as fat infiltrates muscle; nothing outside the muscle
    changes."""
    from .randomize import _smooth_field

    out = np.array(hu, np.float32)
    if muscle.any():
        blobs = np.clip(_smooth_field(hu.shape, max(2.5 / pixel_mm, 0.8), rng) - 0.3, 0.0, 1.0)
        out[muscle] -= MYOSTEATOSIS_SHIFT_HU + MYOSTEATOSIS_PATCH_HU * blobs[muscle]
    return out


def simulate(ct, what: str, seed: int, sat: Optional[np.ndarray] = None,
             muscle: Optional[np.ndarray] = None):
    """ct: a Volume (array float32 (K, J, I) HU, ijk_to_ras); sat: bool (K, J, I), the
    subcutaneous fat (a reference mask; needed by cachexia); muscle: bool (K, J, I), the
    reference's muscle (needed by myosteatosis). Returns (a new Volume, lost: bool (K, J, I),
    the voxels the drawing took from the patient's tissue, which every reference mask and
    structure map must lose).

    metal: two pedicle screws with their head and rod, and their streaks, on every slice
    with a vertebra, drawn from ``seed`` alike on every slice (the same hardware's place
    relative to each slice's vertebra); lost: the metal.
    cachexia: the subcutaneous fat over the front and flanks cut down to 1..6 mm under a new
    skin on every slice, drawn from ``seed`` alike on every slice; lost: what is cut off or
    turned into skin.
    myosteatosis: the muscle darker (fattier_muscle), its patches drawn from ``seed`` alike
    on every slice; lost: nothing (the muscle is still muscle).
    Slices go through in the training orientation (anterior up) and come back as stored."""
    if what not in SIMULATIONS:
        raise ValueError(f"--simulate is one of {', '.join(SIMULATIONS)}; got {what!r}")
    if what == "cachexia" and sat is None:
        raise ValueError("--simulate cachexia needs a --mask for SAT (the subcutaneous fat "
                         "to cut down)")
    if what == "myosteatosis" and muscle is None:
        raise ValueError("--simulate myosteatosis needs the muscle to darken: a --mask for "
                         "MUS+IMAT, or --structures (its paraspinal and psoas labels)")
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
        if what == "myosteatosis":
            array[k] = turn(fattier_muscle(hu, turn(muscle[k]), rng, pixel_mm))
            continue
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
