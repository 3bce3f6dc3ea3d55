"""The L3 anatomy of a subject at height z, painted as tissue codes onto a Canvas.

Drawing coordinates: mm, x to the image right (patient left), y down (posterior), (0, 0) at
the centre of the body; the canvas shift places the body in the field of view. z is mm along
the body axis (positive towards the head) around mid-L3.

The body is built from the outside in: the table, skin, subcutaneous fat (SAT) down to the
muscle fascia ("core"), the abdominal wall muscles (rectus, external and internal obliques,
transversus with thin fat planes between them), the back (erector spinae, multifidus,
quadratus lumborum, psoas, latissimus), the lumbar vertebra, the retroperitoneum (kidneys,
aorta, IVC), the liver, spleen and gallbladder when they reach down to this level, then
the colon, small bowel loops and mesenteric vessels in visceral fat (VAT), and intermuscular
fat (IMAT) streaks and islands inside the muscles. Painting is ordered and, where it
matters, restricted to the tissues a structure may displace (``over``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, Optional

import numpy as np

from .raster import Canvas, band, capsule, clip_below, curved_streak, ellipse, polar, stadium
from .subject import PHI, Subject, Tube, draw_subject
from .tissues import CODE

C = CODE
BOWEL_CODES = (C["vat"], C["bowel_wall"], C["bowel_fluid"], C["oral_contrast"], C["gas"],
               C["stool"])
LEVEL_PERIOD_MM = 38.0     # one lumbar vertebral body (28 mm) plus its disc (10 mm)
BODY_HALF_HEIGHT_MM = 14.0


# ----------------------------------------------------------------------------- outlines


def core_radius(s: Subject, phi: np.ndarray) -> np.ndarray:
    """Centre-to-fascia distance (mm) at angles phi: a superellipse, flatter at the back."""
    phi = np.asarray(phi, np.float64)
    back = (1.0 - np.cos(phi)) / 2.0                      # 0 anterior .. 1 posterior
    n = s.n_front + (s.n_back - s.n_front) * back
    b = np.where(np.cos(phi) > 0, s.core_b_ant, s.core_b_post)
    r = 1.0 / ((np.abs(np.sin(phi)) / s.core_a) ** n + (np.abs(np.cos(phi)) / b) ** n) ** (1 / n)
    wobble = sum(a * np.cos((k + 2) * phi + p) for k, (a, p) in enumerate(s.harmonics))
    return r * (1.0 + wobble * (0.25 + 0.75 * (1.0 - back)))


def sat_thickness(s: Subject, phi: np.ndarray) -> np.ndarray:
    """SAT thickness (mm) at angles phi: knots at 0, 50, 95, 140, 180 deg, smoothed."""
    knots = np.radians([0.0, 50.0, 95.0, 140.0, 180.0])
    t = np.interp(np.abs(PHI), knots, s.sat_knots)
    # smooth on the circle (a 12 deg Gaussian) so the knots leave no corners
    k = np.exp(-0.5 * (np.linspace(-60, 60, 121) / 12.0) ** 2)
    t = np.convolve(np.concatenate([t[-60:], t, t[:60]]), k / k.sum(), mode="valid")
    t = t * (1.0 + s.sat_asym * np.sin(PHI))
    return np.interp(np.asarray(phi), PHI, t, period=2 * np.pi)


def fold_depth(s: Subject, phi: np.ndarray) -> np.ndarray:
    """The small dimple (mm) a skin fold leaves in the skin line, at angles phi."""
    d = np.zeros_like(np.asarray(phi, np.float64))
    for f_phi, _, _ in s.folds:
        dphi = np.angle(np.exp(1j * (phi - f_phi)))
        d += 3.0 * np.exp(-0.5 * (dphi / 0.012) ** 2)
    return d


class Geometry:
    """Where things are for subject s at height z (mm, drawing coordinates)."""

    def __init__(self, s: Subject, z: float):
        self.s, self.z = s, float(z)
        f, m = s.frame, s.muscle
        self.f, self.m = f, m
        self.phi = PHI
        self.r_core = core_radius(s, PHI)
        self.sat = sat_thickness(s, PHI)
        self.r_body = self.r_core + self.sat + s.skin_mm - fold_depth(s, PHI)
        self.back_y = float(self.r_body[0])                 # PHI[0] = -pi: straight back
        self.table_top0 = self.back_y - s.table_gap
        self.post_y = float(self.r_core[0])                 # posterior fascia
        # the lumbar column, measured forward from the posterior fascia
        p = self.post_y
        self.y_spinous_tip = p - 6 * f
        self.y_vb_post = p - 60 * f
        self.y_tp = self.y_vb_post + 13 * f                 # transverse processes
        self.y_canal = self.y_vb_post + 8 * f
        self.vb_rx, self.vb_ry = 24 * f, 16.5 * f
        self.y_vb = self.y_vb_post - self.vb_ry
        self.y_vb_ant = self.y_vb - self.vb_ry
        # vertebral level at this height
        zr = self.z - s.vertebra_shift
        level = int(np.round(zr / LEVEL_PERIOD_MM))
        self.level = level                                  # 0 = L3, 1 = L2, -1 = L4
        self.zl = zr - level * LEVEL_PERIOD_MM              # -19 .. 19 within the level
        self.in_body = abs(self.zl) < BODY_HALF_HEIGHT_MM
        # muscles
        grow = 1.0 - 0.004 * self.z                         # psoas grows going down
        self.psoas_r = (17 * f * m ** 0.7 * grow, 15 * f * m ** 0.7 * grow)
        self.psoas_x = self.vb_rx + 0.75 * self.psoas_r[0] + 2
        self.psoas_y = self.y_vb + 1.5 * f
        self.ql_x = 50 * f + 4 * m
        self.ql_y = self.y_tp - 4 * f
        self.ql_r = (16 * f * m ** 0.7, 8 * f * m ** 0.7)
        self.kidney_x = self.psoas_x + self.psoas_r[0] + 20 * f
        self.kidney_y = self.y_vb + 3 * f
        # what the torso anatomy (torso.py) changes with z; these are the L3 model's values
        self.vb_size = {1: 0.97, 0: 1.0, -1: 1.03}.get(level, 1.0)   # vertebral body scale
        self.tp_len = 1.08 if level == 0 else 0.88                   # transverse processes
        self.wall_scale = (1.0, 1.0, 1.0, 1.0)   # rectus, ext. oblique, int. oblique, transversus
        self.latissimus = (1.95, 2.6, 0.65, 1.0)  # first and last angle (rad), span, thickness
        self.draw_psoas = True
        self.draw_ql = True
        self.draw_spleen_tip = True             # draw_solid_organs' spleen

    def table_y(self, x: np.ndarray) -> np.ndarray:
        """y (mm) of the surface the patient lies on, at x: a shallow arc, concave up."""
        r = self.s.table_radius
        x = np.clip(np.asarray(x, np.float64), -0.95 * r, 0.95 * r)
        return self.table_top0 - (r - np.sqrt(r * r - x * x))

    def level_name(self) -> str:
        names = {1: "L2", 0: "L3", -1: "L4", 2: "L1", -2: "L5"}
        here = names.get(self.level, f"L3{-self.level:+d}")
        if self.in_body:
            return here
        other = names.get(self.level + (1 if self.zl > 0 else -1), "?")
        upper, lower = (other, here) if self.zl > 0 else (here, other)
        return f"{upper}-{lower} disc"


def _clip_to_table(poly: np.ndarray, g: Geometry, inset: float) -> np.ndarray:
    out = np.array(poly)
    out[:, 1] = np.minimum(out[:, 1], g.table_y(out[:, 0]) - inset)
    return out


def _bump(u: np.ndarray, power: float = 0.6) -> np.ndarray:
    """A smooth 0..1..0 window over u in [0, 1]."""
    return np.sin(np.pi * np.clip(u, 0, 1)) ** power


# ----------------------------------------------------------------------------- parts


def draw_table(cv: Canvas, g: Geometry) -> None:
    s = g.s
    half = s.table_width / 2
    x = np.linspace(-half, half, 96)
    top = g.table_y(x) + s.pad_mm
    bottom = top + s.table_thick * np.sqrt(np.clip(1 - (x / half) ** 8, 0, 1))
    shell = np.concatenate([np.stack([x, top], 1), np.stack([x[::-1], bottom[::-1]], 1)])
    cv.paint(shell, C["table_shell"])
    xi = np.linspace(-half + 5, half - 5, 96)
    top_i = g.table_y(xi) + s.pad_mm + 2.2
    bot_i = np.maximum(top_i, top_i + s.table_thick * np.sqrt(np.clip(1 - (xi / half) ** 8, 0, 1))
                       - 4.4)
    core = np.concatenate([np.stack([xi, top_i], 1), np.stack([xi[::-1], bot_i[::-1]], 1)])
    cv.paint(core, C["table_core"])
    if s.pad_mm > 0:
        xp = np.linspace(-half + 20, half - 20, 64)
        pad = np.concatenate([np.stack([xp, g.table_y(xp) - 3], 1),
                              np.stack([xp[::-1], g.table_y(xp[::-1]) + s.pad_mm], 1)])
        cv.paint(pad, C["pad"], over=(C["air"],))


def draw_body_wall(cv: Canvas, g: Geometry) -> None:
    """Skin, SAT with the superficial fascia, the fascia ("core") filled with VAT."""
    s = g.s
    phi = g.phi
    body = _clip_to_table(polar(0, 0, phi, g.r_body), g, 0.0)
    cv.paint(body, C["skin"])
    sat = _clip_to_table(polar(0, 0, phi, g.r_body - s.skin_mm), g, s.skin_mm)
    cv.paint(sat, C["sat"])
    # Scarpa's fascia: a thin fibrous sheet in the deeper half of thick SAT (front and sides)
    depth = g.r_core + 0.45 * g.sat
    sel = np.abs(phi) < 2.1
    width = 0.6 * np.clip((g.sat[sel] - 10.0) / 8.0, 0.0, 1.0)
    if width.max() > 0:
        ph = phi[sel]
        cv.paint(band(0, 0, ph, depth[sel] + width / 2, depth[sel] - width / 2), C["scarpa"],
                 over=(C["sat"],))
    core = _clip_to_table(polar(0, 0, phi, g.r_core), g, s.skin_mm + 2.0)
    cv.paint(core, C["vat"])
    # skin folds: the skin tucked into the fat as a thin dense line with a sliver of air
    for f_phi, width, depth in s.folds:
        r_out = float(np.interp(f_phi, phi, g.r_body, period=2 * np.pi))
        r_in = r_out - depth
        lean = np.sign(f_phi) * 0.35
        a = np.array([np.sin(f_phi), -np.cos(f_phi)])
        mid = a * (r_out + r_in) / 2
        ang = float(np.arctan2(a[1], a[0])) + lean
        cv.paint(curved_streak(mid[0], mid[1], depth + 2, 2.2, ang, width), C["skin"],
                 over=(C["sat"], C["skin"], C["air"]))
        cv.paint(curved_streak(mid[0] + 0.3 * depth * a[0], mid[1] + 0.3 * depth * a[1],
                               0.55 * depth, 0.6, ang, width), C["air"], over=(C["skin"],))


def _radial_layer(g: Geometry, lo: float, hi: float, n: int = 96):
    """Angles over [lo, hi] (rad) with the fascia radius there."""
    ph = np.linspace(lo, hi, n)
    return ph, core_radius(g.s, ph)


def wall_layers(g: Geometry) -> Dict[str, float]:
    """The abdominal wall's layout at this height: half width of the linea alba ``la`` and
    angular width of each rectus ``rect_w`` (rad, from anterior); the lateral wall's span
    ``start``..``end`` (rad from anterior); thicknesses (mm) of the rectus and of the
    external oblique, internal oblique and transversus (``t_rect``, ``t_eo``, ``t_io``,
    ``t_ta``) and the fat plane between the layers (``plane``)."""
    s, f, m = g.s, g.f, g.m
    r0 = float(core_radius(s, np.array([0.0]))[0])
    la = (4 + 8 * s.adiposity) / r0
    rect_w = (62 + 10 * m) * f / r0
    ws = g.wall_scale
    return {"la": la, "rect_w": rect_w, "start": la + 0.8 * rect_w, "end": 2.05 + 0.08 * m,
            "t_rect": 10.5 * f * m * ws[0], "t_eo": 6.5 * f * m * ws[1],
            "t_io": 8.0 * f * m * ws[2], "t_ta": 5.0 * f * m * ws[3],
            "plane": 0.8 + 1.2 * s.adiposity + 0.6 * s.myosteatosis}


def draw_abdominal_muscles(cv: Canvas, g: Geometry) -> None:
    m = g.m
    w = wall_layers(g)
    la, rect_w = w["la"], w["rect_w"]
    t_rect, t_eo, t_io, t_ta, plane = w["t_rect"], w["t_eo"], w["t_io"], w["t_ta"], w["plane"]
    ph, rc = _radial_layer(g, -la, la, 16)
    cv.paint(band(0, 0, ph, rc - 0.3, rc - 2.2), C["fascia"], over=(C["vat"],))
    for side in (-1, 1):
        # rectus abdominis: lens-shaped, thickest medially
        ph, rc = _radial_layer(g, la, la + rect_w, 64)
        u = (ph - la) / rect_w
        t = t_rect * (0.25 + 0.75 * _bump(0.12 + 0.88 * u, 0.7)) * (1 - 0.3 * u)
        cv.paint(band(0, 0, side * ph, rc - 0.4, rc - 0.4 - t), C["muscle"])
        # lateral wall: external oblique, internal oblique, transversus abdominis
        start, end = w["start"], w["end"]
        ph, rc = _radial_layer(g, start, end, 128)

        def window(lo, hi, p=0.5):
            return _bump((ph - lo) / (hi - lo), p)

        w_eo, w_io, w_ta = window(start + 0.1, end - 0.1), window(start, end), window(start + 0.05, end + 0.05)
        r_eo = rc - 0.4
        r_eo_in = r_eo - t_eo * w_eo
        r_io = r_eo_in - plane * np.minimum(w_eo, w_io)
        r_io_in = r_io - t_io * w_io
        r_ta = r_io_in - 0.8 * plane * np.minimum(w_io, w_ta)
        r_ta_in = r_ta - t_ta * w_ta
        cv.paint(band(0, 0, side * ph, r_eo, r_ta_in), C["imat"])
        for outer, inner in ((r_eo, r_eo_in), (r_io, r_io_in), (r_ta, r_ta_in)):
            cv.paint(band(0, 0, side * ph, outer, inner), C["muscle"])
        # latissimus dorsi: a thin sheet outside the fascia, posterolateral
        lo, hi, span, k_lat = g.latissimus
        ph, rc = _radial_layer(g, lo, hi, 48)
        t = (3.0 + 3.0 * m) * _bump((ph - lo) / span, 0.8) * k_lat
        cv.paint(band(0, 0, side * ph, rc + t, rc), C["muscle"], over=(C["sat"],))


def erector_rx(g: Geometry) -> float:
    """Half width (mm) of each erector spinae (draw_back_muscles); its lateral edge lies
    2 * erector_rx + 3 * f from the midline."""
    return 30 * g.f * g.m ** 0.4


def draw_back_muscles(cv: Canvas, g: Geometry) -> None:
    s, f, m = g.s, g.f, g.m
    p = g.post_y
    depth = p - g.y_tp                                  # TP level to the posterior fascia
    for side, key in ((-1, "r"), (1, "l")):
        # erector spinae + multifidus fill the compartment behind the transverse processes
        # (a rounded box from the spinous process out to beyond the TP tips)
        es_rx = erector_rx(g)
        es_ry = 0.5 * depth + 4
        es = ellipse(side * (es_rx + 3 * f), g.y_tp + es_ry - 3, es_rx, es_ry, side * 0.1, 96,
                     s.shapes["es_" + key], power=2.6)
        cv.paint(es, C["muscle"], over=(C["vat"],))
        # the fat plane between multifidus (medial) and the erector spinae (lateral)
        cv.paint(curved_streak(side * 17 * f, g.y_tp + 0.55 * depth, 0.8 * depth,
                               0.5 + 0.8 * s.myosteatosis, np.pi / 2 - side * 0.3, side * 0.012),
                 C["imat"], over=(C["muscle"],))
        # quadratus lumborum at the TP tips, tilted forward laterally
        if g.draw_ql:
            cv.paint(ellipse(side * g.ql_x, g.ql_y, *g.ql_r, -side * 0.5, 48,
                             s.shapes["ql_" + key]), C["muscle"], over=(C["vat"],))
        # psoas beside the vertebral body
        if g.draw_psoas:
            cv.paint(ellipse(side * g.psoas_x, g.psoas_y, *g.psoas_r, side * 0.5, 48,
                             s.shapes["psoas_" + key]), C["muscle"], over=(C["vat"], C["muscle"]))


def back_line(g: Geometry):
    """(x, y) mm where the phantom's back compartment begins, for close_flank and
    close_back: x just beyond the erector spinae's lateral edge (each side of the midline),
    y the quadratus lumborum's back surface (y grows posteriorly)."""
    return 2 * erector_rx(g) + 3 * g.f + 1.0, g.ql_y + g.ql_r[1]


