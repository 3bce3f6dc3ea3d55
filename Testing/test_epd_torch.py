"""The torch variant agrees with the NumPy one; the baselines agree with torch's interpolate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from EPDSegmentationLib.core import epd_torch as epd_torch_module
from EPDSegmentationLib.core.epd import (bilinear_image, downsample_pair, epd_image, epd_labels,
                                    nearest_labels, upsample_soft)
from EPDSegmentationLib.core.epd_torch import (bilinear_image_torch, downsample_pair_torch,
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


AGREE_CASES = [((7, 16, 16), 2), ((5, 17, 23), 4), ((3, 33, 35), 8), ((2, 3, 19, 21), (3, 5)),
               ((9, 10, 11), (2, 3, 4)), ((2, 7, 13, 12), (3, 4, 4)), ((2, 20, 37), (16, 16))]


@pytest.mark.parametrize("block", [None, 64, 3000])
@pytest.mark.parametrize("shape,factor", AGREE_CASES)
@pytest.mark.parametrize("dtype,ignore", [(np.uint8, None), (np.uint8, 255), (np.int64, -1),
                                          (np.int16, 2), (np.int32, None)])
def test_torch_epd_is_bit_identical_to_numpy(shape, factor, dtype, ignore, block, monkeypatch):
    if block is not None:  # small work blocks: several per slice, partial last blocks
        monkeypatch.setattr(epd_torch_module, "_BLOCK_MIN", block)
        monkeypatch.setattr(epd_torch_module, "_BLOCK_MAX", block)
    rng = np.random.default_rng(sum(shape))
    labels = rng.integers(0, 5, shape).astype(dtype)
    if ignore is not None:
        labels[rng.random(shape) < 0.3] = ignore
    got = epd_labels_torch(torch.from_numpy(labels), 5, factor, ignore_index=ignore).numpy()
    np.testing.assert_array_equal(got, epd_labels(labels, 5, factor, ignore_index=ignore))


def test_torch_bool_uint16_and_unmergeable_leading_axes():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, (3, 2, 14, 15))
    want = epd_labels(labels, 2, 4)
    for t in (torch.from_numpy(labels.astype(bool)), torch.from_numpy(labels.astype(np.int32))
              .to(torch.uint16), torch.from_numpy(labels).transpose(0, 1).contiguous()
              .transpose(0, 1)):
        np.testing.assert_array_equal(epd_labels_torch(t, 2, 4).numpy(), want)


def test_torch_range_error_matches_numpy():
    labels = np.random.default_rng(0).integers(0, 4, (3, 20, 20))
    labels[::2, ::5] = 255
    labels[1, 7, 3] = 9
    for ignore in (None, 255):
        with pytest.raises(ValueError) as a:
            epd_labels(labels, 4, 4, ignore_index=ignore)
        with pytest.raises(ValueError) as b:
            epd_labels_torch(torch.from_numpy(labels), 4, 4, ignore_index=ignore)
        assert str(a.value) == str(b.value)


_RSS_SCRIPT = r"""
import ctypes, json, sys
import torch
from EPDSegmentationLib.core.epd_torch import epd_labels_torch

def rss(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))

torch.set_num_threads(1)
libc = ctypes.CDLL("libc.so.6")
g = torch.Generator().manual_seed(0)
labels = torch.randint(0, 6, (40, 512, 512), dtype=torch.uint8, generator=g)
labels[torch.rand(labels.shape, generator=g) < 0.1] = 255
clean = labels.clamp(max=5)
epd_labels_torch(clean[:2], 6, 2)  # warm up the allocator and the kernels
result = []
for k in (2, 4, 8):
    for ignore in (None, 255):
        x = clean if ignore is None else labels
        libc.malloc_trim(0)
        base = rss("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        out = epd_labels_torch(x, 6, k, ignore_index=ignore)
        result.append([k, ignore, rss("VmHWM:") - base, out.numel() * 4])
        del out
print(json.dumps(result))
"""


def test_torch_peak_memory_is_a_small_multiple_of_the_output(repo_root):
    """Peak resident memory of each call above the resident memory before it (Linux only): the
    torch CPU allocator returns large blocks to the system, so this sees every temporary."""
    import json
    import os
    import subprocess
    import sys
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    env = dict(os.environ, PYTHONPATH=str(repo_root / "EPDSegmentation"))
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    for k, ignore, extra, out_bytes in json.loads(done.stdout.strip().splitlines()[-1]):
        assert extra <= 3 * out_bytes, (f"factor {k}, ignore {ignore}: peak extra "
                                        f"{extra / 2**20:.1f} MiB, output {out_bytes / 2**20:.1f}")
