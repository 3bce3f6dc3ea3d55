"""Domain randomisation (--randomize, training/randomize.py): ranges, labels kept, reproducible,
off by default."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import Augment
from training.randomize import (FAT_MEAN_HU, GRID_MM, MUSCLE_MEAN_HU, NOISE_SD_HU,
                                ORGAN_MEDIAN_HU, SAT_GROWTH_MM, add_kernel_noise,
                                close_fat_planes, grow_sat, randomize_appearance)

BG, MUS, IMAT, SAT, VAT, MSC = range(6)


def body_slice(n: int = 128):
    """A round body (n x n pixels): skin-deep SAT ring, a muscle ring, VAT and an organ
    (MSC, 55 HU) inside, a bone disc (700 HU) and a gas bubble (-900 HU); phantom-like HU."""
    rr, cc = np.mgrid[0:n, 0:n]
    d = np.hypot(rr - n / 2, cc - n / 2) / (n / 2)
    lab = np.zeros((n, n), np.uint8)
    hu = np.full((n, n), -1024.0, np.float32)
    for r, cls, value in ((0.8, SAT, -100.0), (0.65, MUS, 50.0), (0.5, VAT, -95.0),
                          (0.3, MSC, 55.0)):
        lab[d < r], hu[d < r] = cls, value
    bone = np.hypot(rr - n * 0.6, cc - n / 2) < n * 0.05
    gas = np.hypot(rr - n * 0.4, cc - n / 2) < n * 0.04
    lab[bone | gas], hu[bone], hu[gas] = MSC, 700.0, -900.0
    return hu, lab


def test_randomize_is_off_by_default_and_keeps_the_other_draws():
    """Augment() does not randomise; turning it on changes the HU only (flip, crop and blur
    are the same choices: the labels, which randomisation keeps here, are identical)."""
    assert Augment().randomize == 0.0
    hu, lab = body_slice()
    a_hu, a_lab = Augment(flip=1.0, crop=1.0, blur=0.0)(hu, lab, np.random.default_rng(5))
    b_hu, b_lab = Augment(flip=1.0, crop=1.0, blur=0.0, randomize=1.0)(
        hu, lab, np.random.default_rng(5))
    c_hu, _ = Augment(flip=1.0, crop=1.0, blur=0.0, randomize=1.0)(
        hu, lab, np.random.default_rng(5))
    assert np.array_equal(b_hu, c_hu)  # reproducible from the generator
    assert not np.array_equal(a_hu, b_hu)
    kept = (b_lab > 0) & (a_lab > 0)
    # only truncation / arms set background; grow_sat may add SAT and skin outside the body
    assert np.array_equal(a_lab[kept], b_lab[kept])
    assert set(np.unique(b_lab[(b_lab > 0) & (a_lab == 0)])) <= {SAT, MSC}
    # obese=0 turns the growth off and keeps the appearance draws
    d_hu, d_lab = Augment(flip=1.0, crop=1.0, blur=0.0, randomize=1.0, obese=0.0)(
        hu, lab, np.random.default_rng(5))
    assert np.array_equal(d_lab[d_lab > 0], a_lab[d_lab > 0])


def test_tissue_means_are_drawn_from_the_real_ranges():
    """Over many slices: SAT's median lands in -130..-60 HU, muscle's in the myosteatosis
    range (-10..60 HU, lowered by at most the 60 HU of fatty infiltration), the muscle means
    spread over most of the range, and labels change only to background."""
    hu, lab = body_slice()
    mus_medians = []
    for seed in range(30):
        h, lb = randomize_appearance(hu, lab, np.random.default_rng(seed))
        assert h.dtype == np.float32 and h.shape == hu.shape
        assert np.all((lb == lab) | (lb == BG))
        sat = (lb == SAT) & (lab == SAT)
        if sat.sum() > 100:
            assert FAT_MEAN_HU[0] - 30 <= np.median(h[sat]) <= FAT_MEAN_HU[1] + 30
        mus = (lb == MUS)
        m = float(np.median(h[mus]))
        assert MUSCLE_MEAN_HU[0] - 60 - 30 <= m <= MUSCLE_MEAN_HU[1] + 30
        mus_medians.append(m)
    assert np.ptp(mus_medians) > 40.0
    # some slices with patchy infiltration: muscle HU varies by more than its texture
    spreads = [float(np.std(randomize_appearance(hu, lab, np.random.default_rng(s))[0][lab == MUS]))
               for s in range(10)]
    assert max(spreads) > 10.0


def test_arms_and_truncation_are_background():
    """Pixels outside the body that randomisation fills (arms, table) stay background, and
    some seeds put arm-like soft tissue (-200..100 HU) beside the body."""
    hu, lab = body_slice()
    outside = lab == BG
    filled = 0
    for seed in range(20):
        h, lb = randomize_appearance(hu, lab, np.random.default_rng(seed))
        assert np.all(lb[outside] == BG)
        filled = max(filled, int(((h > -200) & (h < 100) & outside).sum()))
    assert filled > 100


@pytest.mark.parametrize("seed", range(6))
def test_kernel_noise_sd_and_correlation(seed):
    """The added noise has an SD in 5..30 HU inside the body, none in air, and neighbouring
    pixels are correlated (soft kernel: positive) or anticorrelated (sharp kernel), not white."""
    hu = np.zeros((128, 128), np.float32)
    hu[:, :8] = -1024.0
    n = add_kernel_noise(hu, np.random.default_rng(seed)) - hu
    body = n[:, 8:]
    assert NOISE_SD_HU[0] * 0.9 <= body.std() <= NOISE_SD_HU[1] * 1.1
    assert np.all(n[:, :8] == 0.0)
    corr = np.corrcoef(body[:, :-1].ravel(), body[:, 1:].ravel())[0, 1]
    assert abs(corr) > 0.05  # white noise: about 0 +- 0.01 on these 15,000 pairs
    # the same draws on pixels 3.5 times coarser (a 3 mm scan): the kernels' widths are
    # lengths, so there the noise is all but white, as real 3 mm scans' is (lag-1
    # correlation 0.00 to 0.15 in the shared abdomen-pelvis CT's organs and fat)
    c = add_kernel_noise(hu, np.random.default_rng(seed), pixel=3.5) - hu
    assert np.isclose(c[:, 8:].std(), body.std(), rtol=0.02)
    coarse = np.corrcoef(c[:, 8:-1].ravel(), c[:, 9:].ravel())[0, 1]
    assert abs(coarse) < 0.15 and abs(coarse) < abs(corr)


SHARE_FLAGS = ("--randomize", "--organ-flatten", "--obese", "--organ-contact",
               "--kidney-contact", "--diaphragm-muscle", "--kidney-unenhanced", "--canal-hu",
               "--organ-texture", "--lowres-noise",
               "--thick-slices", "--cachectic", "--metal", "--zoom-out", "--wall-gas")


@pytest.mark.parametrize("flag", SHARE_FLAGS)
def test_share_arguments_are_checked_and_reach_the_parsed_arguments(flag):
    """Every augmentation share is a probability: outside 0..1 is refused by name."""
    from training.__main__ import build_parser
    from training.train import check_args

    def parsed(value):
        return build_parser().parse_args(["train", "--phantom-subjects", "2", "--output", "x",
                                          flag, value])

    for bad in ("1.5", "-0.1"):
        with pytest.raises(ValueError, match=flag):
            check_args(parsed(bad))
    args = parsed("0.4")
    check_args(args)
    assert getattr(args, flag[2:].replace("-", "_")) == 0.4


def test_muscle_region_sd_is_checked():
    from training.__main__ import build_parser
    from training.train import check_args

    args = build_parser().parse_args(["train", "--phantom-subjects", "2", "--output", "x",
                                      "--muscle-region-sd", "-1"])
    with pytest.raises(ValueError, match="--muscle-region-sd"):
        check_args(args)


def test_switches_turn_the_new_randomisation_off():
    """muscle_region_sd=0 leaves out the per-muscle offsets; organ_flatten=0 keeps an
    organ's inner contrast on every slice; Augment passes both (and obese) through."""
    hu, lab = body_slice()
    n = hu.shape[0]
    rr, cc = np.mgrid[0:n, 0:n]
    a = np.hypot(rr - n * 0.55, cc - n * 0.38) < n * 0.05
    lab[a], hu[a] = MUS, 50.0
    kidney = np.hypot(rr - n * 0.45, cc - n * 0.62) < n * 0.08
    medulla = np.hypot(rr - n * 0.45, cc - n * 0.62) < n * 0.04
    lab[kidney], hu[kidney], hu[medulla] = MSC, 150.0, 60.0
    ring = (lab == MUS) & ~a
    for seed in range(10):
        h, _ = randomize_appearance(hu, lab, np.random.default_rng(seed), muscle_region_sd=0.0,
                                    organ_flatten=0.0)
        h12, _ = randomize_appearance(hu, lab, np.random.default_rng(seed),
                                      muscle_region_sd=12.0, organ_flatten=0.0)
        # the same draws but the per-muscle offsets: a constant per muscle, 0 with SD 0
        da, dr = (h12 - h)[a], (h12 - h)[ring]
        assert np.ptp(da) < 1e-3 and np.ptp(dr) < 1e-3
        assert abs(da[0] - dr[0]) > 0.0
        assert np.median(h[kidney & ~medulla]) - np.median(h[medulla]) > 60.0
    aug = Augment(randomize=1.0, obese=0.0, muscle_region_sd_hu=0.0, organ_flatten=0.0)
    assert aug.to_dict()["organ_flatten"] == 0.0 and aug.to_dict()["obese"] == 0.0


