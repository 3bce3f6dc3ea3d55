"""The phantom generator: determinism, exact fractions, realistic anatomy and CT numbers,
for the default (lumbar, around L3) and the torso (T11 to L5) anatomy."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from EPDSegmentationLib.core.classes import NUM_CLASSES
from EPDSegmentationLib.core.epd import epd_image
from training.phantom import PhantomSlice, make_slice, subject_slices
from training.phantom.generate import level_z, levels_z_range
from training.phantom.raster import Canvas
from training.phantom.stats import (body_mask, epd_vs_truth, image_stats,
                                             label_stats)
from training.phantom.anatomy import subject_from_seed
from training.phantom.tissues import CLASS_OF, CODE, mean_hu
from training.phantom.torso import LEVELS, draw_torso

MUS, IMAT, SAT, VAT, MSC = 1, 2, 3, 4, 5
SEEDS_512 = (2, 5, 11)
#: full-size torso slices: (seed, level)
TORSO_512 = ((2, "T12"), (5, "T11"), (11, "L1"))


@pytest.fixture(scope="module")
def slices512():
    """Three full-size mid-L3 slices (lean to obese), made once for the module."""
    return {seed: make_slice(seed) for seed in SEEDS_512}


@pytest.fixture(scope="module")
def torso512():
    """Three full-size upper-abdominal slices of the torso anatomy."""
    return {key: make_slice(key[0], level=key[1]) for key in TORSO_512}


def digest(s: PhantomSlice) -> str:
    """First 16 hex digits of the SHA-256 of a slice's arrays (dtype, shape, bytes) and meta."""
    h = hashlib.sha256()
    for a in (s.hu, s.labels, s.fractions):
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps(s.meta, sort_keys=True).encode())
    return h.hexdigest()[:16]


#: digests of the default phantom computed from the code before the torso anatomy was added
#: (commit c6067b8): make_slice, subject_slices and write_dataset with their old arguments
#: must keep returning exactly these arrays. (A numpy/scipy upgrade that changes float
#: rounding in the image would show here too; then check by hand and re-pin.)
PINNED = {
    "seed0_64": (dict(seed=0, size=64), "84167c8dcad8e55a"),
    "seed1_64": (dict(seed=1, size=64), "ded9c76df360663b"),
    "seed4_64": (dict(seed=4, size=64), "734865e7ea6619b7"),
    "seed11_64": (dict(seed=11, size=64), "9790a80535bff52d"),
    "seed3_96_zm60": (dict(seed=3, size=96, z_mm=-60.0), "ebece86e6c3276c8"),
    "seed3_96_z45": (dict(seed=3, size=96, z_mm=45.0), "68223d433bc4812a"),
    "seed3_96_z90": (dict(seed=3, size=96, z_mm=90.0), "6af940f5b40a8f91"),
    "seed3_96_z130": (dict(seed=3, size=96, z_mm=130.0), "a9f669d462d36c28"),
    "seed8_96_z150": (dict(seed=8, size=96, z_mm=150.0), "dfeb1269c8a72ae7"),
    "seed5_128_ss2_px2.5": (dict(seed=5, size=128, supersample=2, pixel_mm=2.5),
                            "ab0088bdd6c3c55b"),
    "seed7_128_ss1": (dict(seed=7, size=128, supersample=1), "54dd2876100dc4e3"),
}
PINNED_STACKS = {
    "stack9_3x7_64": ((9, 3, 7.0), ["687577846892f049", "821bd50865138b3a", "bb0ee5bc8b0c2861"]),
    "stack9_default_64": ((9,), ["dce7eb6b9b50af9b", "32064e56fbae4a72", "d8a0be9cd35eba0b",
                                 "e0e22f36f00f451f", "018951b2afa03676", "300f724da2cfdc75"]),
}
PINNED_512 = {2: "48f0e229667b99fe", 5: "763d72830f63c09f", 11: "7bed2a3d55bb8917"}


@pytest.mark.parametrize("case", sorted(PINNED))
def test_default_slices_are_bit_identical_to_before_the_torso_anatomy(case):
    kw, expected = PINNED[case]
    kw = dict(kw)
    assert digest(make_slice(kw.pop("seed"), **kw)) == expected


def test_default_stacks_and_full_size_slices_are_bit_identical(slices512):
    for name, (args, expected) in PINNED_STACKS.items():
        assert [digest(s) for s in subject_slices(*args, size=64)] == expected, name
    for seed, expected in PINNED_512.items():
        assert digest(slices512[seed]) == expected, seed
    # the anatomy switch and its default agree
    assert digest(make_slice(0, size=64, anatomy="lumbar")) == PINNED["seed0_64"][1]


@pytest.fixture(scope="module")
def small():
    return make_slice(4, size=64)


def test_same_seed_same_slice_and_different_seeds_differ(small):
    again = make_slice(4, size=64)
    assert np.array_equal(small.hu, again.hu)
    assert np.array_equal(small.labels, again.labels)
    assert np.array_equal(small.fractions, again.fractions)
    assert small.meta == again.meta
    other = make_slice(5, size=64)
    assert not np.array_equal(small.labels, other.labels)
    assert small.meta["seed"] == 4 and other.meta["seed"] == 5


