"""--zoom-out (training.data.Augment.zoom_out): slices shrunk into a frame of air, the
counterpart of the crop, which only enlarges; off by default and keeping every other draw."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import AIR_HU, Augment

BG, MUS, SAT, MSC = 0, 1, 3, 5


def body(n: int = 120):
    """A square slice filled edge to edge: SAT with a muscle block and an organ (MSC)."""
    lab = np.full((n, n), SAT, np.uint8)
    hu = np.full((n, n), -100.0, np.float32)
    lab[30:90, 20:100], hu[30:90, 20:100] = MUS, 50.0
    lab[50:70, 50:70], hu[50:70, 50:70] = MSC, 60.0
    tissues = lab * 7                     # stand-in tissue codes, moved with the labels
    return hu, lab, tissues


def test_zoom_out_shrinks_the_slice_into_air():
    """Every class's area shrinks by the square of a scale in 0.75..1 (to nearest-neighbour
    rounding), the frame around it is air and background, and the shape stays the slice's."""
    hu, lab, _ = body()
    aug = Augment(flip=0.0, crop=0.0, blur=0.0, zoom_out=1.0)
    scales = []
    for seed in range(6):
        a_hu, a_lab = aug(hu, lab, np.random.default_rng(seed))
        assert a_hu.shape == hu.shape and a_lab.shape == lab.shape
        inside = a_lab != BG
        rows, cols = np.nonzero(inside.any(1))[0], np.nonzero(inside.any(0))[0]
        side = rows.size / lab.shape[0]
        assert 0.74 <= side <= 1.0 and cols.size == rows.size   # one scale for both axes
        scales.append(side)
        frame = ~inside
        assert np.all(a_hu[frame] == AIR_HU)
        for cls, rel in ((MUS, 0.05), (MSC, 0.15)):     # a 60 x 80 and a 20 x 20 block
            want = (lab == cls).sum() * side ** 2
            assert (a_lab == cls).sum() == pytest.approx(want, rel=rel), cls
        # the box is solid: the body was shrunk, not cut
        assert inside[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    assert max(scales) - min(scales) > 0.02                      # drawn per slice
    assert len({round(s, 3) for s in scales}) > 1


def test_shrinking_moves_tissue_codes_and_thick_slice_planes_alike():
    """The tissue codes (for the organ looks) and a thick slice's planes (P, H, W) are shrunk
    and placed exactly as the labels."""
    from training.data import _shrink_into_air

    hu, lab, tissues = body()
    planes = (np.stack([hu] * 3), np.stack([lab] * 3), np.stack([tissues] * 3))
    for scale, pos in ((0.8, (0.0, 1.0)), (0.93, (0.5, 0.2))):
        s_hu, s_lab, s_tis = _shrink_into_air(*planes, scale, pos)
        assert s_hu.shape == s_lab.shape == s_tis.shape == (3, 120, 120)
        assert np.array_equal(s_tis // 7, s_lab) and np.array_equal(s_lab[0], s_lab[2])
        assert np.all(s_hu[s_lab == BG] == AIR_HU)
        rows = np.nonzero((s_lab[0] != BG).any(1))[0]
        assert rows.size == round(120 * scale)
        assert rows[0] == min(int(pos[0] * (120 - rows.size + 1)), 120 - rows.size)
        cols = np.nonzero((s_lab[0] != BG).any(0))[0]
        assert cols[-1] <= 119 and cols.size == rows.size
    assert _shrink_into_air(hu, lab, None, 0.8, (0.5, 0.5))[2] is None


def test_zoom_out_is_off_by_default_and_keeps_the_other_draws():
    """Augment().zoom_out is 0; with zoom_out the slices not shrunk get exactly what they
    got without it (its own stream), and a shrunk slice skips the crop."""
    assert Augment().zoom_out == 0.0
    hu, lab, _ = body()
    base = dict(flip=0.5, crop=0.5, blur=0.5, randomize=1.0, obese=0.3)
    same = shrunk = 0
    for seed in range(12):
        a_hu, a_lab = Augment(**base)(hu, lab, np.random.default_rng(seed))
        b_hu, b_lab = Augment(**base, zoom_out=0.5)(hu, lab, np.random.default_rng(seed))
        if np.array_equal(a_hu, b_hu) and np.array_equal(a_lab, b_lab):
            same += 1
        else:
            shrunk += 1
            assert (b_lab == BG).sum() > (lab == BG).sum()
    assert same >= 2 and shrunk >= 2
