"""The bottom of the torso anatomy: L4-L5 to S1, where the iliac wings and the sacrum appear.

An axial slice below the iliac crest meets, besides the lumbar anatomy: the iliac wings
(cortex and marrow, MSC), each a curved plate lateral and posterolateral in the body whose
section grows from a thick crest rim just below the crest to a long plate from the sacroiliac
region (thick) round to the anterior superior iliac spine (thin fossa in between); the
iliacus (MUS) on the wing's inner, anteromedial surface, thickening going down until it meets
the psoas; gluteus medius (MUS) on its outer surface out to the fascia; the psoas larger and
further forward, anterolateral to a broader L5 body; the common iliac arteries drifting
apart in front of the psoas and the common iliac veins below the IVC's confluence; the
quadratus lumborum ending at the crest; more small bowel loops (and the caecum and the
descending colon moved in front of the iliacus). IMAT streaks go into the new muscles. Below
the L5-S1 disc (``S1_DISC_MM``), within the S1 body: the top of the sacrum (draw_sacrum) with
the psoas resting on its ala.

Everything is a smooth function of z for one subject, zero above ``TOP_MM`` (relative to the
subject's column: mid-L3 = 0, mid-L4 = -38, L4-L5 disc about -57, mid-L5 -76), so every slice
above it is exactly what it was before this module existed. Subject-specific numbers come from
``pelvis_from_seed`` (its own random stream). Coordinates and angles as in anatomy.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Dict, List, Tuple

import numpy as np

from .anatomy import core_radius, draw_thin_tubes, drawn_with, mask_points, subject_from_seed
from .raster import Canvas, band, ellipse, polar, stadium
from .subject import Tube, plain
from .tissues import CODE

C = CODE
#: nothing this module draws or moves reaches above this height (mm, relative to the column)
TOP_MM = -42.0
#: the middle of the L5-S1 disc (mm, relative to the column; half-way between torso.COLUMN's
#: L5 and S1, a test holds them together): what only the sacrum (S1) changes starts below
#: it, so every slice from T11 to L5 is what it was before S1 existed
S1_DISC_MM = -95.0


def _smooth(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


@dataclass
class Pelvis:
    """What a seed fixes about the lower lumbar levels and the iliac wings. Heights (``*_z``)
    are mm relative to the subject's column (z - vertebra_shift), 0 = mid-L3."""

    crest_z: Tuple[float, float]   # highest point of the iliac crest, right / left, mm
    crest_u: float                 # where along the wing the crest is highest (0 back .. 1 front)
    post_drop: float               # the crest's posterior end lies this much lower, mm
    ant_drop: float                # its anterior end (ASIS) this much lower, mm
    reach: float                   # lateral reach of the wing (x frame), mm
    depth: float                   # front-to-back size of the wing's arc (x frame), mm
    rim_t: float                   # thickness of the crest rim, mm
    plate_t: float                 # thickness of the thin iliac fossa, mm
    post_t: float                  # thickness of the posterior (sacroiliac) part, mm
    glute_min: float               # gluteus medius at least this thick laterally, mm
    iliacus_t: float               # iliacus thickness at L5-S1, mm
    vb_wide: float                 # L5 body breadth relative to L4's
    psoas_fwd: float               # mm the psoas moves forwards from L4 to L5
    ivc_conf_z: float              # confluence of the common iliac veins, mm
    iliac_spread: float            # how far apart the common iliac arteries end up (x frame)

    def meta(self) -> Dict[str, object]:
        return plain(asdict(self))


@lru_cache(maxsize=64)
def pelvis_from_seed(seed: int) -> Pelvis:
    """The lower-lumbar and iliac parameters of subject ``seed`` (cached; read-only)."""
    s = subject_from_seed(int(seed))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1618]))
    u = rng.uniform
    f, m = s.frame, s.muscle
    crest = u(-60.0, TOP_MM - 4.0)      # about at L4 (lower body) to the L4-L5 disc
    return Pelvis(
        crest_z=(float(crest + u(-3, 3)), float(crest + u(-3, 3))),
        crest_u=float(u(0.2, 0.4)), post_drop=float(u(6, 16)), ant_drop=float(u(55, 80)),
        reach=float(u(98, 112) * f + 3.0 * (s.sex == "F")), depth=float(u(62, 76) * f),
        rim_t=float(u(7, 11) * f), plate_t=float(u(3.0, 5.5) * f), post_t=float(u(16, 26) * f),
        glute_min=float(u(12, 18) * f * m ** 0.5), iliacus_t=float(u(14, 22) * f * m ** 0.7),
        vb_wide=float(u(1.06, 1.14)), psoas_fwd=float(u(8, 15) * f),
        ivc_conf_z=float(u(-82, -64)), iliac_spread=float(u(26, 34) * f),
    )