def test_contract_types_and_shapes(small):
    assert isinstance(small, PhantomSlice)
    assert small.hu.dtype == np.float32 and small.hu.shape == (64, 64)
    assert small.labels.dtype == np.uint8 and small.labels.shape == (64, 64)
    assert small.fractions.dtype == np.float32 and small.fractions.shape == (NUM_CLASSES, 64, 64)
    json.dumps(small.meta)      # json-serialisable
    assert set(np.unique(small.labels)) <= set(range(NUM_CLASSES))


@pytest.mark.parametrize("which", ["L3", "torso T11", "torso T12", "torso L1"])
def test_fractions_are_exact_subpixel_shares_that_sum_to_one(slices512, torso512, which):
    s = slices512[5] if which == "L3" else {
        "torso T12": torso512[(2, "T12")], "torso T11": torso512[(5, "T11")],
        "torso L1": torso512[(11, "L1")]}[which]
    f = s.fractions
    assert np.allclose(f.sum(axis=0), 1.0, atol=1e-6)
    assert f.min() >= 0 and f.max() <= 1
    # supersample 4: every fraction is a whole number of the 16 subpixels
    assert np.allclose(f * 16, np.round(f * 16), atol=1e-4)
    assert np.array_equal(s.labels, np.argmax(f, axis=0))
    mixed = f.max(axis=0) < 1
    assert 0.02 < mixed.mean() < 0.5, "boundaries should make some pixels mixed"


@pytest.mark.parametrize("where", [{}, {"level": "T12"}, {"level": "T11"}, {"level": "L2"}])
def test_hard_labels_agree_with_point_sampling_where_unambiguous(where):
    """Drawn once at 4 x 4 subpixels and once at the pixel centres only (supersample=1):
    wherever the fractions say a pixel is pure, the centre sample has that class."""
    fine = make_slice(7, size=128, **where)
    centre = make_slice(7, size=128, supersample=1, **where)
    pure = fine.fractions.max(axis=0) == 1.0
    assert pure.mean() > 0.8
    if not where:
        assert np.array_equal(fine.labels[pure], centre.labels[pure])
    else:
        # the torso's rib, crus and vein sections taper to nothing at their ends: a tip
        # thinner than the subpixel spacing can hold a pixel centre and no subpixel centre
        assert np.mean(fine.labels[pure] != centre.labels[pure]) <= 2e-4
    # and where the majority is strong, the centre almost always agrees
    strong = fine.fractions.max(axis=0) >= 0.75
    assert np.mean(fine.labels[strong] == centre.labels[strong]) > 0.97


@pytest.mark.parametrize("level", ["T12", "L1"])
def test_torso_anatomy_does_not_depend_on_the_output_size(level):
    """The torso organs are drawn in mm (the wall's inner surface is found on a map of fixed
    1 mm pixels), so their true areas agree across sizes of the same field of view."""
    small, big = make_slice(4, size=64, level=level), make_slice(4, size=256, level=level)
    area_small = small.fractions.sum(axis=(1, 2)) * small.pixel_mm ** 2
    area_big = big.fractions.sum(axis=(1, 2)) * big.pixel_mm ** 2
    for c in (MUS, SAT, VAT, MSC):
        assert area_small[c] == pytest.approx(area_big[c], rel=0.03), c


def test_same_field_of_view_at_any_size_and_true_areas_agree(slices512, small):
    big = make_slice(4)
    assert small.pixel_mm == pytest.approx(8 * big.pixel_mm)
    assert 0.6 <= big.pixel_mm <= 0.9
    area_small = small.fractions.sum(axis=(1, 2)) * small.pixel_mm ** 2
    area_big = big.fractions.sum(axis=(1, 2)) * big.pixel_mm ** 2
    for c in (MUS, SAT, VAT, MSC):
        assert area_small[c] == pytest.approx(area_big[c], rel=0.03), c
    fixed = make_slice(4, size=64, pixel_mm=1.0)
    assert fixed.pixel_mm == 1.0 and fixed.meta["fov_mm"] == pytest.approx(64.0)


def test_z_moves_the_anatomy_smoothly():
    a, b, far = (make_slice(9, size=128, z_mm=z) for z in (0.0, 1.0, 40.0))
    near_agree = np.mean(a.labels == b.labels)
    far_agree = np.mean(a.labels == far.labels)
    assert near_agree > 0.97
    assert far_agree < near_agree - 0.02
    stack = subject_slices(9, n_slices=3, slice_gap_mm=5.0, size=64)
    assert [s.z_mm for s in stack] == [-5.0, 0.0, 5.0]
    assert stack[0].meta["adiposity"] == stack[2].meta["adiposity"]
    assert make_slice(9, size=64, z_mm=0.0).meta["level"] == "L3"


def test_epd_of_hard_labels_is_close_to_the_truth_and_closer_than_nearest(slices512):
    for s in slices512.values():
        for k in (2, 4, 8):
            r = epd_vs_truth(s.labels, s.fractions, k)
            assert r["mae"] < r["mae_nearest"] / 2
            assert r["mae"] < 0.01
        # the hard labels keep the large tissues' true areas within a few % (thin wall
        # muscles and fat planes make majority labels miss about 1 % of muscle)
        errs = epd_vs_truth(s.labels, s.fractions, 2)["area_err_pct"]
        for c in (MUS, SAT, VAT):
            assert abs(errs[c]) < 2.5, (c, errs[c])