def test_organs_keep_their_own_realistic_range_independent_of_muscle():
    """Organ soft tissue (MSC, 55 HU here) gets a median in 30..130 HU on every slice (never
    down at fatty-muscle HU), drawn independently of the muscle mean: over many slices muscle
    is sometimes brighter and sometimes darker than the organs; bone and gas are not moved
    as organs."""
    hu, lab = body_slice()
    organ = (lab == MSC) & (hu == 55.0)
    brighter = darker = 0
    for seed in range(80):
        h, lb = randomize_appearance(hu, lab, np.random.default_rng(seed))
        keep = organ & (lb == MSC)
        o = float(np.median(h[keep]))
        assert ORGAN_MEDIAN_HU[0] - 40 <= o <= ORGAN_MEDIAN_HU[1] + 40  # + one region's offset
        m = float(np.median(h[lb == MUS]))
        brighter += m > o
        darker += m < o
    assert brighter >= 3 and darker >= 40


def test_truncation_keeps_labels_inside_the_field_of_view():
    """Where truncation cuts the body (air written over it), the label is background; every
    body pixel that is not cut keeps its class, and some seeds cut with a straight edge
    (a whole column or row of the body's box set to air)."""
    hu, lab = body_slice()
    body = lab > 0
    straight = 0
    for seed in range(100):
        h, lb = randomize_appearance(hu, lab, np.random.default_rng(seed))
        cut = body & (lb == BG)
        assert np.all(h[cut] == -1024.0)
        assert np.array_equal(lb[body & ~cut], lab[body & ~cut])
        # a straight edge: every column (or row) it touches is cut over the body's whole height
        cols, rows = np.nonzero(cut.any(0))[0], np.nonzero(cut.any(1))[0]
        straight += cut.any() and (all(np.array_equal(cut[:, c], body[:, c]) for c in cols)
                                   or all(np.array_equal(cut[r], body[r]) for r in rows))
    assert straight >= 3


