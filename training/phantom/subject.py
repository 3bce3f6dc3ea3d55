"""One phantom subject: everything about a body that a seed fixes.

``subject_from_seed(seed)`` draws the habitus (frame, fat and muscle amounts, myosteatosis),
the scan (tube voltage, contrast phase, noise, blur, field of view, table) and the layout of
the organs. The same seed always gives the same subject; slices at different z come from the
same subject, so its anatomy changes smoothly along the body axis.

Lengths are mm, CT numbers HU. Angles ``phi`` are measured from anterior (the image top),
increasing towards the image right (the patient's left).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

import numpy as np

from .tissues import PHASES

N_PHI = 720
PHI = np.linspace(-np.pi, np.pi, N_PHI, endpoint=False)


@dataclass
class Tube:
    """Something long that crosses the axial plane: a bowel loop, a vessel, an IMAT streak.

    At height z its section is centred at (x + vx (z - z0), y + vy (z - z0)) and shrinks to
    nothing at |z - z0| = half_len (a rounded end); r is the half width (mm).
    """

    x: float
    y: float
    z0: float
    vx: float
    vy: float
    half_len: float
    r: float
    kind: str = ""
    wall: float = 0.0         # bowel wall thickness, mm
    gas: float = 0.0          # fraction of the lumen height filled by gas (bowel)
    aspect: float = 1.0       # section shape: length / width (IMAT streaks)
    angle: float = 0.0        # in-plane orientation, rad
    bend: float = 0.0         # curvature of the section's centre line, 1/mm
    harm: Tuple[Tuple[float, float], ...] = ()   # outline irregularity

    def section(self, z: float):
        """(cx, cy, scale) at height z, scale in 0..1, or None where the tube has ended."""
        dz = z - self.z0
        if abs(dz) >= self.half_len:
            return None
        scale = float((1.0 - (abs(dz) / self.half_len) ** 4) ** 0.25)
        return self.x + self.vx * dz, self.y + self.vy * dz, scale


@dataclass
class Subject:
    seed: int
    sex: str
    age: float
    frame: float                 # skeletal size factor (1 = average adult)
    adiposity: float             # 0 very lean .. 1 severely obese
    vat: float                   # visceral fat amount 0..1
    muscle: float                # muscle mass factor (sarcopenia < 0.85)
    myosteatosis: float          # 0..1: fatty infiltration (IMAT streaks, lower muscle HU)
    # scan
    kvp: int
    phase: str
    enhancement: float
    oral_contrast: bool
    noise_sd_hu: float           # pixel noise SD at 512 x 512
    psf_fwhm_mm: float
    fov_mm: float
    offset: Tuple[float, float]  # body centre relative to the field-of-view centre, mm
    # CT numbers
    fat_hu: float
    vat_offset_hu: float
    muscle_hu: float
    marrow_hu: float
    cortex_hu: float
    liver_hu: float
    oral_contrast_hu: float
    table_hu: float
    # shape
    core_a: float                # half width of the muscle wall (fascia), mm
    core_b_ant: float            # centre to anterior fascia, mm
    core_b_post: float           # centre to posterior fascia, mm
    n_front: float
    n_back: float
    harmonics: List[Tuple[float, float]]   # (amplitude, phase) for orders 2, 3, 4, ...
    sat_knots: List[float]       # SAT thickness at phi = 0, 50, 95, 140, 180 deg, mm
    sat_asym: float
    skin_mm: float
    folds: List[Tuple[float, float, float]]  # skin folds: (phi, curvature 1/mm, depth mm)
    table_gap: float             # how far the body sinks onto the table, mm
    table_radius: float
    table_thick: float
    table_width: float
    pad_mm: float
    # organs
    kidney_z: Tuple[float, float]          # right, left: centre height, mm
    kidney_size: Tuple[float, float]
    liver_z: float               # height of the liver tip's centre (lower = more liver at L3)
    spleen_z: float
    gallbladder: bool
    aorta_r: float
    bifurcation_z: float
    plaques: List[Tuple[float, float]]      # aortic wall calcifications: (angle, z0)
    vertebra_shift: float        # z of the L3 body centre relative to z = 0, mm
    shapes: Dict[str, List[Tuple[float, float]]]  # outline irregularity per organ/muscle
    layout: Dict[str, list] = field(default_factory=dict, repr=False)

    def meta(self) -> Dict[str, object]:
        """JSON-serialisable subject parameters (the layout lists left out)."""
        d = asdict(self)
        d.pop("layout")
        d["n_bowel_loops"] = len(self.layout.get("loops", []))
        d["n_imat_streaks"] = len(self.layout.get("imat", []))
        return plain(d)


def plain(obj):
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return round(float(obj), 4)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


#: how irregular each outline may be (relative radius amplitude per harmonic)
SHAPE_IRREGULARITY = {"es_r": 0.04, "es_l": 0.04, "psoas_r": 0.05, "psoas_l": 0.05,
                      "ql_r": 0.06, "ql_l": 0.06, "kidney_r": 0.03, "kidney_l": 0.03,
                      "liver": 0.06, "spleen": 0.05, "vb": 0.02}


def draw_subject(seed: int) -> Subject:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 31337]))
    u = rng.uniform
    sex = "F" if rng.random() < 0.5 else "M"
    male = sex == "M"
    age = u(22, 88)
    frame = float(np.clip(rng.normal(1.04 if male else 0.97, 0.05), 0.9, 1.14))
    adiposity = float(np.clip(rng.beta(1.8, 2.6), 0.0, 1.0))
    vat = float(np.clip(adiposity * (1.25 if male else 0.75) * u(0.6, 1.3)
                        + 0.15 * (age - 50) / 40, 0.0, 1.0))
    muscle = rng.normal(1.08 if male else 0.92, 0.09) - 0.2 * max(0.0, age - 60) / 30
    muscle = float(np.clip(muscle, 0.62, 1.3))
    myo = float(np.clip(0.55 * (age - 25) / 60 + 0.3 * adiposity + rng.normal(0, 0.15)
                        - 0.15, 0.0, 1.0))

    kvp = int(rng.choice([80, 100, 120], p=[0.2, 0.45, 0.35]))
    phase = str(rng.choice(PHASES, p=[0.15, 0.15, 0.6, 0.1]))
    fat_hu = -97.0 - 0.35 * (120 - kvp) + rng.normal(0, 4)
    muscle_hu = 51.0 - 28.0 * myo + rng.normal(0, 4)

    sat_scale = (1.3 if not male else 0.8) * u(0.7, 1.3)
    sat_ant = 5 + 42 * adiposity ** 1.3 * sat_scale
    sat_lat = 6 + 38 * adiposity ** 1.2 * sat_scale * u(0.8, 1.25)
    sat_post = 5 + 30 * adiposity ** 1.2 * sat_scale * u(0.7, 1.2)
    sat_knots = [sat_ant, sat_ant * u(0.85, 1.15), sat_lat, (sat_lat + sat_post) / 2 * u(0.9, 1.3),
                 sat_post]

    core_a = frame * (125 + 8 * male) * (0.92 + 0.08 * muscle) + 22 * vat
    core_b_post = frame * 90 + 6 * vat
    core_b_ant = frame * 78 + 55 * vat * u(0.8, 1.2)
    width = 2 * (core_a + sat_lat + 2)
    fov = float(np.clip(width + u(70, 150), 0.6 * 512, 0.9 * 512))

    noise = 13.5 * (width / 330.0) ** 0.8 * (120.0 / kvp) ** 0.2 * u(0.9, 1.1)
    folds = []
    if adiposity > 0.45:
        for _ in range(rng.poisson(2.5 * adiposity)):
            side = rng.choice([-1, 1])
            folds.append((float(side * u(0.9, 2.2)), float(u(-0.02, 0.02)),
                          float(u(0.25, 0.6) * sat_lat)))

    n_plaques = rng.poisson(max(0.0, age - 50) / 6)
    plaques = [(float(u(0, 2 * np.pi)), float(u(-60, 60))) for _ in range(n_plaques)]
    return Subject(
        seed=int(seed), sex=sex, age=float(age), frame=frame, adiposity=adiposity, vat=vat,
        muscle=muscle, myosteatosis=myo,
        kvp=kvp, phase=phase, enhancement=float(u(0.8, 1.2)),
        oral_contrast=bool(rng.random() < 0.3), noise_sd_hu=float(noise),
        psf_fwhm_mm=float(u(0.7, 1.1)), fov_mm=fov,
        offset=(float(u(-12, 12)), float(u(-25, 0))),
        fat_hu=float(fat_hu), vat_offset_hu=float(u(4, 14)), muscle_hu=float(muscle_hu),
        marrow_hu=float(np.clip(215 - 1.9 * (age - 25) + rng.normal(0, 20), 70, 280)),
        cortex_hu=float(u(450, 700)),
        liver_hu=float(60 - 35 * vat * u(0, 1)),
        oral_contrast_hu=float(u(180, 400)), table_hu=float(u(150, 450)),
        core_a=float(core_a), core_b_ant=float(core_b_ant), core_b_post=float(core_b_post),
        n_front=float(u(1.8, 2.15)), n_back=float(u(2.2, 2.9)),
        harmonics=[(float(u(0, 0.03)), float(u(0, 2 * np.pi))) for _ in range(4)],
        sat_knots=[float(v) for v in sat_knots], sat_asym=float(u(-0.12, 0.12)),
        skin_mm=float(u(1.5, 2.6)), folds=folds,
        table_gap=float(2 + 14 * adiposity * u(0.5, 1.0)), table_radius=float(u(380, 700)),
        table_thick=float(u(28, 48)), table_width=float(u(420, 520)),
        pad_mm=float(u(8, 30)) if rng.random() < 0.35 else 0.0,
        kidney_z=(float(u(10, 35)), float(u(25, 50))),
        kidney_size=(float(u(0.88, 1.12)), float(u(0.88, 1.12))),
        liver_z=float(u(45, 130)), spleen_z=float(u(75, 140)),
        gallbladder=bool(rng.random() < 0.2),
        aorta_r=float(8.5 + 3.0 * (age - 20) / 60 + u(-1, 1)),
        bifurcation_z=float(u(-55, -28)), plaques=plaques,
        vertebra_shift=float(u(-4, 4)),
        shapes={name: [(float(u(0, amp)), float(u(0, 2 * np.pi))) for _ in range(3)]
                for name, amp in SHAPE_IRREGULARITY.items()},
    )
