"""EPD and the baselines against brute-force references, on random inputs of odd sizes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from EPDSegmentationLib.epd import (bilinear_image, downsample_pair, downsampled_shape,
                                    epd_image, epd_labels, nearest_labels, normalize_factor,
                                    soft_pixel_counts, soft_to_labels, upsample_labels,
                                    upsample_soft)


def brute_epd(labels, num_classes, fac, ignore=None):
    """Loop over every window: fraction of each class among its labelled pixels."""
    nd = len(fac)
    spatial = labels.shape[-nd:]
    lead = labels.shape[:-nd]
    low = tuple(-(-n // k) for n, k in zip(spatial, fac))
    out = np.zeros(lead + (num_classes,) + low, np.float64)
    for li in itertools.product(*[range(n) for n in lead]):
        for wi in itertools.product(*[range(n) for n in low]):
            sl = tuple(slice(i * k, min((i + 1) * k, n)) for i, k, n in zip(wi, fac, spatial))
            win = labels[li + sl].ravel()
            if ignore is not None:
                win = win[win != ignore]
            for c in range(num_classes):
                if win.size:
                    out[li + (c,) + wi] = np.count_nonzero(win == c) / win.size
    return out


def brute_mean(image, fac):
    nd = len(fac)
    spatial, lead = image.shape[-nd:], image.shape[:-nd]
    low = tuple(-(-n // k) for n, k in zip(spatial, fac))
    out = np.zeros(lead + low)
    for li in itertools.product(*[range(n) for n in lead]):
        for wi in itertools.product(*[range(n) for n in low]):
            sl = tuple(slice(i * k, min((i + 1) * k, n)) for i, k, n in zip(wi, fac, spatial))
            out[li + wi] = image[li + sl].astype(np.float64).mean()
    return out


CASES = [
    ((13, 17), 2),
    ((9, 11), 4),
    ((16, 16), 8),
    ((3, 10, 7), 3),          # batched 2D
    ((2, 2, 12, 9), (2, 5)),  # two leading axes, anisotropic in-plane
    ((5, 9, 10), (2, 2, 2)),  # 3D windows
    ((2, 7, 6, 5), (3, 2, 4)),
    ((4, 33, 40), 16),        # windows of 256 pixels: counts beyond a byte
]


@pytest.mark.parametrize("shape,factor", CASES)
@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.int16])
def test_epd_labels_matches_brute_force(shape, factor, dtype):
    rng = np.random.default_rng(sum(shape))
    labels = rng.integers(0, 6, shape).astype(dtype)
    fac = normalize_factor(factor)
    got = epd_labels(labels, 6, factor, workers=2)
    want = brute_epd(labels, 6, fac)
    assert got.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    np.testing.assert_allclose(got.sum(axis=labels.ndim - len(fac)), 1.0, atol=1e-6)


@pytest.mark.parametrize("shape,factor", CASES)
def test_epd_preserves_every_class_area_exactly(shape, factor):
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 6, shape).astype(np.uint8)
    soft = epd_labels(labels, 6, factor)
    fac = normalize_factor(factor)
    counts = soft_pixel_counts(soft, labels.shape[-len(fac):], factor)
    np.testing.assert_allclose(counts, np.bincount(labels.ravel(), minlength=6), atol=1e-3)


def test_edge_windows_count_only_existing_pixels():
    labels = np.array([[0, 1, 2, 2, 1]], np.uint8)
    soft = epd_labels(labels, 3, (1, 2))
    # windows: [0,1] [2,2] [1]
    np.testing.assert_array_equal(soft[0], [[0.5, 0, 0]])
    np.testing.assert_array_equal(soft[1], [[0.5, 0, 1]])
    np.testing.assert_array_equal(soft[2], [[0, 1, 0]])


@pytest.mark.parametrize("ignore,dtype", [(255, np.uint8), (-1, np.int32), (7, np.int64),
                                          (259, np.int32), (0, np.uint8)])
def test_ignore_value_is_excluded(ignore, dtype):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (3, 15, 14)).astype(dtype)
    labels[rng.random(labels.shape) < 0.3] = ignore
    labels[0, :4, :4] = ignore  # a window with no labelled pixel
    got = epd_labels(labels, 4, 4, ignore_index=ignore)
    want = brute_epd(labels, 4, (4, 4), ignore=ignore)
    np.testing.assert_allclose(got, want, atol=1e-7)
    assert np.all(got[0, :, 0, 0] == 0)
    sums = got.sum(axis=1)
    assert np.all((np.abs(sums - 1) < 1e-6) | (sums == 0))


def test_epd_image_is_the_window_mean():
    rng = np.random.default_rng(5)
    for shape, factor in CASES:
        image = rng.normal(0, 300, shape).astype(np.float32)
        got = epd_image(image, factor)
        want = brute_mean(image, normalize_factor(factor))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
        assert got.dtype == np.float32


def test_epd_image_accepts_integer_hu():
    image = np.arange(-8, 8, dtype=np.int16).reshape(4, 4)
    np.testing.assert_array_equal(epd_image(image, 2), [[-5.5, -3.5], [2.5, 4.5]])


def test_labels_to_one_hot_with_unit_window():
    labels = np.array([[0, 2], [1, 2]], np.uint8)
    soft = epd_labels(labels, 3, (1, 1))
    np.testing.assert_array_equal(soft.argmax(0), labels)
    assert soft.max() == 1 and soft.sum() == 4


@pytest.mark.parametrize("bad,message", [
    (lambda: epd_labels(np.array([[0, 6]]), 6, 2), "found 6"),
    (lambda: epd_labels(np.array([[0, -1]]), 6, 2), "found -1"),
    (lambda: epd_labels(np.array([[0.0, 1.0]]), 6, 2), "integer"),
    (lambda: epd_labels(np.zeros((4, 4), np.uint8), 6, 0), ">= 1"),
    (lambda: epd_labels(np.zeros((4, 4), np.uint8), 6, 2.0), "factor"),
    (lambda: epd_labels(np.zeros((4, 4), np.uint8), 6, (2, 2, 2)), "at least 3 axes"),
    (lambda: epd_labels(np.zeros((0, 4), np.uint8), 6, 2), "empty"),
    (lambda: epd_labels(np.zeros((4, 4), np.uint8), 0, 2), "num_classes"),
    (lambda: epd_labels(np.full((4, 4), 9), 6, 2, ignore_index=255), "ignore_index=255"),
    (lambda: epd_image(np.array([[0.0, np.nan]]), 2), "non-finite"),
    (lambda: bilinear_image(np.array([[np.inf, 0.0]]), 2), "non-finite"),
    (lambda: nearest_labels(np.zeros((4, 4), np.float32), 2), "integer"),
    (lambda: downsample_pair(np.zeros((4, 4)), np.zeros((4, 5), np.uint8), 6, 2), "share their grid"),
    (lambda: downsample_pair(np.zeros((4, 4)), np.zeros((4, 4), np.uint8), 6, 2,
                             label_mode="bilinear"), "label_mode"),
    (lambda: upsample_soft(np.zeros((6, 3, 3)), (8, 8), 2), "downsampled by"),
    (lambda: upsample_labels(np.zeros((3, 3), np.uint8), (5, 5, 5), 2), "entries"),
])
def test_bad_input_gets_a_specific_error(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_nearest_picks_the_pixel_nearest_each_window_centre():
    labels = np.arange(49).reshape(7, 7)
    near = nearest_labels(labels, 2)
    # centres at 2i + 0.5 round up to 2i + 1; the last partial window [6] keeps pixel 6
    np.testing.assert_array_equal(near[0], labels[1, [1, 3, 5, 6]])
    np.testing.assert_array_equal(nearest_labels(labels, 3)[:, 0], labels[[1, 4, 6], 1])


def test_downsampled_shape():
    assert downsampled_shape((3, 13, 17), 4) == (3, 4, 5)
    assert downsampled_shape((5, 9, 10), (2, 2, 3)) == (3, 5, 4)


def test_upsample_labels_inverts_nearest_windows():
    low = np.array([[1, 2], [3, 4]], np.uint8)
    up = upsample_labels(low, (3, 4), 2)
    np.testing.assert_array_equal(up, [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4]])


def test_upsample_soft_keeps_uniform_regions_and_interpolates_edges():
    soft = np.zeros((2, 1, 3), np.float32)
    soft[0, 0] = [1, 0, 0]
    soft[1] = 1 - soft[0]
    up = upsample_soft(soft, (2, 6), 2)
    np.testing.assert_allclose(up.sum(0), 1.0, atol=1e-6)
    # pixel j sits at low-res coordinate (j - 0.5) / 2
    np.testing.assert_allclose(up[0, 0], [1, 0.75, 0.25, 0, 0, 0], atol=1e-6)
    np.testing.assert_array_equal(soft_to_labels(up, class_axis=0)[0], [0, 0, 1, 1, 1, 1])


def test_downsample_pair_modes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (12, 12)).astype(np.uint8)
    image = rng.normal(size=(3, 12, 12)).astype(np.float32)
    img, soft = downsample_pair(image, labels, 6, 4)
    assert img.shape == (3, 3, 3) and soft.shape == (6, 3, 3)
    img_b, hard = downsample_pair(image, labels, 6, 4, label_mode="nearest", image_mode="bilinear")
    np.testing.assert_array_equal(hard.argmax(0), nearest_labels(labels, 4))
    np.testing.assert_allclose(img_b, bilinear_image(image, 4))


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 23), w=st.integers(1, 23), k=st.integers(1, 9),
       c=st.integers(1, 7), seed=st.integers(0, 2**31 - 1))
def test_epd_properties(h, w, k, c, seed):
    labels = np.random.default_rng(seed).integers(0, c, (h, w)).astype(np.uint8)
    soft = epd_labels(labels, c, k)
    np.testing.assert_allclose(soft, brute_epd(labels, c, (k, k)), atol=1e-7)
    np.testing.assert_allclose(soft_pixel_counts(soft, (h, w), k),
                               np.bincount(labels.ravel(), minlength=c), atol=1e-3)