def test_organ_median_does_not_depend_on_the_phantom_phase():
    """The organ median is drawn anew, not shifted: a phantom organ at 55 HU (unenhanced) and
    one at 150 HU (enhanced) come out at the same HU from the same generator."""
    hu, lab = body_slice()
    organ = (lab == MSC) & (hu == 55.0)
    bright = hu.copy()
    bright[organ] = 150.0
    for seed in range(5):
        a, la = randomize_appearance(hu, lab, np.random.default_rng(seed))
        b, lb = randomize_appearance(bright, lab, np.random.default_rng(seed))
        keep = organ & (la == MSC) & (lb == MSC)
        assert abs(np.median(a[keep]) - np.median(b[keep])) < 1.0


def skinned_body_slice(n: int = 160):
    """body_slice with a 2-pixel skin (MSC, 40 HU) around it, and a table (BG, 200 HU) below."""
    hu, lab = body_slice(n)
    rr, cc = np.mgrid[0:n, 0:n]
    d = np.hypot(rr - n / 2, cc - n / 2) / (n / 2)
    skin = (d >= 0.8) & (d < 0.8 + 2.0 / (n / 2))
    lab[skin], hu[skin] = MSC, 40.0
    table = rr >= int(n / 2 + 0.8 * n / 2) + 3
    hu[table] = 200.0
    return hu, lab


def test_grow_sat_makes_the_body_obese_with_exact_labels():
    """The fat grows outward into air only (not into the table, not below the body), by at
    most SAT_GROWTH_MM; new pixels are SAT with fat HU and a skin (MSC) at the new surface;
    every pixel inside the old body keeps its class except the old skin, which becomes SAT;
    the same generator gives the same body."""
    hu, lab = skinned_body_slice()
    body = lab > 0
    lowest = np.nonzero(body.any(1))[0].max()
    grown_any = 0
    for seed in range(8):
        h, lb = grow_sat(hu, lab, np.random.default_rng(seed))
        h2, lb2 = grow_sat(hu, lab, np.random.default_rng(seed))
        assert np.array_equal(h, h2) and np.array_equal(lb, lb2)
        new = (lb > 0) & ~body
        grown_any = max(grown_any, int(new.sum()))
        assert np.all(hu[new] < -800.0)                      # into air only
        assert not new[lowest + 1:].any()                    # not under the body
        assert set(np.unique(lb[new])) <= {SAT, MSC}
        assert np.all(lb[new & (lb == SAT)] == SAT)
        sat_new = new & (lb == SAT)
        if sat_new.sum() > 50:
            assert abs(np.median(h[sat_new]) - np.median(hu[lab == SAT])) < 5.0
        # the new surface is skin: every grown pixel that touches air is MSC
        from scipy.ndimage import binary_dilation, distance_transform_edt

        edge = new & binary_dilation(lb == BG)
        assert np.all(lb[edge] == MSC)
        assert distance_transform_edt(~body)[new].max() <= SAT_GROWTH_MM[1] / GRID_MM + 1
        changed = body & (lb != lab)
        assert np.all(lab[changed] == MSC) and np.all(lb[changed] == SAT)
    assert grown_any > 500


def test_organ_inner_contrast_fades_on_some_slices():
    """An organ with a bright cortex (150 HU) around a darker medulla (60 HU): on some slices
    the two come out within a few HU of each other (contrast faded), on others they keep
    most of their 90 HU difference; the labels never change."""
    hu, lab = body_slice()
    n = hu.shape[0]
    rr, cc = np.mgrid[0:n, 0:n]
    kidney = np.hypot(rr - n * 0.45, cc - n * 0.35) < n * 0.08
    medulla = np.hypot(rr - n * 0.45, cc - n * 0.35) < n * 0.04
    lab[kidney] = MSC
    hu[kidney], hu[medulla] = 150.0, 60.0
    cortex = kidney & ~medulla
    gaps = []
    for seed in range(30):
        h, lb = randomize_appearance(hu, lab, np.random.default_rng(seed))
        keep = lb == MSC
        gaps.append(float(np.median(h[cortex & keep]) - np.median(h[medulla & keep])))
    assert min(gaps) < 0.5 * 90.0 + 10.0   # faded on some slices
    assert max(gaps) > 70.0                # kept on others


def test_separate_muscles_get_their_own_offsets():
    """Two muscles that do not touch (both 50 HU in the phantom) come out with medians more
    than 10 HU apart on some slices: infiltration differs between muscles."""
    hu, lab = body_slice()
    n = hu.shape[0]
    rr, cc = np.mgrid[0:n, 0:n]
    a = np.hypot(rr - n * 0.55, cc - n * 0.38) < n * 0.05
    b = np.hypot(rr - n * 0.55, cc - n * 0.62) < n * 0.05
    lab[a | b], hu[a | b] = MUS, 50.0
    apart = 0
    for seed in range(20):
        h, _ = randomize_appearance(hu, lab, np.random.default_rng(seed))
        apart += abs(np.median(h[a]) - np.median(h[b])) > 10.0
    assert apart >= 3


