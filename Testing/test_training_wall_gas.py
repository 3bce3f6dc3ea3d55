"""Gas-filled bowel against the inside of the abdominal wall (--wall-gas, randomize.wall_gas):
where the loops go, what they replace, and that the option is off by default and keeps
every other draw."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation

from training.data import Augment
from training.randomize import BOWEL_WALL_MM, WALL_GAS_CODES, wall_gas
from training.phantom.tissues import CODE

from test_training_cachexia_metal import PIXEL_MM, torso

BG, MUS, IMAT, SAT, VAT, MSC = range(6)


def test_loops_lie_against_the_wall_muscle_and_replace_only_visceral_fat():
    """Each draw paints gas (below -900 HU) inside a bowel wall, all class MSC; only VAT
    pixels change; the gas touches no muscle (a bowel wall lies between) but lies within the
    bowel wall's thickness of it (against the wall); reproducible from the generator."""
    hu, lab = torso()
    touched = 0
    for seed in range(8):
        h, lb = wall_gas(hu, lab, np.random.default_rng(seed), pixel_mm=PIXEL_MM)
        h2, lb2 = wall_gas(hu, lab, np.random.default_rng(seed), pixel_mm=PIXEL_MM)
        assert np.array_equal(h, h2) and np.array_equal(lb, lb2)
        changed = (lb != lab) | (h != hu)
        if not changed.any():
            continue
        touched += 1
        assert np.all(lab[changed] == VAT) and np.all(lb[changed] == MSC)
        gas = changed & (h < -900)
        assert gas.sum() > 50
        wall = changed & ~gas
        assert np.all((h[wall] >= 20) & (h[wall] <= 50))
        muscle = lab == MUS
        assert not (gas & binary_dilation(muscle)).any()
        reach = int(np.ceil(BOWEL_WALL_MM[1] / PIXEL_MM)) + 2
        assert (gas & binary_dilation(muscle, iterations=reach)).any()
        # in front or at a flank: above the body's lowest third
        rows = np.nonzero(gas)[0]
        body_rows = np.nonzero((lab > 0).any(1))[0]
        assert rows.min() < body_rows.min() + 0.75 * (body_rows.max() - body_rows.min())
    assert touched >= 6


def test_with_tissue_codes_loops_also_take_bowel_but_never_organs():
    """Given the phantom's codes, a loop may take bowel (WALL_GAS_CODES) as well as visceral
    fat; the organ (liver code) is never touched."""
    hu, lab = torso()
    tissues = np.zeros(lab.shape, np.uint8)
    tissues[lab == VAT] = CODE["vat"]
    tissues[lab == MUS] = CODE["muscle"] if "muscle" in CODE else 1
    organ = (lab == MSC) & (hu == 55.0)
    tissues[organ] = CODE["liver"]
    # a bowel band inside the muscle ring, in front: the loops' only room there
    rr = np.mgrid[0:256, 0:256][0]
    bowel = (lab == VAT) & (rr < 90)
    tissues[bowel] = CODE["bowel_fluid"]
    lab2 = lab.copy()
    lab2[bowel] = MSC
    hit = False
    for seed in range(8):
        h, lb = wall_gas(hu, lab2, np.random.default_rng(seed), tissues=tissues,
                         pixel_mm=PIXEL_MM)
        changed = (lb != lab2) | (h != hu)
        assert not (changed & organ).any()
        assert set(np.unique(tissues[changed])) <= set(WALL_GAS_CODES)
        hit |= bool((changed & bowel).any())
    assert hit


def test_a_slice_without_wall_muscle_comes_back_as_is():
    hu, lab = torso()
    lab = np.where(lab == MUS, VAT, lab).astype(np.uint8)
    h, lb = wall_gas(hu, lab, np.random.default_rng(0), pixel_mm=PIXEL_MM)
    assert np.array_equal(h, hu) and np.array_equal(lb, lab)


def test_wall_gas_is_off_by_default_and_keeps_the_other_draws():
    """Off by default; on, the labels change only where loops replace visceral fat, and a
    slice where no loop finds room comes out exactly as with the option off (own stream)."""
    assert Augment().wall_gas == 0.0
    hu, lab = torso()
    no_wall = np.where(lab == MUS, VAT, lab).astype(np.uint8)
    base = dict(flip=0.0, crop=0.0, blur=0.0, randomize=1.0, obese=0.0)
    changed_any = False
    for seed in range(4):
        a_hu, a_lab = Augment(**base)(hu, lab, np.random.default_rng(seed))
        b_hu, b_lab = Augment(**base, wall_gas=1.0)(hu, lab, np.random.default_rng(seed))
        changed = b_lab != a_lab
        assert set(np.unique(a_lab[changed])) <= {VAT}
        assert set(np.unique(b_lab[changed])) <= {MSC}
        changed_any |= bool(changed.any())
        # away from the loops the HU are the same draws (the kernel noise reaches a little)
        away = ~binary_dilation(changed, iterations=8)
        assert np.allclose(a_hu[away], b_hu[away], atol=1e-3)
        c = Augment(**base)(hu, no_wall, np.random.default_rng(seed))
        d = Augment(**base, wall_gas=1.0)(hu, no_wall, np.random.default_rng(seed))
        assert np.array_equal(c[0], d[0]) and np.array_equal(c[1], d[1])
    assert changed_any
