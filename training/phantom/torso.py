"""The torso anatomy (``anatomy="torso"``): T11 to S1, the upper abdomen and the lower chest.

The default ("lumbar") anatomy in anatomy.py is the abdomen around mid-L3 and simply repeats
lumbar levels above and below. The torso anatomy follows the vertebral column from T11 down to
L4 (``COLUMN``) and adds what a slice meets above L2: a large liver on the patient's right
with portal and hepatic veins and the intrahepatic IVC, the spleen on the left posterior, the
stomach on the left anterior (wall, food or fluid, a gas-fluid level), the upper poles of the
kidneys and the adrenals, the pancreas and splenic vein, the celiac trunk and SMA origins and
the left renal vein, the diaphragm crura around the aorta, the lung bases in the posterior
costophrenic recesses with the diaphragm between lung and abdomen, and the ribs (head and
neck beside the vertebra, shaft around the wall, costal cartilage in front) with intercostal
muscle between them. Going up, the abdominal wall muscles thin, psoas and quadratus lumborum
end, latissimus grows, the body is rounder and carries less visceral fat, the colon ends at
its flexures and the small bowel below them. Below L2 it is the lumbar anatomy (the same
layout, outline and organs), so a subject's L3 looks as it does by default. Below mid-L4
pelvis.py adds the iliac wings, iliacus and gluteus medius, a broader L5 body, the common
iliac vessels and more small bowel, down to the L5-S1 disc; below it, to the bottom of the
S1 body, the top of the sacrum (pelvis.draw_sacrum) in place of the lumbar vertebra.

Everything is a smooth function of z for one subject: organ sizes rise and fall with the
height, rib sections slide around the wall as the plane cuts each obliquely running rib at a
different place, the lungs grow from nothing at the bottom of their recess. Subject-specific
numbers beyond those of subject.py (rib heights, lung bases, liver and stomach shape, ...)
come from ``torso_from_seed`` (its own random stream, so the lumbar subject is unchanged).

Labels: the liver, spleen, stomach, lungs, diaphragm and crura, costal cartilage, vessels and
pancreas are MSC; intercostal muscles are MUS (as TotalSegmentator's skeletal muscle mask
counts them); the diaphragm is MSC (its skeletal muscle mask leaves the diaphragm out); fat
between the organs is VAT.

Drawing coordinates are those of anatomy.py: mm, x to the image right (patient's left), y
posterior, z cranial, mid-L3 of the nominal column at z = 0. Angles ``phi`` from anterior,
towards the patient's left; ``a`` is the angle from the posterior midline on either side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from .anatomy import (BODY_HALF_HEIGHT_MM, Geometry, aorta_lumens, close_back, close_flank,
                      core_radius,
                      draw_abdominal_muscles, draw_back_muscles, draw_body_wall, draw_bowel,
                      draw_kidneys, draw_solid_organs, draw_table, draw_thin_tubes, draw_vertebra,
                      drawn_with, has_back_sat, has_flank_sat, mask_points, subject_from_seed,
                      wall_layers)
from .pelvis import (draw_pelvic_layout, draw_pelvis, draw_sacrum, has_psoas_apart,
                     iliac_arteries, iliac_veins, lower_weight, part_psoas, pelvis_from_seed,
                     sacral_weight)
from .raster import Canvas, band, capsule, clip_below, curved_streak, ellipse, polar
from .subject import PHI, Subject, Tube, plain
from .tissues import CODE

C = CODE

# ----------------------------------------------------------------------------- the column

#: vertebrae and the height (mm) of the middle of each body above mid-L3, before the
#: subject's ``vertebra_shift``: lumbar levels 38 mm apart as in the lumbar anatomy, lower
#: thoracic ones closer (smaller bodies and discs)
COLUMN = (("S1", -114.0), ("L5", -76.0), ("L4", -38.0), ("L3", 0.0), ("L2", 38.0), ("L1", 76.0),
          ("T12", 112.0), ("T11", 145.0), ("T10", 177.0), ("T9", 208.0), ("T8", 238.0),
          ("T7", 267.0))
#: the levels the torso anatomy is made for, cranial to caudal
LEVELS = ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
_NAMES = [n for n, _ in COLUMN]
_CENTRES = np.array([c for _, c in COLUMN])
_LUMBAR_HALF = 19.0                       # half a lumbar level (anatomy.LEVEL_PERIOD_MM / 2)
#: vertebral body size and transverse process length by level (L3 = 1 / 1.08)
_VB_SIZE = (1.04, 1.04, 1.03, 1.0, 0.97, 0.95, 0.91, 0.87, 0.84, 0.82, 0.8, 0.78)
_TP_LEN = (0.95, 0.95, 0.92, 1.08, 0.92, 0.8, 0.45, 0.55, 0.6, 0.6, 0.6, 0.6)
COARSE_MM = 1.0                           # pixel of the map that finds the wall's inner surface


def _smooth(x):
    """smoothstep: 0 below 0, 1 above 1, C1 in between."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def check_level(name: str) -> str:
    """A level name of LEVELS (case-insensitive), or ValueError."""
    key = str(name).strip().upper()
    if key not in LEVELS:
        raise ValueError(f"unknown vertebral level {name!r}; the torso phantom covers "
                         f"{', '.join(LEVELS)}")
    return key


def level_centre(s: Subject, name: str) -> float:
    """z (mm) of the middle of vertebral body ``name`` in subject s."""
    return float(_CENTRES[_NAMES.index(check_level(name))] + s.vertebra_shift)


def level_bounds(s: Subject, name: str) -> Tuple[float, float]:
    """(z_low, z_high) mm of level ``name``: from the middle of the disc below it to the
    middle of the disc above it (S1, the lowest: from the bottom of its body)."""
    i = _NAMES.index(check_level(name))
    lo = (_CENTRES[i - 1] + _CENTRES[i]) / 2 if i > 0 else _CENTRES[i] - BODY_HALF_HEIGHT_MM
    hi = (_CENTRES[i] + _CENTRES[i + 1]) / 2
    return float(lo + s.vertebra_shift), float(hi + s.vertebra_shift)


def levels_span(s: Subject, levels: Sequence[Union[str, float]]) -> Tuple[float, float]:
    """(z_low, z_high) mm covered by ``levels``: two level names (either order, e.g.
    ("T11", "L4"): from the bottom of the lower one to the top of the upper one) or two
    heights in mm."""
    if isinstance(levels, str) or len(levels) != 2:
        raise ValueError(f"levels must be two level names such as ('T11', 'L4') or two "
                         f"heights in mm; got {levels!r}")
    ends = []
    for v in levels:
        if isinstance(v, str):
            ends.append(level_bounds(s, v))
        elif isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v):
            ends.append((float(v), float(v)))
        else:
            raise ValueError(f"levels: {v!r} is neither a level name nor a height in mm")
    lo, hi = min(e[0] for e in ends), max(e[1] for e in ends)
    top = level_bounds(s, LEVELS[0])[1]
    bottom = level_bounds(s, LEVELS[-1])[0]
    if lo < bottom - 1e-6 or hi > top + 1e-6:
        raise ValueError(f"levels {tuple(levels)!r} reach beyond {LEVELS[0]}-{LEVELS[-1]} "
                         f"(z {bottom:.1f} to {top:.1f} mm for this subject)")
    if not hi > lo:
        raise ValueError(f"levels {tuple(levels)!r} span no height")
    return lo, hi


def column_position(s: Subject, z: float):
    """(index into COLUMN, name, zl) at height z: the nearest vertebra and the distance from
    the middle of its body scaled to a lumbar level (+-19 mm), so that anatomy.draw_vertebra
    draws body, disc and posterior elements in the same proportions."""
    zr = float(z) - s.vertebra_shift
    i = int(np.argmin(np.abs(_CENTRES - zr)))
    d = zr - _CENTRES[i]
    j = i + (1 if d > 0 else -1)
    half = abs(_CENTRES[j] - _CENTRES[i]) / 2 if 0 <= j < len(_CENTRES) else _LUMBAR_HALF
    return i, _NAMES[i], d * _LUMBAR_HALF / half


# ----------------------------------------------------------------------------- the subject


