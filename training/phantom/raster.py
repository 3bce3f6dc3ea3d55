"""Painting closed shapes onto a tissue map: exact point sampling at pixel centres.

The phantom draws its anatomy in millimetres as closed polygons and paints them in order
(later shapes cover earlier ones, optionally only over given tissues) onto a uint8 map of
tissue codes at several times the output resolution. A pixel takes a shape's code when its
centre lies inside the polygon (even-odd rule), so the map is a point sampling of the drawn
anatomy and the per-pixel class fractions computed from it are exact up to the subpixel grid.

Coordinates: x to the image right (patient left), y down (posterior), in mm, with (0, 0) at
the centre of the field of view. Pixel (row r, column c) of the map covers
[c, c + 1) x [r, r + 1) in map units, centre (c + 0.5, r + 0.5).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import numpy as np


def polygon_mask(poly_xy: np.ndarray, shape: Tuple[int, int]):
    """Rasterise one closed polygon given in map pixel units.

    poly_xy: (N, 2) vertices (x, y) in map pixel units (N >= 3; the last vertex joins the first).
    Returns (r0, c0, mask): the bool mask (h, w) of pixels whose centre is inside, placed at
    row r0, column c0 of a map of ``shape``; None when the polygon covers no pixel centre.
    """
    p = np.asarray(poly_xy, np.float64)
    h_map, w_map = shape
    x0, y0 = p[:, 0], p[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    r0 = max(0, int(np.floor(y0.min() - 0.5)))
    r1 = min(h_map, int(np.ceil(y0.max() + 0.5)) + 1)
    c0 = max(0, int(np.floor(x0.min() - 0.5)))
    c1 = min(w_map, int(np.ceil(x0.max() + 0.5)) + 1)
    if r1 <= r0 or c1 <= c0:
        return None
    # Each edge crosses the pixel-centre rows y = r + 0.5 with lo <= y < hi (half open, so a
    # vertex on a row is counted once): enumerate (edge, row) pairs without a Python loop.
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    first = np.maximum(np.ceil(lo - 0.5), r0).astype(np.int64)
    last = np.minimum(np.ceil(hi - 0.5) - 1, r1 - 1).astype(np.int64)
    n = np.maximum(last - first + 1, 0)
    n[y0 == y1] = 0
    total = int(n.sum())
    if total == 0:
        return None
    edge = np.repeat(np.arange(len(p)), n)
    start = np.repeat(np.cumsum(n) - n, n)
    row = first[edge] + (np.arange(total) - start)
    yc = row + 0.5
    t = (yc - y0[edge]) / (y1[edge] - y0[edge])
    xc = x0[edge] + t * (x1[edge] - x0[edge])
    order = np.lexsort((xc, row))
    row, xc = row[order], xc[order]
    # Sorted crossings pair up row by row (every row has an even count): inside spans
    # cover pixel centres c + 0.5 in [x_even, x_odd).
    ra, xa, xb = row[0::2], xc[0::2], xc[1::2]
    ca = np.clip(np.ceil(xa - 0.5).astype(np.int64), c0, c1) - c0
    cb = np.clip(np.ceil(xb - 0.5).astype(np.int64), c0, c1) - c0
    keep = cb > ca
    if not keep.any():
        return None
    ra, ca, cb = ra[keep] - r0, ca[keep], cb[keep]
    h, w = r1 - r0, c1 - c0
    diff = np.zeros((h, w + 1), np.int16)
    np.add.at(diff, (ra, ca), 1)
    np.add.at(diff, (ra, cb), -1)
    mask = np.cumsum(diff[:, :w], axis=1, dtype=np.int16) > 0
    return r0, c0, mask


class Canvas:
    """A tissue-code map (H, W) uint8 over a square field of view, painted in mm.

    fov_mm: side of the field of view; shape: (H, W) = (n, n) map pixels.
    """

    def __init__(self, n: int, fov_mm: float, fill: int = 0):
        self.n = int(n)
        self.fov_mm = float(fov_mm)
        self.px_mm = self.fov_mm / self.n
        self.codes = np.full((self.n, self.n), fill, np.uint8)
        #: where the drawing's (0, 0) lies relative to the field-of-view centre, mm
        self.shift = np.zeros(2)

    def to_px(self, xy_mm: np.ndarray) -> np.ndarray:
        """Drawing mm (x, y) -> map pixel units."""
        return (np.asarray(xy_mm, np.float64) + self.shift + self.fov_mm / 2.0) / self.px_mm

    def centres_mm(self) -> np.ndarray:
        """Drawing x (= y) coordinate of every pixel centre along one axis, (n,) mm, without
        the shift: add ``-shift[0]`` for x and ``-shift[1]`` for y."""
        return (np.arange(self.n) + 0.5) * self.px_mm - self.fov_mm / 2.0

    def paint(self, poly_mm: np.ndarray, code: int, over: Optional[Iterable[int]] = None) -> None:
        """Set ``code`` inside the polygon (mm); with ``over``, only where the map holds one
        of those codes (so an organ can fill fat without covering muscle, for example)."""
        hit = polygon_mask(self.to_px(poly_mm), self.codes.shape)
        if hit is None:
            return
        r0, c0, mask = hit
        view = self.codes[r0:r0 + mask.shape[0], c0:c0 + mask.shape[1]]
        if over is not None:
            mask = mask & np.isin(view, np.fromiter(over, np.uint8))
        view[mask] = code

    def code_at(self, x_mm: float, y_mm: float) -> int:
        """Tissue code of the map pixel containing (x, y) mm; 0 outside the map."""
        c, r = (int(v) for v in np.floor(self.to_px((x_mm, y_mm))))
        if 0 <= r < self.n and 0 <= c < self.n:
            return int(self.codes[r, c])
        return 0


# ----------------------------------------------------------------------------- shapes (mm)


def _wobble(t: np.ndarray, harm) -> np.ndarray:
    """1 + sum_k a_k cos((k + 2) t + p_k): a smooth irregularity of a closed outline."""
    out = np.ones_like(t)
    for k, (a, p) in enumerate(harm or ()):
        out += a * np.cos((k + 2) * t + p)
    return out


def ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0,
            n: int = 64, harm=None, power: float = 2.0) -> np.ndarray:
    """Polygon (n, 2) of an ellipse with semi-axes rx, ry (mm), rotated by ``angle`` rad.

    harm: [(amplitude, phase), ...] for orders 2, 3, ... makes the outline irregular;
    power > 2 squares it off (a superellipse |u/rx|^p + |v/ry|^p = 1).
    """
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    ct, st = np.cos(t), np.sin(t)
    if power == 2.0:
        u, v = rx * ct, ry * st
    else:
        e = 2.0 / power
        u, v = rx * np.sign(ct) * np.abs(ct) ** e, ry * np.sign(st) * np.abs(st) ** e
    w = _wobble(t, harm)
    u, v = u * w, v * w
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([cx + u * c - v * s, cy + u * s + v * c], axis=1)


def capsule(cx: float, cy: float, length: float, r: float, angle: float = 0.0,
            bend: float = 0.0, n: int = 48, harm=None) -> np.ndarray:
    """A sausage (mm): a centre line of ``length`` through (cx, cy) along ``angle``, bent
    with curvature ``bend`` (1/mm), swept by a disc of radius r (round ends). length 0 gives
    a circle. harm perturbs the width along the outline."""
    m = max(4, n // 4)
    s = np.linspace(-length / 2, length / 2, m)
    theta = bend * s
    if abs(bend) < 1e-9:
        ax, ay = s, np.zeros_like(s)
    else:
        ax, ay = np.sin(theta) / bend, (1 - np.cos(theta)) / bend
    nx, ny = -np.sin(theta), np.cos(theta)
    cap = np.linspace(0, np.pi, m)
    t_end, t_start = theta[-1], theta[0]
    side1 = np.stack([ax + r * nx, ay + r * ny], 1)
    end1 = np.stack([ax[-1] + r * np.cos(t_end + np.pi / 2 - cap),
                     ay[-1] + r * np.sin(t_end + np.pi / 2 - cap)], 1)
    side2 = np.stack([ax - r * nx, ay - r * ny], 1)[::-1]
    end0 = np.stack([ax[0] + r * np.cos(t_start - np.pi / 2 - cap),
                     ay[0] + r * np.sin(t_start - np.pi / 2 - cap)], 1)
    pts = np.concatenate([side1, end1[1:-1], side2, end0[1:-1]])
    if harm:
        centre = pts.mean(axis=0)
        t = np.linspace(0, 2 * np.pi, len(pts), endpoint=False)
        pts = centre + (pts - centre) * _wobble(t, harm)[:, None]
    c, s_ = np.cos(angle), np.sin(angle)
    return np.stack([cx + pts[:, 0] * c - pts[:, 1] * s_, cy + pts[:, 0] * s_ + pts[:, 1] * c],
                    axis=1)


def polar(cx: float, cy: float, phi: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Points at angle ``phi`` (rad, 0 = anterior/up, increasing towards the image right)
    and ``radius`` (mm) around (cx, cy)."""
    return np.stack([cx + radius * np.sin(phi), cy - radius * np.cos(phi)], axis=1)