def test_close_fat_planes_turns_the_fat_between_organ_and_muscle_into_organ():
    """A fat plane between an organ and a muscle narrower than the drawn width becomes that
    organ, all of it (label, and the HU of the nearest organ pixel); a plane wider than any
    width drawn, fat near only one of them, and every other label stay. Augment's
    organ_contact=0 (the default) changes nothing; turned on, it keeps the appearance
    draws and only the closed planes differ."""
    from training.randomize import CONTACT_MM

    n = 160
    lab = np.full((n, n), VAT, np.uint8)
    hu = np.full((n, n), -100.0, np.float32)
    lab[:, :40], hu[:, :40] = MUS, 45.0                   # a muscle on the left
    lab[:, 43:80], hu[:, 43:80] = MSC, 30.0               # a kidney 3 px (2.6 mm) away
    hu[:, 43:80] += np.linspace(0.0, 5.0, n)[:, None]     # its HU varies down the rows
    lab[:, 140:], hu[:, 140:] = MUS, 45.0                  # 60 px (52 mm) of fat: stays
    assert 60 * GRID_MM > CONTACT_MM[1] and 3 * GRID_MM < CONTACT_MM[0]
    for seed in range(5):
        h, l = close_fat_planes(hu, lab, np.random.default_rng(seed))
        changed = l != lab
        assert changed[4:-4, 40:43].all() and not changed[:, :40].any() \
            and not changed[:, 43:].any()
        assert (l[4:-4, 40:43] == MSC).all()
        # the nearest organ pixel is the one in the same row (away from the image's edge,
        # where the opening that drops thin rims rounds the organ's corners)
        np.testing.assert_array_equal(h[4:-4, 40:43], hu[4:-4, 43:44].repeat(3, 1))
    body_hu, body_lab = body_slice()
    base = Augment(randomize=1.0, obese=0.0)(body_hu, body_lab, np.random.default_rng(3))
    off = Augment(randomize=1.0, obese=0.0, organ_contact=0.0)(body_hu, body_lab,
                                                               np.random.default_rng(3))
    assert np.array_equal(base[0], off[0]) and np.array_equal(base[1], off[1])
    plain = dict(flip=0.0, crop=0.0, blur=0.0, randomize=1.0, obese=0.0)
    _, l_on = Augment(organ_contact=1.0, **plain)(hu, lab, np.random.default_rng(4))
    _, l_off = Augment(**plain)(hu, lab, np.random.default_rng(4))
    assert (l_on[:, 40:43] == MSC).mean() > 0.5 and (l_off[:, 40:43] == VAT).mean() > 0.5


def organ_slice(n: int = 128):
    """body_slice with a diaphragm band (MSC, muscle HU, tissue code 31) inside the muscle
    ring, two kidneys (MSC, cortex 150 HU / medulla 140 HU as enhanced, codes 14 / 15) in
    the VAT and a spinal canal (CSF, 10 HU, code 13); -> (hu, labels, tissues)."""
    from training.randomize import CANAL_CODE, DIAPHRAGM_CODE, KIDNEY_CODES

    hu, lab = body_slice(n)
    tissues = np.zeros((n, n), np.uint8)
    rr, cc = np.mgrid[0:n, 0:n]
    d = np.hypot(rr - n / 2, cc - n / 2) / (n / 2)
    band = (d >= 0.47) & (d < 0.5) & (rr < n / 2)
    lab[band], hu[band], tissues[band] = MSC, 50.0, DIAPHRAGM_CODE
    canal = np.hypot(rr - n * 0.7, cc - n / 2) < n * 0.03
    lab[canal], hu[canal], tissues[canal] = MSC, 10.0, CANAL_CODE
    for c0 in (0.3, 0.7):
        k = np.hypot((rr - n * 0.62) / 0.6, cc - n * c0) < n * 0.07
        m = np.hypot((rr - n * 0.62) / 0.6, cc - n * c0) < n * 0.035
        lab[k], hu[k], tissues[k] = MSC, 150.0, KIDNEY_CODES[0]
        hu[m], tissues[m] = 140.0, KIDNEY_CODES[1]
    return hu, lab, tissues


def test_organ_look_draws_the_diaphragm_as_muscle_and_the_kidneys_unenhanced():
    """With OrganLook the diaphragm's median follows the muscle's new mean (-5..+20 HU above
    it, not the organs' 30..130 HU), the kidneys land at 15..40 HU with at most 20 % of
    their 10 HU inner contrast and the canal's contents at 0..40 HU; without it the
    diaphragm moves with the organs (the phantom as before)."""
    from training.randomize import (CANAL_CODE, DIAPHRAGM_CODE, KIDNEY_CODES,
                                    KIDNEY_UNENHANCED_HU, OrganLook)

    hu, lab, tissues = organ_slice()
    dia = tissues == DIAPHRAGM_CODE
    kid = np.isin(tissues, KIDNEY_CODES)
    cortex, medulla = tissues == KIDNEY_CODES[0], tissues == KIDNEY_CODES[1]
    canal = tissues == CANAL_CODE
    gaps, before, contrast, canals = [], [], [], []
    for seed in range(40):
        look = OrganLook(tissues, True, True, np.random.default_rng([seed, 3]),
                         np.random.default_rng([seed, 4]))
        # the muscle's mean is the first draw of the appearance generator
        mean = np.random.default_rng(seed).uniform(*MUSCLE_MEAN_HU)
        out, out_lab = randomize_appearance(hu, lab, np.random.default_rng(seed), organs=look)
        inside = out_lab == lab     # truncation may cut the body
        d = dia & inside & (out_lab == MSC)
        if d.sum() > 20:
            gaps.append(float(np.median(out[d])) - mean)
        k = kid & inside
        if k.sum() > 50:
            assert KIDNEY_UNENHANCED_HU[0] - 12 <= np.median(out[k]) <= KIDNEY_UNENHANCED_HU[1] + 12
            # streaks may cross one part and not the other: compared over all slices below
            contrast.append(abs(float(np.median(out[cortex & inside]))
                                - float(np.median(out[medulla & inside]))))
        if (canal & inside).sum() > 10:
            canals.append(float(np.median(out[canal & inside])))
        old, _ = randomize_appearance(hu, lab, np.random.default_rng(seed))
        if (dia & inside).sum() > 20:
            before.append(float(np.median(old[dia & inside])) - mean)
    assert len(gaps) > 20 and len(contrast) > 20
    assert np.median(contrast) <= 0.2 * 10.0 + 0.5
    # the canal's contents spread over 0..40 HU (streaks may cross it)
    assert np.percentile(canals, 10) < 12.0 and np.percentile(canals, 90) > 28.0
    assert np.median([abs(c - 20.0) for c in canals]) <= 20.0
    # noise, streaks and kernel blur are not part of randomize_appearance: the gap is the draw
    assert -8.0 <= min(gaps) and max(gaps) <= 23.0
    # before, the diaphragm went with the organs: often far above the muscle
    assert max(before) > 40.0