def lower_weight(zr: float, span: float = 34.0) -> float:
    """0 at TOP_MM and above, rising smoothly to 1 ``span`` mm below it."""
    return float(_smooth((TOP_MM - zr) / span))


def sacral_weight(zr: float, span: float = 20.0) -> float:
    """0 at S1_DISC_MM and above, rising smoothly to 1 ``span`` mm below it (into S1)."""
    return float(_smooth((S1_DISC_MM - zr) / span))


def has_psoas_apart(s, share: float) -> bool:
    """Whether subject s is drawn with part_psoas (anatomy.drawn_with)."""
    return drawn_with(s, share, 5197, "psoas_apart")


def part_psoas(g) -> None:
    """psoas_apart: the psoas and iliacus below TOP_MM as in many adults, where at L5 the
    psoas is a round muscle of its own in the retroperitoneal fat, not the mass joined to the
    vertebral body and the iliacus that the phantom otherwise draws: the psoas moves
    laterally off the body by 5 to 14 mm (x frame; visceral fat in between) and is 10 to
    25 % smaller than drawn otherwise (which grows about 12 % from TOP_MM to mid-L5), and the
    iliacus is a strip 0.25 to 0.55 times as thick (so fat parts it from the psoas); each
    faded in over lower_weight's 34 mm. Changes g (a torso.TorsoGeometry) in place; drawn from
    the subject's seed on a stream of its own; nothing changes at or above TOP_MM."""
    low = lower_weight(g.zr)
    if low <= 0.0:
        return
    rng = np.random.default_rng(np.random.SeedSequence([int(g.subject.seed), 5198]))
    gap, shrink, thin = rng.uniform(5.0, 14.0), rng.uniform(0.1, 0.25), rng.uniform(0.25, 0.55)
    k = 1.0 - shrink * low
    # the medial edge gap x frame x low mm lateral of where it was, whatever the shrink
    g.psoas_x += gap * g.f * low - (1.0 - k) * g.psoas_r[0]
    g.psoas_r = (g.psoas_r[0] * k, g.psoas_r[1] * k)
    g.iliacus_k = 1.0 - (1.0 - thin) * low


# ----------------------------------------------------------------------------- the wing


def wing_line(g, side: int, n: int = 320):
    """Centre line of the iliac wing on one side (-1 right, +1 left): (points (n, 2) mm,
    u (n,) 0 at the posterior end .. 1 at the anterior superior iliac spine, outward unit
    normals (n, 2)). An elliptic arc round a centre in front of and medial to it, kept at
    least ``glute_min`` inside the fascia."""
    p, f = g.pel, g.f
    cx, cy = side * 36.0 * f, g.y_vb - 30.0 * f
    rx = max(20.0, p.reach - 36.0 * f)
    th = np.linspace(np.radians(72.0), np.radians(-38.0), n)   # posterior .. anterior
    u = np.linspace(0.0, 1.0, n)
    pts = np.stack([cx + side * rx * np.cos(th), cy + p.depth * np.sin(th)], 1)
    phi = np.arctan2(pts[:, 0], -pts[:, 1])
    r = np.hypot(pts[:, 0], pts[:, 1])
    lim = core_radius(g.s, phi) - p.glute_min - 6.0
    pts *= (np.minimum(r, lim) / np.maximum(r, 1e-6))[:, None]
    d = np.gradient(pts, axis=0)
    nrm = np.stack([-d[:, 1], d[:, 0]], 1) * side       # away from the arc's centre
    nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-9)
    return pts, u, nrm


def crest_height(p: Pelvis, side_i: int, u: np.ndarray) -> np.ndarray:
    """Height (mm, column-relative) of the crest above each point u of the wing."""
    top, cu = p.crest_z[side_i], p.crest_u
    back = p.post_drop * ((cu - u) / cu) ** 2
    front = p.ant_drop * ((u - cu) / (1 - cu)) ** 2
    return top - np.where(u < cu, back, front)


