"""Cachectic bodies (--cachectic, randomize.thin_sat) and metal with its streaks (--metal,
training/metal.py): what changes, what is kept, and that both are off by default and keep
every other draw."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, distance_transform_edt
from scipy.ndimage import label as connected

from training.data import Augment
from training.metal import CT_MAX_HU, METAL_HU, add_metal
from training.randomize import CACHECTIC_SAT_MM, thin_sat

BG, MUS, IMAT, SAT, VAT, MSC = range(6)
PIXEL_MM = 1.5


def torso(n: int = 256):
    """An oval body (anterior up) at PIXEL_MM: a 2-pixel skin (MSC, 40 HU), SAT about 25 mm
    thick all round (-100 HU), a muscle ring (50 HU), VAT (-95 HU), an organ (MSC, 55 HU), a
    vertebral body (cortex 700 HU around marrow 150 HU) behind the centre, a posterior arch
    (700 HU) and a table (BG, 200 HU) below."""
    rr, cc = np.mgrid[0:n, 0:n].astype(np.float32)
    r0, c0 = n * 0.5, n * 0.5

    def oval(a, b, dr=0.0, dc=0.0):
        return ((rr - r0 - dr) / a) ** 2 + ((cc - c0 - dc) / b) ** 2 <= 1.0

    lab = np.zeros((n, n), np.uint8)
    hu = np.full((n, n), -1000.0, np.float32)
    outer_a, outer_b = n * 0.32, n * 0.44
    for grow, cls, value in ((0, MSC, 40.0), (-2, SAT, -100.0), (-18, MUS, 50.0),
                             (-28, VAT, -95.0)):
        m = oval(outer_a + grow, outer_b + grow)
        lab[m], hu[m] = cls, value
    organ = oval(12, 18, -20, 25)
    lab[organ], hu[organ] = MSC, 55.0
    vb = oval(12, 16, 30)
    lab[vb], hu[vb] = MSC, 700.0
    marrow = oval(10, 14, 30)
    hu[marrow] = 150.0
    arch = oval(6, 12, 52)
    lab[arch], hu[arch] = MSC, 700.0
    table = rr >= r0 + outer_a + 3
    hu[table] = 200.0
    return hu, lab


def test_thin_sat_cuts_the_fat_over_the_front_and_flanks_down():
    """Removed pixels were SAT or skin and become air and background; the rest keeps its
    class and HU except a new skin (MSC) on the fat that is left; what is left of the SAT in
    front lies within the drawn thickness (at most 1.4 x CACHECTIC_SAT_MM, plus the skin) of
    the muscle; the back, on the table, keeps its fat; reproducible from the generator."""
    hu, lab = torso()
    body = lab > 0
    deep = body & (lab != SAT) & ~((lab == MSC) & (distance_transform_edt(body) <= 3.5 / PIXEL_MM))
    d_deep = distance_transform_edt(~deep)
    rows = np.nonzero(body.any(1))[0]
    back_rows = slice(int(rows.max() - 6), int(rows.max() + 1))
    for seed in range(6):
        h, lb = thin_sat(hu, lab, np.random.default_rng(seed), PIXEL_MM)
        h2, lb2 = thin_sat(hu, lab, np.random.default_rng(seed), PIXEL_MM)
        assert np.array_equal(h, h2) and np.array_equal(lb, lb2)
        removed = body & (lb == BG)
        assert removed.sum() > 1000
        assert set(np.unique(lab[removed])) <= {SAT, MSC}
        assert np.all(h[removed] == -1000.0)
        assert not ((lb > 0) & ~body).any()                       # nothing grows
        changed = body & ~removed & (lb != lab)
        assert np.all(lab[changed] == SAT) and np.all(lb[changed] == MSC)   # the new skin
        assert np.array_equal(lb[deep], lab[deep]) and np.array_equal(h[deep], hu[deep])
        # the new surface is skin
        edge = (lb > 0) & binary_dilation(removed)
        assert np.all(lb[edge] == MSC)
        # the fat left in front is within the drawn thickness of the muscle
        front = (lb == SAT) & (np.mgrid[0:256, 0:256][0] < 128)
        assert d_deep[front].max() <= (1.4 * CACHECTIC_SAT_MM[1] + 2.6) / PIXEL_MM + 1.5
        # the back is untouched
        assert np.array_equal(lb[back_rows], lab[back_rows])
    no_sat = np.where(lab == SAT, MUS, lab).astype(np.uint8)
    h, lb = thin_sat(hu, no_sat, np.random.default_rng(0), PIXEL_MM)
    assert np.array_equal(lb, no_sat) and np.array_equal(h, hu)


def test_screws_go_through_the_vertebra_with_streaks():
    """Two screws from behind the vertebral body into its front half, mirrored about its
    middle; metal at METAL_HU (CT's ceiling at most), label MSC; streaks change the HU inside
    the body away from the metal, not the air around it; labels elsewhere kept."""
    hu, lab = torso()
    body = lab > 0
    vb_rows = np.nonzero((hu == 150.0).any(1))[0]
    for seed in range(4):
        h, lb = add_metal(hu, lab, np.random.default_rng(seed), PIXEL_MM, kind="screws")
        metal = h >= METAL_HU[0]
        assert metal.sum() > 50 and h.max() <= CT_MAX_HU
        assert np.all(lb[metal & body] == MSC)
        assert np.array_equal(lb[~metal], lab[~metal])
        regions, n = connected(metal)
        assert n == 2                                              # one screw a side
        r, c = np.nonzero(metal)
        assert (c < 128).any() and (c > 128).any()
        assert r.min() < vb_rows.mean()                            # tips in the body's front half
        assert r.max() > vb_rows.max()                             # entering from behind it
        far = body & (distance_transform_edt(~metal) > 10)
        assert np.abs(h - hu)[far].mean() > 5.0
        assert np.array_equal(h[hu < -900.0], hu[hu < -900.0])
        h2, lb2 = add_metal(hu, lab, np.random.default_rng(seed), PIXEL_MM, kind="screws")
        assert np.array_equal(h, h2) and np.array_equal(lb, lb2)
    # no vertebra, no screws
    flat = np.where(hu > 250.0, 50.0, hu).astype(np.float32)
    h, lb = add_metal(flat, lab, np.random.default_rng(0), PIXEL_MM, kind="screws")
    assert np.array_equal(h, flat) and np.array_equal(lb, lab)
    with pytest.raises(ValueError, match="kind"):
        add_metal(hu, lab, np.random.default_rng(0), PIXEL_MM, kind="plate")


def test_clips_lie_in_the_visceral_fat_or_organs():
    hu, lab = torso()
    for seed in range(6):
        h, lb = add_metal(hu, lab, np.random.default_rng(seed), PIXEL_MM, kind="clips")
        metal = h >= METAL_HU[0]
        assert metal.any()
        assert set(np.unique(lab[metal])) <= {VAT, MSC}
        assert np.all(lb[metal] == MSC)
        assert connected(binary_dilation(metal), np.ones((3, 3)))[1] <= 6   # 1..6 clips


def test_cachectic_and_metal_are_off_by_default_and_keep_the_other_draws():
    """Augment defaults both to 0; on, a slice made obese is never also made cachectic, and
    turning either on changes nothing but what it draws (own streams)."""
    assert Augment().cachectic == 0.0 and Augment().metal == 0.0
    hu, lab = torso()
    base = dict(flip=0.0, crop=0.0, blur=0.0, randomize=1.0)
    for seed in range(3):
        a_hu, a_lab = Augment(**base, obese=0.0)(hu, lab, np.random.default_rng(seed))
        b_hu, b_lab = Augment(**base, obese=0.0, cachectic=1.0)(hu, lab,
                                                                  np.random.default_rng(seed))
        assert (b_lab == BG).sum() > (a_lab == BG).sum()
        changed = b_lab != a_lab                   # fat and skin cut off, or the new skin
        assert set(np.unique(a_lab[changed])) <= {SAT, MSC}
        assert set(np.unique(b_lab[changed])) <= {BG, MSC}
        # obese first: a grown body is not also thinned
        c_hu, c_lab = Augment(**base, obese=1.0)(hu, lab, np.random.default_rng(seed))
        d_hu, d_lab = Augment(**base, obese=1.0, cachectic=1.0)(hu, lab,
                                                                  np.random.default_rng(seed))
        assert np.array_equal(c_hu, d_hu) and np.array_equal(c_lab, d_lab)
        # metal: the same slice but the metal's labels and the HU it touches
        e_hu, e_lab = Augment(**base, obese=0.0, metal=1.0)(hu, lab, np.random.default_rng(seed))
        assert np.array_equal(e_lab[e_lab != MSC], a_lab[e_lab != MSC])
        assert not np.array_equal(e_hu, a_hu)
