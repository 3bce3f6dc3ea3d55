"""HU-guided upsampling (core/upsampling.py, ``training guide``): the formula, that it keeps
the bilinear result where the network's cells agree, that pixels follow the CT's edge where
they do not, and that every path (NumPy, streamed, flipped, segment) applies it alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from EPDSegmentationLib.core.inference import (predict_volume, prepare_slices,
                                               restore_probabilities, run_network)
from EPDSegmentationLib.core.model_io import load_model
from EPDSegmentationLib.core.upsampling import (check_upsampling, describe, guided,
                                                guided_upsample)
from training.__main__ import main

UP = {"method": "hu-guided", "sigma_hu": 30.0, "sigma_cells": 1.0, "radius_cells": 1}


def _reference(p, g, k, sigma_hu, sigma_cells, r):
    """The docstring's sum, pixel by pixel, in float64: p (n, C, h, w), g (n, H, W)."""
    n, C, h, w = p.shape
    H, W = g.shape[1:]
    gfull = np.pad(g, ((0, 0), (0, h * k - H), (0, w * k - W)), mode="edge")
    cell = np.zeros((n, h, w))
    for y in range(h):
        for x in range(w):         # partial cells at the far edges: over the pixels they hold
            cell[:, y, x] = g[:, y * k:(y + 1) * k, x * k:(x + 1) * k].mean(axis=(1, 2))
    out = np.zeros((n, C, H, W))
    for j in range(H):
        for i in range(W):
            cy, cx = j // k, i // k
            u, v = (j + 0.5) / k - 0.5, (i + 0.5) / k - 0.5
            num, den = np.zeros((n, C)), np.zeros(n)
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    yy, xx = min(max(cy + dy, 0), h - 1), min(max(cx + dx, 0), w - 1)
                    ws = np.exp(-((u - cy - dy) ** 2 + (v - cx - dx) ** 2) / (2 * sigma_cells ** 2))
                    wr = np.exp(-(gfull[:, j, i] - cell[:, yy, xx]) ** 2 / (2 * sigma_hu ** 2))
                    num += (ws * wr)[:, None] * p[:, :, yy, xx]
                    den += ws * wr
            out[:, :, j, i] = num / den[:, None]
    return out


@pytest.mark.parametrize("k, shape, r", [(2, (9, 11), 1), (4, (13, 10), 1), (2, (8, 7), 2)])
def test_the_sum_of_the_docstring_pixel_by_pixel(k, shape, r):
    rng = np.random.default_rng(k)
    h, w = -(-shape[0] // k), -(-shape[1] // k)
    p = rng.dirichlet(np.ones(6), size=(2, h, w)).transpose(0, 3, 1, 2)
    g = rng.normal(0, 60, (2,) + shape)
    got = guided_upsample(torch.tensor(p, dtype=torch.float32), torch.tensor(g), k,
                          sigma_hu=40.0, sigma_cells=1.0, radius_cells=r, tolerance=-1.0)
    assert got.shape == (2, 6) + shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), _reference(p, g, k, 40.0, 1.0, r), atol=2e-6)


def test_cells_that_agree_keep_the_bilinear_result_and_the_rest_differ_by_little():
    from torch.nn import functional as F

    rng = np.random.default_rng(1)
    p = np.zeros((1, 6, 12, 12), np.float32)
    p[0, 1] = 1.0                                               # all muscle...
    p[0, :, 6:, 6:] = rng.dirichlet(np.ones(6), size=(6, 6)).transpose(2, 0, 1)  # ...but a corner
    pt, g = torch.from_numpy(p), torch.tensor(rng.normal(0, 200, (1, 24, 24)), dtype=torch.float32)
    bil = F.interpolate(pt, scale_factor=2, mode="bilinear", align_corners=False)
    got = guided_upsample(pt, g, 2, sigma_hu=30.0, tolerance=0.01)
    exact = guided_upsample(pt, g, 2, sigma_hu=30.0, tolerance=-1.0)
    assert torch.equal(got[..., :8, :8], bil[..., :8, :8])      # cells 0..3: all neighbours agree
    assert torch.allclose(got[..., 12:, 12:], exact[..., 12:, 12:], atol=1e-6)
    assert (got - exact).abs().max() <= 0.01 + 1e-6               # TOLERANCE's bound
    assert (exact[..., 12:, 12:] - bil[..., 12:, 12:]).abs().max() > 0.05  # guidance acted there
    assert torch.allclose(got.sum(1), torch.ones(1, 24, 24), atol=1e-5)
    assert got.min() >= 0 and got.max() <= 1 + 1e-6