def test_organ_look_is_off_by_default_and_needs_the_tissue_codes():
    """Augment's diaphragm_muscle / kidney_unenhanced default to 0; at 0, or without tissue
    codes, the slice is exactly as before (the new draws have their own stream); on, only
    the diaphragm's and kidneys' HU change (flip and crop move the codes with the labels)."""
    from training.randomize import CANAL_CODE, DIAPHRAGM_CODE, KIDNEY_CODES

    assert Augment().canal_hu == 0.0 and Augment().diaphragm_muscle == 0.0 and Augment().kidney_unenhanced == 0.0
    hu, lab, tissues = organ_slice()
    base = dict(flip=1.0, crop=1.0, blur=0.0, randomize=1.0, obese=0.0)
    a_hu, a_lab = Augment(**base)(hu, lab, np.random.default_rng(2))
    b_hu, b_lab = Augment(**base)(hu, lab, np.random.default_rng(2), tissues)
    c_hu, _ = Augment(**base, diaphragm_muscle=1.0, kidney_unenhanced=1.0, canal_hu=1.0)(
        hu, lab, np.random.default_rng(2))
    assert np.array_equal(a_hu, b_hu) and np.array_equal(a_hu, c_hu)
    d_hu, d_lab = Augment(**base, diaphragm_muscle=1.0, kidney_unenhanced=1.0, canal_hu=1.0)(
        hu, lab, np.random.default_rng(2), tissues)
    assert np.array_equal(a_lab, d_lab)
    # where it changed: the flipped and cropped diaphragm and kidneys (and the noise that
    # rides on them); elsewhere identical
    moved = Augment(flip=1.0, crop=1.0, blur=0.0)(hu, tissues, np.random.default_rng(2))[1]
    changed = ~np.isclose(a_hu, d_hu)
    assert changed.any()
    assert np.array_equal(changed, np.isin(moved, (DIAPHRAGM_CODE, CANAL_CODE) + KIDNEY_CODES)
                          & changed)
    assert (changed & (moved == CANAL_CODE)).any()
    # the canal's own stream: turning it on changes nothing of the diaphragm and kidneys
    e_hu, _ = Augment(**base, diaphragm_muscle=1.0, kidney_unenhanced=1.0)(
        hu, lab, np.random.default_rng(2), tissues)
    assert np.array_equal(e_hu[moved != CANAL_CODE], d_hu[moved != CANAL_CODE])


def test_organ_texture_varies_the_organs_alone_on_a_stream_of_its_own():
    """organ_texture (off by default) adds a speckle and patches to the organs, kidneys and
    diaphragm: on, the kidneys' HU spread grows, some organ pixels change and no muscle,
    fat, bone, gas, canal or background pixel and no label does; off (0), every draw is as
    before."""
    from training.randomize import CANAL_CODE, DIAPHRAGM_CODE, KIDNEY_CODES

    assert Augment().organ_texture == 0.0
    hu, lab, tissues = organ_slice()
    base = dict(flip=0.0, crop=0.0, blur=0.0, randomize=1.0, obese=0.0, diaphragm_muscle=1.0,
                kidney_unenhanced=1.0)
    grown = 0
    for seed in range(6):
        a_hu, a_lab = Augment(**base)(hu, lab, np.random.default_rng(seed), tissues)
        z_hu, _ = Augment(**base, organ_texture=0.0)(hu, lab, np.random.default_rng(seed),
                                                      tissues)
        assert np.array_equal(a_hu, z_hu)
        b_hu, b_lab = Augment(**base, organ_texture=1.0)(hu, lab, np.random.default_rng(seed),
                                                          tissues)
        assert np.array_equal(a_lab, b_lab)
        # organs: MSC soft tissue (25..200 HU before the draw), kidneys and diaphragm
        organs = (lab == MSC) & (((hu > 25.0) & (hu < 200.0))
                                 | np.isin(tissues, KIDNEY_CODES + (DIAPHRAGM_CODE,)))
        changed = ~np.isclose(a_hu, b_hu)
        assert not (changed & ~organs).any()
        assert not (changed & (tissues == CANAL_CODE)).any() and changed.any()
        kidney = np.isin(tissues, KIDNEY_CODES) & (a_lab == MSC)
        grown += b_hu[kidney].std() > a_hu[kidney].std() + 0.5
    assert grown >= 4   # the draws' amplitudes start at 0: a few may add almost nothing