@dataclass
class Torso:
    """What a seed fixes about the upper abdomen and lower chest. Heights (``*_z``) are mm
    relative to the subject's column (z - vertebra_shift), 0 = mid-L3."""

    rib_offset: Tuple[float, float]      # rib cage higher (+) or lower, right and left, mm
    rib_drop: float                      # how steeply the ribs run down (1 = average)
    rib_t: float                         # rib thickness (across the wall), mm
    rib_h: float                         # rib height (along the body), mm
    cart_t: float
    cart_h: float
    cart_calc: float                     # calcified costal cartilage, 0..1
    lung_base_z: Tuple[float, float]     # bottom of the posterior costophrenic recess, R / L
    lung_rate: float                     # lung depth gained per mm above the recess bottom
    lung_max: float                      # mm
    dia_t: float                         # diaphragm thickness, mm
    crus_t: float                        # crus thickness, mm (the right one 1.3 x)
    psoas_top_z: float
    ql_top_z: float
    kidney_up: float                     # kidneys this much higher than in the lumbar model, mm
    liver_size: float
    liver_left: float                    # how far the left lobe reaches across (0..1)
    liver_full_z: float                  # the liver is largest from here up
    liver_gap: float                     # fat between liver and wall, mm
    liver_harm: List[Tuple[float, float]]
    spleen_size: float
    spleen_phi: float
    stomach_kind: str                    # food, fluid, contrast, collapsed
    stomach_size: float
    stomach_gas: float                   # share of the lumen height filled by gas
    stomach_body_z: float
    stomach_pylorus_z: float
    stomach_xy: Tuple[float, float]      # body centre as fractions of the fascia half-axes
    stomach_harm: List[Tuple[float, float]]   # rugal folds
    pancreas_z: float
    pancreas_t: float
    celiac_z: float
    sma_z: float
    renal_vein_z: float
    adrenal_len: float
    flexure_z: Tuple[float, float]       # hepatic (right) and splenic (left) flexure
    flexure_len: float
    small_bowel_top_z: float
    hepatic_veins: List[Tuple[float, float]]   # (angle, length mm) of the right/middle/left
    lung_vessels: List[Tuple[int, float, float, float, float, float]] = field(repr=False)

    def meta(self) -> Dict[str, object]:
        d = asdict(self)
        for k in ("liver_harm", "stomach_harm", "hepatic_veins", "lung_vessels"):
            d.pop(k)
        return plain(d)


@lru_cache(maxsize=64)
def torso_from_seed(seed: int) -> Torso:
    """The upper-abdominal parameters of subject ``seed`` (cached; treat as read-only)."""
    s = subject_from_seed(int(seed))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2718]))
    u = rng.uniform
    f, m = s.frame, s.muscle
    base = 88.0 + u(-15, 15)
    rib_off = u(-12, 10)
    r = rng.random()
    kind = "collapsed" if r < 0.2 else ("food" if r < 0.55 else "fluid")
    if kind == "fluid" and s.oral_contrast:
        kind = "contrast"
    gas = u(0.0, 0.2) if kind == "collapsed" else u(0.08, 0.55)
    celiac = 100.0 + u(-10, 8)
    vessels = []
    for side in (-1, 1):
        for _ in range(int(rng.integers(6, 12))):
            vessels.append((side, float(u(0.05, 0.95)), float(u(0.25, 0.8)), float(u(90, 170)),
                            float(u(8, 30)), float(u(0.8, 2.0))))
    return Torso(
        rib_offset=(float(rib_off + u(-3, 3)), float(rib_off + u(-3, 3))),
        rib_drop=float(u(0.9, 1.1)), rib_t=float(u(5.5, 7.0) * f), rib_h=float(u(9, 12)),
        cart_t=float(u(6.5, 8.5) * f), cart_h=float(u(11, 15)),
        cart_calc=float(np.clip((s.age - 35) / 45 + rng.normal(0, 0.2), 0, 1)),
        lung_base_z=(float(base + u(0, 8)), float(base + u(-4, 4))),
        lung_rate=float(u(0.45, 0.8)), lung_max=float(u(30, 55)),
        dia_t=float(u(2.5, 4.5) * m ** 0.5), crus_t=float(u(4.0, 7.0) * m ** 0.5),
        psoas_top_z=float(112 + u(-8, 8)), ql_top_z=float(98 + u(-8, 8)),
        kidney_up=float(u(0, 18)),
        liver_size=float(np.clip(rng.normal(1.1, 0.1), 0.85, 1.35)),
        liver_left=float(u(0.6, 1.2)), liver_full_z=float(112 + u(-12, 28)),
        liver_gap=float(0.3 + 3.0 * s.vat * u(0.3, 1.0)),
        liver_harm=[(float(u(0, 0.06)), float(u(0, 2 * np.pi))) for _ in range(3)],
        spleen_size=float(u(0.8, 1.25)), spleen_phi=float(u(-0.15, 0.15)),
        stomach_kind=kind, stomach_size=float(u(0.75, 1.2)), stomach_gas=float(gas),
        stomach_body_z=float(112 + u(-15, 15)), stomach_pylorus_z=float(76 + u(-30, 5)),
        stomach_xy=(float(u(0.3, 0.45)), float(u(-0.45, -0.15))),
        stomach_harm=[(float(u(0, 0.035)), float(u(0, 2 * np.pi))) for _ in range(7)],
        pancreas_z=float(76 + u(-25, 5)),
        pancreas_t=float(u(14, 22) * (1 - 0.25 * max(0.0, s.age - 50) / 40)),
        celiac_z=float(celiac), sma_z=float(celiac - u(8, 16)),
        renal_vein_z=float(s.kidney_z[1] + u(12, 30)), adrenal_len=float(u(18, 28)),
        flexure_z=(float(u(40, 85)), float(u(80, 125))), flexure_len=float(u(50, 90)),
        small_bowel_top_z=float(u(55, 100)),
        hepatic_veins=[(float(a + u(-0.15, 0.15)), float(u(45, 80)))
                       for a in (-2.1, -1.45, -0.8)],
        lung_vessels=vessels,
    )


def _blend(s: Subject, w: float, t: Torso) -> Subject:
    """The subject in the torso anatomy at upper weight w (0 at L3, 1 at T12 and above): the
    kidneys a little higher, the outline rounder going up, with less visceral fat bulging the
    front and a little less subcutaneous fat."""
    kz = (s.kidney_z[0] + t.kidney_up, s.kidney_z[1] + t.kidney_up)
    if w <= 0:
        return dataclasses.replace(s, kidney_z=kz)
    return dataclasses.replace(
        s, kidney_z=kz,
        core_a=s.core_a - w * (12.0 * s.vat + 3.0 * s.frame),
        core_b_ant=s.core_b_ant - w * 28.0 * s.vat,
        core_b_post=s.core_b_post + w * 4.0 * s.frame,
        n_front=s.n_front + w * 0.6 * (2.2 - s.n_front),
        sat_knots=[k * (1.0 - w * c) for k, c in zip(s.sat_knots, (0.25, 0.2, 0.12, 0.1, 0.1))])


class TorsoGeometry(Geometry):
    """Geometry of the torso anatomy at height z: the lumbar geometry of the z-dependent
    outline, with the level, vertebra, psoas, quadratus lumborum and wall muscles of the
    torso column, and the inner surface of the wall (``r_in``, set by draw_torso)."""

    def __init__(self, s: Subject, z: float, t: Torso):
        zr = float(z) - s.vertebra_shift
        self.zr = zr
        self.w = float(_smooth((zr - 30.0) / 90.0))
        super().__init__(_blend(s, self.w, t), z)
        self.subject, self.t = s, t
        i, name, zl = column_position(s, z)
        self.level, self.level_label, self.zl = i - _NAMES.index("L3"), name, zl
        self.in_body = abs(zl) < BODY_HALF_HEIGHT_MM
        self.vb_size = float(np.interp(zr, _CENTRES, _VB_SIZE))
        self.tp_len = float(np.interp(zr, _CENTRES, _TP_LEN))
        f, w = self.f, self.w
        # psoas arises from T12-L1, quadratus lumborum from the 12th rib
        k = float(np.clip((t.psoas_top_z - zr) / 60.0, 0.0, 1.0)) ** 0.7
        self.psoas_r = (self.psoas_r[0] * k, self.psoas_r[1] * k)
        # below L4 (pelvis.py): a broader L5 body, the psoas further forward, the quadratus
        # lumborum ending at the iliac crest
        self.pel = p = pelvis_from_seed(s.seed)
        low = lower_weight(zr)
        self.vb_rx *= 1.0 + (p.vb_wide - 1.0) * low
        self.psoas_x = self.vb_rx + 0.75 * self.psoas_r[0] + 2 + 2 * f * low
        self.psoas_y -= p.psoas_fwd * low
        # at S1 the psoas lies on the ala, in front of where the L5 body's side was, and no
        # larger than at L5 (the lumbar model's growth with depth stops at the disc)
        sac = sacral_weight(zr)
        if sac > 0.0:
            k = 1.0 - 0.2 * sac
            self.psoas_r = (self.psoas_r[0] * k, self.psoas_r[1] * k)
            self.psoas_x += 3.0 * f * sac
            self.psoas_y -= 4.0 * f * sac
        self.draw_psoas = self.psoas_r[0] > 1.0
        self.iliacus_k = 1.0          # pelvis.part_psoas thins the iliacus
        k = float(np.sqrt(np.clip((t.ql_top_z - zr) / 35.0, 0.0, 1.0)))
        k *= float(_smooth((zr - (min(p.crest_z) - 18.0)) / 16.0))
        # ... broadening towards its insertion on the crest
        wide = lower_weight(zr, 20.0)
        self.ql_r = (self.ql_r[0] * k * (1 + 0.5 * wide), self.ql_r[1] * k * (1 + 0.25 * wide))
        self.ql_x += 6 * f * wide
        self.draw_ql = self.ql_r[0] > 1.5
        self.draw_spleen_tip = False            # draw_spleen draws the whole spleen
        self.wall_scale = (1 - 0.3 * w, 1 - 0.35 * w, 1 - 0.8 * w, 1 - 0.55 * w)
        self.latissimus = (1.95 - 0.35 * w, 2.6 + 0.05 * w, 0.65 + 0.4 * w, 1 + 0.6 * w)
        # the aorta: in front of the vertebra, drifting left and back going up
        self.aorta_r = s.aorta_r * (1.0 + 0.06 * w)
        self.ax = 9 * f + 5 * f * w
        self.ay = self.y_vb_ant - self.aorta_r - 1.5 + 3.0 * w
        self.r_in = None            # inner surface of the wall (N_PHI,), mm

    def level_name(self) -> str:
        if self.in_body:
            return self.level_label
        i = _NAMES.index(self.level_label)
        j = i + (1 if self.zl > 0 else -1)
        if j < 0:
            return self.level_label
        if j >= len(_NAMES):
            return self.level_label
        upper, lower = (_NAMES[j], _NAMES[i]) if self.zl > 0 else (_NAMES[i], _NAMES[j])
        return f"{upper}-{lower} disc"

    def rin(self, phi) -> np.ndarray:
        return np.interp(np.asarray(phi, np.float64), PHI, self.r_in, period=2 * np.pi)