@pytest.mark.parametrize("where", [{}, {"level": "T12"}])
def test_truth_at_lower_resolution_is_the_window_mean_of_fractions(where):
    """Fractions average exactly: drawing at 64 x 64 with 8 x 8 subpixels equals the 4 x 4
    window mean of the 256 x 256 drawing with 2 x 2 subpixels (same subpixel grid)."""
    low = make_slice(3, size=64, supersample=8, **where)
    high = make_slice(3, size=256, supersample=2, **where)
    assert np.allclose(low.fractions, epd_image(high.fractions, 4), atol=1e-6)


def tissue_hu_and_noise(s, key):
    """Fat, muscle and noise of one slice within real CT's ranges (GUIDE.md section 6);
    returns its image_stats."""
    st = label_stats(s.labels, s.hu, s.fractions.max(axis=0) == 1)
    assert -125 < st["sat_mean_hu"] < -80, (key, st)
    assert -120 < st["vat_mean_hu"] < -70, (key, st)
    assert 15 < st["muscle_mean_hu"] < 70, (key, st)
    img = image_stats(s.hu, s.pixel_mm)
    assert 9 < img["fat_noise_sd_hu"] < 18, (key, img)
    return img


def test_hu_per_tissue_is_realistic(slices512):
    for seed, s in slices512.items():
        img = tissue_hu_and_noise(s, seed)
        assert -115 < img["fat_mean_hu"] < -69, (seed, img)
        assert 25 < img["soft_mean_hu"] < 65, (seed, img)
        outside = ~body_mask(s.hu, s.pixel_mm)
        air = s.hu[outside & (s.labels == 0) & (s.hu < -900)]
        assert abs(np.median(air) + 1000) < 30


def test_anatomy_is_body_sized_with_table_and_all_tissues(slices512):
    widths = []
    for seed, s in slices512.items():
        img = image_stats(s.hu, s.pixel_mm)
        assert 25 < img["width_cm"] < 42 and 17 < img["ap_cm"] < 32, (seed, img)
        widths.append(img["width_cm"])
        assert set(np.unique(s.labels)) == set(range(NUM_CLASSES)), seed
        # IMAT a few % of muscle
        imat = label_stats(s.labels)["imat_pct_of_muscle"]
        assert 0.5 < imat < 15, (seed, imat)
        # the table: dense background pixels below the body
        body = s.labels > 0
        lowest_body_row = np.nonzero(body.any(axis=1))[0].max()
        below = (s.labels == 0) & (s.hu > 0)
        assert below[lowest_body_row - 5:].sum() > 100, seed
        # the vertebra: bone (> 300 HU) on the midline behind the body centre
        rows = np.nonzero(body.any(axis=1))[0]
        mid = s.hu[rows.mean().astype(int):, s.hu.shape[1] // 2 - 20: s.hu.shape[1] // 2 + 20]
        assert (mid > 300).sum() > 200, seed
    assert max(widths) - min(widths) > 4, "habitus should vary with the seed"


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="seed"):
        make_slice(-1)
    with pytest.raises(ValueError, match="size"):
        make_slice(1, size=8)
    with pytest.raises(ValueError, match="supersample"):
        make_slice(1, size=64, supersample=0)
    with pytest.raises(ValueError, match="pixel_mm"):
        make_slice(1, size=64, pixel_mm=-2.0)
    with pytest.raises(ValueError, match="n_slices"):
        subject_slices(1, n_slices=0, size=64)


def test_downsampling_statistics_on_phantom_follow_real_anatomy(slices512):
    """Nearest misstates IMAT much more than the large tissues, and more at 1/8 than 1/2
    (GUIDE section 6 on real L3 maps: 5 / 9 / 26 % against 0.1-0.8 %)."""
    from training.phantom.stats import downsampling_area_errors, mixed_window_pct

    errs = {k: [] for k in (2, 8)}
    big = []
    for s in slices512.values():
        for k in (2, 8):
            errs[k].append(abs(downsampling_area_errors(s.labels, k, IMAT)["nearest_pct"]))
        big.append(abs(downsampling_area_errors(s.labels, 2, SAT)["nearest_pct"]))
        m2, m8 = mixed_window_pct(s.labels, 2), mixed_window_pct(s.labels, 8)
        assert 1 < m2 < m8 < 60
    assert np.mean(errs[8]) > np.mean(errs[2])
    assert np.mean(errs[2]) > np.mean(big)


# ----------------------------------------------------------------------------- torso anatomy


def torso_codes(seed: int, level: str, size: int = 256):
    """Tissue codes of a torso slice at the output pixel centres (what supersample=1 draws),
    the pixel size (mm) and the pixel (row, col) of the body centre (drawing origin)."""
    s = subject_from_seed(seed)
    cv = Canvas(size, s.fov_mm)
    draw_torso(cv, s, level_z(seed, level))
    c, r = cv.to_px((0.0, 0.0))
    return cv.codes, s.fov_mm / size, (r, c)


