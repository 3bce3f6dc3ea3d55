"""The field of view the network sees: slices whose content fills the image are padded with
air before the network and cropped back after it.

The network normalises its features over the whole image (GroupNorm), so what it calls a
pixel depends on how much of the image is body. Its training phantoms lie in a square
field of view 70 to 150 mm wider than the body (training/phantom/subject.py): their
content (HU above CONTENT_HU: body, arms, table) spans a median 0.62 of the image from
front to back. A scan reconstructed tight to the body, or cropped, fills it edge to edge;
on held-out phantoms cropped so, the muscle Dice fell from 0.933 to 0.886 and SAT from
0.906 to 0.826, and padding them with air to that share restored 0.932 and 0.904
(Testing/tools/field_of_view.py; docs/model.md, "The field of view"). The card's
``field`` (``training field``) holds the share; a card without it runs as before.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from .windowing import AIR_HU

#: HU above which a pixel is content (body, arms, table), not air
CONTENT_HU = -500.0
#: the padded field's side is a multiple of this, mm
QUANTUM_MM = 32.0

#: the card's field
KEY = "field"

Padding = Tuple[Tuple[int, int], Tuple[int, int]]
NO_PADDING: Padding = ((0, 0), (0, 0))


def check_field(spec: Any) -> Optional[str]:
    """What is wrong with a card's field, or None."""
    if not isinstance(spec, Mapping):
        return "field must be an object with content_share"
    share = spec.get("content_share")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share <= 1.0:
        return f"field content_share must be a number in (0, 1]; got {share!r}"
    return None


def content_share(card: Mapping[str, Any]) -> Optional[float]:
    """The card's largest share of the rows the content may span, or None (no padding)."""
    spec = card.get(KEY)
    if spec is None:
        return None
    problem = check_field(spec)
    if problem is not None:
        raise ValueError(problem)
    return float(spec["content_share"])


def parameters(card: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The card's field less its command and report (what provenance, DICOM SEG and the
    model version record: the same weights with another field give other numbers), or None
    when the card has none."""
    spec = card.get(KEY)
    if not isinstance(spec, Mapping):
        return None
    return {k: v for k, v in spec.items() if k not in ("command", "measured_on")}


def field_padding(hu: np.ndarray, pixel_mm: Sequence[float],
                  card: Mapping[str, Any]) -> Padding:
    """((top, bottom), (left, right)) pixels of air to add to HU slices (n, J, I) in the
    network's orientation (rows front to back), pixel_mm (row, col) in mm.

    With the card's share s, where the content's extent from front to back (over the
    slices given: call it per slice, so that a slice's result does not depend on others)
    is more than s of the rows: the field is padded to a square of side extent / s, rounded
    up to QUANTUM_MM (so that the slices of a scan mostly share one field and run in
    one batch), and never narrower than it is; split evenly, the odd pixel at the bottom or
    right. Nothing is padded without a share, without content, or where the rows already
    leave the content within s."""
    share = content_share(card)
    if share is None or hu.size == 0:
        return NO_PADDING
    rows = np.flatnonzero((np.asarray(hu) > CONTENT_HU).any(axis=(0, 2)))
    if rows.size == 0:
        return NO_PADDING
    dr, dc = float(pixel_mm[0]), float(pixel_mm[1])
    j, i = int(hu.shape[1]), int(hu.shape[2])
    needed_mm = (int(rows[-1]) - int(rows[0]) + 1) * dr / share
    if needed_mm <= j * dr * (1.0 + 1e-6):
        return NO_PADDING
    side_mm = math.ceil(max(needed_mm, j * dr, i * dc) / QUANTUM_MM - 1e-9) * QUANTUM_MM
    pj = max(0, math.ceil(side_mm / dr - 1e-6) - j)
    pi = max(0, math.ceil(side_mm / dc - 1e-6) - i)
    return (pj // 2, pj - pj // 2), (pi // 2, pi - pi // 2)


def pad_slab(hu: np.ndarray, padding: Padding) -> np.ndarray:
    """(n, J, I) HU -> (n, J + top + bottom, I + left + right) with air around; the same
    array when nothing is padded."""
    if padding == NO_PADDING:
        return hu
    return np.pad(hu, ((0, 0),) + tuple(padding), mode="constant",
                  constant_values=np.asarray(AIR_HU, dtype=hu.dtype))


def describe(share: float) -> str:
    """One line for notes: that slices were padded, and why."""
    return (f"slices whose content spans more than {share:.2f} of the rows front to back "
            f"(more than the training phantoms') padded with air to a square field for the "
            f"network, and cropped back")
