"""EPD and the baselines against brute-force references, on random inputs of odd sizes."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from EPDSegmentationLib.core import epd as epd_module
from EPDSegmentationLib.core.epd import (bilinear_image, downsample_pair, downsampled_shape,
                                    epd_image, epd_labels, nearest_labels, normalize_factor,
                                    soft_pixel_counts, soft_to_labels, upsample_labels,
                                    upsample_soft)


def brute_counts(labels, num_classes, fac, ignore=None):
    """Per-window class counts (..., C, *low) and labelled pixels per window (..., *low)."""
    nd = len(fac)
    spatial, lead = labels.shape[-nd:], labels.shape[:-nd]
    low = tuple(-(-n // k) for n, k in zip(spatial, fac))
    counts = np.zeros(lead + (num_classes,) + low, np.int64)
    totals = np.zeros(lead + low, np.int64)
    for li in itertools.product(*[range(n) for n in lead]):
        for wi in itertools.product(*[range(n) for n in low]):
            sl = tuple(slice(i * k, min((i + 1) * k, n)) for i, k, n in zip(wi, fac, spatial))
            win = labels[li + sl].ravel()
            if ignore is not None:
                win = win[win != ignore]
            totals[li + wi] = win.size
            for c in range(num_classes):
                counts[li + (c,) + wi] = np.count_nonzero(win == c)
    return counts, totals


def brute_epd(labels, num_classes, fac, ignore=None):
    """Loop over every window: fraction of each class among its labelled pixels (float64;
    0 for a window without labelled pixels)."""
    counts, totals = brute_counts(labels, num_classes, fac, ignore)
    totals = np.expand_dims(totals, labels.ndim - len(fac))
    return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)


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


# ----------------------------------------------------------------------------- exactness, paths


def exact_epd(labels, num_classes, factor, ignore=None):
    """The specified result, bit for bit: float32(count) / float32(labelled pixels), one
    correctly rounded float32 division (0 for a window without labelled pixels)."""
    fac = normalize_factor(factor)
    counts, totals = brute_counts(labels, num_classes, fac, ignore)
    totals = np.expand_dims(np.maximum(totals, 1), labels.ndim - len(fac))
    return counts.astype(np.float32) / totals.astype(np.float32)


@pytest.fixture
def small_blocks(monkeypatch):
    """Work blocks of a few hundred bytes, so small inputs exercise every block shape: several
    slices per block, one slice per block, rows of windows of one slice, partial last blocks."""
    def use(nbytes):
        monkeypatch.setattr(epd_module, "_BLOCK_MIN", nbytes)
        monkeypatch.setattr(epd_module, "_BLOCK_MAX", nbytes)
    return use


PATH_CASES = [
    # shape, factor: full windows, partial rows / columns / depth, 3D, anisotropic
    ((7, 16, 16), 2),
    ((5, 17, 23), 4),
    ((3, 33, 35), 8),
    ((2, 3, 19, 21), (3, 5)),
    ((9, 10, 11), (2, 3, 4)),
    ((2, 7, 13, 12), (3, 4, 4)),
    ((4, 12, 20), (1, 4)),        # one plane per window: no plane sum
    ((3, 9, 14), (2, 7)),         # generic horizontal sum
    ((2, 20, 37), (16, 16)),      # 256-pixel windows: 16-bit counts
    ((1, 512, 3), (256, 1)),      # 256 planes per window: summed with add.reduce
]


@pytest.mark.parametrize("block_bytes", [None, 64, 700, 5000])
@pytest.mark.parametrize("shape,factor", PATH_CASES)
def test_every_block_layout_is_exact(shape, factor, block_bytes, small_blocks):
    if block_bytes is not None:
        small_blocks(block_bytes)
    rng = np.random.default_rng(len(shape) * 100 + sum(shape))
    labels = rng.integers(0, 5, shape).astype(np.uint8)
    want = exact_epd(labels, 5, factor)
    for workers in (1, 3):
        got = epd_labels(labels, 5, factor, workers=workers)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("ignore,dtype", [(255, np.uint8), (0, np.uint8), (6, np.uint8),
                                          (-1, np.int16), (3, np.int64), (300, np.int32),
                                          (255, np.int32)])
@pytest.mark.parametrize("shape,factor", [((3, 17, 22), 4), ((9, 10, 11), (2, 3, 4)),
                                          ((2, 33, 35), 8)])
def test_ignore_paths_are_exact(ignore, dtype, shape, factor, small_blocks):
    small_blocks(300)
    rng = np.random.default_rng(abs(ignore) + len(shape))
    labels = rng.integers(0, 5, shape).astype(dtype)
    labels[rng.random(shape) < 0.4] = ignore
    labels[(0,) * (labels.ndim - 2) + (slice(0, 8), slice(0, 8))] = ignore  # empty windows
    np.testing.assert_array_equal(epd_labels(labels, 5, factor, ignore_index=ignore),
                                  exact_epd(labels, 5, factor, ignore))


def test_ignore_value_outside_the_dtype_counts_nothing_out():
    labels = np.random.default_rng(0).integers(0, 3, (9, 10)).astype(np.uint8)
    np.testing.assert_array_equal(epd_labels(labels, 3, 3, ignore_index=-1),
                                  exact_epd(labels, 3, 3))


def test_bool_and_wide_dtypes_and_views():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, (2, 3, 14, 15))
    want = exact_epd(labels, 2, 4)
    for variant in (labels.astype(bool), labels.astype(np.uint16), labels.astype(np.int8)):
        np.testing.assert_array_equal(epd_labels(variant, 2, 4), want)
    # non-contiguous: spatial axes transposed, and leading axes that no view can merge
    t = np.ascontiguousarray(labels.swapaxes(-1, -2)).swapaxes(-1, -2)
    np.testing.assert_array_equal(epd_labels(t, 2, 4), want)
    s = np.ascontiguousarray(labels.swapaxes(0, 1)).swapaxes(0, 1)
    assert not s.flags.c_contiguous
    np.testing.assert_array_equal(epd_labels(s, 2, 4), want)


@pytest.mark.parametrize("where", [(0, 0, 0), (3, 20, 7), (5, 31, 31)])
@pytest.mark.parametrize("ignore", [None, 255, 2])
def test_range_error_names_the_first_bad_label(where, ignore, small_blocks):
    small_blocks(256)
    labels = np.random.default_rng(1).integers(0, 4, (6, 32, 32)).astype(np.uint8)
    if ignore is not None:
        labels[::2, ::3] = ignore
    labels[5, 31, 31] = 7  # a later bad value (in another block) is not the one named
    labels[where] = 9
    allowed = "[0, 4)" + ("" if ignore is None else f" or ignore_index={ignore}")
    message = f"labels must lie in {allowed}; found 9 at index {where}"
    for workers in (1, 2):
        with pytest.raises(ValueError) as err:
            epd_labels(labels, 4, 4, ignore_index=ignore, workers=workers)
        assert str(err.value) == message


@settings(max_examples=80, deadline=None)
@given(shape=st.lists(st.integers(1, 19), min_size=2, max_size=4),
       fac=st.lists(st.integers(1, 7), min_size=2, max_size=3),
       c=st.integers(1, 7), ignore=st.sampled_from([None, 255, 0, -1]),
       block=st.sampled_from([None, 64, 1000]), seed=st.integers(0, 2**31 - 1))
def test_epd_is_exact_for_any_shape(shape, fac, c, ignore, block, seed):
    if len(fac) > len(shape):
        fac = fac[: len(shape)]
    dtype = np.int16 if ignore == -1 else np.uint8
    labels = np.random.default_rng(seed).integers(0, c, shape).astype(dtype)
    if ignore is not None:
        labels[np.random.default_rng(seed + 1).random(shape) < 0.3] = ignore
    saved = epd_module._BLOCK_MIN, epd_module._BLOCK_MAX
    try:
        if block is not None:
            epd_module._BLOCK_MIN = epd_module._BLOCK_MAX = block
        got = epd_labels(labels, c, tuple(fac), ignore_index=ignore, workers=2)
    finally:
        epd_module._BLOCK_MIN, epd_module._BLOCK_MAX = saved
    np.testing.assert_array_equal(got, exact_epd(labels, c, tuple(fac), ignore))


# ----------------------------------------------------------------------------- memory


def _peak_extra(fn):
    """Peak of NumPy's traced allocations during fn() above what was allocated before, bytes."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak - before