def _area_cm2(mask, px_mm):
    return float(mask.sum()) * (px_mm / 10) ** 2


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 6, 9])
def test_liver_and_spleen_at_T12(seed):
    """T12: a large MSC region with the liver's HU on the patient's right (image left), the
    spleen behind on the left; both MSC."""
    from scipy import ndimage

    s = make_slice(seed, level="T12", size=256)
    hu_tab = mean_hu(subject_from_seed(seed))
    smooth = ndimage.median_filter(s.hu, 5)
    liverish = (s.labels == MSC) & (np.abs(smooth - hu_tab[CODE["liver"]]) < 25)
    lab, n = ndimage.label(liverish)
    sizes = ndimage.sum(liverish, lab, index=np.arange(1, n + 1))
    big = lab == 1 + int(np.argmax(sizes))
    codes, px, (r0, c0) = torso_codes(seed, "T12")
    assert _area_cm2(big, s.pixel_mm) > 90, seed
    assert np.nonzero(big)[1].mean() < c0, "the liver lies on the patient's right"
    liver, spleen = codes == CODE["liver"], codes == CODE["spleen"]
    assert 110 < _area_cm2(liver, px) < 300, (seed, _area_cm2(liver, px))
    assert 15 < _area_cm2(spleen, px) < 90, (seed, _area_cm2(spleen, px))
    rows, cols = np.nonzero(spleen)
    assert cols.mean() > c0 + 40 / px and rows.mean() > r0 - 20 / px, "spleen: left, posterior"
    assert CLASS_OF[CODE["liver"]] == MSC and CLASS_OF[CODE["spleen"]] == MSC
    # the stomach (wall, contents, gas) in front on the left, when it reaches this level
    stomach = np.isin(codes, [CODE["gastric"], CODE["bowel_fluid"], CODE["oral_contrast"],
                              CODE["gas"], CODE["bowel_wall"]])
    if stomach.sum():
        rows, cols = np.nonzero(stomach)
        assert cols.mean() > c0 and rows.mean() < r0


@pytest.mark.parametrize("seed,level", [(0, "T11"), (1, "T12"), (4, "T12"), (7, "T11"),
                                        (12, "T12")])
def test_ribs_with_intercostal_muscle_between_them_at_T11_T12(seed, level):
    """A ring of rib sections (bone, MSC) on both sides, with skeletal muscle (MUS) between
    neighbouring ribs along the wall, and costal cartilage (MSC) in front."""
    from scipy import ndimage

    codes, px, (r0, c0) = torso_codes(seed, level)
    bone = np.isin(codes, [CODE["cortex"], CODE["marrow"]])
    lab, n = ndimage.label(bone)
    sizes = ndimage.sum(bone, lab, index=np.arange(1, n + 1))
    spine = 1 + int(np.argmax(sizes))
    ribs = [i for i in range(1, n + 1) if i != spine and sizes[i - 1] * px * px > 12]
    centres = np.array([np.mean(np.nonzero(lab == i), axis=1) for i in ribs])
    dy, dx = centres[:, 0] - r0, centres[:, 1] - c0
    left, right = (dx > 0).sum(), (dx < 0).sum()
    assert left >= 3 and right >= 3, (seed, level, left, right)
    assert CLASS_OF[CODE["cortex"]] == MSC and CLASS_OF[CODE["cartilage"]] == MSC
    cls = CLASS_OF[codes]
    # between angular neighbours on each side, at the ribs' radius: intercostal muscle
    phi, rad = np.arctan2(dx, -dy), np.hypot(dx, dy)
    found, gaps = 0, 0
    for side in (-1, 1):
        sel = np.flatnonzero(np.sign(dx) == side)
        order = sel[np.argsort(np.abs(phi[sel]))]
        for a, b in zip(order[:-1], order[1:]):
            if abs(abs(phi[a]) - abs(phi[b])) > 0.8 or rad[a] < 60 / px or rad[b] < 60 / px:
                continue
            gaps += 1
            p, r = (phi[a] + phi[b]) / 2, (rad[a] + rad[b]) / 2
            hits = [cls[int(round(r0 - (r + d) * np.cos(p))), int(round(c0 + (r + d) * np.sin(p)))]
                    for d in np.arange(-5, 5.1, 1.0) / px]
            found += MUS in hits
    assert gaps >= 3 and found >= 0.75 * gaps, (seed, level, found, gaps)
    cart = codes == CODE["cartilage"]
    if cart.any():
        assert np.nonzero(cart)[0].mean() < r0, "costal cartilage in front"