def wing_half(p: Pelvis, u: np.ndarray, dd: np.ndarray) -> np.ndarray:
    """Half thickness (mm) of the wing's section at u, dd mm below the crest (0 where dd <= 0):
    the round crest rim, then the plate (thick behind, thin in the fossa, a little thicker at
    the front)."""
    h = p.rim_t / 2
    plate = 0.5 * (p.plate_t + (p.post_t - p.plate_t) * _smooth((0.32 - u) / 0.3)
                   + 2.0 * _smooth((u - 0.85) / 0.15))
    rim = h * np.sqrt(np.clip(1.0 - (1.0 - dd / h) ** 2, 0.0, 1.0))
    v = _smooth((dd - h) / 14.0)
    below = (1 - v) * h + v * plate
    out = np.where(dd < h, rim, below)
    out = np.maximum(out, plate * _smooth(dd / p.rim_t))
    return np.where(dd > 0, out, 0.0)


def _runs(mask: np.ndarray):
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [(a, b) for a, b in zip(edges[0::2], edges[1::2]) if b - a >= 3]


def _strip(a, b):
    """Closed polygon between two polylines a (N, 2) and b (N, 2)."""
    return np.concatenate([a, b[::-1]])


def draw_pelvis(cv: Canvas, g) -> None:
    """Iliac wings, gluteus medius outside them and the iliacus inside (below the crest)."""
    if g.zr >= TOP_MM:
        return
    p = g.pel
    wall = (C["vat"], C["muscle"], C["imat"], C["fascia"], C["fat_pad"])
    for side_i, side in enumerate((-1, 1)):
        pts, u, nrm = wing_line(g, side)
        dd = crest_height(p, side_i, u) - g.zr
        half = wing_half(p, u, dd)
        for a, b in _runs(half > 0.05):
            P, H, N, U, D = pts[a:b], half[a:b], nrm[a:b], u[a:b], dd[a:b]
            outer = P + N * H[:, None]
            # gluteus medius (and the obliques' insertion): muscle from the bone to the fascia
            phi = np.arctan2(outer[:, 0], -outer[:, 1])
            r_out = np.hypot(outer[:, 0], outer[:, 1])
            r_f = core_radius(g.s, phi) - 0.4
            keep = r_f > r_out + 0.5
            if keep.sum() >= 3:
                cv.paint(band(0, 0, phi[keep], r_f[keep], r_out[keep] - 0.3), C["muscle"],
                         over=wall)
            sweep = 0.7 * float(_smooth(D.max() / 20.0))
            if sweep > 0.02:
                # behind the wing's posterior end, out to the back muscles: gluteus and the
                # erector spinae's lateral edge (no visceral fat outside the wing)
                ph = phi[0] + side * np.linspace(0.0, sweep, 40)
                r_end = np.full(40, r_out[0] - 2.0 - H[0])
                cv.paint(band(0, 0, ph, core_radius(g.s, ph) - 0.4, r_end), C["muscle"],
                         over=(C["vat"], C["fat_pad"], C["imat"]))
            # iliacus: on the inner surface, from the crest down, thickest in the fossa
            t_il = (p.iliacus_t * _smooth(D / 25.0) * _smooth(U / 0.04)
                    * (1.0 - 0.5 * _smooth((U - 0.4) / 0.5)) * _smooth((0.97 - U) / 0.2))
            t_il = t_il * (0.55 + 0.45 * lower_weight(g.zr, 40.0)) * g.iliacus_k
            inner = P - N * (H[:, None] + 0.2)
            if t_il.max() > 1.0:
                cv.paint(_strip(inner, inner - N * t_il[:, None]), C["muscle"],
                         over=(C["vat"], C["fat_pad"]))
            # the bone: cortex, and marrow where it is thick enough
            cv.paint(_strip(P + N * H[:, None], P - N * H[:, None]), C["cortex"],
                     over=wall + (C["sat"],))
            hm = np.maximum(H - 1.3, 0.0)
            if hm.max() > 0.4:
                cv.paint(_strip(P + N * hm[:, None], P - N * hm[:, None]), C["marrow"],
                         over=(C["cortex"],))


# ----------------------------------------------------------------------------- the sacrum