def test_muscle_hu_sets_the_range_of_the_muscle_mean_and_is_checked():
    """Augment.muscle_mean_hu (--muscle-hu, default MUSCLE_MEAN_HU) is the range the
    muscle's new mean is drawn from: the same draws land higher with a higher range (the
    muscle without infiltration patches: depth drawn 0 is rare, so compare medians over
    seeds), nothing but muscle and the arms' muscle moves, and the CLI refuses LO >= HI."""
    from training.__main__ import build_parser
    from training.train import check_args

    assert tuple(Augment().muscle_mean_hu) == MUSCLE_MEAN_HU
    hu, lab = body_slice()
    base = dict(flip=0.0, crop=0.0, blur=0.0, randomize=1.0, obese=0.0)
    higher = 0
    for seed in range(8):
        a_hu, a_lab = Augment(**base)(hu, lab, np.random.default_rng(seed))
        b_hu, b_lab = Augment(**base, muscle_mean_hu=(40.0, 110.0))(
            hu, lab, np.random.default_rng(seed))
        assert np.array_equal(a_lab, b_lab)
        mus = a_lab == MUS
        higher += np.median(b_hu[mus]) > np.median(a_hu[mus]) + 20.0
        inside = a_lab > 0
        assert np.allclose(a_hu[inside & ~mus], b_hu[inside & ~mus])
    assert higher == 8
    args = build_parser().parse_args(["train", "--phantom-subjects", "2", "--output", "x",
                                      "--muscle-hu", "-10", "75"])
    check_args(args)
    assert args.muscle_hu == [-10.0, 75.0]
    with pytest.raises(ValueError, match="--muscle-hu"):
        check_args(build_parser().parse_args(["train", "--phantom-subjects", "2", "--output",
                                              "x", "--muscle-hu", "60", "10"]))


def test_organ_look_finds_enhanced_kidneys_above_200_hu_by_their_codes():
    """A phantom kidney enhanced past 200 HU (portal venous at 80 kVp: cortex about 235) is
    found by its tissue codes: with the kidneys drawn unenhanced every one of its pixels
    lands near the draw, and with the organ look on but the kidneys not redrawn, it moves
    with the organs as one piece. An HU window split such a kidney into drawn pixels and
    pixels left at their enhanced HU, a speckle of 100 HU and more."""
    from training.randomize import KIDNEY_CODES, KIDNEY_UNENHANCED_HU, OrganLook

    hu, lab, tissues = organ_slice()
    kid = np.isin(tissues, KIDNEY_CODES)
    noise = np.random.default_rng(0).normal(0.0, 15.0, hu.shape).astype(np.float32)
    hu = np.where(kid, np.where(tissues == KIDNEY_CODES[0], 235.0, 225.0) + noise, hu)
    assert 0.02 < (hu[kid] < 200.0).mean() < 0.2      # the window would split it
    checked = 0
    for seed in range(12):
        for redraw in (True, False):
            look = OrganLook(tissues, False, redraw, np.random.default_rng([seed, 3]))
            out, out_lab = randomize_appearance(hu, lab, np.random.default_rng(seed),
                                                organs=look)
            k = kid & (out_lab == lab)
            if k.sum() < 50:
                continue
            v = out[k]
            med = float(np.median(v))
            if redraw:
                assert KIDNEY_UNENHANCED_HU[0] - 12 <= med <= KIDNEY_UNENHANCED_HU[1] + 12
            # one piece: no pixels left 100 HU and more from the kidney's median (streaks
            # through the spine may cross it, by at most 100 HU on a few pixels)
            assert (np.abs(v - med) > 100.0).mean() < 0.01, (seed, redraw)
            checked += 1
    assert checked >= 20


def test_the_unenhanced_kidneys_level_range_is_an_option():
    """OrganLook.kidney_hu (--kidney-hu) moves the redrawn kidneys' level: drawn from
    -5..0 HU their median lies far below the default 15..40 HU; the other draws keep their
    streams (the rest of the slice unchanged), and train refuses a range upside down."""
    from training.__main__ import build_parser
    from training.randomize import KIDNEY_CODES, OrganLook
    from training.train import check_args

    hu, lab, tissues = organ_slice()
    kid = np.isin(tissues, KIDNEY_CODES)
    low = OrganLook(tissues, False, True, np.random.default_rng([4, 3]), kidney_hu=(-5.0, 0.0))
    std = OrganLook(tissues, False, True, np.random.default_rng([4, 3]))
    a, la = randomize_appearance(hu, lab, np.random.default_rng(4), organs=low)
    b, lb = randomize_appearance(hu, lab, np.random.default_rng(4), organs=std)
    k = kid & (la == lab)
    assert np.median(a[k]) < np.median(b[k]) - 10 and np.median(a[k]) < 12
    assert np.array_equal(la, lb) and np.array_equal(a[~kid], b[~kid])
    args = build_parser().parse_args(["train", "--phantom-subjects", "2", "--output", "x",
                                      "--kidney-hu", "40", "0"])
    with pytest.raises(ValueError, match="--kidney-hu"):
        check_args(args)
    args = build_parser().parse_args(["train", "--phantom-subjects", "2", "--output", "x",
                                      "--kidney-hu", "0", "40"])
    check_args(args)
    assert args.kidney_hu == [0.0, 40.0]


# ----------------------------------------------------------------------------- thick slices


def test_slice_profile_weighs_the_planes_a_slice_takes_in():
    """A box profile over planes 1 mm apart: 0.6 and 1 mm are the centre plane alone, 3 mm
    the three middle planes alike, 5 mm all five alike, 4 mm the outer two at half weight;
    the weights sum to one and spread as the slice thickens."""
    from training.randomize import slice_profile

    assert np.allclose(slice_profile(0.6), [0, 0, 1, 0, 0])
    assert np.allclose(slice_profile(1.0), [0, 0, 1, 0, 0])
    assert np.allclose(slice_profile(3.0), [0, 1 / 3, 1 / 3, 1 / 3, 0])
    assert np.allclose(slice_profile(4.0), [0.125, 0.25, 0.25, 0.25, 0.125])
    assert np.allclose(slice_profile(5.0), [0.2] * 5)
    centre = [slice_profile(t)[2] for t in np.linspace(0.6, 5.0, 23)]
    assert np.all(np.diff(centre) <= 1e-12) and centre[-1] < centre[0]
    for t in np.linspace(0.6, 5.0, 23):
        assert abs(slice_profile(t).sum() - 1.0) < 1e-12
    with pytest.raises(ValueError, match="thickness"):
        slice_profile(0.0)


