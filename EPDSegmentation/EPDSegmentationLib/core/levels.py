"""Vertebral levels (T12 to L5) in an axial CT, without a network: anatomy rules on HU.

How (all sizes in mm, so 3 mm and thin-slice CT take the same path):

1. Orientation from IJK-to-RAS: slices must be axial; the array is turned so that K runs
   inferior -> superior and J posterior -> anterior.
2. The iliac crests: lateral bone (> 180 HU, more than 60 mm from the midline) forming a
   large piece on both sides; ribs are cut as small pieces and never qualify. The top of the
   lowest run of such slices is the crest, which lies at the L4 body or the L4/L5 disc
   (Tuffier's line). No crest in the scan: the vertebrae cannot be counted and we refuse.
3. The vertebral body column: per slice, the brightest point of the blurred midline
   sagittal image (in cancellous bone of low density, the posterior wall and pedicles),
   smoothed along z. The mean HU of a box from 5 mm behind to 20 mm in front of it (the
   front of the body, clear of the facet joints) is the body profile; intervertebral discs (~80 HU)
   make it dip. Single minima are unreliable (the basivertebral vein, tilted endplates), so
   the discs are fitted as a comb: evenly spaced teeth (period 24..42 mm, any phase) where
   the profile is lowest against the bodies half a period away, from 30 mm below the
   crest to 200 mm above it.
4. Counting: the highest disc at or below crest + 10 mm is L4/L5; the discs above are
   L3/L4, L2/L3, ... and each level's centre is the midpoint of its two discs (L5: above the
   L4/L5 disc by the mean disc spacing). A level whose upper disc lies outside the scan is
   not reported.

Validated only on one real CT (TotalSegmentator test data, 3 mm) and synthetic volumes
(Testing/test_levels.py); see docs/cohort.md for the measured errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

#: Levels reported, inferior to superior.
LEVELS = ("L5", "L4", "L3", "L2", "L1", "T12")
#: A model card's per-level evaluation on real CT (``training evaluate-real``) names the
#: slices past L5 (the sacrum and the pelvis, where the phantoms end) so.
BELOW_L5 = "below L5"
BONE_HU = 180.0
BODY_HU = -400.0
LATERAL_MM = 60.0          # iliac bone lies further than this from the midline
ILIAC_SIDE_MM2 = 100.0     # each side's largest lateral piece, per slice, at least
ILIAC_BOTH_MM2 = 250.0     # both sides together, at least
ILIAC_WING_MM2 = 600.0     # somewhere in the run, each side: a wing, never a rib
PERIOD_MM = (24.0, 42.0)   # one vertebral body plus its disc, adult T11..L5
SPINE_SPAN_MM = 200.0      # the comb is fitted from 30 mm below the crest to this above
CREST_TOLERANCE_MM = 10.0


class LevelError(ValueError):
    """The levels cannot be found in this volume (the message says why, for a person)."""


@dataclass
class Levels:
    """Vertebral levels found in a volume.

    ``centres``: level name -> slice index K (float, the volume's own K order) of the middle
    of the vertebral body; ``discs``: K of the discs found (inferior to superior, with their
    names in ``disc_names``); ``crest_k``: K of the top of the iliac crests; ``sagittal``:
    the midline sagittal HU image (K, J) in the volume's K order, for the picture;
    ``notes``: how it was found."""

    centres: Dict[str, float]
    discs: List[float]
    disc_names: List[str]
    crest_k: float
    sagittal: np.ndarray = field(repr=False, default=None)
    notes: List[str] = field(default_factory=list)

    def slice_of(self, level: str) -> int:
        """The nearest slice index K to the centre of ``level`` (e.g. "L3")."""
        level = level.upper()
        if level not in self.centres:
            found = ", ".join(k for k in LEVELS if k in self.centres) or "none"
            raise LevelError(f"level {level} is not covered by this scan (found: {found})")
        return int(round(self.centres[level]))


def _orientation(ijk_to_ras: np.ndarray) -> Tuple[int, int]:
    """(+1/-1 for K towards superior, +1/-1 for J towards anterior); LevelError unless the
    volume is axial with I along left-right and J along posterior-anterior."""
    d = np.asarray(ijk_to_ras, np.float64)[:3, :3]
    d = d / np.linalg.norm(d, axis=0)[None, :]
    if abs(d[2, 2]) < 0.9 or abs(d[1, 1]) < 0.9 or abs(d[0, 0]) < 0.9:
        raise LevelError("the slices are not axial (levels are found on axial CT only)")
    return int(np.sign(d[2, 2])), int(np.sign(d[1, 1]))


def _largest_piece_mm2(mask2d: np.ndarray, pixel_mm2: float) -> float:
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask2d)
    return 0.0 if n == 0 else float(np.bincount(lab.ravel())[1:].max()) * pixel_mm2


def _crest(hu: np.ndarray, x_mm: np.ndarray, pixel_mm2: float, sk: float) -> Optional[int]:
    """K (canonical, inferior first) of the top of the iliac crests, or None."""
    left = (x_mm < -LATERAL_MM)[None, :]
    right = (x_mm > LATERAL_MM)[None, :]
    sizes = np.array([[_largest_piece_mm2((s > BONE_HU) & side, pixel_mm2)
                       for side in (left, right)] for s in hu])
    pelvic = (sizes.min(axis=1) >= ILIAC_SIDE_MM2) & (sizes.sum(axis=1) >= ILIAC_BOTH_MM2)
    ks = np.nonzero(pelvic)[0]
    if len(ks) == 0:
        return None
    # the lowest run, bridging gaps shorter than 10 mm (thin bone near the crest)
    gap = max(1, int(round(10.0 / sk)))
    top = ks[0]
    for k in ks[1:]:
        if k - top > gap:
            break
        top = k
    run = slice(ks[0], top + 1)
    if top - ks[0] + 1 < max(2, 15.0 / sk) or sizes[run].min(axis=1).max() < ILIAC_WING_MM2:
        return None
    return int(top)


def _body_profile(hu: np.ndarray, x_mm: np.ndarray, spacing: Tuple[float, float, float]
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """(profile (K,) mean HU of a box in the vertebral body per slice, body centre J (K,)).

    The body centre per slice is the brightest point of the midline sagittal image blurred
    by 6 mm (the vertebral body is the largest bone mass there), behind the middle of the
    body outline; it is median-filtered over 45 mm along z so that discs do not move it."""
    from scipy import ndimage as ndi

    si, sj, sk = spacing
    K, J, _ = hu.shape
    sag = hu[:, :, np.abs(x_mm) <= 10.0].mean(axis=2)                 # (K, J)
    blur = ndi.gaussian_filter(np.clip(sag, -200.0, 600.0), (6.0 / sk, 6.0 / sj))
    centre = np.full(K, np.nan)
    for k in range(K):
        body = np.nonzero(hu[k] > BODY_HU)[0]
        if len(body) == 0:
            continue
        # in thin people the spine reaches the middle of the body outline
        mid = int(0.5 * (body.min() + body.max()) + 25.0 / sj) + 1
        j = int(np.argmax(blur[k, body.min():mid])) + body.min()
        if blur[k, j] > 100.0:
            centre[k] = j
    ok = np.isfinite(centre)
    if ok.sum() < 3:
        raise LevelError("no vertebral column found (no bone in the midline behind the "
                         "middle of the body)")
    centre = np.interp(np.arange(K), np.nonzero(ok)[0], centre[ok])
    centre = ndi.median_filter(centre, size=max(3, int(round(45.0 / sk)) | 1), mode="nearest")
    depth = np.arange(J)[None, :]
    # anterior of the bright point: facet joints and laminae, bright at the disc levels too,
    # lie behind it; the discs show best in the front two thirds of the body
    box = ((depth >= centre[:, None] - 5.0 / sj)
           & (depth <= centre[:, None] + 20.0 / sj))                    # (K, J)
    profile = np.array([sag[k, box[k]].mean() if box[k].any() else np.nan
                        for k in range(K)])
    profile = np.where(np.isfinite(profile), profile, np.nanmean(profile))
    profile = ndi.gaussian_filter1d(profile, max(0.5, 2.0 / sk), mode="nearest")
    return profile, centre


def _disc_comb(profile: np.ndarray, lo: float, hi: float, sk: float
               ) -> Optional[np.ndarray]:
    """Positions K (floats) of evenly spaced discs between lo and hi minimising the mean of
    ``profile`` at them; None when fewer than three fit."""
    ks = np.arange(len(profile), dtype=np.float64)
    best: Optional[Tuple[float, np.ndarray]] = None
    for period in np.arange(PERIOD_MM[0], PERIOD_MM[1], 0.3) / sk:
        for phase in np.arange(0.0, period, 0.5 / sk):
            teeth = np.arange(lo + phase, hi + 1e-9, period)
            if len(teeth) < 3:
                continue
            # discs low against the bodies half a period away: contrast, not level
            mids = teeth[:-1] + period / 2.0
            score = float(np.interp(teeth, ks, profile).mean()
                          - np.interp(mids, ks, profile).mean())
            if best is None or score < best[0]:
                best = (score, teeth)
    return None if best is None else best[1]


def find_levels(hu, ijk_to_ras) -> Levels:
    """Find T12..L5 in a CT volume ``hu`` (K, J, I) in HU with its IJK-to-RAS matrix (mm).

    Raises LevelError (a sentence for a person) when the levels cannot be counted: not axial,
    no iliac crest in the scan (a chest-only scan, one that stops above the pelvis), or no
    discs found."""
    hu = np.asarray(hu, np.float32)
    if hu.ndim != 3 or hu.shape[0] < 3:
        raise LevelError(f"levels need a volume of several slices; got shape {hu.shape}")
    up, ant = _orientation(ijk_to_ras)
    m = np.asarray(ijk_to_ras, np.float64)
    si, sj, sk = (float(s) for s in np.linalg.norm(m[:3, :3], axis=0))
    K = hu.shape[0]
    canon = hu[::up, ::ant]                                # K inferior->superior, J post->ant

    body = canon > BODY_HU
    cols = [np.nonzero(b)[1].mean() for b in body if b.sum() * si * sj > 2000.0]
    if not cols:
        raise LevelError("no body found (nothing above -400 HU)")
    x_mm = (np.arange(hu.shape[2]) - float(np.median(cols))) * si

    crest = _crest(canon, x_mm, si * sj, sk)
    if crest is None:
        raise LevelError("the scan does not reach the iliac crests (pelvis), which are "
                         "needed to count the lumbar vertebrae; a chest-only scan or one "
                         "that stops above the pelvis cannot be levelled")
    profile, front = _body_profile(canon, x_mm, (si, sj, sk))
    lo = max(0.0, crest - 30.0 / sk)
    hi = min(K - 1.0, crest + SPINE_SPAN_MM / sk)
    teeth = _disc_comb(profile, lo, hi, sk)
    if teeth is None:
        raise LevelError("the scan covers too little of the lumbar spine above the iliac "
                         "crests to find the discs (at least three are needed)")
    below = [t for t in teeth if t <= crest + CREST_TOLERANCE_MM / sk]
    if not below:
        raise LevelError("no intervertebral disc found at or below the iliac crests "
                         "(the L4/L5 disc); cannot count the lumbar vertebrae")
    discs = [float(t) for t in teeth[len(below) - 1:]]
    names = ["L4/L5", "L3/L4", "L2/L3", "L1/L2", "T12/L1", "T11/T12"][: len(discs)]
    discs = discs[: len(names)]
    centres: Dict[str, float] = {}
    for i, level in enumerate(LEVELS[1:]):                  # L4 between discs 0 and 1...
        if i + 1 < len(discs):
            centres[level] = 0.5 * (discs[i] + discs[i + 1])
    gaps = np.diff(discs)
    if len(gaps) and discs[0] - float(np.mean(gaps)) / 2 >= 0:
        centres["L5"] = discs[0] - float(np.mean(gaps)) / 2
    if up < 0:                                              # back to the volume's K order
        centres = {k: K - 1 - v for k, v in centres.items()}
        discs = [K - 1 - d for d in discs]
        crest = K - 1 - crest
    sag = hu[:, :, np.abs(x_mm) <= 5.0].mean(axis=2)
    notes = [f"iliac crest top at slice {crest}",
             "discs at slices " + ", ".join(f"{n} {d:.1f}" for n, d in zip(names, discs))]
    return Levels(centres, discs, names[: len(discs)], float(crest), sag, notes)


def level_slices(levels: Levels, level: str, n_slices: int, slice_mm: float,
                 slab_mm: Optional[float] = None) -> List[int]:
    """Slice indices K for ``level``: the centre slice, or every slice whose centre lies
    within ``slab_mm`` / 2 of the level's centre (a slab of that thickness, mm)."""
    centre = levels.centres.get(level.upper())
    k0 = levels.slice_of(level)
    if not slab_mm:
        return [k0]
    if slab_mm <= 0:
        raise ValueError(f"--slab-mm must be > 0 mm; got {slab_mm:g}")
    half = slab_mm / 2.0 / slice_mm
    ks = [k for k in range(n_slices) if abs(k - centre) <= half + 1e-9]
    return ks or [k0]
