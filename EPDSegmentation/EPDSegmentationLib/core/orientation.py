"""The in-plane orientation the network was trained in, and the flips that bring a volume's
axial slices into it.

Every training slice (the phantom, training/phantom) has row 0 anterior and column 0 on the
patient's right: the radiological view, and what an axial DICOM series with the usual
orientation stores. A volume stored the other way round (a NIfTI in RAS+ order, as
TotalSegmentator and nibabel write them, has rows running posterior -> anterior and columns
left -> right) would reach the network upside down and mirrored: the spine
on top, where it never saw it. So the (J, I) planes are flipped before the network and the
probabilities flipped back after it; nothing is resampled.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np


def network_flips(ijk_to_ras) -> Tuple[bool, bool, List[str]]:
    """ijk_to_ras (4, 4) RAS mm -> (flip rows J, flip columns I, notes).

    Rows are flipped when the J axis points anterior (RAS +y), columns when the I axis points
    to the patient's right (RAS +x), as column 0 must be the right side. Only the dominant component of each axis counts
    (oblique scans); when the in-plane axes are not the x and y axes (a sagittal or coronal
    stack, or transposed axes) nothing is flipped and a note says so."""
    m = np.asarray(ijk_to_ras, np.float64)[:3, :3]
    d = m / np.maximum(np.linalg.norm(m, axis=0), 1e-12)[None, :]
    ai, aj = int(np.argmax(np.abs(d[:, 0]))), int(np.argmax(np.abs(d[:, 1])))
    if (ai, aj) != (0, 1):
        return False, False, ["slices are not axial with columns left-right and rows "
                              "front-back; used as stored (the network was trained on "
                              "axial slices, anterior up, patient's right on the left)"]
    flip_rows, flip_cols = bool(d[1, 1] > 0), bool(d[0, 0] > 0)
    notes = []
    if flip_rows or flip_cols:
        what = " and ".join(w for w, f in (("rows (anterior up)", flip_rows),
                                            ("columns (patient's right on the left)", flip_cols))
                            if f)
        notes.append(f"slices flipped for the network: {what}; results flipped back")
    return flip_rows, flip_cols, notes