def draw_sacrum(cv: Canvas, g) -> None:
    """The top of the sacrum (S1 body, in place of anatomy.draw_vertebra): the body, broader
    and shallower than L5's; the alae, bone from the body out and back to the sacroiliac
    joints on the iliac wings' posterior ends, their front surface where the psoas rests
    (painted over fat only, so the psoas and the back muscles stay); a small flat canal;
    the fused laminae and the median crest behind it. Real axial slices within the
    L5 vertebra's height (its posterior elements reach below the L5-S1 disc) meet this:
    on the shared abdomen-pelvis CT, TotalSegmentator's L5 label shares 10 slices of 3 mm
    with its sacrum."""
    f = g.f
    rx, ry = g.vb_rx * g.vb_size * 1.04, g.vb_ry * g.vb_size * 0.92
    y0 = g.y_vb + 3.0 * f * sacral_weight(g.zr)       # the promontory leans back going down
    vbp = y0 + ry
    soft = (C["vat"], C["fat_pad"], C["imat"], C["fascia"], C["disc"], C["csf"])
    for side_i, side in enumerate((-1, 1)):
        pts, u, nrm = wing_line(g, side)
        half = wing_half(g.pel, u, crest_height(g.pel, side_i, u) - g.zr)
        inner = pts - nrm * half[:, None]
        a_front = inner[int(np.argmin(np.abs(u - 0.12)))]   # the joint's front end
        a_back = inner[0]
        # under the psoas: its back rests on the ala
        rest = (side * g.psoas_x, g.psoas_y + 0.75 * g.psoas_r[1])
        ala = np.array([(side * 0.55 * rx, y0 - 0.55 * ry), rest,
                        tuple(a_front), tuple(a_back),
                        (side * 14.0 * f, vbp + 10.0 * f), (side * 6.0 * f, vbp + 2.0 * f)])
        cv.paint(ala, C["cortex"], over=soft)
        core = ala.mean(0) + 0.78 * (ala - ala.mean(0))
        cv.paint(core, C["marrow"], over=(C["cortex"],))
    theta = np.linspace(-np.pi, np.pi, 96, endpoint=False)
    rad = 1 / np.sqrt((np.sin(theta) / rx) ** 2 + (np.cos(theta) / ry) ** 2)
    cv.paint(polar(0, y0, theta, rad), C["cortex"], over=soft + (C["marrow"],))
    cv.paint(polar(0, y0, theta, rad - 1.5), C["marrow"], over=(C["cortex"],))
    # fused laminae and the median crest
    for side in (-1, 1):
        p0, p1 = (side * 15 * f, vbp + 6 * f), (0.0, vbp + 13 * f)
        cv.paint(stadium(p0, p1, 4.0 * f), C["cortex"], over=soft + (C["marrow"],))
    cv.paint(stadium((0.0, vbp + 12 * f), (0.0, vbp + 20 * f), 3.2 * f, 2.4 * f), C["cortex"],
             over=soft + (C["muscle"],))
    # the canal: smaller and flatter than the lumbar one
    cv.paint(ellipse(0.0, vbp + 6.5 * f, 9.0 * f, 4.5 * f, 0, 48, power=2.3), C["csf"],
             over=(C["cortex"], C["marrow"]) + soft)


# ----------------------------------------------------------------------------- vessels


def iliac_arteries(g, lumens: List[Tuple[float, float, float]]):
    """The aorta's lumens moved below TOP_MM: the common iliac arteries drifting apart to lie
    in front of the psoas."""
    if g.zr >= TOP_MM or len(lumens) != 2:
        return lumens
    v = lower_weight(g.zr)
    out = []
    for side, (x, y, r) in zip((-1, 1), lumens):
        out.append((x + v * (side * g.pel.iliac_spread - x), y + v * 5.0 * g.f, r))
    return out


def iliac_veins(g, ivc):
    """[(x, y, rx, ry)] of the IVC, or below its confluence the two common iliac veins
    (behind and medial to the arteries, the left one crossing in front of L5)."""
    x, y, rx, ry = ivc
    v = float(_smooth((g.pel.ivc_conf_z - g.zr) / 14.0)) if g.zr < TOP_MM else 0.0
    if v <= 0:
        return [ivc]
    f = g.f
    targets = ((-(g.pel.iliac_spread + 4.0 * f), g.y_vb_ant - 2.0 * f),
               (g.pel.iliac_spread - 10.0 * f, g.y_vb_ant - 1.0 * f))
    k = 1.0 - 0.35 * v
    return [(x + v * (tx - x), y + v * (ty - y), rx * k, ry * (1 - 0.15 * v))
            for tx, ty in targets]


# ----------------------------------------------------------------------------- layout