def test_a_stack_of_planes_gets_one_appearance():
    """randomize_appearance on (P, H, W) planes: identical planes come out identical (one
    muscle mean, one organ phase, the same fields, table, arms, streaks and cut in every
    plane), and a stack of one draws exactly as the slice alone."""
    from training.randomize import OrganLook

    hu, lab, tissues = organ_slice()
    for seed in range(8):
        look = OrganLook(np.stack([tissues] * 3), True, True, np.random.default_rng([seed, 3]),
                         np.random.default_rng([seed, 4]))
        out, out_lab = randomize_appearance(np.stack([hu] * 3), np.stack([lab] * 3),
                                            np.random.default_rng(seed), organs=look)
        assert out.shape == (3,) + hu.shape and out_lab.shape == (3,) + hu.shape
        assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])
        assert np.array_equal(out_lab[0], out_lab[2])
        one = randomize_appearance(hu[None], lab[None], np.random.default_rng(seed),
                                   organs=OrganLook(tissues[None], True, True,
                                                    np.random.default_rng([seed, 3]),
                                                    np.random.default_rng([seed, 4])))
        flat = randomize_appearance(hu, lab, np.random.default_rng(seed),
                                    organs=OrganLook(tissues, True, True,
                                                     np.random.default_rng([seed, 3]),
                                                     np.random.default_rng([seed, 4])))
        assert np.array_equal(one[0][0], flat[0]) and np.array_equal(one[1][0], flat[1])
    with pytest.raises(ValueError, match="alike"):
        randomize_appearance(np.stack([hu] * 2), lab, np.random.default_rng(0))


def _planes(hu, lab, tissues, step_hu: float = 40.0):
    """Planes at PLANE_OFFSETS_MM: the slice's HU plus step_hu per mm squared inside the
    body (so that the profile's mean differs from the centre), and
    the labels one class up (1..5) in the lowest plane, so that the centre's are told
    apart."""
    from training.randomize import PLANE_OFFSETS_MM

    p_hu = np.stack([np.where(lab > 0, hu + step_hu * o * o, hu) for o in PLANE_OFFSETS_MM])
    p_lab = np.stack([lab] * len(PLANE_OFFSETS_MM))
    p_lab[0] = np.where(lab > 0, lab % 5 + 1, 0)
    return p_hu.astype(np.float32), p_lab, np.stack([tissues] * len(PLANE_OFFSETS_MM))


def test_a_thick_slice_is_the_profile_mean_of_its_planes():
    """Without randomisation a thick slice's HU are its planes' HU averaged over the slice
    profile (with flip and crop applied to every plane alike), its labels the centre's."""
    from training.randomize import PLANE_OFFSETS_MM, slice_profile

    hu, lab, tissues = organ_slice()
    planes = _planes(hu, lab, tissues)
    offsets = sorted(PLANE_OFFSETS_MM + (0.0,))
    stack = np.stack([hu if o == 0.0 else planes[0][PLANE_OFFSETS_MM.index(o)] for o in offsets])
    for t in (2.0, 3.0, 4.5, 5.0):
        out, out_lab = Augment(flip=0.0, crop=0.0, blur=0.0, thick=1.0, thickness_mm=(t, t))(
            hu, lab, np.random.default_rng(1), tissues, planes)
        expect = np.tensordot(slice_profile(t, offsets), stack, axes=1)
        assert np.allclose(out, expect, atol=1e-3)
        assert np.array_equal(out_lab, lab)
        assert np.median(out[lab > 0] - hu[lab > 0]) > 10.0
    # flipped and cropped alike: the same as flipping and cropping the averaged slice
    moved = Augment(flip=1.0, crop=1.0, blur=0.0, thick=1.0, thickness_mm=(5.0, 5.0))(
        hu, lab, np.random.default_rng(1), tissues, planes)
    mean = np.tensordot(slice_profile(5.0, offsets), stack, axes=1).astype(np.float32)
    ref = Augment(flip=1.0, crop=1.0, blur=0.0)(mean, lab, np.random.default_rng(1))
    assert np.allclose(moved[0], ref[0], atol=1e-2) and np.array_equal(moved[1], ref[1])


def test_thin_slices_and_uniform_anatomy_are_as_before():
    """thick is off by default and changes nothing without planes or at 0; a slice drawn
    0.6 mm thick (the centre plane alone) is exactly the thin slice, randomised and with the
    organ looks included; a 5 mm slice through anatomy that does not change with height is
    the thin slice too (one appearance for all planes, averaged before the noise)."""
    hu, lab, tissues = organ_slice()
    planes = _planes(hu, lab, tissues)
    uniform = (np.stack([hu] * 4), np.stack([lab] * 4), np.stack([tissues] * 4))
    assert Augment().thick == 0.0
    base = dict(flip=1.0, crop=1.0, blur=0.0, randomize=1.0, obese=0.0, diaphragm_muscle=1.0,
                kidney_unenhanced=1.0, canal_hu=1.0, lowres=0.5)
    for seed in range(6):
        thin = Augment(**base)(hu, lab, np.random.default_rng(seed), tissues)
        for aug, pl in ((Augment(**base, thick=1.0), None), (Augment(**base), planes),
                        (Augment(**base, thick=1.0, thickness_mm=(0.6, 0.6)), planes)):
            out = aug(hu, lab, np.random.default_rng(seed), tissues, pl)
            assert np.array_equal(out[0], thin[0]) and np.array_equal(out[1], thin[1])
        # with the body grown obese and the fat planes closed, plane by plane, too
        for extra in ({}, {"obese": 1.0, "organ_contact": 1.0}):
            kw = dict(base, **extra)
            thin = Augment(**kw)(hu, lab, np.random.default_rng(seed), tissues)
            out = Augment(**kw, thick=1.0, thickness_mm=(5.0, 5.0))(
                hu, lab, np.random.default_rng(seed), tissues, uniform)
            assert np.allclose(out[0], thin[0], atol=1e-2) and np.array_equal(out[1], thin[1])