def test_lung_bases_and_diaphragm_are_msc_not_muscle():
    """T11: air-filled lung (about -850 HU) in the posterior costophrenic recesses, labelled
    MSC; the diaphragm and its crura have muscle-like HU but are MSC, as TotalSegmentator's
    skeletal muscle mask leaves them out."""
    assert CLASS_OF[CODE["lung"]] == MSC and CLASS_OF[CODE["diaphragm"]] == MSC
    for seed in (0, 3, 5, 8):
        s = make_slice(seed, level="T11", size=256)
        body = body_mask(s.hu, s.pixel_mm)
        lung = body & (s.hu < -650) & (s.labels == MSC)
        codes, px, (r0, c0) = torso_codes(seed, "T11")
        assert _area_cm2(codes == CODE["lung"], px) > 8, seed
        assert _area_cm2(lung, s.pixel_mm) > 5, seed
        assert np.nonzero(lung)[0].mean() > r0, "lung bases lie posteriorly"
        assert np.median(s.hu[lung]) < -750
        hu = mean_hu(subject_from_seed(seed))
        assert -900 < hu[CODE["lung"]] < -800
        assert abs(hu[CODE["diaphragm"]] - hu[CODE["muscle"]]) < 40
        assert _area_cm2(codes == CODE["diaphragm"], px) > 3
    codes, px, _ = torso_codes(2, "L1")
    assert _area_cm2(codes == CODE["diaphragm"], px) > 0.5, "crura at L1"


def test_liver_ct_numbers_by_phase():
    """Liver about 50-65 HU unenhanced (lower with steatosis), about 90-130 portal venous at
    120 kVp (more at lower tube voltage); portal and hepatic veins brighter than the liver
    when enhanced; the image's liver has that HU."""
    by_phase = {}
    for seed in range(60):
        s = subject_from_seed(seed)
        hu = mean_hu(s)
        by_phase.setdefault(s.phase, []).append((hu[CODE["liver"]], s.kvp, hu))
    native = [v for v, _, _ in by_phase["non_contrast"]]
    assert 25 < min(native) and max(native) < 66 and np.median(native) > 45
    pv120 = [v for v, kvp, _ in by_phase["portal_venous"] if kvp == 120]
    assert pv120 and 85 < min(pv120) and max(pv120) < 135
    for v, _, hu in by_phase["portal_venous"]:
        assert hu[CODE["portal_vein"]] > v + 30 and hu[CODE["hepatic_vein"]] > v + 15
    from scipy import ndimage

    s = make_slice(1, level="T12", size=256)
    codes, _, _ = torso_codes(1, "T12")
    core = ndimage.binary_erosion(codes == CODE["liver"], iterations=3)
    assert abs(np.median(s.hu[core]) - mean_hu(subject_from_seed(1))[CODE["liver"]]) < 8


def test_torso_hu_and_body_are_realistic(torso512):
    for key, s in torso512.items():
        img = tissue_hu_and_noise(s, key)
        assert 25 < img["width_cm"] < 42 and 17 < img["ap_cm"] < 32, (key, img)
        assert set(np.unique(s.labels)) == set(range(NUM_CLASSES)), key
        assert s.meta["anatomy"] == "torso" and s.meta["level"] == key[1]


def test_torso_is_deterministic_and_changes_smoothly_with_z():
    a, b = make_slice(6, size=64, level="T12"), make_slice(6, size=64, level="T12")
    for x, y in ((a.hu, b.hu), (a.labels, b.labels), (a.fractions, b.fractions)):
        assert np.array_equal(x, y)
    assert a.meta == b.meta and json.dumps(a.meta)
    assert not np.array_equal(a.labels, make_slice(7, size=64, level="T12").labels)
    for level in LEVELS:
        z = level_z(6, level)
        s0, s1, far = (make_slice(6, size=128, z_mm=z + d, anatomy="torso")
                       for d in (0.0, 1.0, 40.0))
        near = np.mean(s0.labels == s1.labels)
        assert near > 0.96, (level, near)
        assert np.mean(s0.labels == far.labels) < near - 0.01, level
    stack = subject_slices(6, 4, 5.0, levels=("T11", "L4"), size=64)
    again = subject_slices(6, 4, 5.0, levels=("T11", "L4"), size=64)
    assert all(np.array_equal(x.hu, y.hu) and np.array_equal(x.labels, y.labels)
               for x, y in zip(stack, again))
    zs = [s.z_mm for s in stack]
    lo, hi = levels_z_range(6, ("T11", "L4"))
    assert np.allclose(np.diff(zs), 5.0) and lo <= zs[0] and zs[-1] <= hi
    assert len({json.dumps(s.meta["torso"], sort_keys=True) for s in stack}) == 1
    assert len({s.meta["adiposity"] for s in stack}) == 1


def test_torso_levels_follow_the_vertebral_column():
    for level in LEVELS:
        assert make_slice(3, size=48, level=level).meta["level"] == level
    zs = [level_z(3, v) for v in LEVELS]
    assert all(a > b for a, b in zip(zs[:-1], zs[1:])), "T11 above T12 above ... S1"
    assert level_z(3, "L3") == pytest.approx(subject_from_seed(3).vertebra_shift)
    lo, hi = levels_z_range(3, ("S1", "T11"))
    assert (lo, hi) == levels_z_range(3, ("T11", "S1")) and lo < zs[-1] and hi > zs[0]
    lo, hi = levels_z_range(3, ("L4", "T11"))
    spread = subject_slices(3, 5, None, levels=("T11", "L4"), size=48)
    assert [s.z_mm for s in spread] == pytest.approx(list(np.linspace(lo, hi, 5)))
    assert [s.meta["level"] for s in spread][2] in ("L1", "L2", "L1-L2 disc")
    # one stack per subject, placed by its seed: different subjects sit at different heights
    centres = {np.mean([s.z_mm for s in subject_slices(seed, 2, 5.0, levels=("T11", "L4"),
                                                       size=32)]) for seed in range(4)}
    assert len(centres) == 4


