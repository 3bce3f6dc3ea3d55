"""Inference on CPU with a small random-weight model saved through save_model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from EPDSegmentationLib.core.epd import epd_image, upsample_soft
from EPDSegmentationLib.core.inference import (Cancelled, DeviceError, Prediction, predict_volume,
                                          prepare_slices, resampled_shape, run_network,
                                          select_device, source_pixel_mm)
from EPDSegmentationLib.core.model_io import load_model
from EPDSegmentationLib.core.windowing import DEFAULT_WINDOWS, window_channels


@pytest.fixture(scope="module")
def saved_model(tiny_model_path):
    return load_model(tiny_model_path)


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    hu = rng.normal(-100, 300, (5, 40, 52)).astype(np.float32)
    hu[:, 10:30, 12:40] = 40.0  # a block of soft tissue in air-like noise
    return hu


def test_probabilities_on_the_input_grid(saved_model, volume):
    model, card = saved_model
    calls = []
    pred = predict_volume(volume, (0.8, 0.8), model, card, device="cpu", batch_size=2,
                          progress=lambda done, total: calls.append((done, total)))
    assert isinstance(pred, Prediction)
    assert pred.probabilities.shape == (6, 5, 40, 52)
    assert pred.probabilities.dtype == np.float32
    assert np.allclose(pred.probabilities.sum(0), 1.0, atol=1e-5)
    assert pred.slices == [0, 1, 2, 3, 4] and pred.device == "cpu"
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_same_spacing_is_exactly_window_downsample_predict_upsample(saved_model, volume):
    """At the model's source spacing nothing is resampled: the documented pipeline by hand."""
    model, card = saved_model
    assert source_pixel_mm(card) == (0.8, 0.8)
    pred = predict_volume(volume, (0.8, 0.8), model, card, device="cpu", slices=[3, 1])
    x = epd_image(window_channels(volume[[3, 1]], DEFAULT_WINDOWS), 2)
    with torch.no_grad():
        p = model(torch.from_numpy(x)).numpy()
    expected = np.moveaxis(upsample_soft(p, (40, 52), 2), 1, 0)
    assert pred.slices == [3, 1]
    assert np.allclose(pred.probabilities, expected, atol=1e-6)
    assert not any("resampled" in n for n in pred.notes)


def test_other_spacing_is_resampled_to_the_models_scale(saved_model, volume):
    model, card = saved_model
    # 0.4 mm pixels: the network sees half as many source pixels per axis, then 1/2 of that
    x, work = prepare_slices(volume[:1], (0.4, 0.4), card)
    assert work == (20, 26) and x.shape == (1, 3, 10, 13)
    pred = predict_volume(volume, (0.4, 0.4), model, card, device="cpu", slices=[0])
    assert pred.probabilities.shape == (6, 1, 40, 52)
    assert np.allclose(pred.probabilities.sum(0), 1.0, atol=1e-5)
    assert any("resampled from 0.4 x 0.4 mm" in n for n in pred.notes)
    assert resampled_shape((100, 80), (0.8008, 1.2), (0.8, 0.8)) == (100, 120)


def test_cancel_between_batches(saved_model, volume):
    model, card = saved_model
    seen = []

    def should_cancel():
        return len(seen) >= 1

    with pytest.raises(Cancelled, match="cancelled after 2 of 5 slices"):
        predict_volume(volume, (0.8, 0.8), model, card, device="cpu", batch_size=2,
                       progress=lambda d, t: seen.append(d), should_cancel=should_cancel)
    assert seen == [2]


class OutOfMemoryAbove(torch.nn.Module):
    """Wraps a network and fails like an exhausted device for batches above ``limit``."""

    def __init__(self, net, limit):
        super().__init__()
        self.net, self.limit = net, limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


def test_out_of_memory_halves_the_batch_and_records_it(saved_model, volume):
    model, card = saved_model
    x, _ = prepare_slices(volume, (0.8, 0.8), card)
    notes = []
    got, dev, bs = run_network(OutOfMemoryAbove(model, 2), x, torch.device("cpu"), 8, notes)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert np.allclose(got, expected, atol=1e-6)
    assert bs == 2
    assert notes == ["out of memory on cpu: retrying with batch size 4",
                     "out of memory on cpu: retrying with batch size 2"]
    with pytest.raises(RuntimeError, match="out of memory on the CPU even at batch size 1"):
        run_network(OutOfMemoryAbove(model, 0), x, torch.device("cpu"), 2, [])


def test_device_selection_explains_itself():
    dev, reason = select_device("auto")
    assert isinstance(dev, torch.device) and reason
    if not torch.cuda.is_available():
        assert dev.type in ("cpu", "mps") and "CUDA" in reason
        with pytest.raises(DeviceError, match="'cuda' requested, but"):
            select_device("cuda")
    assert select_device("cpu")[0].type == "cpu"
    with pytest.raises(ValueError, match="device must be"):
        select_device("tpu")


def test_bad_input_is_named(saved_model, volume):
    model, card = saved_model
    with pytest.raises(ValueError, match=r"\(K, J, I\)"):
        predict_volume(volume[0], (0.8, 0.8), model, card, device="cpu")
    with pytest.raises(ValueError, match="pixel_mm"):
        predict_volume(volume, (0.8, 0), model, card, device="cpu")
    with pytest.raises(ValueError, match="slice index 9 outside"):
        predict_volume(volume, (0.8, 0.8), model, card, device="cpu", slices=[1, 9])
    with pytest.raises(ValueError, match="batch_size"):
        predict_volume(volume, (0.8, 0.8), model, card, device="cpu", batch_size=0)