# ----------------------------------------------------------------------------- helpers


def ribbon(pts: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Closed polygon around a centre line pts (N, 2) mm with half widths half (N,)."""
    d = np.gradient(pts, axis=0)
    n = np.stack([-d[:, 1], d[:, 0]], 1)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9)
    return np.concatenate([pts + half[:, None] * n, (pts - half[:, None] * n)[::-1]])


def resample(poly: np.ndarray, step: float):
    """Points every ``step`` mm along an open polyline, with their arc length."""
    seg = np.linalg.norm(np.diff(poly, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(np.ceil(s[-1] / step)) + 1)
    t = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(t, s, poly[:, 0]), np.interp(t, s, poly[:, 1])], 1), t


def cut_runs(pts: np.ndarray, dz: np.ndarray, h: float, extra: Optional[np.ndarray] = None):
    """Where a plane cuts a band of height h (mm along z) that runs along pts (N, 2) with its
    middle dz (N,) mm above the plane: [(points, dz, extra)] per stretch with |dz| < h / 2,
    each ended exactly where |dz| = h / 2 (between samples, by linear interpolation, which
    also interpolates the optional per-point values ``extra``)."""
    g = np.abs(dz) - h / 2.0                       # < 0 inside the band
    inside = g < 0
    if not inside.any():
        return []
    ex = np.zeros(len(pts)) if extra is None else np.asarray(extra, np.float64)
    cols = np.column_stack([pts, dz, ex])
    edges = np.flatnonzero(np.diff(np.concatenate([[0], inside.astype(np.int8), [0]])))
    out = []
    for a, b in zip(edges[0::2], edges[1::2]):
        parts = [cols[a:b]]
        if a > 0:
            lam = g[a - 1] / (g[a - 1] - g[a])
            parts.insert(0, (cols[a - 1] + lam * (cols[a] - cols[a - 1]))[None])
        if b < len(pts):
            lam = g[b] / (g[b] - g[b - 1])
            parts.append((cols[b] + lam * (cols[b - 1] - cols[b]))[None])
        run = np.concatenate(parts)
        if len(run) >= 2:
            out.append((run[:, :2], run[:, 2], run[:, 3]))
    return out


def _section_half(dz: np.ndarray, h: float, t: float) -> np.ndarray:
    """Half width of the cut through a band of elliptic cross-section t x h at offset dz."""
    return 0.5 * t * np.sqrt(np.clip(1.0 - (2.0 * dz / h) ** 2, 0.0, 1.0))


def _paint_tube_cut(cv: Canvas, pts, dz, h, t, code, over, inner=None) -> None:
    """Paint every stretch where the plane cuts a band (height h, thickness t) along pts;
    inner=(code, margin) paints the core, ``margin`` mm in from every side."""
    for P, D, _ in cut_runs(pts, dz, h):
        cv.paint(ribbon(P, _section_half(D, h, t)), code, over=over)
    if inner is not None:
        code2, c = inner
        if t > 2 * c + 0.5 and h > 2 * c + 0.5:
            for P, D, _ in cut_runs(pts, dz, h - 2 * c):
                cv.paint(ribbon(P, _section_half(D, h - 2 * c, t - 2 * c)), code2, over=(code,))


# ----------------------------------------------------------------------------- ribs

#: rib -> knots (angle from the posterior midline along the rib, rad; mm below the rib head);
#: the angle runs 0 .. 0.85 over head and neck, then is the polar angle around the wall.
#: Ribs 7 to 10 turn into costal cartilage (rising again) beyond RIB_BONE_END.
RIB_KNOTS = {
    12: ((0.0, 0.0), (0.85, -12.0), (1.25, -40.0)),
    11: ((0.0, 0.0), (0.85, -15.0), (1.4, -55.0), (1.75, -80.0)),
    10: ((0.0, 0.0), (0.85, -18.0), (1.5, -70.0), (2.1, -125.0), (2.35, -128.0), (2.6, -100.0)),
    9: ((0.0, 0.0), (0.85, -18.0), (1.6, -85.0), (2.2, -135.0), (2.45, -130.0), (2.75, -90.0)),
    8: ((0.0, 0.0), (0.85, -18.0), (1.7, -95.0), (2.3, -140.0), (2.6, -125.0), (2.9, -80.0)),
    7: ((0.0, 0.0), (0.85, -18.0), (1.8, -100.0), (2.45, -140.0), (2.75, -120.0), (3.05, -75.0)),
}
RIB_BONE_END = {12: 1.25, 11: 1.75, 10: 2.1, 9: 2.2, 8: 2.3, 7: 2.45}
A_ANGLE = 0.85                   # the rib angle: where the rib meets the wall


def _pchip(x: np.ndarray, xk: Sequence[float], yk: Sequence[float]) -> np.ndarray:
    from scipy.interpolate import PchipInterpolator

    return PchipInterpolator(np.asarray(xk), np.asarray(yk), extrapolate=True)(x)


def rib_radius(g: TorsoGeometry, phi: np.ndarray) -> np.ndarray:
    """Radius (mm) of the middle of the rib layer at angles phi: under the external oblique at
    the side, under the rectus in front, deeper (in front of the erector spinae) behind."""
    s, t, f, m = g.s, g.t, g.f, g.m
    ws = g.wall_scale
    a = np.pi - np.abs(np.asarray(phi, np.float64))
    side_d = 0.4 + 6.5 * f * m * ws[1] + 1.0 + t.rib_t / 2
    front_d = 0.4 + 10.5 * f * m * ws[0] * 0.75 + 1.0 + t.cart_t / 2
    d = side_d + (front_d - side_d) * _smooth((a - 2.2) / 0.5)
    rc = core_radius(s, phi)
    # behind: from the rib angle (ES lateral edge) the ribs come up to the wall
    ax, ay = 62 * f, g.y_tp + 10 * f
    d_angle = float(core_radius(s, np.array([np.pi - np.arctan2(ax, ay)]))[0] - np.hypot(ax, ay))
    back = 1.0 - _smooth((a - A_ANGLE) / 0.55)
    return rc - (d + (np.maximum(d_angle, d) - d) * back)


def rib_paths(g: TorsoGeometry):
    """[(side, rib, points (N, 2), z (N,), bone (N,) bool)] for ribs 7-12 on both sides: the
    rib's centre line (head, neck, angle, shaft, cartilage) and its height along it."""
    s, t, f = g.subject, g.t, g.f
    out = []
    for side_i, side in enumerate((-1, 1)):
        head = np.array([side * 0.8 * g.vb_rx * g.vb_size, g.y_vb_post - 4 * f])
        tub = np.array([side * 40 * f, g.y_tp + 4 * f])
        ang = np.array([side * 62 * f, g.y_tp + 10 * f])
        neck, s_neck = resample(np.stack([head, tub, ang]), 1.0)
        a_neck = A_ANGLE * s_neck / s_neck[-1]
        a_wall0 = float(np.arctan2(abs(ang[0]), ang[1]))
        for rib, knots in RIB_KNOTS.items():
            a_end = knots[-1][0]
            aw = np.linspace(a_wall0, a_end, max(8, int((a_end - a_wall0) / 0.004)))
            phi = side * (np.pi - aw)
            wall = polar(0, 0, phi, rib_radius(g, phi))
            wall, _ = resample(np.concatenate([ang[None], wall]), 1.0)
            aw = np.pi - np.abs(np.arctan2(wall[:, 0], -wall[:, 1]))
            pts = np.concatenate([neck, wall[1:]])
            a = np.concatenate([a_neck, np.maximum(aw[1:], A_ANGLE)])
            xk, yk = zip(*knots)
            z_head = _CENTRES[_NAMES.index(f"T{rib}")] + t.rib_offset[side_i]
            zz = z_head + t.rib_drop * _pchip(a, xk, yk) + s.vertebra_shift
            out.append((side, rib, pts, zz, a <= RIB_BONE_END[rib], a))
    return out


def draw_ribcage(cv: Canvas, g: TorsoGeometry, costal: bool = False) -> Set[int]:
    """Ribs (cortex and marrow), costal cartilage and the intercostal muscle between them;
    returns the sides (-1 right, +1 left) where a rib or cartilage is cut.

    costal: also the diaphragm's costal part along the inside of the cut ribs
    (_paint_costal_diaphragm; label MSC): in real patients it lines the lower ribs from its
    dome down to its attachments on ribs 7 to 12; without it only the posterior recesses
    near the lung bases have diaphragm (draw_lungs), and the organs and fat reach the ribs."""
    t = g.t
    paths = rib_paths(g)
    wall_over = (C["vat"], C["muscle"], C["imat"], C["fascia"])
    spans: Dict[int, List[float]] = {-1: [], 1: []}
    cuts = []
    for side, rib, pts, zz, bone, a in paths:
        dz = zz - g.z
        for part, h, is_bone in ((bone, t.rib_h, True), (~bone, t.cart_h, False)):
            if not part.any():
                continue
            idx = np.flatnonzero(part)
            sl = slice(max(0, idx[0] - 1), idx[-1] + 1)     # cartilage starts at the bone's end
            inside = np.abs(dz[sl]) < h / 2
            if inside.any():
                cuts.append((pts[sl], dz[sl], is_bone))
                spans[side].extend(a[sl][inside].tolist())
    # intercostal muscle: a sheet along the rib layer between the first and last rib cut
    sheets = []
    for side, a_cut in spans.items():
        if len(a_cut) < 2:
            continue
        lo, hi = max(min(a_cut), A_ANGLE), max(a_cut)
        if hi - lo < 0.05:
            continue
        aa = np.linspace(lo, hi, 96)
        phi = side * (np.pi - aa)
        rr = rib_radius(g, phi)
        half = 0.5 * 0.85 * t.rib_t * np.minimum(1.0, 0.3 + 0.7 * _smooth(
            np.minimum(aa - lo, hi - aa) / 0.06))
        cv.paint(band(0, 0, phi, rr + half, rr - half), C["muscle"], over=wall_over)
        sheets.append((side, lo, hi))
    for pts, dz, is_bone in cuts:
        if is_bone:
            _paint_tube_cut(cv, pts, dz, t.rib_h, t.rib_t, C["cortex"], wall_over + (C["muscle"],),
                            inner=(C["marrow"], 1.2))
        elif t.cart_calc > 0.5:
            # calcified cartilage: a thin dense rim (its HU smeared by partial volume)
            _paint_tube_cut(cv, pts, dz, t.cart_h, t.cart_t, C["calcification"], wall_over,
                            inner=(C["cartilage"], 0.3 + 0.6 * (t.cart_calc - 0.5)))
        else:
            _paint_tube_cut(cv, pts, dz, t.cart_h, t.cart_t, C["cartilage"], wall_over)
    if costal:                  # after the ribs, which it must not cover
        for side, lo, hi in sheets:
            _paint_costal_diaphragm(cv, g, side, lo, hi)
    return {side for side, a_cut in spans.items() if a_cut}


def _paint_costal_diaphragm(cv: Canvas, g: TorsoGeometry, side: int, lo: float,
                            hi: float) -> None:
    """The diaphragm's costal part where the ribs are cut on this side (angles lo..hi from
    the posterior midline): a sheet of the subject's diaphragm thickness over the visceral
    fat along the rib layer's inner surface (organs drawn later stop at it; the lung bases,
    drawn later, lie outside it), and over the lateral wall's layers that lie inside the rib
    layer (muscle and IMAT down to beyond the transversus). Tapering over 0.1 rad at
    either end of the cut ribs and of the lateral wall."""
    aa = np.linspace(lo, hi, 128)
    phi = side * (np.pi - aa)
    outer = rib_radius(g, phi) - 0.5 * 0.85 * g.t.rib_t
    taper = _smooth(np.minimum(aa - lo, hi - aa) / 0.1)
    cv.paint(band(0, 0, phi, outer, outer - g.t.dia_t * taper), C["diaphragm"],
             over=(C["vat"],))
    w = wall_layers(g)
    a0, a1 = max(lo, np.pi - w["end"]), min(hi, np.pi - w["start"])   # the lateral wall
    if a1 - a0 < 0.05:
        return
    aa = np.linspace(a0, a1, 96)
    phi = side * (np.pi - aa)
    outer = rib_radius(g, phi) - 0.5 * 0.85 * g.t.rib_t
    # the transversus's inner surface where the layers are whole (draw_abdominal_muscles)
    inner = core_radius(g.s, phi) - 1.4 - (w["t_eo"] + w["t_io"] + w["t_ta"] + 1.8 * w["plane"])
    taper = _smooth(np.minimum(aa - a0, a1 - aa) / 0.1)
    inner = outer - np.maximum(outer - inner, 0.0) * taper
    cv.paint(band(0, 0, phi, outer, inner), C["diaphragm"], over=(C["muscle"], C["imat"]))


# ----------------------------------------------------------------------------- the wall


def draw_wall(cv: Canvas, g: TorsoGeometry, costal: bool = False, flank: bool = False,
              back: bool = False) -> None:
    """Skin, SAT, the fascia filled with VAT, wall and back muscles, vertebra and ribs
    (costal: draw_ribcage's costal diaphragm; flank: anatomy.close_flank on each side where
    no rib is cut, above the pelvis, whose iliac wings and gluteal muscles fill that place;
    back: anatomy.close_back above the pelvis)."""
    draw_body_wall(cv, g)
    draw_abdominal_muscles(cv, g)
    draw_back_muscles(cv, g)
    if g.level_label == "S1" and g.in_body:
        draw_sacrum(cv, g)
    else:
        draw_vertebra(cv, g)
    ribbed = draw_ribcage(cv, g, costal)
    if flank and lower_weight(g.zr) == 0.0:
        close_flank(cv, g, [side for side in (-1, 1) if side not in ribbed])
    if back and lower_weight(g.zr) == 0.0:
        close_back(cv, g)


def inner_radius(g: TorsoGeometry) -> np.ndarray:
    """The inner surface of the wall at every PHI (mm from the body centre): the outermost
    visceral fat inside the fascia, found on a map of the wall at COARSE_MM pixels (the same
    for every output size, so the organs drawn against it do not depend on the size)."""
    from scipy.ndimage import gaussian_filter1d, median_filter

    s = g.s
    n = int(np.ceil(s.fov_mm / COARSE_MM))
    cv = Canvas(n, s.fov_mm)
    cv.shift = np.asarray(s.offset, np.float64)
    draw_wall(cv, g)
    phis = PHI[::2]
    r = np.arange(0.0, float(g.r_core.max()), 0.5)
    xy = np.stack([np.sin(phis)[:, None] * r, -np.cos(phis)[:, None] * r], -1)
    px = np.clip(np.floor(cv.to_px(xy)).astype(np.int64), 0, n - 1)
    vat = cv.codes[px[..., 1], px[..., 0]] == C["vat"]
    vat &= r[None, :] < core_radius(s, phis)[:, None]
    rin = np.where(vat, r[None, :], 0.0).max(axis=1)
    rin = gaussian_filter1d(median_filter(rin, 5, mode="wrap"), 1.5, mode="wrap")
    return np.interp(PHI, phis, rin, period=2 * np.pi) + 0.5


# ----------------------------------------------------------------------------- chest


def chest(g: TorsoGeometry, side_i: int):
    """The lung base and diaphragm on one side (0 right, 1 left) at this height, or None:
    (a0, a1, depth, dia_hi, h) with the lung over angles a0..a1 from the posterior midline,
    ``depth`` mm deep at most, the diaphragm over 0.36..dia_hi, h mm above the recess bottom."""
    t = g.t
    h = g.zr - t.lung_base_z[side_i]
    if h < -25:
        return None
    depth = float(np.clip(t.lung_rate * h, 0.0, t.lung_max))
    a1 = float(min(2.1, 1.2 + 0.03 * max(h, 0.0)))
    return 0.42, a1, depth, min(2.75, a1 + 0.45), h


def chest_depth(g: TorsoGeometry, phi: np.ndarray) -> np.ndarray:
    """How far (mm) lung and diaphragm reach in from the wall's inner surface at phi."""
    phi = np.asarray(phi, np.float64)
    out = np.zeros_like(phi)
    aa = np.pi - np.abs(phi)
    for side_i, side in enumerate((-1, 1)):
        c = chest(g, side_i)
        if c is None:
            continue
        a0, a1, depth, dia_hi, h = c
        sel = np.sign(phi) == side
        lung = depth * _bump01((aa - a0) / (a1 - a0), 0.45)
        dia = g.t.dia_t * float(_smooth((h + 25.0) / 25.0)) * (aa > 0.36) * (aa < dia_hi)
        out[sel] = (lung + dia)[sel]
    return out


def draw_lungs(cv: Canvas, g: TorsoGeometry) -> None:
    """The lung bases in the posterior costophrenic recesses, the diaphragm inside them (and
    along the wall below them), small vessels in the lung."""
    t = g.t
    for side_i, side in enumerate((-1, 1)):
        c = chest(g, side_i)
        if c is None:
            continue
        a0, a1, depth, dia_hi, h = c
        aa = np.linspace(0.36, dia_hi, 160)
        phi = side * (np.pi - aa)
        rin = g.rin(phi)
        lung = depth * _bump01((aa - a0) / (a1 - a0), 0.45)
        dia = t.dia_t * float(_smooth((h + 25.0) / 25.0)) * np.minimum(
            1.0, _smooth((aa - 0.36) / 0.08) * _smooth((dia_hi - aa) / 0.25))
        outer = core_radius(g.s, phi) + 1.0
        if dia.max() > 0.3:
            cv.paint(band(0, 0, phi, outer, rin - lung - dia), C["diaphragm"], over=(C["vat"],))
        if depth > 0.3:
            sel = lung > 0.05
            if sel.sum() >= 3:
                cv.paint(band(0, 0, phi[sel], outer[sel], (rin - lung)[sel]), C["lung"],
                         over=(C["vat"], C["diaphragm"]))
                for vs, ua, fr, z0, half, rad in t.lung_vessels:
                    if vs != side or abs(g.zr - z0) >= half:
                        continue
                    a = a0 + ua * (a1 - a0)
                    here = depth * float(_bump01(np.array([ua]), 0.45)[0])
                    if here < 5.0:
                        continue
                    p = side * (np.pi - a)
                    rr = float(g.rin(np.array([p]))[0]) - fr * here
                    k = np.sqrt(1 - (abs(g.zr - z0) / half) ** 2)
                    cv.paint(ellipse(rr * np.sin(p), -rr * np.cos(p), rad * k, rad * k, 0, 16),
                             C["vessel"], over=(C["lung"],))


def _bump01(u: np.ndarray, power: float) -> np.ndarray:
    return np.sin(np.pi * np.clip(u, 0.0, 1.0)) ** power


def draw_aorta_and_crura(cv: Canvas, g: TorsoGeometry, crura_front: bool = False) -> None:
    """The aorta (with periaortic fat and plaques; the bifurcation lower down as in the lumbar
    anatomy) and the diaphragm crura beside and, at the hiatus, in front of it. crura_front:
    each crus arises from the front of the vertebral body beside the midline, as in real
    patients, where the psoas lies beside the body (False: from the body's side, behind
    its front corner, as before)."""
    s, t = g.subject, g.t
    r, ax, ay = g.aorta_r, g.ax, g.ay
    aortas = iliac_arteries(g, aorta_lumens(ax, ay, r, g.z, s.bifurcation_z))
    for x, y, rad in aortas:
        cv.paint(ellipse(x, y, rad + 2.5, rad + 2.5, 0, 48), C["fat_pad"], over=(C["vat"],))
        cv.paint(ellipse(x, y, rad, rad * 0.97, 0, 48), C["aorta"],
                 over=(C["vat"], C["fat_pad"]))
    for angle, z0 in s.plaques:
        if abs(g.z - z0) < 4 and len(aortas) == 1:
            cv.paint(curved_streak(ax + (r - 0.8) * np.cos(angle), ay + (r - 0.8) * np.sin(angle),
                                   3.5, 1.3, angle + np.pi / 2, 1 / r), C["calcification"])
    # crura: the right one from L3, the left from L2; they meet in front of the aorta at the
    # hiatus (about T12-L1) and run beside it above
    zr = g.zr
    hiatus = t.celiac_z + 8.0
    for side, z_low, k_side in ((-1, -5.0, 1.3), (1, 30.0, 1.0)):
        thick = t.crus_t * k_side * float(_smooth((zr - z_low) / 40.0))
        if thick < 0.4:
            continue
        vbr = g.vb_rx * g.vb_size
        front = g.y_vb - g.vb_ry * g.vb_size + 1.0
        start = ([(side * 0.35 * vbr, front)] if crura_front else
                 [(side * 0.95 * vbr, g.y_vb + 0.25 * g.vb_ry), (side * 0.72 * vbr, front)])
        pts = start + [(ax + side * (r + 2.0 + thick / 2), ay + 0.3 * r)]
        meet = float(_smooth(1.0 - abs(zr - hiatus) / 18.0))
        if meet > 0:
            pts.append((ax + side * (r + 2 + thick / 2) * (1 - 0.75 * meet),
                        ay - (r + 2 + thick / 2) * (0.4 + 0.6 * meet)))
        else:
            pts.append((ax + side * (r + 3 + thick / 2), ay - 0.35 * r))
        reach = float(np.clip((zr - z_low) / 60.0, 0.25, 1.0))
        line, sl = resample(np.array(pts), 0.7)
        keep = sl <= reach * sl[-1]
        line, sl = line[keep], sl[keep]
        if len(line) < 3:
            continue
        u = sl / sl[-1]
        half = 0.5 * thick * (0.35 + 0.65 * _smooth(u / 0.3)) * (0.3 + 0.7 * _smooth((1 - u) / 0.15))
        cv.paint(ribbon(line, half), C["diaphragm"], over=(C["vat"], C["fat_pad"]))


# ----------------------------------------------------------------------------- organs


def _b_profile(b: np.ndarray, knots) -> np.ndarray:
    xk, yk = zip(*knots)
    return np.interp(b, xk, yk)


def liver_extent(g: TorsoGeometry):
    """(b (n,), inner radius (n,), outer radius (n,)) of the liver at this height, b = -phi
    (0 anterior, pi posterior along the patient's right); None where there is no liver."""
    t = g.t
    tt = liver_fullness(g)
    if tt <= 0.02:
        return None
    b_ant_full = -0.95 * t.liver_left
    b_ant = 1.3 + (b_ant_full - 1.3) * tt ** 0.7
    b_post = 2.2 + (2.62 - 2.2) * tt ** 0.5
    b = np.linspace(b_ant, b_post, 200)
    u = (b - b_ant) / (b_post - b_ant)
    # inner radius as a fraction of the wall's inner radius, at full size
    knots = ((0.0, 1.0), (0.08, 0.55), (0.22, 0.36), (0.4, 0.2), (0.58, 0.1), (0.76, 0.2),
             (0.9, 0.42), (1.0, 1.0))
    q = _b_profile(u, knots)
    wob = 1.0 + sum(a * np.cos((k + 2) * np.pi * u + p) for k, (a, p) in enumerate(t.liver_harm))
    depth = np.clip((1.0 - q) * t.liver_size * wob, 0.0, 0.94) * tt ** 0.5
    rin = g.rin(-b)
    inset = chest_depth(g, -b)
    return b, rin * (1.0 - depth) - 0.5 * inset, rin - t.liver_gap - inset


def draw_liver(cv: Canvas, g: TorsoGeometry) -> None:
    """The liver against the right wall and diaphragm, its left lobe across the front; portal
    and hepatic veins inside, the intrahepatic IVC, the fissure and the gallbladder."""
    s, t, f = g.subject, g.t, g.f
    ext = liver_extent(g)
    if ext is None:
        return
    b, inner, outer = ext
    cv.paint(band(0, 0, -b, np.maximum(outer, inner + 0.5), inner), C["liver"], over=(C["vat"],))
    zr = g.zr
    # caudate lobe: liver around the IVC and reaching towards the midline, higher up
    kc = float(_smooth((liver_fullness(g) - 0.35) / 0.4))
    if kc > 0:
        x, y, rx, ry = ivc_section(g)
        cv.paint(ellipse(x + 6 * f, y - 4 * f, (rx + 14 * f) * kc, (ry + 12 * f) * kc, -0.3, 48,
                         t.liver_harm), C["liver"], over=(C["vat"],))
    # fissure for the ligamentum teres: a fat cleft at the front, right of the midline
    if zr > 85 and b[0] < -0.1:
        p = 0.12
        r_out = float(g.rin(np.array([-p]))[0])
        cv.paint(curved_streak(r_out * np.sin(-p) * 0.8, -r_out * np.cos(-p) * 0.8,
                               0.35 * r_out, 3.0 + 4 * s.vat, np.pi / 2 - 0.25, 0.0),
                 C["vat"], over=(C["liver"],))
    # portal vein: from behind the pancreas neck up and right into the porta hepatis, then its
    # right and left branches in the liver
    z_conf = t.pancreas_z
    conf = np.array([-4.0 * f, g.ay - g.aorta_r - 22 * f])
    hilum = np.array([-32.0 * f, g.ay - g.aorta_r - 28 * f])
    v = (zr - z_conf) / 32.0
    if -0.1 < v < 1.0:
        k = float(np.clip(min(v + 0.1, 1.0 - v) / 0.15, 0, 1)) ** 0.5
        c = conf + np.clip(v, 0, 1) * (hilum - conf)
        cv.paint(ellipse(c[0], c[1], 8.5 * f * k, 7.0 * f * k, -0.6, 32), C["portal_vein"],
                 over=(C["vat"], C["liver"], C["fat_pad"]))
    for tip, z0 in ((np.array([-85.0 * f, -5.0]), z_conf + 38), (np.array([5.0, -45.0 * f]),
                                                                 z_conf + 44)):
        dzv = abs(zr - z0)
        if dzv < 7:
            k = np.sqrt(1 - (dzv / 7) ** 2)
            line, sl = resample(np.stack([hilum, (hilum + tip) / 2 + [0, -6], tip]), 1.0)
            half = (5.0 - 3.0 * sl / sl[-1]) * k * f
            cv.paint(ribbon(line, half), C["portal_vein"], over=(C["liver"],))
    # gallbladder under the liver, medially (when the subject has one)
    if s.gallbladder:
        dzg = zr - (s.liver_z - 15.0)
        if abs(dzg) < 30 and liver_fullness(g) > 0.15:
            k = np.sqrt(1 - (dzg / 30) ** 2)
            p = -0.75
            r0 = float(np.interp(0.75, b, inner)) + 8.0
            cv.paint(ellipse(r0 * np.sin(p), -r0 * np.cos(p), 16 * k, 12 * k, 0.5, 32),
                     C["bile"], over=(C["vat"], C["liver"]))


def liver_fullness(g: TorsoGeometry) -> float:
    """How much of its full size the liver has at this height (0 below its tip .. 1)."""
    s, t = g.subject, g.t
    z_lo = s.liver_z - 70.0
    full = max(t.liver_full_z, z_lo + 60.0)
    return float(_smooth((g.zr - z_lo) / (full - z_lo)))


def ivc_section(g: TorsoGeometry):
    """(x, y, rx, ry) of the IVC: beside the vertebra low down, forwards and to the right
    into the back of the liver going up."""
    f = g.f
    up = float(_smooth((g.zr - 70.0) / 45.0))
    return (-17 * f - 0.4 * g.subject.aorta_r - 7 * f * up, g.y_vb_ant - 8 * f - 16 * f * up,
            12 * f * (1 - 0.1 * up), 7.5 * f + 3.5 * f * up)


def draw_veins(cv: Canvas, g: TorsoGeometry) -> None:
    """IVC (retroperitoneal, then within the liver), hepatic veins into it, SMA and SMV below
    their origins, the celiac trunk, and the left renal vein crossing in front of the aorta."""
    t, f = g.t, g.f
    zr, r, ax, ay = g.zr, g.aorta_r, g.ax, g.ay
    ivc_x, ivc_y, rx, ry = ivc_section(g)
    for vx, vy, vrx, vry in iliac_veins(g, (ivc_x, ivc_y, rx, ry)):
        cv.paint(ellipse(vx, vy, vrx, vry, 0.15, 48), C["ivc"],
                 over=(C["vat"], C["fat_pad"], C["liver"], C["diaphragm"]))
    # hepatic veins: from the IVC forwards and to the right through the liver, near the top
    kv = float(_smooth((zr - 118.0) / 25.0))
    if kv > 0:
        for i, (angle, length) in enumerate(t.hepatic_veins):
            L = length * (0.5 + 0.5 * kv)
            bend = 0.25 * (1 if i % 2 else -1)
            mid = np.array([ivc_x + 0.5 * L * np.cos(angle - bend),
                            ivc_y + 0.5 * L * np.sin(angle - bend)])
            end = np.array([ivc_x + L * np.cos(angle), ivc_y + L * np.sin(angle)])
            line, sl = resample(np.stack([[ivc_x, ivc_y], mid, end]), 1.0)
            half = (4.5 - 3.7 * (sl / sl[-1]) ** 0.7) * f * kv ** 0.5
            cv.paint(ribbon(line, half), C["hepatic_vein"], over=(C["liver"],))
    # SMA and SMV below their origins (the SMV ends in the portal confluence)
    ry_m = ay - r - 16 * f
    if zr < t.sma_z:
        cv.paint(ellipse(ax - 3, ry_m, 3.2, 3.2, 0, 24), C["vessel"], over=(C["vat"],))
    elif zr < t.sma_z + 5:
        cv.paint(capsule(ax - 1.5, (ry_m + ay - r) / 2, abs(ry_m - (ay - r)), 3.0, np.pi / 2),
                 C["vessel"], over=(C["vat"], C["fat_pad"]))
    if zr < t.pancreas_z:
        cv.paint(ellipse(ax - 15, ry_m + 1, 5.0, 4.5, 0, 24), C["vessel"], over=(C["vat"],))
    # celiac trunk: forwards from the aorta, then splitting into hepatic and splenic arteries
    dzc = abs(zr - t.celiac_z)
    if dzc < 5:
        k = np.sqrt(1 - (dzc / 5) ** 2)
        tip = ay - r - 15 * f
        cv.paint(capsule(ax - 1, (tip + ay - r) / 2, abs(tip - (ay - r)), 3.2 * k, np.pi / 2),
                 C["vessel"], over=(C["vat"], C["fat_pad"]))
        cv.paint(capsule(ax - 1, tip, 40 * f * k, 2.6 * k, 0.0, 0.01), C["vessel"],
                 over=(C["vat"],))
    # left renal vein: from the left kidney's hilum between aorta and SMA to the IVC
    dzr = abs(zr - t.renal_vein_z)
    if dzr < 5:
        k = np.sqrt(1 - (dzr / 5) ** 2)
        pts = np.array([[g.kidney_x - 22 * f, g.kidney_y - 6 * f], [ax + r + 4, ay - r - 3],
                        [ax - 2, ay - r - 4.5], [ivc_x + 6, ivc_y]])
        line, _ = resample(pts, 1.0)
        cv.paint(ribbon(line, np.full(len(line), 4.0 * k)), C["ivc"],
                 over=(C["vat"], C["fat_pad"]))


def draw_spleen(cv: Canvas, g: TorsoGeometry) -> None:
    """The spleen: a crescent against the left posterolateral wall (inside the diaphragm)."""
    s, t, f = g.subject, g.t, g.f
    zc, hh = s.spleen_z + 15.0, 75.0 * t.spleen_size
    dz = g.zr - zc
    if abs(dz) >= hh:
        return
    k = float(np.sqrt(1 - (dz / hh) ** 2))
    centre = 2.0 + t.spleen_phi
    half = 0.8 * k ** 0.6 * t.spleen_size
    phi = np.linspace(centre - half, centre + half, 80)
    u = (phi - phi[0]) / (phi[-1] - phi[0])
    depth = 52.0 * f * t.spleen_size * k * _bump01(u, 0.55)
    rin = g.rin(phi) - 0.5 - chest_depth(g, phi)
    sel = depth > 0.3
    if sel.sum() < 3:
        return
    cv.paint(band(0, 0, phi[sel], rin[sel] + 2.0, (rin - depth)[sel]), C["spleen"],
             over=(C["vat"],))


def draw_stomach(cv: Canvas, g: TorsoGeometry) -> None:
    """The stomach: body on the left in front, the antrum sweeping across to the pylorus
    lower down; wall, contents (food, fluid or oral contrast) and a gas-fluid level."""
    s, t, f = g.subject, g.t, g.f
    zr = g.zr
    zb, zp = t.stomach_body_z, min(t.stomach_pylorus_z, t.stomach_body_z - 20.0)
    if zr < zp - 15:
        return
    a_in = float(g.rin(np.array([np.pi / 2]))[0])
    b_in = float(g.rin(np.array([0.0]))[0])
    body = np.array([t.stomach_xy[0] * a_in, t.stomach_xy[1] * b_in])
    antrum = np.array([-0.05 * a_in, -0.55 * b_in])
    R_body = (34.0 + 10 * s.adiposity) * f * t.stomach_size
    if zr >= zb:
        c, L, R, ang = body, 12.0 * f, R_body, -0.6
    elif zr >= zp:
        v = (zb - zr) / (zb - zp)
        c = body + v * (antrum - body)
        L = 12.0 * f + v * 80.0 * f * t.stomach_size
        R = R_body + v * (17.0 * f - R_body)
        ang = -0.6 + v * 0.75
    else:
        v = (zr - (zp - 15)) / 15.0
        c, L, R, ang = antrum, 80.0 * f * t.stomach_size * v, 17.0 * f * np.sqrt(v), 0.15
    if R < 2.0:
        return
    collapsed = t.stomach_kind == "collapsed"
    wall = (6.0 if collapsed else 3.5) * f
    if collapsed:
        R *= 0.55
    outer = capsule(c[0], c[1], L, R, ang, 0.0, 64)
    cv.paint(outer, C["bowel_wall"], over=(C["vat"],))
    if R - wall < 1.0:
        return
    lumen = capsule(c[0], c[1], L, R - wall, ang, 0.0, 96, t.stomach_harm)
    content = {"food": "gastric", "fluid": "bowel_fluid", "contrast": "oral_contrast",
               "collapsed": "bowel_fluid"}[t.stomach_kind]
    cv.paint(lumen, C[content], over=(C["bowel_wall"],))
    if t.stomach_gas > 0.02:
        top = lumen[:, 1].min()
        level = top + t.stomach_gas * (lumen[:, 1].max() - top)
        cv.paint(clip_below(lumen, level), C["gas"], over=(C[content],))


def draw_pancreas(cv: Canvas, g: TorsoGeometry) -> None:
    """Pancreas (head low and right, tail high towards the splenic hilum) with the splenic
    vein along its back."""
    t, f = g.t, g.f
    ay, r = g.ay, g.aorta_r
    pts = np.array([[-32 * f, ay - r - 12 * f], [-4 * f, ay - r - 26 * f],
                    [35 * f, ay - r - 18 * f], [62 * f, g.kidney_y - 28 * f],
                    [80 * f, g.kidney_y - 12 * f]])
    line, sl = resample(pts, 1.0)
    u = sl / sl[-1]
    zline = t.pancreas_z - 14.0 + 34.0 * u          # the tail lies higher than the head
    dz = zline - g.zr
    thick = t.pancreas_t * (1.15 - 0.45 * u)
    for P, D, T in cut_runs(line, dz, 26.0, thick):
        cv.paint(ribbon(P, 0.5 * T * np.sqrt(np.clip(1 - (D / 13.0) ** 2, 0, 1))),
                 C["pancreas"], over=(C["vat"],))
    # the splenic vein, just behind the body and tail
    n = np.gradient(line, axis=0)
    n = np.stack([-n[:, 1], n[:, 0]], 1)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9)
    n *= np.sign(n[:, 1:2] + 1e-9)                  # pointing posterior
    back = line + n * (thick[:, None] / 2 + 2.5)
    sel = u > 0.2
    _paint_tube_cut(cv, back[sel], dz[sel], 9.0, 7.5 * f, C["portal_vein"],
                    (C["vat"], C["pancreas"]))