def test_pixels_follow_the_hu_edge_inside_a_mixed_cell():
    """Muscle cells (40 HU) on the left, fat cells (-100 HU) on the right, and between them
    one column of cells half and half whose left pixel is muscle and right pixel fat: the
    guided maps give each pixel its own tissue, sure of it; bilinear gives both pixels
    0.625 of their side (the edge where the cell's middle happens to be, no sharper)."""
    p = np.zeros((1, 6, 4, 5), np.float32)
    p[0, 1, :, :2] = 1.0                       # MUS
    p[0, 3, :, 3:] = 1.0                       # SAT
    p[0, 1, :, 2] = p[0, 3, :, 2] = 0.5        # the mixed column
    hu = np.full((1, 8, 10), 40.0, np.float32)
    hu[..., 5:] = -100.0                       # the edge inside cell column 2 (pixels 4 | 5)
    pt, g = torch.from_numpy(p), torch.from_numpy(hu)
    got = guided_upsample(pt, g, 2, **{k: v for k, v in UP.items() if k != "method"})
    lab = got.argmax(1)
    assert (lab[0, :, :5] == 1).all() and (lab[0, :, 5:] == 3).all()
    assert (got[0, 1, :, 4] > 0.95).all() and (got[0, 3, :, 5] > 0.95).all()
    from torch.nn import functional as F

    bil = F.interpolate(pt, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(bil[0, 1, :, 4], torch.tensor(0.625))
    assert torch.allclose(bil[0, 3, :, 5], torch.tensor(0.625))


def test_the_card_field_is_checked_and_described():
    assert check_upsampling(UP) is None and guided({}) is None
    assert guided({"upsampling": UP}) == UP
    assert "bilinearly" in describe({}) and "30 HU" in describe({"upsampling": UP})
    for bad, words in (({**UP, "method": "bicubic"}, "method"),
                       ({**UP, "sigma_hu": -1}, "positive"),
                       ({**UP, "radius_cells": 9}, "radius_cells"),
                       ({"method": "hu-guided"}, "needs")):
        assert words in check_upsampling(bad)
        with pytest.raises(ValueError, match=words):
            guided({"upsampling": bad})


@pytest.fixture(scope="module")
def guided_model(tiny_model_path):
    model, card = load_model(tiny_model_path)
    return model, dict(card, upsampling=dict(UP))


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    hu = rng.normal(-100, 30, (3, 40, 52)).astype(np.float32)
    hu[:, 10:30, 12:40] = rng.normal(40, 10, (3, 20, 28))     # soft tissue in fat
    return hu


def test_restoring_a_guided_models_maps_needs_the_hu(guided_model):
    _, card = guided_model
    with pytest.raises(ValueError, match="guided by the HU"):
        restore_probabilities(np.full((1, 6, 5, 5), 1 / 6, np.float32), (10, 10), (10, 10), card)


@pytest.mark.parametrize("pixel", [0.8, 0.6])
def test_streamed_and_flipped_paths_apply_it_as_the_numpy_path(guided_model, volume, pixel):
    """predict_volume (network_slab, Deferred, torch) gives the probabilities that
    prepare_slices, run_network and the NumPy restore_probabilities with the guide give,
    also when the slices are flipped into the network's orientation and back."""
    model, card = guided_model
    x, work, guide = prepare_slices(volume, (pixel, pixel), card, keep_hu=True)
    low, _, _ = run_network(model, x, torch.device("cpu"), 4, [], mirror=True)
    want = restore_probabilities(low, work, volume.shape[1:], card, guide)
    got = predict_volume(volume, (pixel, pixel), model, card, device="cpu", batch_size=2)
    assert ("soft maps upsampled guided by the HU (sigma 30 HU; in network pixels, sigma 1, "
            "radius 1)") in got.notes
    np.testing.assert_allclose(np.moveaxis(got.probabilities, 0, 1), want, atol=2e-6)
    plain = predict_volume(volume, (pixel, pixel), model, {k: v for k, v in card.items()
                                                           if k != "upsampling"}, device="cpu")
    assert np.abs(plain.probabilities - got.probabilities).max() > 0.01   # it does something
    # rows stored posterior to anterior (a RAS volume): flipped in, the guide with them
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped = predict_volume(volume[:, ::-1].copy(), (pixel, pixel), model, card, device="cpu",
                             ijk_to_ras=np.diag([pixel, pixel, 1.0, 1.0]) @ flip)
    np.testing.assert_allclose(flipped.probabilities[:, :, ::-1], got.probabilities, atol=2e-6)


def test_training_evaluate_scores_the_guided_maps(guided_model, volume):
    """training evaluate restores a guided card's maps guided, as segment does: its soft
    areas are those of predict_volume's probabilities, and differ from the bilinear ones."""
    from training.data import SliceRecord
    from training.evaluate import evaluate

    model, card = guided_model
    pixel = 0.6
    labels = np.where(volume > 0, 5, 3).astype(np.uint8)
    records = [SliceRecord(volume[i], labels[i], (pixel, pixel), "s", f"s{i}")
               for i in range(len(volume))]
    got = evaluate(model, card, records, device="cpu", batch_size=4, examples=0)
    pred = predict_volume(volume, (pixel, pixel), model, card, device="cpu", batch_size=2)
    want = pred.probabilities.sum(axis=(2, 3), dtype=np.float64).T * pixel * pixel / 100.0
    np.testing.assert_allclose(got["areas"]["soft_cm2"], want, rtol=0, atol=1e-4)
    plain = evaluate(model, {k: v for k, v in card.items() if k != "upsampling"}, records,
                     device="cpu", batch_size=4, examples=0)
    assert np.abs(plain["areas"]["soft_cm2"] - want).max() > 1e-2


def test_training_guide_writes_the_field_and_keeps_the_weights(tiny_model_path, tmp_path,
                                                               capsys):
    from EPDSegmentationLib.cli.cohort import model_version

    src = tiny_model_path.with_suffix(".safetensors")
    assert main(["guide", "--model", str(src), "--output", str(tmp_path / "g"),
                 "--sigma-hu", "25"]) == 0
    out = tmp_path / "g" / "model.safetensors"
    model, card = load_model(out)
    assert card["upsampling"]["sigma_hu"] == 25.0 and card["upsampling"]["radius_cells"] == 1
    assert "training guide" in card["upsampling"]["command"] and card["metrics"] == {}
    ref, _ = load_model(src)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 ref.state_dict().values()))
    assert model_version(out, False) == model_version(src, False)
    assert model_version(out) != model_version(src)          # other boundaries, other numbers
    assert main(["guide", "--model", str(src), "--output", str(tmp_path / "h"),
                 "--radius", "5"]) == 2
    assert "--radius 1 to 3" in capsys.readouterr().err
    card_path = out.with_suffix(".json")
    bad = json.loads(card_path.read_text())
    bad["upsampling"]["method"] = "magic"
    card_path.write_text(json.dumps(bad))
    with pytest.raises(Exception, match="upsampling method"):
        load_model(out)


def test_slices_coarser_than_the_networks_cells_are_upsampled_bilinearly(guided_model, volume):
    """At 3.2 mm pixels (the tiny model's cells are 1.6 mm) the interpolated HU cannot place
    an edge inside a cell: the guided card gives what the plain card gives."""
    model, card = guided_model
    plain = {k: v for k, v in card.items() if k != "upsampling"}
    got = predict_volume(volume, (3.2, 3.2), model, card, device="cpu")
    want = predict_volume(volume, (3.2, 3.2), model, plain, device="cpu")
    assert any(n.startswith("soft maps upsampled bilinearly") for n in got.notes)
    assert not any("upsampled" in n for n in want.notes)
    np.testing.assert_array_equal(got.probabilities, want.probabilities)
    x, work = prepare_slices(volume, (3.2, 3.2), card)
    low, _, _ = run_network(model, x, torch.device("cpu"), 4, [], mirror=True)
    np.testing.assert_allclose(restore_probabilities(low, work, volume.shape[1:], card),
                               np.moveaxis(want.probabilities, 0, 1), atol=2e-6)