def test_thick_slices_from_the_phantom(tmp_path):
    """phantom_records renders each training slice's planes (the subject at the slice's
    height plus each offset), not the validation slices'; planes_on_grid places them as the
    slices; --thick-slices is a share, and needs the phantom."""
    from training.data import phantom_records, planes_on_grid, to_source_grid
    from training.phantom.generate import make_slice, subject_slices
    from training.randomize import PLANE_OFFSETS_MM

    recs = phantom_records(3, 1, size=48, seed=0, val_fraction=0.34, levels=("T12", "L1"),
                           plane_offsets_mm=PLANE_OFFSETS_MM)
    assert recs["val"] and all(r.planes is None for r in recs["val"])
    r = recs["train"][0]
    assert r.planes.hu.shape == (4, 48, 48) and r.planes.offsets_mm == PLANE_OFFSETS_MM
    seed = int(r.name.split("seed ")[1].split(")")[0])
    z = subject_slices(seed, 1, 5.0, size=48, levels=("T12", "L1"))[0].z_mm
    for i, o in enumerate(PLANE_OFFSETS_MM):
        p = make_slice(seed, z_mm=z + o, size=48, supersample=2, anatomy="torso")
        assert np.array_equal(r.planes.labels[i], p.labels)
        assert np.array_equal(r.planes.hu[i], p.hu)
    again = phantom_records(3, 1, size=48, seed=0, val_fraction=0.34, levels=("T12", "L1"))
    assert all(a.planes is None for a in again["train"])
    assert np.array_equal(again["train"][0].labels, r.labels)
    hu, _, size = to_source_grid(recs["train"], 1.0)
    p_hu, p_lab, p_tis = planes_on_grid(recs["train"], 1.0, size)
    assert p_hu.shape == (len(recs["train"]), 4) + tuple(size) == p_lab.shape == p_tis.shape
    assert planes_on_grid(recs["val"], 1.0, size) is None
    # the planes lie where the subject is 1 and 2 mm away: most labels agree with the slice,
    # not all (the anatomy changes with height)
    agree = [(r.planes.labels[i] == r.labels).mean() for i in range(4)]
    assert min(agree) > 0.5 and max(agree) < 1.0

    from training.__main__ import build_parser
    from training.train import check_args

    for extra, match in ((["--phantom-subjects", "2", "--thick-slices", "1.5"], "--thick-slices"),
                         (["--manifest", str(tmp_path / "m.csv"), "--thick-slices", "0.5"],
                          "needs the phantom")):
        with pytest.raises(ValueError, match=match):
            check_args(build_parser().parse_args(["train", *extra, "--output", "x"]))


def test_lowres_noise_draws_a_coarse_scans_noise_on_its_coarse_pixels():
    """lowres_noise (--lowres-noise, off by default) adds the scanner noise after a coarse
    scan's shrink instead of before it: on the coarse pixels the organ's noise is then as
    drawn (SD 5..30 HU), where the shrink averages the noise drawn on the training grid down;
    the labels, and every draw with it off or without lowres, are as before."""
    from scipy.ndimage import binary_erosion

    assert Augment().lowres_noise == 0.0
    hu, lab = body_slice(192)
    hu[(hu > 200.0) | (hu < -800.0) & (lab == MSC)] = 55.0  # no bone streaks, no gas
    base = dict(flip=0.0, crop=0.0, blur=0.0, randomize=1.0, obese=0.0)
    small = (round(192 / 3.5),) * 2
    # the organ disc at the coarse pixels' centres, off its edge
    centres = np.round((np.arange(small[0]) + 0.5) * 192 / small[0] - 0.5).astype(int)
    organ = binary_erosion(lab[np.ix_(centres, centres)] == MSC, iterations=2)
    sds = {0.0: [], 1.0: []}
    for seed in range(8):
        # without lowres, lowres_noise changes nothing
        a_hu, _ = Augment(**base)(hu, lab, np.random.default_rng(seed))
        b_hu, _ = Augment(**base, lowres_noise=1.0)(hu, lab, np.random.default_rng(seed))
        assert np.array_equal(a_hu, b_hu)
        for p in sds:
            c_hu, c_lab = Augment(**base, lowres=1.0, lowres_factor=(3.5, 3.5),
                                  lowres_noise=p)(hu, lab, np.random.default_rng(seed))
            if p == 0.0:
                d_hu, _ = Augment(**base, lowres=1.0, lowres_factor=(3.5, 3.5))(
                    hu, lab, np.random.default_rng(seed))
                assert np.array_equal(c_hu, d_hu)
                off_lab = c_lab
            else:
                assert np.array_equal(c_lab, off_lab)
            coarse = c_hu[np.ix_(centres, centres)]     # the coarse pixels, enlarged back
            # the organ is one level here: its robust SD on the coarse pixels is the noise's
            # (where the field of view or an arm has not cut it off)
            x = coarse[organ & (np.abs(coarse) < 300.0)]
            sds[p].append(float(1.4826 * np.median(np.abs(x - np.median(x)))))
    assert np.mean(sds[1.0]) > 2.0 * np.mean(sds[0.0])