def close_flank(cv: Canvas, g: Geometry, sides=(-1, 1), fascia_mm: float = 0.6) -> None:
    """The visceral compartment closed at the back (flank_sat): lateral to the erector
    spinae and behind the quadratus lumborum, the lateral wall's layers end and what lies
    there inside the fascia outline (visceral fat, the wall muscles' posterior ends)
    becomes SAT, continuous with the SAT outside.

    The phantom's fascia outline, flatter at the back, ran round behind the back muscles
    with the lateral wall's layers inside it, so the fat lateral to the erector spinae
    was visceral. In real patients the transversus and internal oblique end in the
    thoracolumbar fascia at the lateral border of the quadratus lumborum and erector
    spinae; the retroperitoneal (visceral) fat lies in front of that line, and the fat
    behind the flank and beside the back muscles is subcutaneous, thick in obese patients
    (mistaken for visceral on real CT before this). A fascia ``fascia_mm`` wide (MSC; 0 for
    none) marks the line out to the wall. Call after draw_back_muscles, before the organs.
    sides: -1 right (image left), +1 left."""
    ph = np.linspace(np.pi / 2, np.pi, 256)
    r = core_radius(g.s, ph)
    y = -r * np.cos(ph)
    xq, yq = back_line(g)
    if not y[0] < yq < y[-1]:
        return
    k = int(np.searchsorted(y, yq))                   # y rises with the angle on this arc
    xa = float(np.interp(yq, y, r * np.sin(ph)))
    if xa <= xq:
        return
    for side in sides:
        outline = polar(0, 0, side * ph[k:], r[k:])
        wedge = np.concatenate([[[side * xq, yq], [side * xa, yq]], outline,
                                [[side * xq, float(outline[-1, 1])]]])
        cv.paint(wedge, C["sat"], over=(C["vat"], C["muscle"], C["imat"]))
        if fascia_mm > 0:
            h = fascia_mm / 2
            cv.paint(np.array([[side * xq, yq - h], [side * xa, yq - h], [side * xa, yq + h],
                               [side * xq, yq + h]]), C["fascia"], over=(C["vat"], C["sat"]))