def band(cx: float, cy: float, phi: np.ndarray, r_outer: np.ndarray,
         r_inner: np.ndarray) -> np.ndarray:
    """Closed polygon between two radial curves over the angles ``phi`` (an open arc)."""
    outer = polar(cx, cy, phi, r_outer)
    inner = polar(cx, cy, phi[::-1], r_inner[::-1])
    return np.concatenate([outer, inner])


def stadium(p0: Sequence[float], p1: Sequence[float], r0: float, r1: Optional[float] = None,
            n: int = 12) -> np.ndarray:
    """A bar from p0 to p1 (mm) with round ends of radius r0 and r1 (a tapered capsule)."""
    r1 = r0 if r1 is None else r1
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    ang = np.arctan2(d[1], d[0])
    a1 = ang + np.linspace(-np.pi / 2, np.pi / 2, n)
    a0 = ang + np.linspace(np.pi / 2, 3 * np.pi / 2, n)
    end1 = p1 + r1 * np.stack([np.cos(a1), np.sin(a1)], axis=1)
    end0 = p0 + r0 * np.stack([np.cos(a0), np.sin(a0)], axis=1)
    return np.concatenate([end1, end0])


def curved_streak(cx: float, cy: float, length: float, width: float, angle: float,
                  bend: float, n: int = 16) -> np.ndarray:
    """A thin curved sliver (mm): a circular arc of ``length`` through (cx, cy) at ``angle``,
    curvature ``bend`` (1/mm), widest (``width``) in the middle and pointed at both ends."""
    s = np.linspace(-length / 2, length / 2, n)
    theta = bend * s
    # arc-length parametrisation of a circle arc (a straight line when bend == 0)
    if abs(bend) < 1e-9:
        ax, ay = s, np.zeros_like(s)
    else:
        ax, ay = np.sin(theta) / bend, (1 - np.cos(theta)) / bend
    half = 0.5 * width * np.sqrt(np.clip(1 - (2 * s / length) ** 2, 0, 1))
    nx, ny = -np.sin(theta), np.cos(theta)
    upper = np.stack([ax + half * nx, ay + half * ny], axis=1)
    lower = np.stack([ax - half * nx, ay - half * ny], axis=1)[::-1]
    pts = np.concatenate([upper, lower[1:-1]])
    c, s_ = np.cos(angle), np.sin(angle)
    return np.stack([cx + pts[:, 0] * c - pts[:, 1] * s_, cy + pts[:, 0] * s_ + pts[:, 1] * c],
                    axis=1)


def clip_below(poly: np.ndarray, y_max: float) -> np.ndarray:
    """The part of a convex polygon with y <= y_max (points below are pulled onto the line),
    e.g. the gas above a fluid level, or a body resting on the table."""
    out = np.array(poly, np.float64)
    out[:, 1] = np.minimum(out[:, 1], y_max)
    return out
