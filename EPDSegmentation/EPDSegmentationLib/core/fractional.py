"""Slicer's fractional labelmap values, the one encoding of soft labels in our files and
nodes: a probability p in 0..1 is stored as int8 round(216 p - 108) in -108..108
(vtkPolyDataToFractionalLabelmapFilter.h: probability 0 -> -108, 1 -> 108; 216 steps),
rounded half to even, in float32 arithmetic.

Used by the streamed .seg.nrrd (core.stream), the whole-array writer (io.seg_nrrd) and the
MRML segments (mrml.segmentation). NumPy only.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

FRACTIONAL_MIN, FRACTIONAL_MAX = -108, 108
FRACTIONAL_STEPS = FRACTIONAL_MAX - FRACTIONAL_MIN


def encode_fractional(probabilities, out: Optional[np.ndarray] = None,
                      scratch: Optional[np.ndarray] = None, clamp: bool = True) -> np.ndarray:
    """Probabilities (any shape, 0..1; a little outside is clamped) -> int8 codes, written
    into ``out`` (any int8 array of that shape, a strided view included) or a new array.
    scratch: a float32 array of that shape to compute in (else one is made). Clamping the
    scaled values rather than the probabilities gives the same codes (216 p - 108 is
    monotonic) and saves a pass. clamp=False skips it for probabilities known to lie within
    0.5 / FRACTIONAL_STEPS of 0..1, which round into -108..108 unclamped (a pass less)."""
    p = np.asarray(probabilities)
    q = np.multiply(p, np.float32(FRACTIONAL_STEPS), out=scratch, dtype=np.float32)
    q += np.float32(FRACTIONAL_MIN)
    if clamp:
        np.clip(q, FRACTIONAL_MIN, FRACTIONAL_MAX, out=q)
    np.rint(q, out=q)
    if out is None:
        return q.astype(np.int8)
    # one plane at a time: into a classes-fastest view (the .seg.nrrd's order) that copies
    # 4 times faster than one copy of the whole (docs/benchmarks.md)
    if q.ndim > 1:
        for c in range(q.shape[0]):
            np.copyto(out[c], q[c], casting="unsafe")
    else:
        np.copyto(out, q, casting="unsafe")
    return out


def decode_fractional(values) -> np.ndarray:
    """int8 codes -> float32 probabilities (step 1/216), clipped to 0..1."""
    v = np.asarray(values, np.float32)
    return np.clip((v - FRACTIONAL_MIN) / FRACTIONAL_STEPS, 0.0, 1.0)