def test_torso_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="level"):
        make_slice(1, size=32, level="T5")
    with pytest.raises(ValueError, match="anatomy"):
        make_slice(1, size=32, anatomy="pelvis")
    with pytest.raises(ValueError, match="torso"):
        make_slice(1, size=32, level="T12", anatomy="lumbar")
    with pytest.raises(ValueError, match="levels"):
        subject_slices(1, 2, levels=("T11",), size=32)
    with pytest.raises(ValueError, match="beyond"):
        subject_slices(1, 2, levels=("T11", -200.0), size=32)
    with pytest.raises(ValueError, match="levels"):
        subject_slices(1, 2, None, size=32)


def test_kidney_contact_lays_the_kidneys_on_their_muscles():
    """kidney_contact=1 moves both kidneys back and in, onto the quadratus lumborum and
    psoas: kidney (MSC) pixels then touch muscle with no fat between, the muscles keep
    every pixel, and nothing changes away from the kidneys. 0 is the phantom as before."""
    from scipy.ndimage import binary_dilation

    MUS, VAT, MSC = 1, 4, 5
    before = make_slice(5, anatomy="torso", level="L2", size=256, supersample=2)
    again = make_slice(5, anatomy="torso", level="L2", size=256, supersample=2,
                       kidney_contact=0.0)
    after = make_slice(5, anatomy="torso", level="L2", size=256, supersample=2,
                       kidney_contact=1.0)
    assert np.array_equal(before.labels, again.labels) and np.array_equal(before.hu, again.hu)
    changed = before.labels != after.labels
    assert changed.any()
    # the muscles keep almost all their pixels (a few on their edge now share a pixel with
    # the kidney instead of fat, and a muscle drawn after the kidneys is dented a little);
    # everything that changes lies around the kidneys
    mus_diff = (before.labels == MUS) != (after.labels == MUS)
    assert mus_diff.sum() < 0.15 * changed.sum()
    assert set(np.unique(before.labels[changed])) <= {MUS, VAT, MSC}
    kidneys = changed & ((before.labels == MSC) | (after.labels == MSC))
    assert (changed <= binary_dilation(kidneys, iterations=3)).all()
    # pixels that were fat and are kidney now, right against a muscle (4-neighbours)
    moved_to = changed & (after.labels == MSC) & (before.labels == VAT)
    touching = moved_to & binary_dilation(after.labels == MUS)
    assert touching.sum() > 20


def test_kidney_contact_is_drawn_per_subject_and_checks_its_share():
    """Which subjects get the contact is anatomy.drawn_with's draw on the option's own stream
    (so a share of 0.5 gives about half of them, the same ones every time); its size then
    lies within KIDNEY_CONTACT_MM; a share outside 0..1 is refused by name."""
    from training.phantom.anatomy import drawn_with
    from training.phantom.torso import KIDNEY_CONTACT_MM, _kidney_shift, kidney_contact_shift

    on = []
    for seed in range(40):
        s = subject_from_seed(seed)
        shift = kidney_contact_shift(s, 0.5)
        assert (shift is not _kidney_shift) == drawn_with(s, 0.5, 5150, "kidney_contact")
        on.append(shift is not _kidney_shift)
        if on[-1]:
            again = kidney_contact_shift(s, 0.5)
            for i in (0, 1):
                dx, dy = np.subtract(shift(i, 3.0), _kidney_shift(i, 3.0))
                assert again(i, 3.0) == shift(i, 3.0)
                assert KIDNEY_CONTACT_MM[0] <= dy / 0.85 <= KIDNEY_CONTACT_MM[1]
                assert dx == pytest.approx(0.5 * dy / 0.85)
        assert kidney_contact_shift(s, 0.0) is _kidney_shift
    assert 10 <= sum(on) <= 30
    with pytest.raises(ValueError, match="kidney_contact"):
        kidney_contact_shift(subject_from_seed(0), 1.5)


def test_kidney_rise_moves_the_kidneys_up_by_that_much():
    """kidney_rise=20 draws the kidneys 20 mm higher: each kidney's highest and lowest
    heights (tissue codes scanned every 4 mm from L4 to T11) move up by 20 mm, to within
    the scan step; 0 is the phantom as before; the lumbar anatomy refuses it."""
    from training.data import phantom_records
    from training.phantom.tissues import CODE
    from training.phantom.torso import level_centre
    from training.phantom.anatomy import subject_from_seed

    seed = 3
    s = subject_from_seed(seed)
    zs = np.arange(level_centre(s, "L4"), level_centre(s, "T11"), 4.0)
    kidney = (CODE["kidney_cortex"], CODE["kidney_medulla"])

    def span(rise):
        have = [z for z in zs if np.isin(make_slice(seed, anatomy="torso", z_mm=float(z),
                                                    size=64, supersample=2,
                                                    kidney_rise=rise).tissues, kidney).any()]
        return min(have), max(have)

    lo0, hi0 = span(0.0)
    lo1, hi1 = span(20.0)
    assert abs((lo1 - lo0) - 20.0) <= 4.0 and abs((hi1 - hi0) - 20.0) <= 4.0
    base = make_slice(seed, anatomy="torso", level="L1", size=64, supersample=2)
    same = make_slice(seed, anatomy="torso", level="L1", size=64, supersample=2,
                      kidney_rise=0.0)
    assert np.array_equal(base.hu, same.hu)
    with pytest.raises(ValueError, match="torso anatomy"):
        phantom_records(2, 1, size=32, kidney_rise=20.0)