def draw_adrenals(cv: Canvas, g: TorsoGeometry) -> None:
    """Adrenal glands: thin limbs above and in front of the upper poles of the kidneys, the
    right one behind the IVC, the left beside the aorta."""
    s, t, f = g.subject, g.t, g.f
    vbr = g.vb_rx * g.vb_size
    for i, side in enumerate((-1, 1)):
        zc = s.kidney_z[i] + (58.0 if side < 0 else 48.0)
        dz = g.zr - zc
        if abs(dz) >= 22:
            continue
        k = float(np.sqrt(1 - (dz / 22) ** 2))
        L = t.adrenal_len * k
        if side < 0:
            cx, cy, angles = -(vbr + 14 * f), g.y_vb - 10 * f, (1.25, 1.75)
        else:
            cx, cy, angles = vbr + 20 * f, g.y_vb - 12 * f, (1.1, 2.0)
        for ang in angles:
            a = ang if side > 0 else np.pi - ang
            mx, my = cx + 0.45 * L * np.cos(a), cy + 0.45 * L * np.sin(a)
            cv.paint(curved_streak(mx, my, L, 4.5 * k + 0.8, a, 0.0), C["adrenal"],
                     over=(C["vat"],))


# ----------------------------------------------------------------------------- bowel


def _truncate(tube: Tube, top: float) -> Optional[Tube]:
    """The tube ending (rounded) at height ``top`` instead of higher up, its sections below
    in the same places."""
    lo, hi = tube.z0 - tube.half_len, tube.z0 + tube.half_len
    if hi <= top:
        return tube
    if top <= lo + 4.0:
        return None
    z0, hl = (lo + top) / 2, (top - lo) / 2
    return dataclasses.replace(tube, z0=z0, half_len=hl, x=tube.x + tube.vx * (z0 - tube.z0),
                               y=tube.y + tube.vy * (z0 - tube.z0))