def close_back(cv: Canvas, g: Geometry) -> None:
    """The fat behind the back muscles subcutaneous (back_sat): between the erector spinae's
    lateral edges and behind the quadratus lumborum's back surface, what the phantom drew as
    visceral fat inside its fascia outline (a strip behind the erector spinae and a wedge
    behind the spinous process, in every subject) becomes SAT, continuous with the SAT
    outside; the muscles, bone and anything else keep their pixels.

    The phantom's fascia outline runs round behind the back muscles, so the fat there was
    visceral; in real patients the thoracolumbar fascia lies on the erector spinae and the
    fat behind it is subcutaneous (real CT: VAT called behind the back muscles' middle,
    training/realct.vat_behind_back). close_flank does the same lateral to the muscles.
    Call after draw_back_muscles."""
    xq, yq = back_line(g)
    ph = np.linspace(np.pi / 2, 3 * np.pi / 2, 512)   # the back half, image right to left
    arc = polar(0, 0, ph, core_radius(g.s, ph))
    arc = arc[(np.abs(arc[:, 0]) <= xq) & (arc[:, 1] > yq)]
    if len(arc) < 2:
        return
    cv.paint(np.concatenate([[[xq, yq]], arc, [[-xq, yq]]]), C["sat"], over=(C["vat"],))