def test_kidney_tilt_brings_the_upper_poles_towards_the_midline():
    """kidney_tilt=15 leans the kidneys' long axes in going up: the distance between the two
    kidneys' centres shrinks from the lower poles to the upper ones against the upright
    kidneys (by tan 15 deg, 0.27 mm per mm of height for each), by several mm at the poles; 0 is the phantom
    as before; a bad angle and the lumbar anatomy are refused."""
    from training.data import phantom_records
    from training.phantom.anatomy import subject_from_seed
    from training.phantom.tissues import CODE
    from training.phantom.torso import level_centre, tilted_kidney_shift

    seed = 3
    s = subject_from_seed(seed)
    zs = np.arange(level_centre(s, "L3"), level_centre(s, "T12"), 6.0)

    def gap_mm(z, tilt):
        sl = make_slice(seed, anatomy="torso", z_mm=float(z), size=128, supersample=2,
                        kidney_tilt=tilt)
        cols = [np.nonzero(np.isin(sl.tissues, [CODE["kidney_cortex"], CODE["kidney_medulla"]])
                           [:, half])[1] for half in (slice(0, 64), slice(64, 128))]
        if min(c.size for c in cols) < 5:
            return None
        return (cols[1].mean() + 64 - cols[0].mean()) * sl.pixel_mm

    rows = [(z, gap_mm(z, 0.0), gap_mm(z, 15.0)) for z in zs]
    rows = [(z, a, b) for z, a, b in rows if a is not None and b is not None]
    assert len(rows) >= 6
    z, diff = np.array([r[0] for r in rows]), np.array([r[2] - r[1] for r in rows])
    assert np.corrcoef(z, diff)[0, 1] < -0.8          # nearer going up
    assert diff[-1] < -5.0 and diff[0] > 5.0          # upper poles in, lower poles out
    base = make_slice(seed, anatomy="torso", level="L1", size=64, supersample=2)
    same = make_slice(seed, anatomy="torso", level="L1", size=64, supersample=2,
                      kidney_tilt=0.0)
    assert np.array_equal(base.hu, same.hu)
    with pytest.raises(ValueError, match="0..45"):
        tilted_kidney_shift(lambda i, dz: (0.0, 0.0), 50.0)
    with pytest.raises(ValueError, match="torso anatomy"):
        phantom_records(2, 1, size=32, kidney_tilt=15.0)


def test_costal_diaphragm_lines_the_lower_ribs():
    """costal_diaphragm=1 draws diaphragm (MSC) just inside the cut ribs at T12 to L1, in
    place of visceral fat, wall muscle or the organs that filled that fat, within a few mm
    of the rib layer, and nothing else; nothing changes at L4 (no ribs), and 0 is the
    phantom as before; the share is checked."""
    from scipy.ndimage import binary_dilation

    from training.data import phantom_records
    from training.phantom.tissues import CODE
    from training.phantom.torso import has_costal_diaphragm

    rib = [CODE[k] for k in ("cortex", "marrow", "cartilage", "calcification")]
    for seed in (3, 11):
        for level in ("T12", "L1"):
            a = make_slice(seed, anatomy="torso", level=level, size=128, supersample=2)
            b = make_slice(seed, anatomy="torso", level=level, size=128, supersample=2,
                           costal_diaphragm=1.0)
            changed = a.tissues != b.tissues
            assert changed.sum() >= 20
            assert set(np.unique(b.tissues[changed])) == {CODE["diaphragm"]}
            # fat, wall muscle, or the organs that now stop at the sheet: never bone or SAT
            assert set(np.unique(a.labels[changed])) <= {1, 2, 4, 5}
            assert not np.isin(a.tissues[changed], rib).any()
            assert (b.labels == 5).sum() > (a.labels == 5).sum()   # pixels of 3 mm: mixed
            # within 8 mm of a rib or the intercostal muscle between the ribs
            near = binary_dilation(np.isin(a.tissues, rib) | (a.tissues == CODE["muscle"]),
                                   iterations=int(np.ceil(8.0 / a.pixel_mm)))
            assert near[changed].all()
        low = [make_slice(seed, anatomy="torso", level="L4", size=64, supersample=2,
                          costal_diaphragm=v) for v in (0.0, 1.0)]
        assert np.array_equal(low[0].tissues, low[1].tissues)
    base = make_slice(3, anatomy="torso", level="T12", size=64, supersample=2)
    same = make_slice(3, anatomy="torso", level="T12", size=64, supersample=2,
                      costal_diaphragm=0.0)
    assert np.array_equal(base.hu, same.hu)
    from training.phantom.anatomy import subject_from_seed
    share = np.mean([has_costal_diaphragm(subject_from_seed(s), 0.5) for s in range(200)])
    assert 0.4 < share < 0.6
    with pytest.raises(ValueError, match="0..1"):
        has_costal_diaphragm(subject_from_seed(3), 1.5)
    with pytest.raises(ValueError, match="torso anatomy"):
        phantom_records(2, 1, size=32, costal_diaphragm=1.0)