def _colon_shift(g: TorsoGeometry, i: int, top: float, z: float) -> Tuple[float, float]:
    """(dx, dy) mm moving colon i (0 ascending, 1 descending) at height z towards where its
    flexure lies: the hepatic flexure forwards and medially, under the liver's edge; the
    splenic flexure a little forwards, beside the spleen's tip."""
    v = float(_smooth((z - (top - 50.0)) / 50.0))
    low = lower_weight(z - g.subject.vertebra_shift)
    if low > 0:
        # below L4: the caecum and the descending colon in front of the iliacus
        side = -1 if i == 0 else 1
        return -side * 14.0 * g.f * low, -(18.0 if i == 0 else 10.0) * g.f * low
    if v <= 0:
        return 0.0, 0.0
    if i == 0:
        return 22.0 * g.f * v, -22.0 * g.f * v
    return -4.0 * g.f * v, -10.0 * g.f * v


def draw_torso_colon(cv: Canvas, g: TorsoGeometry) -> None:
    """The lumbar layout's ascending and descending colon, ending at the hepatic and splenic
    flexures with a short transverse stretch at each (drawn before the solid organs, which
    then lie around it)."""
    s, t = g.subject, g.t
    lay = s.layout
    sh = s.vertebra_shift
    colon = list(lay["colon"])
    tops = (t.flexure_z[0] + sh, t.flexure_z[1] + sh)
    for i, tube in enumerate(colon[:2]):
        cut = _truncate(tube, tops[i])
        if cut is None:
            continue
        dx, dy = _colon_shift(g, i, tops[i], g.z)
        draw_bowel(cv, [dataclasses.replace(cut, x=cut.x + dx, y=cut.y + dy)], g.z)
    # flexures: the colon turning forwards and towards the midline at its top
    for i, tube in enumerate(colon[:2]):
        dz = g.z - tops[i]
        if abs(dz) >= tube.r:
            continue
        k = float(np.sqrt(1 - (dz / tube.r) ** 2))
        z_end = min(g.z, tops[i] - 1.0)
        sec = tube.section(z_end)
        if sec is None:
            continue
        dx, dy = _colon_shift(g, i, tops[i], z_end)
        cx, cy = sec[0] + dx, sec[1] + dy
        side = -1 if i == 0 else 1
        ang = np.arctan2(-0.6, -side * 1.0)           # forwards and medially
        L = t.flexure_len * k
        mx, my = cx + 0.5 * L * np.cos(ang), cy + 0.5 * L * np.sin(ang)
        _paint_loop(cv, capsule(mx, my, L, tube.r * k, ang, 0.0, 48, tube.harm),
                    tube.r * k, tube.wall, tube.kind, tube.gas, (mx, my, L, ang))


