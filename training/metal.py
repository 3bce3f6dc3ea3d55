"""Metal and its artefacts on a training slice (``--metal``): pedicle screws and rods of a
spinal fixation, or surgical clips, with the streaks they cast. Older and cancer patients,
the cohorts body-composition studies measure, may carry them at L1 to L5; the phantom has
none, and the model trained without them lost 0.05 muscle Dice on a real CT with screws
drawn in (``evaluate-real --simulate metal``, docs/model.md).

What a slice gets (all HU, pixels of the training grid, about 0.87 mm):
- spinal fixation (60 %): two screws from the posterior elements through the pedicles into
  the vertebral body, converging forward, 5..7 mm thick, with a head and a rod (4..6 mm and
  2.5..3 mm across) behind the entry, in the paraspinal muscles; placed from the vertebral
  body (the largest region above 250 HU in the middle of the body: its front and width);
- clips (40 %): 1..6 short bars, 3..8 mm long and 1..1.5 mm thick, in the visceral fat or
  an organ;
- metal at 2000..3071 HU (CT's usual ceiling), label MSC ("everything else", as bone);
- streaks, as filtered back projection draws photon starvation and beam hardening: a dark
  band along the line through every pair of metal objects (150..700 HU deep at its middle
  times a strength drawn per slice, 0.4..1 for screws, 0.05..0.25 for clips), and 6..16
  straight rays from each object, bright and dark in turn (50..400 HU times the strength),
  fading with distance over 20..80 mm; everything denser than -900 HU (body, table, arms)
  gets them, air not.
Labels change only under the metal. Every draw comes from the generator passed in.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .randomize import GRID_MM, MSC, VAT

METAL_HU = (2000.0, 3071.0)
CT_MAX_HU = 3071.0


def _bar(rr, cc, a, b, radius: float) -> np.ndarray:
    """Pixels within ``radius`` of the segment from a to b ((row, col), pixels)."""
    (r0, c0), (r1, c1) = a, b
    dr, dc = r1 - r0, c1 - c0
    n2 = max(dr * dr + dc * dc, 1e-6)
    t = np.clip(((rr - r0) * dr + (cc - c0) * dc) / n2, 0.0, 1.0)
    return (rr - r0 - t * dr) ** 2 + (cc - c0 - t * dc) ** 2 <= radius * radius


def _vertebral_body(hu: np.ndarray, body: np.ndarray, pixel_mm: float):
    """(front row, middle column, width) of the vertebral body, pixels: the largest connected
    region above 250 HU (holes filled) reaching the middle fifth of the body's width, measured over its
    front 25 mm (the posterior arch may or may not join it in a slice); None if none."""
    from scipy.ndimage import binary_fill_holes
    from scipy.ndimage import label as connected

    cols = np.nonzero(body.any(axis=0))[0]
    mid, half = (cols.min() + cols.max()) / 2.0, (cols.max() - cols.min()) / 10.0
    # filled: the body's cortex ring encloses marrow below 250 HU, which is bone too
    regions, n = connected(binary_fill_holes((hu > 250.0) & body))
    if not n:
        return None
    central = np.zeros_like(body)
    central[:, int(mid - half):int(mid + half) + 1] = True
    sizes = np.bincount(regions[central], minlength=n + 1)
    sizes[0] = 0
    if not sizes.max():
        return None
    r, c = np.nonzero(regions == int(sizes.argmax()))
    front = r.min()
    near = r <= front + 25.0 / pixel_mm
    return float(front), float(c[near].mean()), float(np.ptp(c[near]) + 1)


def add_metal(hu: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
              pixel_mm: float = GRID_MM, kind: Optional[str] = None):
    """hu float32 (H, W) HU, labels uint8 (H, W) -> (hu, labels) copies with metal and its
    streaks (module docstring); the slice in the training orientation (anterior up).
    pixel_mm: the pixel size (mm); kind: "screws" or "clips", or None to draw one (60 / 40 %;
    drawn either way, so the other draws do not depend on it). A slice without a body, or
    (screws) without a vertebra to put them in, comes back as is."""
    if kind not in (None, "screws", "clips"):
        raise ValueError(f"kind is 'screws', 'clips' or None; got {kind!r}")
    hu = np.array(hu, np.float32)
    labels = np.array(labels, np.uint8)
    body = labels > 0
    if not body.any():
        return hu, labels
    h, w = hu.shape
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
    mm = 1.0 / pixel_mm
    metal = np.zeros((h, w), bool)
    centres = []
    screws = rng.random() < 0.6
    if kind is not None:
        screws = kind == "screws"
    if screws:
        found = _vertebral_body(hu, body, pixel_mm)
        if found is None:
            return hu, labels
        # the body's depth from its width (lumbar bodies: about 0.7 as deep as wide); the
        # screws enter at the facets, behind the body, and end in its front third
        front, mid, wb = found
        hb = 0.7 * wb
        screw_r = rng.uniform(2.5, 3.5) * mm
        for side in (-1.0, 1.0):
            entry = (front + hb + rng.uniform(0.25, 0.45) * hb,
                     mid + side * rng.uniform(0.4, 0.5) * wb)
            tip = (front + rng.uniform(0.15, 0.3) * hb, mid + side * rng.uniform(0.05, 0.15) * wb)
            back = rng.uniform(5.0, 9.0) * mm
            head = (entry[0] + back, entry[1] + side * 0.3 * back)
            metal |= _bar(rr, cc, tip, entry, screw_r)
            metal |= _bar(rr, cc, entry, head, screw_r)
            metal |= (rr - head[0]) ** 2 + (cc - head[1]) ** 2 <= (rng.uniform(2.0, 3.0) * mm) ** 2
            rod = (head[0] + rng.uniform(2.0, 4.0) * mm, head[1])
            metal |= (rr - rod[0]) ** 2 + (cc - rod[1]) ** 2 <= (rng.uniform(1.2, 1.5) * mm) ** 2
            centres += [((tip[0] + entry[0]) / 2, (tip[1] + entry[1]) / 2), head]
        strength = rng.uniform(0.4, 1.0)
    else:
        inside = np.nonzero(((labels == MSC) & (hu > -50.0) & (hu < 250.0)) | (labels == VAT))
        if not inside[0].size:
            return hu, labels
        for _ in range(int(rng.integers(1, 7))):
            k = int(rng.integers(inside[0].size))
            c = (float(inside[0][k]), float(inside[1][k]))
            t = rng.uniform(0, np.pi)
            half = rng.uniform(1.5, 4.0) * mm
            d = (half * np.cos(t), half * np.sin(t))
            metal |= _bar(rr, cc, (c[0] - d[0], c[1] - d[1]), (c[0] + d[0], c[1] + d[1]),
                          rng.uniform(0.5, 0.75) * mm)
            centres.append(c)
        strength = rng.uniform(0.05, 0.25)
    streak = np.zeros((h, w), np.float32)
    # photon starvation: dark along the line through each pair of objects
    for i in range(len(centres)):
        for j in range(i + 1, len(centres)):
            (r0, c0), (r1, c1) = centres[i], centres[j]
            length = max(np.hypot(r1 - r0, c1 - c0), 1.0)
            nr, nc = (c1 - c0) / length, -(r1 - r0) / length     # unit normal
            d = (rr - r0) * nr + (cc - c0) * nc
            along = ((rr - (r0 + r1) / 2) * (r1 - r0) + (cc - (c0 + c1) / 2) * (c1 - c0)) / length
            streak -= (strength * rng.uniform(150.0, 700.0)
                       * np.exp(-(d / (rng.uniform(1.5, 4.0) * mm)) ** 2)
                       * np.exp(-(along / (length / 2 + 40.0 * mm)) ** 2))
    # rays from each object, bright and dark in turn
    for r0, c0 in centres:
        dist = np.hypot(rr - r0, cc - c0)
        fade = np.exp(-dist / (rng.uniform(20.0, 80.0) * mm))
        for k, t in enumerate(np.sort(rng.uniform(0, np.pi, int(rng.integers(6, 17))))):
            d = (rr - r0) * np.cos(t) - (cc - c0) * np.sin(t)
            sign = 1.0 if k % 2 else -1.0
            streak += (sign * strength * rng.uniform(50.0, 400.0) * fade
                       * np.exp(-(d / (rng.uniform(0.8, 2.5) * mm)) ** 2))
    hu += streak * (hu > -900.0)
    hu[metal] = rng.uniform(*METAL_HU, int(metal.sum()))
    labels[metal & body] = MSC
    np.clip(hu, -1024.0, CT_MAX_HU, out=hu)
    return hu, labels