def _check_sat_option(option: str, has) -> None:
    """What the back's SAT options share: the phantom at L5 unchanged (the iliac wings fill
    that place), 0 the phantom as before, a share of subjects drawn from their seeds and
    checked (``has``), and the mid-L3 (lumbar) phantoms of the data pipeline with more SAT."""
    from training.data import phantom_records

    for seed in (3, 11):
        low = [make_slice(seed, anatomy="torso", level="L5", size=64, supersample=2,
                          **{option: v}) for v in (0.0, 1.0)]
        assert np.array_equal(low[0].tissues, low[1].tissues)
    base = make_slice(3, anatomy="torso", level="L3", size=64, supersample=2)
    same = make_slice(3, anatomy="torso", level="L3", size=64, supersample=2, **{option: 0.0})
    assert np.array_equal(base.hu, same.hu)
    share = np.mean([has(subject_from_seed(s), 0.5) for s in range(200)])
    assert 0.4 < share < 0.6
    with pytest.raises(ValueError, match=rf"{option} is a share in 0\.\.1"):
        has(subject_from_seed(3), 1.5)
    recs = [phantom_records(2, 1, size=64, **{option: v})["train"] for v in (0.0, 1.0)]
    assert sum((r1.labels == 3).sum() - (r0.labels == 3).sum()
               for r0, r1 in zip(*recs)) > 0


def test_back_sat_makes_the_fat_behind_the_back_muscles_subcutaneous():
    """back_sat=1 turns the visceral fat the phantom draws behind the erector spinae and the
    spinous process into SAT, and nothing else: no other tissue changes, it lies behind the
    middle of the body within the muscles' width, the muscles keep their pixels; with
    flank_sat too. It leaves L5 as it was (as flank_sat); 0 is the phantom as before; the
    share is checked; the mid-L3 (lumbar) phantoms of the data pipeline have it too."""
    from training.phantom.anatomy import has_back_sat
    from training.phantom.tissues import CODE

    for seed, level, flank in ((3, "L2", 0.0), (3, "L3", 1.0), (11, "L3", 0.0)):
        a = make_slice(seed, anatomy="torso", level=level, size=128, supersample=2,
                       flank_sat=flank)
        b = make_slice(seed, anatomy="torso", level=level, size=128, supersample=2,
                       flank_sat=flank, back_sat=1.0)
        changed = a.tissues != b.tissues
        assert changed.sum() >= 10
        assert set(np.unique(a.tissues[changed])) == {CODE["vat"]}
        assert set(np.unique(b.tissues[changed])) == {CODE["sat"]}
        assert np.array_equal(a.tissues == CODE["muscle"], b.tissues == CODE["muscle"])
        rows, cols = np.nonzero(changed)
        assert rows.min() > b.tissues.shape[0] // 2          # rows grow posteriorly
        # within the back muscles' width: no further from the midline than the muscle
        muscle_back = np.nonzero(b.labels[rows.min():] == 1)[1]
        mid = (b.tissues.shape[1] - 1) / 2
        assert np.abs(cols - mid).max() <= np.abs(muscle_back - mid).max() + 2
    _check_sat_option("back_sat", has_back_sat)


def test_flank_sat_makes_the_fat_beside_the_back_muscles_subcutaneous():
    """flank_sat=1 at L2 and L3 turns visceral fat (and the lateral wall's posterior ends)
    lateral to the erector spinae and behind the quadratus lumborum into SAT, marked by a
    thin fascia, and nothing else; it leaves L5 (the iliac wings fill that place) as it
    was; 0 is the phantom as before; the share is checked; the mid-L3 (lumbar) phantoms
    of the data pipeline have it too."""
    from training.phantom.anatomy import subject_from_seed
    from training.phantom.tissues import CODE
    from training.phantom.torso import has_flank_sat

    for seed, level in ((3, "L2"), (3, "L3"), (11, "L3")):
        a = make_slice(seed, anatomy="torso", level=level, size=128, supersample=2)
        b = make_slice(seed, anatomy="torso", level=level, size=128, supersample=2,
                       flank_sat=1.0)
        changed = a.tissues != b.tissues
        assert changed.sum() >= 20
        assert set(np.unique(b.tissues[changed])) <= {CODE["sat"], CODE["fascia"]}
        assert (b.labels == 3).sum() > (a.labels == 3).sum()
        assert (b.labels == 4).sum() < (a.labels == 4).sum()
        assert not np.isin(a.tissues[changed], [CODE["cortex"], CODE["marrow"]]).any()
        # behind the middle of the body (rows grow posteriorly) and off the midline
        rows, cols = np.nonzero(changed)
        assert rows.min() > b.tissues.shape[0] // 2
        assert np.abs(cols - (b.tissues.shape[1] - 1) / 2).min() > 4
    _check_sat_option("flank_sat", has_flank_sat)