def drawn_with(s: Subject, share: float, stream: int, name: str) -> bool:
    """Whether subject s has an anatomy option given to a ``share`` of the subjects: drawn
    from the subject's seed on a stream of its own (``stream``), so every other draw is
    unchanged; share 0: never, the phantom as before. name: the option, for the error."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"{name} is a share in 0..1; got {share}")
    rng = np.random.default_rng(np.random.SeedSequence([int(s.seed), int(stream)]))
    return bool(rng.random() < share)


def has_flank_sat(s: Subject, share: float) -> bool:
    """Whether subject s is drawn with close_flank (draw's and torso.draw_wall's flank)."""
    return drawn_with(s, share, 5189, "flank_sat")


def has_back_sat(s: Subject, share: float) -> bool:
    """Whether subject s is drawn with close_back (draw's and torso.draw_wall's back)."""
    return drawn_with(s, share, 5203, "back_sat")


def _bone(cv: Canvas, outer: np.ndarray, inner: Optional[np.ndarray]) -> None:
    cv.paint(outer, C["cortex"])
    if inner is not None:
        cv.paint(inner, C["marrow"])


def draw_vertebra(cv: Canvas, g: Geometry) -> None:
    """Body (or disc), pedicles, transverse processes, laminae, spinous process, facets and
    the canal, by where z falls within the level (upper part: pedicles and TPs)."""
    s, f = g.s, g.f
    zl = g.zl
    size = g.vb_size
    vbp = g.y_vb_post
    # vertebral body (kidney-shaped: concave at the back) or the disc
    theta = np.linspace(-np.pi, np.pi, 96, endpoint=False)
    rx, ry = g.vb_rx * size, g.vb_ry * size
    rad = 1 / np.sqrt((np.sin(theta) / rx) ** 2 + (np.cos(theta) / ry) ** 2)
    rad = rad * (1 - 0.13 * np.exp(-0.5 * (np.angle(np.exp(1j * (theta - np.pi))) / 0.5) ** 2))
    for k, (a, ph) in enumerate(s.shapes["vb"]):
        rad = rad * (1 + a * np.cos((k + 2) * theta + ph))
    if g.in_body:
        _bone(cv, polar(0, g.y_vb, theta, rad), polar(0, g.y_vb, theta, rad - 1.5))
    else:
        cv.paint(polar(0, g.y_vb, theta, rad + 1.5), C["disc"])
        # the endplate where the slice grazes the neighbouring body
        if abs(abs(zl) - BODY_HALF_HEIGHT_MM) < 1.0:
            cv.paint(polar(0, g.y_vb, theta, rad - 2), C["cortex"], over=(C["disc"],))
    tp_len = g.tp_len
    # pedicles (upper two thirds of the body)
    if -6 < zl < 12:
        for side in (-1, 1):
            p0, p1 = (side * 14 * f, vbp - 1), (side * 16 * f, vbp + 11 * f)
            _bone(cv, stadium(p0, p1, 5.5 * f), stadium(p0, p1, 3.8 * f))
    # transverse processes from the pedicle-lamina junction
    if -5 < zl < 9:
        k = _bump((zl + 5) / 14, 0.5)
        tip = (22 + 28 * k) * f * tp_len
        for side in (-1, 1):
            p0, p1 = (side * 16 * f, vbp + 10 * f), (side * tip, vbp + 13 * f)
            _bone(cv, stadium(p0, p1, 4.4 * f, 2.6 * f), stadium(p0, p1, 2.9 * f, 1.2 * f))
    # laminae, meeting behind the canal
    if -15 < zl < 8:
        for side in (-1, 1):
            p0, p1 = (side * 16 * f, vbp + 12 * f), (side * 2 * f, vbp + 22 * f)
            _bone(cv, stadium(p0, p1, 4.4 * f), stadium(p0, p1, 2.8 * f))
    # spinous process, pointing back and down
    if -17 < zl < 5:
        k = _bump((zl + 17) / 22, 0.4)
        tip_y = vbp + (22 + (g.y_spinous_tip - vbp - 22) * (0.5 + 0.5 * k)) * 1.0
        _bone(cv, stadium((0, vbp + 21 * f), (0, tip_y), 3.8 * f, 4.2 * f),
              stadium((0, vbp + 21 * f), (0, tip_y), 2.3 * f, 2.6 * f))
    # facet joints: superior articular processes with the joint space, near the discs
    if abs(zl) > 7:
        for side in (-1, 1):
            cx, cy = side * 19 * f, vbp + 16 * f
            _bone(cv, ellipse(cx, cy, 5.0 * f, 7.0 * f, -side * 0.45, 32),
                  ellipse(cx, cy, 3.2 * f, 5.0 * f, -side * 0.45, 32))
            cv.paint(curved_streak(cx - side * 3 * f, cy + 1, 13 * f, 1.1,
                                   np.pi / 2 - side * 0.45, 0.0), C["disc"])
    # spinal canal (thecal sac)
    cv.paint(ellipse(0, vbp + 8 * f, 11 * f, 7.5 * f, 0, 48, power=2.3), C["csf"],
             over=(C["vat"], C["muscle"], C["disc"], C["marrow"], C["imat"]))


def draw_kidneys(cv: Canvas, g: Geometry, shift=None, rim: float = 0.0) -> None:
    """The kidneys (and ureters below them). shift(i, dz) -> (dx, dy) mm moves kidney i
    (0 right, 1 left; dx towards the midline) at dz from its centre height; rim > 0 first
    lays perirenal fat (VAT) that far around each section, which later organs cannot fill."""
    s, f = g.s, g.f
    kidney_over = (C["vat"],) if rim <= 0 else (C["vat"], C["fat_pad"])
    for i, (side, key) in enumerate(((-1, "kidney_r"), (1, "kidney_l"))):  # right = image left
        half_len = 52 * f * s.kidney_size[i]
        dz = g.z - s.kidney_z[i]
        x, y = side * g.kidney_x, g.kidney_y
        if shift is not None:
            dx, dy = shift(i, dz)
            x, y = x - side * dx, y + dy
        if abs(dz) >= half_len:
            # below the lower pole: only the ureter, in front of the psoas
            if dz < 0:
                cv.paint(ellipse(side * (g.psoas_x + 2), g.psoas_y - g.psoas_r[1] - 4, 2.6, 2.6,
                                 0, 16), C["urine"], over=(C["vat"],))
            continue
        k = np.sqrt(1 - (dz / half_len) ** 2)
        rx, ry = 27 * f * s.kidney_size[i] * k, 20 * f * s.kidney_size[i] * k
        ang = side * 0.9
        if rim > 0:
            cv.paint(ellipse(x, y, rx + rim, ry + rim, ang, 64, s.shapes[key]), C["fat_pad"],
                     over=(C["vat"],))
        cv.paint(ellipse(x, y, rx, ry, ang, 64, s.shapes[key]), C["kidney_cortex"],
                 over=kidney_over)
        if rx > 8:
            cv.paint(ellipse(x, y, rx - 6, ry - 6, ang, 48), C["kidney_medulla"],
                     over=(C["kidney_cortex"],))
        if k > 0.8:
            # renal sinus: fat and the collecting system, opening anteromedially
            # the sinus opens through the medial border (the hilum), so the kidney is C-shaped
            hx, hy = x - side * 0.72 * rx, y - 0.15 * ry
            cv.paint(ellipse(hx, hy, 0.42 * rx, 0.32 * ry, ang, 32), C["vat"],
                     over=(C["kidney_cortex"], C["kidney_medulla"]))
            cv.paint(ellipse(hx - side * 0.1 * rx, hy, 0.2 * rx, 0.15 * ry, ang, 24), C["urine"])


def aorta_lumens(ax: float, ay: float, r: float, z: float, bifurcation_z: float):
    """[(x, y, radius)] mm of the aorta at height z: one lumen above the bifurcation, the two
    common iliac arteries (0.68 r, drifting apart over 25 mm) below it."""
    if z > bifurcation_z:
        return [(ax, ay, r)]
    spread = min(1.0, (bifurcation_z - z) / 25.0)
    rr = 0.68 * r
    return [(ax - (4 + 14 * spread), ay + 2, rr), (ax + 4 + 12 * spread, ay + 2, rr)]


def draw_vessels(cv: Canvas, g: Geometry) -> None:
    s, f = g.s, g.f
    r = s.aorta_r
    ax, ay = 9 * f, g.y_vb_ant - r - 1.5
    aortas = aorta_lumens(ax, ay, r, g.z, s.bifurcation_z)
    for x, y, rad in aortas:
        cv.paint(ellipse(x, y, rad, rad * 0.97, 0, 48), C["aorta"], over=(C["vat"],))
    for angle, z0 in s.plaques:
        if abs(g.z - z0) < 4 and len(aortas) == 1:
            cv.paint(curved_streak(ax + (r - 0.8) * np.cos(angle), ay + (r - 0.8) * np.sin(angle),
                                   3.5, 1.3, angle + np.pi / 2, 1 / r), C["calcification"])
    ivc_x = -17 * f - 0.4 * r
    cv.paint(ellipse(ivc_x, g.y_vb_ant - 8 * f, 12 * f, 7.5 * f, 0.15, 48), C["ivc"],
             over=(C["vat"],))
    # superior mesenteric artery and vein in the root of the mesentery
    ry = ay - r - 16 * f
    cv.paint(ellipse(ax - 3, ry, 3.2, 3.2, 0, 24), C["vessel"], over=(C["vat"],))
    cv.paint(ellipse(ax - 15, ry + 1, 5.0, 4.5, 0, 24), C["vessel"], over=(C["vat"],))


def draw_solid_organs(cv: Canvas, g: Geometry) -> None:
    s, f = g.s, g.f
    a = s.core_a
    # liver: the inferior tip of the right lobe, lateral and in front of the right kidney
    dz = g.z - s.liver_z
    if abs(dz) < 95:
        k = np.sqrt(1 - (dz / 95) ** 2)
        if k > 0.05:
            cx, cy = -(a - 30 - 22 * k), g.kidney_y - 30 * f
            cv.paint(ellipse(cx, cy, 60 * k, 40 * k, -0.5, 64, s.shapes["liver"]), C["liver"],
                     over=(C["vat"],))
            if s.gallbladder and k > 0.35:
                cv.paint(ellipse(cx + 40 * k, cy - 22 * k, 14, 11, 0.4, 32), C["bile"],
                         over=(C["vat"], C["liver"]))
    dz = g.z - s.spleen_z
    if abs(dz) < 70 and g.draw_spleen_tip:
        k = np.sqrt(1 - (dz / 70) ** 2)
        cv.paint(ellipse(a - 25 - 20 * k, g.kidney_y + 5, 40 * k, 26 * k, 0.8, 48,
                         s.shapes["spleen"]), C["spleen"], over=(C["vat"],))


def _tube_section(t: Tube, z: float):
    sec = t.section(z)
    if sec is None:
        return None
    cx, cy, k = sec
    v = np.hypot(t.vx, t.vy)
    angle = float(np.arctan2(t.vy, t.vx)) if v > 1e-6 else t.angle
    return cx, cy, k, v, angle


def loop_outline(t: Tube, z: float, inset: float = 0.0):
    """The section of a bowel loop at z, shrunk by ``inset`` mm (for the lumen), or None.

    A tube of radius r crossing the plane with in-plane drift v per mm of z cuts a sausage
    whose centre line is 2 r (sqrt(1 + v^2) - 1) long."""
    sec = _tube_section(t, z)
    if sec is None:
        return None
    cx, cy, k, v, angle = sec
    r = t.r * k - inset
    if r < 0.5:
        return None
    length = 2 * t.r * k * (np.sqrt(1 + v * v) - 1)
    return capsule(cx, cy, length, r, angle, t.bend, 48, t.harm)


def draw_bowel(cv: Canvas, loops, z: float) -> None:
    for t in loops:
        outer = loop_outline(t, z)
        if outer is None:
            continue
        cv.paint(outer, C["bowel_wall"], over=BOWEL_CODES)
        lumen = loop_outline(t, z, t.wall)
        if lumen is None:
            continue
        content = {"fluid": "bowel_fluid", "contrast": "oral_contrast", "stool": "stool",
                   "gas": "bowel_fluid", "collapsed": "bowel_fluid"}[t.kind]
        cv.paint(lumen, C[content], over=(C["bowel_wall"],))
        if t.gas > 0:
            # gas rises to the front (supine): everything above the fluid level
            top = lumen[:, 1].min()
            level = top + t.gas * (lumen[:, 1].max() - top)
            cv.paint(clip_below(lumen, level), C["gas"], over=(C[content],))
        if t.kind == "stool":
            # gas bubbles mottling the stool
            rng = np.random.default_rng(int(abs(t.x * 1000 + t.y)) % (2 ** 31))
            cx, cy = lumen.mean(axis=0)
            rr = 0.6 * (t.r - t.wall)
            for _ in range(int(3 + t.r / 3)):
                a, d = rng.uniform(0, 2 * np.pi), rr * np.sqrt(rng.uniform())
                cv.paint(ellipse(cx + d * np.cos(a), cy + d * np.sin(a), rng.uniform(0.8, 3),
                                 rng.uniform(0.8, 3), 0, 16), C["gas"], over=(C["stool"],))


def draw_thin_tubes(cv: Canvas, tubes, z: float, code: int, over) -> None:
    for t in tubes:
        sec = t.section(z)
        if sec is None:
            continue
        cx, cy, k = sec
        if t.aspect > 1.5:
            poly = curved_streak(cx, cy, 2 * t.r * t.aspect * k, 2 * t.r * k, t.angle, t.bend)
        else:
            poly = ellipse(cx, cy, t.r * k * t.aspect, t.r * k, t.angle, 20)
        cv.paint(poly, code, over=over)


def draw(cv: Canvas, s: Subject, z: float, with_layout: bool = True,
         flank: bool = False, back: bool = False) -> Geometry:
    """Paint subject s at height z (mm) onto the canvas; returns the geometry used.

    with_layout=False leaves out what plan_layout places (bowel, mesenteric vessels, IMAT).
    flank: close_flank on both sides (the fat beside the back muscles subcutaneous).
    back: close_back (the fat behind the back muscles subcutaneous).
    """
    g = Geometry(s, z)
    cv.shift = np.asarray(s.offset, np.float64)
    draw_table(cv, g)
    draw_body_wall(cv, g)
    draw_abdominal_muscles(cv, g)
    draw_back_muscles(cv, g)
    if flank:
        close_flank(cv, g)
    if back:
        close_back(cv, g)
    draw_vertebra(cv, g)
    draw_kidneys(cv, g)
    draw_vessels(cv, g)
    draw_solid_organs(cv, g)
    if with_layout:
        lay = s.layout
        draw_bowel(cv, lay["colon"], z)
        draw_bowel(cv, lay["loops"], z)
        draw_thin_tubes(cv, lay["mesenteric"], z, C["vessel"], (C["vat"],))
        draw_thin_tubes(cv, lay["septa"], z, C["scarpa"], (C["sat"],))
        draw_thin_tubes(cv, lay["imat"], z, C["imat"], (C["muscle"],))
    return g


# ----------------------------------------------------------------------------- layout


def mask_points(cv: Canvas, mask: np.ndarray, rng, n: int) -> np.ndarray:
    """n random drawing-mm points inside pixels where mask is True ((0, 2) when none)."""
    rr, cc = np.nonzero(mask)
    if len(rr) == 0:
        return np.zeros((0, 2))
    pick = rng.integers(0, len(rr), n)
    jitter = rng.uniform(0, 1, (n, 2))
    x = (cc[pick] + jitter[:, 0]) * cv.px_mm - cv.fov_mm / 2 - cv.shift[0]
    y = (rr[pick] + jitter[:, 1]) * cv.px_mm - cv.fov_mm / 2 - cv.shift[1]
    return np.stack([x, y], 1)


def plan_layout(s: Subject) -> None:
    """Place the colon, small bowel loops, mesenteric vessels and IMAT streaks (s.layout).

    Works on a coarse map (1.5 mm pixels) of the anatomy at z = 0: loops go into visceral fat
    in front of the kidneys until the fat left over matches the subject's VAT amount; IMAT
    goes into muscle, more of it with myosteatosis.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(s.seed), 4242]))
    u = rng.uniform
    cv = Canvas(int(np.ceil(s.fov_mm / 1.5)), s.fov_mm)
    g = draw(cv, s, 0.0, with_layout=False)
    f = s.frame
    xs = cv.centres_mm() - cv.shift[0]
    ys = cv.centres_mm() - cv.shift[1]
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    vat = cv.codes == C["vat"]
    # intraperitoneal space: in front of the kidneys and psoas, away from the kidneys
    peritoneal = vat & (yy < g.kidney_y - 6 * f)
    for side in (-1, 1):
        d = ((xx - side * g.kidney_x) / 45) ** 2 + ((yy - g.kidney_y) / 38) ** 2
        peritoneal &= d > 1
    lay: Dict[str, list] = {"colon": [], "loops": [], "mesenteric": [], "imat": [], "septa": []}

    def occupy(t: Tube):
        outline = loop_outline(t, 0.0)
        if outline is not None:
            cv.paint(outline, C["bowel_wall"], over=(C["vat"],))

    def harm(amp):
        return tuple((float(u(0, amp)), float(u(0, 2 * np.pi))) for _ in range(3))

    def content(colon: bool):
        r = rng.random()
        if colon:
            return ("stool", u(0.0, 0.3)) if r < 0.65 else ("gas", u(0.5, 0.95))
        if s.oral_contrast and r < 0.5:
            return "contrast", 0.0
        if r < 0.3:
            return "collapsed", 0.0
        if r < 0.36:
            return "gas", u(0.2, 0.6)
        return "fluid", 0.0

    wall_in = float(np.mean(core_radius(s, np.array([-1.57, 1.57])))) - 18 * f
    # ascending (right, image left) and descending (left) colon, nearly vertical tubes
    for side in (-1, 1):
        r = u(15, 24) if side < 0 else u(11, 17)
        kind, gas = content(True)
        x = side * (wall_in - r - u(0, 10))
        y = g.kidney_y - (30 * f if side < 0 else 14 * f) + u(-8, 8)
        t = Tube(x, y, 0.0, u(-0.08, 0.08), u(-0.08, 0.08), 300.0, r, kind, u(2, 3.5), gas,
                 harm=harm(0.06))
        lay["colon"].append(t)
        occupy(t)
    if rng.random() < 0.4:   # transverse colon sweeping across the front
        kind, gas = content(True)
        t = Tube(u(-40, 40), -(s.core_b_ant - 35), u(-15, 15), float(rng.choice([-2.5, 2.5])),
                 u(-0.3, 0.3), u(12, 25), u(13, 20), kind, 2.5, gas, harm=harm(0.05))
        lay["colon"].append(t)
        occupy(t)
    # small bowel loops until the fat left over matches the VAT amount
    start = max(1, int(peritoneal.sum()))
    keep = 0.12 + 0.6 * s.vat
    for _ in range(600):
        free = peritoneal & (cv.codes == C["vat"])
        if free.sum() <= keep * start:
            break
        pt = mask_points(cv, free, rng, 1)
        if len(pt) == 0:
            break
        kind, gas = content(False)
        r, wall = u(7, 14), u(1.5, 3.0)
        if kind == "collapsed":
            r = u(4, 8)
            wall = 0.8 * r
        direction, drift = u(0, 2 * np.pi), abs(rng.normal(0, 0.9))
        t = Tube(float(pt[0, 0]), float(pt[0, 1]), u(-20, 20), drift * np.cos(direction),
                 drift * np.sin(direction), u(45, 110), r, kind, wall, gas,
                 bend=0.0 if gas else rng.normal(0, 0.025), harm=harm(0.12))
        lay["loops"].append(t)
        occupy(t)
    # small mesenteric vessels in the fat left between the loops
    free = peritoneal & (cv.codes == C["vat"])
    for x, y in mask_points(cv, free, rng, int(20 + 30 * s.vat)):
        lay["mesenteric"].append(Tube(float(x), float(y), u(-30, 30), rng.normal(0, 0.3),
                                      rng.normal(0, 0.3), u(30, 120), u(0.7, 2.2), "vessel"))
    # fibrous septa in the subcutaneous fat, running roughly along the skin
    sat = cv.codes == C["sat"]
    for x, y in mask_points(cv, sat, rng, int(15 + 50 * s.adiposity)):
        tangent = float(np.arctan2(y, x)) + np.pi / 2 + rng.normal(0, 0.35)
        lay["septa"].append(Tube(float(x), float(y), u(-30, 30), rng.normal(0, 0.1),
                                 rng.normal(0, 0.1), u(15, 50), u(0.2, 0.45), "septum",
                                 aspect=u(15, 60), angle=tangent, bend=rng.normal(0, 0.02)))
    # IMAT: thin streaks and small islands inside muscle, more in the back muscles
    muscle = cv.codes == C["muscle"]
    back = muscle & (yy > g.y_canal)
    q = s.myosteatosis
    n_streak = int(4 + 30 * q ** 1.2)
    n_island = int(3 + 15 * q)
    for i in range(n_streak + n_island):
        src = back if rng.random() < 0.65 else muscle
        pt = mask_points(cv, src, rng, 1)
        if len(pt) == 0:
            break
        x, y = float(pt[0, 0]), float(pt[0, 1])
        if i < n_streak:
            width = u(1.0, 2.5) + 1.2 * q * rng.random()
            lay["imat"].append(Tube(x, y, u(-40, 40), rng.normal(0, 0.08), rng.normal(0, 0.08),
                                    u(12, 45), width / 2, "streak",
                                    aspect=u(3, 10) * (1 + 0.5 * q), angle=u(0, np.pi),
                                    bend=rng.normal(0, 0.04)))
        else:
            lay["imat"].append(Tube(x, y, u(-40, 40), rng.normal(0, 0.05), rng.normal(0, 0.05),
                                    u(6, 20), u(1.5, 4.0) + 2.0 * q * rng.random(), "island",
                                    aspect=u(1.0, 1.6), angle=u(0, np.pi)))
    s.layout = lay


@lru_cache(maxsize=64)
def subject_from_seed(seed: int) -> Subject:
    """The subject a seed stands for, with its organ layout (cached; treat as read-only)."""
    s = draw_subject(int(seed))
    plan_layout(s)
    return s
