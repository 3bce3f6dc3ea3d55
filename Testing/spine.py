"""A synthetic torso CT with a lumbar spine of known levels (for the level and cohort tests):
vertebral bodies and discs of fixed heights, iliac wings below the crest, thin ribs above L1."""

from __future__ import annotations

import numpy as np

from EPDSegmentationLib.core.volume import ijk_to_ras_matrix

BODY_MM = 28.0      # vertebral body height
DISC_MM = 9.0       # disc height
L5_BOTTOM_MM = 60.0  # above the bottom of the volume
CREST_MM = L5_BOTTOM_MM + BODY_MM + 0.5 * DISC_MM + 10.0   # crest at the L4 body's bottom


def level_centre_mm(i_from_l5: int) -> float:
    """z (mm above the volume's bottom) of the middle of L5 (0), L4 (1), L3 (2), ..."""
    return L5_BOTTOM_MM + i_from_l5 * (BODY_MM + DISC_MM) + BODY_MM / 2


def synthetic_ct(slice_mm: float, pixel_mm: float, z_mm=(0.0, 260.0), pelvis=True,
                 rng_seed=0) -> tuple:
    """A torso (K, J, I) in HU with a lumbar spine of known levels, J posterior->anterior,
    K inferior->superior; iliac wings below CREST_MM when ``pelvis``; thin ribs above L1."""
    rng = np.random.default_rng(rng_seed)
    zs = np.arange(z_mm[0], z_mm[1], slice_mm) + slice_mm / 2
    n = int(round(360 / pixel_mm))
    x = (np.arange(n) - n / 2 + 0.5) * pixel_mm                 # mm, left-right
    y = (np.arange(n) - n / 2 + 0.5) * pixel_mm                 # mm, posterior->anterior
    X, Y = np.meshgrid(x, y)                                   # (J, I)
    out = np.full((len(zs), n, n), -1000.0, np.float32)
    body = (X / 160) ** 2 + (Y / 115) ** 2 <= 1
    inner = (X / 145) ** 2 + (Y / 100) ** 2 <= 1
    spine_y = -45.0                                            # body centre, mm
    vb = (X / 22) ** 2 + ((Y - spine_y) / 16) ** 2 <= 1
    vb_in = (X / 19) ** 2 + ((Y - spine_y) / 13) ** 2 <= 1
    post = (np.abs(X) < 6) & (Y < spine_y - 22) & (Y > spine_y - 50)
    period = BODY_MM + DISC_MM
    for k, z in enumerate(zs):
        s = out[k]
        s[body] = -100
        s[inner] = 40
        rel = (z - L5_BOTTOM_MM) % period
        level = (z - L5_BOTTOM_MM) // period
        if z >= L5_BOTTOM_MM - DISC_MM and level < 7:
            if rel < BODY_MM:                                  # a vertebral body
                s[vb] = 400
                s[vb_in] = 140
                s[post] = 500
            else:                                              # a disc
                s[vb] = 80
        elif z < L5_BOTTOM_MM - DISC_MM:                       # the sacrum
            s[vb] = 300
        if pelvis and z < CREST_MM:
            wing = (np.abs(X) > 70) & (np.abs(X) < 120) & (np.abs(Y + 20) < 12)
            s[wing] = 450
        if z > level_centre_mm(5) - 20:                        # rib cross-sections
            for sign in (-1, 1):
                for cx, cy in ((95, -40), (130, 10), (110, 60)):
                    s[((X - sign * cx) ** 2 + (Y - cy) ** 2) <= 25] = 450
    out += rng.normal(0, 12, out.shape).astype(np.float32)
    m = ijk_to_ras_matrix((pixel_mm, pixel_mm, slice_mm), (0.0, y[0], zs[0]))
    return out, m, zs
