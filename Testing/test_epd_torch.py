"""The torch variant agrees with the NumPy one; the baselines agree with torch's interpolate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from EPDSegmentationLib.epd import (bilinear_image, downsample_pair, epd_image, epd_labels,
                                    nearest_labels, upsample_soft)
from EPDSegmentationLib.epd_torch import (bilinear_image_torch, downsample_pair_torch,
                                          epd_image_torch, epd_labels_torch,
                                          nearest_labels_torch, upsample_soft_torch)

SHAPES = [((13, 17), 2), ((2, 9, 11), 4), ((3, 16, 16), 8), ((5, 9, 10), (2, 2, 2)),
          ((2, 12, 9), (2, 5))]


@pytest.mark.parametrize("shape,factor", SHAPES)
def test_torch_epd_agrees_with_numpy(shape, factor):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, shape)
    image = rng.normal(0, 200, shape).astype(np.float32)
    np.testing.assert_allclose(epd_labels_torch(torch.from_numpy(labels), 6, factor).numpy(),
                               epd_labels(labels, 6, factor), atol=1e-7)
    np.testing.assert_allclose(epd_image_torch(torch.from_numpy(image), factor).numpy(),
                               epd_image(image, factor), rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(nearest_labels_torch(torch.from_numpy(labels), factor).numpy(),
                                  nearest_labels(labels, factor))
    np.testing.assert_allclose(bilinear_image_torch(torch.from_numpy(image), factor).numpy(),
                               bilinear_image(image, factor), rtol=1e-5, atol=1e-3)


def test_torch_ignore_index_agrees():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 6, (2, 15, 13))
    labels[rng.random(labels.shape) < 0.4] = 255
    labels[0, :4, :4] = 255
    np.testing.assert_allclose(
        epd_labels_torch(torch.from_numpy(labels), 6, 4, ignore_index=255).numpy(),
        epd_labels(labels, 6, 4, ignore_index=255), atol=1e-7)


def test_torch_bad_labels():
    with pytest.raises(ValueError, match="found 9"):
        epd_labels_torch(torch.tensor([[0, 9]]), 6, 2)
    with pytest.raises(ValueError, match="integer"):
        epd_labels_torch(torch.tensor([[0.0, 1.0]]), 6, 2)
    with pytest.raises(ValueError, match="non-finite"):
        epd_image_torch(torch.tensor([[0.0, float("nan")]]), 2)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_baselines_equal_torch_interpolate_on_divisible_grids(k):
    rng = np.random.default_rng(k)
    image = rng.normal(size=(2, 3, 8 * k, 5 * k)).astype(np.float32)
    labels = rng.integers(0, 6, (2, 1, 8 * k, 5 * k))
    size = (8, 5)
    ref_b = F.interpolate(torch.from_numpy(image), size=size, mode="bilinear",
                          align_corners=False, antialias=False).numpy()
    np.testing.assert_allclose(bilinear_image(image, k), ref_b, rtol=1e-5, atol=1e-5)
    ref_n = F.interpolate(torch.from_numpy(labels).float(), size=size, mode="nearest-exact")
    np.testing.assert_array_equal(nearest_labels(labels, k), ref_n.long().numpy())
    # and upsampling soft maps is torch's bilinear with the inverse scale
    soft = rng.random((2, 6, 8, 5)).astype(np.float32)
    ref_u = F.interpolate(torch.from_numpy(soft), size=(8 * k, 5 * k), mode="bilinear",
                          align_corners=False).numpy()
    np.testing.assert_allclose(upsample_soft(soft, (8 * k, 5 * k), k), ref_u, atol=1e-5)
    np.testing.assert_allclose(upsample_soft_torch(torch.from_numpy(soft), (8 * k, 5 * k), k)
                               .numpy(), ref_u, atol=1e-5)


def test_bilinear_is_the_window_mean_at_factor_two():
    # With k = 2 the window centre lies midway between four pixels.
    image = np.random.default_rng(0).normal(size=(10, 12)).astype(np.float32)
    np.testing.assert_allclose(bilinear_image(image, 2), epd_image(image, 2), atol=1e-6)


def test_downsample_pair_torch_agrees():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 6, (2, 16, 16))
    image = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    for mode in ("epd", "nearest"):
        for image_mode in ("average", "bilinear"):
            a = downsample_pair(image, labels[:, None], 6, 4, label_mode=mode,
                                image_mode=image_mode)
            b = downsample_pair_torch(torch.from_numpy(image), torch.from_numpy(labels[:, None]),
                                      6, 4, label_mode=mode, image_mode=image_mode)
            np.testing.assert_allclose(b[0].numpy(), a[0], atol=1e-5)
            np.testing.assert_allclose(b[1].numpy(), a[1], atol=1e-7)