def draw_torso_bowel(cv: Canvas, g: TorsoGeometry) -> None:
    """The rest of the lumbar layout (transverse colon, small bowel and its vessels ending
    below the upper abdomen, septa, IMAT) and the torso's own IMAT and small vessels."""
    s, t = g.subject, g.t
    lay = s.layout
    sh = s.vertebra_shift
    draw_bowel(cv, list(lay["colon"][2:]), g.z)
    loops = [_truncate(tb, t.small_bowel_top_z + sh) for tb in lay["loops"]]
    draw_bowel(cv, [tb for tb in loops if tb is not None], g.z)
    mes = [_truncate(tb, t.small_bowel_top_z + sh + 10) for tb in lay["mesenteric"]]
    draw_thin_tubes(cv, [tb for tb in mes if tb is not None], g.z, C["vessel"], (C["vat"],))
    draw_thin_tubes(cv, lay["septa"], g.z, C["scarpa"], (C["sat"],))
    draw_thin_tubes(cv, lay["imat"], g.z, C["imat"], (C["muscle"],))
    up = torso_layout(s.seed)
    draw_thin_tubes(cv, up["vessels"], g.z, C["vessel"], (C["vat"],))
    draw_thin_tubes(cv, up["imat"], g.z, C["imat"], (C["muscle"],))