@pytest.fixture(scope="module")
def ct_like_labels():
    """40 x 512 x 512 uint8 labels, 6 classes, a tenth of the pixels unlabelled (255)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (40, 512, 512), dtype=np.uint8)
    labels[rng.random(labels.shape, dtype=np.float32) < 0.1] = 255
    return labels


@pytest.mark.parametrize("ignore", [None, 255])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_peak_memory_is_a_small_multiple_of_the_output(ct_like_labels, k, ignore):
    labels = ct_like_labels if ignore is not None else np.minimum(ct_like_labels, 5)
    out, extra = _peak_extra(lambda: epd_labels(labels, 6, k, ignore_index=ignore))
    assert extra <= 3 * out.nbytes, f"peak extra {extra / 2**20:.1f} MiB for a " \
                                    f"{out.nbytes / 2**20:.1f} MiB output"


@pytest.mark.parametrize("dtype,ignore", [(np.int32, -1), (np.int64, 7)])
def test_peak_memory_of_wide_labels_with_ignore(ct_like_labels, dtype, ignore):
    labels = ct_like_labels[:10].astype(dtype)
    labels[labels == 255] = ignore
    out, extra = _peak_extra(lambda: epd_labels(labels, 6, 8, ignore_index=ignore))
    assert extra <= 3 * out.nbytes
    np.testing.assert_array_equal(out[:, :, :3, :3],
                                  exact_epd(labels[:, :24, :24], 6, 8, ignore))


@pytest.mark.parametrize("ignore", [None, 255])
def test_range_error_needs_no_full_size_temporaries(ct_like_labels, ignore):
    labels = np.minimum(ct_like_labels, 5) if ignore is None else ct_like_labels.copy()
    labels[-1, -1, -1] = 200
    err, extra = _peak_extra(lambda: pytest.raises(ValueError, epd_labels, labels, 6, 8,
                                                   ignore_index=ignore))
    assert "found 200 at index (39, 511, 511)" in str(err.value)
    assert extra <= 3 * (40 * 6 * 64 * 64 * 4)  # the output it would have returned
