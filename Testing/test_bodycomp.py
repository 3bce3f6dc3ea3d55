"""Body-composition measures on hand-made arrays whose answers are known."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from EPDSegmentationLib.core import bodycomp
from EPDSegmentationLib.core.bodycomp import (COLUMN_KEYS, concatenate_sums, measures_from_sums,
                                         measures_to_csv, slice_sums, tissue_measures)
from EPDSegmentationLib.core.classes import NUM_CLASSES

SPACING = (0.5, 0.8, 3.0)          # I, J, K mm: a pixel is 0.004 cm^2, a slice 0.3 cm thick
PIXEL_CM2 = 0.5 * 0.8 / 100


def _rows(rows, slice_label):
    return {r["tissue"]: r for r in rows if r["slice"] == slice_label}


def test_hard_labels_give_pixel_counts_and_exact_hu():
    # one slice 2 x 4: two muscle pixels (HU 30, 50), one SAT pixel (-100), rest background
    probs = np.zeros((NUM_CLASSES, 1, 2, 4), np.float32)
    probs[0] = 1
    for (j, i), c in (((0, 0), 1), ((0, 1), 1), ((1, 3), 3)):
        probs[:, 0, j, i] = 0
        probs[c, 0, j, i] = 1
    hu = np.full((1, 2, 4), -1000.0)
    hu[0, 0, 0], hu[0, 0, 1], hu[0, 1, 3] = 30, 50, -100
    rows = tissue_measures(probs, hu, SPACING, [0])
    mus, sat, vat = _rows(rows, 0)["MUS"], _rows(rows, 0)["SAT"], _rows(rows, 0)["VAT"]
    assert mus["area_cm2"] == pytest.approx(2 * PIXEL_CM2)
    assert mus["hard_area_cm2"] == pytest.approx(2 * PIXEL_CM2)
    assert mus["volume_cm3"] == pytest.approx(2 * PIXEL_CM2 * 0.3)
    assert (mus["hu_mean"], mus["hu_sd"]) == (pytest.approx(40.0), pytest.approx(10.0))
    assert (mus["hard_hu_mean"], mus["hard_hu_sd"]) == (pytest.approx(40.0), pytest.approx(10.0))
    assert sat["hu_mean"] == pytest.approx(-100.0) and sat["hu_sd"] == pytest.approx(0.0)
    assert vat["area_cm2"] == 0 and math.isnan(vat["hu_mean"]) and math.isnan(vat["hard_hu_sd"])


def test_soft_area_is_the_probability_mass_and_hu_is_weighted():
    # a thin tissue at 30 % in 10 pixels: soft area 3 pixels, hard area 0 (argmax is SAT)
    probs = np.zeros((NUM_CLASSES, 1, 1, 10), np.float32)
    probs[2] = 0.3          # IMAT
    probs[3] = 0.7          # SAT
    hu = np.linspace(-120, -60, 10)[None, None, :]
    row = _rows(tissue_measures(probs, hu, SPACING, [0]), 0)
    assert row["IMAT"]["area_cm2"] == pytest.approx(3 * PIXEL_CM2, rel=1e-6)
    assert row["IMAT"]["hard_area_cm2"] == 0
    assert row["SAT"]["hard_area_cm2"] == pytest.approx(10 * PIXEL_CM2)
    assert row["IMAT"]["hu_mean"] == pytest.approx(-90.0)   # uniform weights: plain mean
    assert row["IMAT"]["hu_sd"] == pytest.approx(np.std(hu), rel=1e-6)
    # unequal weights: probability-weighted mean
    probs[2, 0, 0, :5], probs[3, 0, 0, :5] = 1.0, 0.0
    row = _rows(tissue_measures(probs, hu, SPACING, [0]), 0)
    w = probs[2, 0, 0]
    assert row["IMAT"]["hu_mean"] == pytest.approx(float((w * hu[0, 0]).sum() / w.sum()))


def test_totals_sum_volumes_and_average_areas_over_slices():
    probs = np.zeros((NUM_CLASSES, 3, 4, 4), np.float32)
    probs[0] = 1
    for k, n in enumerate((2, 4, 6)):                      # 2, 4, 6 muscle pixels
        probs[0, k].flat[:n] = 0
        probs[1, k].flat[:n] = 1
    hu = np.zeros((5, 4, 4))                               # a 5-slice volume
    hu[1:4, :, :] = np.arange(3)[:, None, None] * 10.0     # slice HU 0, 10, 20
    rows = tissue_measures(probs, hu, SPACING, [1, 2, 3])
    assert [r["slice"] for r in rows[::5]] == [1, 2, 3, "all"]
    total = _rows(rows, "all")["MUS"]
    assert total["area_cm2"] == pytest.approx(4 * PIXEL_CM2)            # mean of 2, 4, 6
    assert total["volume_cm3"] == pytest.approx(12 * PIXEL_CM2 * 0.3)   # all 12 pixels
    expected_mean = (2 * 0 + 4 * 10 + 6 * 20) / 12
    assert total["hu_mean"] == pytest.approx(expected_mean)
    values = [0] * 2 + [10] * 4 + [20] * 6
    assert total["hu_sd"] == pytest.approx(np.std(values))


def test_whole_volume_probabilities_are_indexed_by_slices():
    rng = np.random.default_rng(0)
    p = rng.random((NUM_CLASSES, 6, 5, 5)).astype(np.float32)
    p /= p.sum(axis=0)
    hu = rng.normal(0, 50, (6, 5, 5))
    full = tissue_measures(p, hu, SPACING, [4, 1])                      # (C, K, ...) given
    aligned = tissue_measures(p[:, [4, 1]], hu, SPACING, [4, 1])        # Prediction layout
    assert full == aligned
    assert [r["slice"] for r in full[::5]] == [4, 1, "all"]


@pytest.mark.parametrize("kind", ["int16", "integer float32", "wide", "fractional", "nan"])
def test_sums_equal_their_definition_for_every_kind_of_hu(kind):
    """slice_sums against the float64 definition: the hard sums exact for integer HU (CT's,
    counted per class and HU value, or, spanning more than _HU_BINS values, by weighted
    bincounts), to float64 rounding for others; the soft sums to float32 rounding, over a
    slice longer than one of their partial sums plus a remainder."""
    rng = np.random.default_rng(4)
    shape = (2, 37, 59)                          # 2183 pixels: two chunks of 1024 and 135
    p = rng.random((NUM_CLASSES,) + shape).astype(np.float32)
    p /= p.sum(axis=0)
    hu = rng.integers(-1024, 3072, shape).astype(np.float32)
    hu[0, 0, :3] = (-3024, 3071, 0)
    if kind == "int16":
        hu = hu.astype(np.int16)
    elif kind == "wide":
        hu[1, 5, 5] = bodycomp._HU_BINS * 2          # integers, too many values to count
    elif kind == "fractional":
        hu[1] += np.float32(0.25)
    elif kind == "nan":
        hu[1, 2, 3] = np.nan
    integer = kind in ("int16", "integer float32")
    for s in range(2):
        found = bodycomp._integer_hu(hu[s].reshape(-1))
        assert (found is not None) == (integer or s == 0)     # slice 1 holds the odd value
    got = slice_sums(p, hu)
    lab = np.argmax(p, axis=0)
    h = hu.astype(np.float64)
    for c in range(NUM_CLASSES):
        mask = lab == c
        for prefix, w in (("p", p.astype(np.float64)[c]), ("n", mask.astype(np.float64))):
            for suffix, m in (("", 0), ("_hu", 1), ("_hu2", 2)):
                want = (w * h ** m).sum(axis=(1, 2))
                key = prefix + suffix
                if kind == "nan" and m:
                    assert np.isnan(got[key][1, c]) == (prefix == "p" or mask[1, 2, 3])
                    want, have = want[:1], got[key][:1, c]
                else:
                    have = got[key][:, c]
                if prefix == "p":
                    scale = (w * np.abs(h) ** m).sum(axis=(1, 2))[:len(want)]
                    assert (np.abs(have - want) <= 1e-6 * scale).all(), key
                elif kind == "fractional":
                    np.testing.assert_allclose(have, want, rtol=1e-12, err_msg=key)
                else:
                    np.testing.assert_array_equal(have, want, err_msg=key)


def test_chunked_sums_equal_one_pass():
    rng = np.random.default_rng(1)
    p = rng.random((NUM_CLASSES, 7, 6, 6)).astype(np.float32)
    p /= p.sum(axis=0)
    hu = rng.normal(-50, 80, (7, 6, 6))
    one = measures_from_sums(slice_sums(p, hu), SPACING, range(7))
    parts = [slice_sums(p[:, a:b], hu[a:b]) for a, b in ((0, 3), (3, 5), (5, 7))]
    chunked = measures_from_sums(concatenate_sums(parts), SPACING, range(7))
    for a, b in zip(one, chunked):
        for k in COLUMN_KEYS:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-12, nan_ok=True)
            else:
                assert a[k] == b[k]


@pytest.mark.parametrize("bad, message", [
    (dict(probabilities=np.zeros((5, 1, 2, 2), np.float32)), "C = 6"),
    (dict(probabilities=np.full((6, 1, 2, 2), 1.5, np.float32)), "0..1"),
    (dict(probabilities=np.zeros((6, 1, 2, 2), np.int64)), "floating point"),
    (dict(hu=np.zeros((1, 3, 3))), r"\(J, I\)"),
    (dict(slices=[0, 0]), "repeat"),
    (dict(slices=[5]), "outside"),
    (dict(spacing_mm=(0.5, -1, 3)), "positive"),
])
def test_bad_inputs_are_named(bad, message):
    args = dict(probabilities=np.full((6, 1, 2, 2), 1 / 6, np.float32),
                hu=np.zeros((1, 2, 2)), spacing_mm=SPACING, slices=[0])
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        tissue_measures(args["probabilities"], args["hu"], args["spacing_mm"], args["slices"])


def test_csv_is_atomic_and_never_overwrites(tmp_path):
    p = np.zeros((NUM_CLASSES, 1, 2, 2), np.float32)
    p[1] = 1
    rows = tissue_measures(p, np.full((1, 2, 2), 42.0), SPACING, [0])
    path = measures_to_csv(rows, tmp_path / "m.csv")
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == list(COLUMN_KEYS) and len(got) == len(rows)
    mus = [r for r in got if r["tissue"] == "MUS" and r["slice"] == "0"][0]
    assert float(mus["area_cm2"]) == pytest.approx(4 * PIXEL_CM2)
    assert float(mus["hu_mean"]) == 42.0
    assert [r for r in got if r["tissue"] == "VAT"][0]["hu_mean"] == ""     # NaN -> empty
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        measures_to_csv(rows[:1], path)
    assert path.read_bytes() == before
    measures_to_csv(rows[:1], path, overwrite=True)
    assert path.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["m.csv"]               # no temp left
    with pytest.raises(FileNotFoundError):
        measures_to_csv(rows, tmp_path / "nowhere" / "m.csv")


def test_protocol_rows_per_slice_and_all_from_slab_sums(tmp_path):
    """with_protocol, fed slab by slab, gives per slice what indices.protocol_measures gives
    for that slice alone and, in "all" rows, what it gives for every slice (the mean area per
    slice); hand-checked on one slice: 40 HU muscle is MUS, -100 HU IMAT, 200 HU neither."""
    from EPDSegmentationLib.core.indices import (protocol_measures, protocol_slice_sums,
                                                 with_protocol)

    rng = np.random.default_rng(4)
    p = rng.random((NUM_CLASSES, 5, 6, 6)).astype(np.float32)
    p /= p.sum(axis=0)
    hu = rng.choice([-300.0, -120.0, -100.0, -40.0, 0.0, 40.0, 200.0], (5, 6, 6))
    slices = [3, 4, 8, 9, 12]
    rows = measures_from_sums(slice_sums(p, hu), SPACING, slices)
    parts = [protocol_slice_sums(p[:, a:b], hu[a:b]) for a, b in ((0, 2), (2, 5))]
    got = with_protocol(rows, slices, parts, SPACING)
    assert [{k: v for k, v in r.items() if not k.startswith("protocol_")} for r in got] == rows
    for s, k in enumerate(slices + ["all"]):
        want = protocol_measures(p[:, s:s + 1] if k != "all" else p,
                                 hu[s:s + 1] if k != "all" else hu, SPACING)
        by = _rows(got, k)
        for key in ("MUS", "IMAT", "SAT", "VAT"):
            assert by[key]["protocol_area_cm2"] == pytest.approx(
                want[f"protocol_area_cm2_{key}"], rel=1e-12)
            assert by[key]["protocol_hu_mean"] == pytest.approx(
                want[f"protocol_hu_mean_{key}"], rel=1e-12, nan_ok=True)
        assert math.isnan(by["MSC"]["protocol_area_cm2"])
    one = np.zeros((NUM_CLASSES, 1, 1, 3), np.float32)
    one[1] = 1.0
    rows = with_protocol(
        tissue_measures(one, np.array([[[40.0, -100.0, 200.0]]]), SPACING, [0]), [0],
        [protocol_slice_sums(one, np.array([[[40.0, -100.0, 200.0]]]))], SPACING)
    by = _rows(rows, 0)
    assert by["MUS"]["protocol_area_cm2"] == pytest.approx(PIXEL_CM2)
    assert by["MUS"]["protocol_hu_mean"] == 40.0 and by["IMAT"]["protocol_hu_mean"] == -100.0
    assert by["MUS"]["area_cm2"] == pytest.approx(3 * PIXEL_CM2)     # the soft area beside it
    # the CSV gets the protocol columns only when the rows have them
    path = measures_to_csv(rows, tmp_path / "p.csv")
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert header == list(COLUMN_KEYS) + list(bodycomp.PROTOCOL_COLUMN_KEYS)
    with pytest.raises(ValueError, match="protocol sums hold 1 slices"):
        with_protocol(rows, [0, 1], [protocol_slice_sums(one, np.zeros((1, 1, 3)))],
                               SPACING)


def test_protocol_labels_split_the_network_labels_by_hu():
    """Muscle or IMAT by HU within what the network calls either, SAT and VAT within their
    own ranges, MSC kept, the rest 0 (not counted), at the ranges' edges included."""
    from EPDSegmentationLib.core.indices import protocol_labels

    labels = np.array([[1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 0, 1]], np.uint8)
    hu = np.array([[-29, 150, -30, 40, -190, -190, -29, -150, -49, 900, -100, 151]], np.int16)
    np.testing.assert_array_equal(protocol_labels(labels, hu),
                                  [[1, 1, 2, 1, 2, 3, 0, 4, 0, 5, 0, 0]])
    with pytest.raises(ValueError, match="does not match"):
        protocol_labels(labels, hu[:, :3])


def test_summary_line():
    p = np.zeros((NUM_CLASSES, 1, 10, 10), np.float32)
    p[3] = 1
    line = bodycomp.summary_line(tissue_measures(p, np.zeros((1, 10, 10)), (1, 1, 1), [0]))
    assert "SAT 1.0" in line and "MUS 0.0" in line