@lru_cache(maxsize=64)
def torso_layout(seed: int) -> Dict[str, List[Tube]]:
    """IMAT streaks and islands in the muscles of the upper levels and small vessels in their
    visceral fat, placed once per subject on a coarse map (1.5 mm pixels) of its T12 (as
    anatomy.plan_layout does around L3, whose layout stops about 60 mm above mid-L3)."""
    s = subject_from_seed(int(seed))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 4243]))
    u = rng.uniform
    cv = Canvas(int(np.ceil(s.fov_mm / 1.5)), s.fov_mm)
    z12 = level_centre(s, "T12")
    g = draw_torso(cv, s, z12, with_layout=False)
    ys = cv.centres_mm() - cv.shift[1]
    yy = np.broadcast_to(ys[:, None], cv.codes.shape)
    muscle = cv.codes == C["muscle"]
    back = muscle & (yy > g.y_canal)
    q = s.myosteatosis
    out: Dict[str, List[Tube]] = {"imat": [], "vessels": []}
    n_streak, n_island = int(3 + 24 * q ** 1.2), int(2 + 12 * q)
    for i in range(n_streak + n_island):
        pt = mask_points(cv, back if rng.random() < 0.7 else muscle, rng, 1)
        if len(pt) == 0:
            break
        x, y = float(pt[0, 0]), float(pt[0, 1])
        z0 = z12 + u(-45, 45)
        if i < n_streak:
            width = u(1.0, 2.5) + 1.2 * q * rng.random()
            out["imat"].append(Tube(x, y, z0, rng.normal(0, 0.08), rng.normal(0, 0.08),
                                    u(12, 45), width / 2, "streak",
                                    aspect=u(3, 10) * (1 + 0.5 * q), angle=u(0, np.pi),
                                    bend=rng.normal(0, 0.04)))
        else:
            out["imat"].append(Tube(x, y, z0, rng.normal(0, 0.05), rng.normal(0, 0.05),
                                    u(6, 20), u(1.5, 4.0) + 2.0 * q * rng.random(), "island",
                                    aspect=u(1.0, 1.6), angle=u(0, np.pi)))
    vat = cv.codes == C["vat"]
    for x, y in mask_points(cv, vat, rng, int(10 + 20 * s.vat)):
        out["vessels"].append(Tube(float(x), float(y), z12 + u(-45, 40), rng.normal(0, 0.3),
                                   rng.normal(0, 0.3), u(20, 60), u(0.7, 2.0), "vessel"))
    return out