@lru_cache(maxsize=64)
def pelvis_layout(seed: int) -> Dict[str, List[Tube]]:
    """Small bowel loops filling the lower abdomen and IMAT in the new muscles, placed once
    per subject on a coarse map (1.5 mm pixels) of its mid-L5; every tube ends (rounded)
    below TOP_MM."""
    from .torso import _truncate, draw_torso, level_centre

    s = subject_from_seed(int(seed))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 4244]))
    u = rng.uniform
    cv = Canvas(int(np.ceil(s.fov_mm / 1.5)), s.fov_mm)
    z5 = level_centre(s, "L5")
    g = draw_torso(cv, s, z5, with_layout=True, pelvic_layout=False)
    top = TOP_MM - 2.0 + s.vertebra_shift
    xs = cv.centres_mm() - cv.shift[0]
    ys = cv.centres_mm() - cv.shift[1]
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    vat = cv.codes == C["vat"]
    peritoneal = vat & (yy < g.psoas_y - 4.0 * g.f)
    out: Dict[str, List[Tube]] = {"loops": [], "imat": []}

    def harm(amp):
        return tuple((float(u(0, amp)), float(u(0, 2 * np.pi))) for _ in range(3))

    start = max(1, int(peritoneal.sum()))
    keep = 0.15 + 0.6 * s.vat
    for _ in range(200):
        free = peritoneal & (cv.codes == C["vat"])
        if free.sum() <= keep * start:
            break
        pt = mask_points(cv, free, rng, 1)
        if len(pt) == 0:
            break
        r = rng.random()
        kind, gas = (("contrast", 0.0) if s.oral_contrast and r < 0.5 else
                     ("collapsed", 0.0) if r < 0.3 else
                     ("gas", u(0.2, 0.6)) if r < 0.36 else ("fluid", 0.0))
        rad, wall = (u(4, 8), 0.0) if kind == "collapsed" else (u(7, 14), u(1.5, 3.0))
        if kind == "collapsed":
            wall = 0.8 * rad
        direction, drift = u(0, 2 * np.pi), abs(rng.normal(0, 0.6))
        t = Tube(float(pt[0, 0]), float(pt[0, 1]), z5 + u(-12, 12), drift * np.cos(direction),
                 drift * np.sin(direction), u(30, 70), rad, kind, wall, gas,
                 bend=0.0 if gas else rng.normal(0, 0.025), harm=harm(0.12))
        t = _truncate(t, top)
        if t is None:
            continue
        from .anatomy import loop_outline

        outline = loop_outline(t, z5)
        if outline is not None:
            cv.paint(outline, C["bowel_wall"], over=(C["vat"],))
        out["loops"].append(t)
    # IMAT in the muscles beside and behind the pelvis (iliacus, gluteus, psoas, back)
    muscle = (cv.codes == C["muscle"]) & (np.abs(xx) > 0.8 * g.vb_rx)
    q = s.myosteatosis
    for i in range(int(3 + 16 * q ** 1.2) + int(2 + 8 * q)):
        pt = mask_points(cv, muscle, rng, 1)
        if len(pt) == 0:
            break
        x, y = float(pt[0, 0]), float(pt[0, 1])
        if i % 3:
            t = Tube(x, y, z5 + u(-20, 20), rng.normal(0, 0.08), rng.normal(0, 0.08),
                     u(12, 40), (u(1.0, 2.5) + 1.2 * q * rng.random()) / 2, "streak",
                     aspect=u(3, 10) * (1 + 0.5 * q), angle=u(0, np.pi),
                     bend=rng.normal(0, 0.04))
        else:
            t = Tube(x, y, z5 + u(-20, 20), rng.normal(0, 0.05), rng.normal(0, 0.05),
                     u(6, 18), u(1.5, 4.0) + 2.0 * q * rng.random(), "island",
                     aspect=u(1.0, 1.6), angle=u(0, np.pi))
        t = _truncate(t, top)
        if t is not None:
            out["imat"].append(t)
    return out


def draw_pelvic_layout(cv: Canvas, g) -> None:
    """The loops and IMAT of pelvis_layout (nothing above TOP_MM)."""
    if g.zr >= TOP_MM:
        return
    from .anatomy import draw_bowel

    lay = pelvis_layout(g.subject.seed)
    draw_bowel(cv, lay["loops"], g.z)
    draw_thin_tubes(cv, lay["imat"], g.z, C["imat"], (C["muscle"],))