def _paint_loop(cv: Canvas, outer, r, wall, kind, gas, where) -> None:
    mx, my, L, ang = where
    cv.paint(outer, C["bowel_wall"], over=(C["vat"], C["bowel_wall"], C["bowel_fluid"],
                                            C["stool"], C["gas"]))
    if r - wall < 0.5:
        return
    lumen = capsule(mx, my, L, r - wall, ang, 0.0, 48)
    content = {"fluid": "bowel_fluid", "contrast": "oral_contrast", "stool": "stool",
               "gas": "bowel_fluid", "collapsed": "bowel_fluid"}[kind]
    cv.paint(lumen, C[content], over=(C["bowel_wall"],))
    if gas > 0:
        top = lumen[:, 1].min()
        cv.paint(clip_below(lumen, top + gas * (lumen[:, 1].max() - top)), C["gas"],
                 over=(C[content],))


# ----------------------------------------------------------------------------- all


def _kidney_shift(i: int, dz: float) -> Tuple[float, float]:
    """Above its middle a kidney lies a little further back (its upper pole is posterior)."""
    return 0.0, 0.12 * max(0.0, dz)


#: kidney_contact: how far (mm, drawn per kidney) a kidney moves back and in, onto the
#: quadratus lumborum and psoas; the phantom's kidneys otherwise lie about 10 to 20 mm of
#: fat in front of and beside them
KIDNEY_CONTACT_MM = (6.0, 20.0)


def kidney_contact_shift(s: Subject, share: float):
    """The kidney shift of subject s (a function for draw_kidneys): with probability
    ``share`` (drawn from the subject's seed, on a stream of its own, so every other draw
    is unchanged) both kidneys move back and towards the midline by KIDNEY_CONTACT_MM each,
    onto the quadratus lumborum and psoas, as real kidneys lie on them; the muscles keep
    their pixels (kidneys are drawn over fat only), so the kidney touches them with no fat
    between. share 0: _kidney_shift, the phantom as before."""
    if not drawn_with(s, share, 5150, "kidney_contact"):
        return _kidney_shift
    rng = np.random.default_rng(np.random.SeedSequence([int(s.seed), 5150]))
    rng.random()                  # drawn_with's draw: the shifts follow it on the same stream
    t = rng.uniform(*KIDNEY_CONTACT_MM, 2)

    def shift(i: int, dz: float) -> Tuple[float, float]:
        dx, dy = _kidney_shift(i, dz)
        return dx + 0.5 * t[i], dy + 0.85 * t[i]

    return shift


def tilted_kidney_shift(shift, degrees: float):
    """``shift`` (a draw_kidneys shift) with each kidney's sections moved towards the midline
    by tan(degrees) mm per mm above its middle (and away from it below): real kidneys' long
    axes lean in going up, their upper poles beside the crura and the vertebral bodies at
    T12 to L1, where the psoas has barely begun; the phantom drew them upright, leaving that
    place to the psoas's small origin."""
    if not 0.0 <= degrees < 45.0:
        raise ValueError(f"kidney_tilt is an angle in 0..45 degrees; got {degrees}")
    k = float(np.tan(np.radians(degrees)))

    def tilted(i: int, dz: float) -> Tuple[float, float]:
        dx, dy = shift(i, dz)
        return dx + k * dz, dy

    return tilted


def has_costal_diaphragm(s: Subject, share: float) -> bool:
    """Whether subject s is drawn with draw_ribcage's costal diaphragm (anatomy.drawn_with)."""
    return drawn_with(s, share, 5171, "costal_diaphragm")


def has_crura_front(s: Subject, share: float) -> bool:
    """Whether subject s is drawn with its crura from the front of the vertebral bodies
    (draw_aorta_and_crura; anatomy.drawn_with)."""
    return drawn_with(s, share, 5209, "crura_front")


def draw_torso(cv: Canvas, s: Subject, z: float, with_layout: bool = True,
               pelvic_layout: bool = True, kidney_contact: float = 0.0,
               kidney_rise: float = 0.0, kidney_tilt: float = 0.0,
               costal_diaphragm: float = 0.0, flank_sat: float = 0.0,
               psoas_apart: float = 0.0, back_sat: float = 0.0,
               crura_front: float = 0.0) -> TorsoGeometry:
    """Paint subject s at height z (mm) in the torso anatomy; returns the geometry used.
    pelvic_layout=False leaves out pelvis.pelvis_layout (which is planned on this drawing).
    kidney_contact: share of subjects whose kidneys lie on their muscles
    (kidney_contact_shift; the bowel layouts are planned without it). kidney_rise: mm the
    kidneys (and the adrenals and renal vein with them) lie higher than the torso's own
    draw (0 to 18 mm above the lumbar model's): the torso's kidneys span about L1 to L3,
    real ones T12 to L3, the left upper pole at T11 to T12; 20 mm puts them there.
    kidney_tilt: degrees the kidneys' long axes lean towards the midline going up
    (tilted_kidney_shift; 0: upright, as before). costal_diaphragm: share of subjects
    whose lower ribs the diaphragm lines on the inside (draw_ribcage's costal;
    has_costal_diaphragm; 0: as before). flank_sat: share of subjects whose visceral
    compartment is closed at the back, the fat beside the back muscles subcutaneous
    (draw_wall's flank; has_flank_sat; 0: as before). psoas_apart: share of subjects whose
    psoas at L5 lies apart from the vertebral body and the iliacus (pelvis.part_psoas;
    has_psoas_apart; 0: as before). back_sat: share of subjects whose fat behind the back
    muscles is subcutaneous (draw_wall's back; has_back_sat; 0: as before). crura_front:
    share of subjects whose crura arise from the front of the vertebral bodies
    (draw_aorta_and_crura; has_crura_front; 0: as before)."""
    t = torso_from_seed(s.seed)
    if kidney_rise:
        t = dataclasses.replace(t, kidney_up=t.kidney_up + float(kidney_rise),
                                renal_vein_z=t.renal_vein_z + float(kidney_rise))
    g = TorsoGeometry(s, z, t)
    if has_psoas_apart(s, psoas_apart):
        part_psoas(g)
    cv.shift = np.asarray(s.offset, np.float64)
    g.r_in = inner_radius(g)
    draw_table(cv, g)
    draw_wall(cv, g, has_costal_diaphragm(s, costal_diaphragm), has_flank_sat(s, flank_sat),
              has_back_sat(s, back_sat))
    draw_pelvis(cv, g)
    draw_aorta_and_crura(cv, g, has_crura_front(s, crura_front))
    draw_lungs(cv, g)
    shift = kidney_contact_shift(s, kidney_contact)
    if kidney_tilt:
        shift = tilted_kidney_shift(shift, kidney_tilt)
    draw_kidneys(cv, g, shift=shift, rim=2.0 + 8.0 * s.vat)
    draw_adrenals(cv, g)
    if with_layout:
        draw_torso_colon(cv, g)
    draw_liver(cv, g)
    draw_spleen(cv, g)
    draw_stomach(cv, g)
    draw_pancreas(cv, g)
    draw_veins(cv, g)
    draw_solid_organs(cv, g)
    if with_layout:
        draw_torso_bowel(cv, g)
        if pelvic_layout:
            draw_pelvic_layout(cv, g)
    return g
