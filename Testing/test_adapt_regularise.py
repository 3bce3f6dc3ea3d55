"""What keeps an adapted model near the base model (core/adapt.py): weight-space interpolation
(AdaptSettings.interpolate), the L2-SP penalty (AdaptSettings.l2sp) and a replay share smaller
than one slice per batch (replay_fraction 0.1 of a batch of 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from EPDSegmentationLib.core.adapt import (AdaptCase, AdaptError, AdaptSettings, _replay_count,
                                           adapt_model, adapted_card, interpolate_weights,
                                           l2sp_penalty)
from EPDSegmentationLib.core.model import ModelConfig, build_model

from test_adapt import PIXEL_MM, body_case, files, one_thread, tiny  # noqa: F401  (fixtures)


def distance(a, b) -> float:
    """||w_a - w_b|| over all weights."""
    sa, sb = a.state_dict(), b.state_dict()
    return float(sum(((sa[k].double() - sb[k].double()) ** 2).sum() for k in sa)) ** 0.5


def test_interpolate_puts_the_weights_between_base_and_fine_tuned(tiny):
    model, card = tiny
    hu, labels = body_case()
    case = [AdaptCase(hu, labels, PIXEL_MM, [1, 3])]
    full = adapt_model(model, card, case, AdaptSettings(steps=3, lr=1e-2, batch_size=2,
                                                        interpolate=1.0))
    half = adapt_model(model, card, case, AdaptSettings(steps=3, lr=1e-2, batch_size=2,
                                                        interpolate=0.5))
    b, f, h = model.state_dict(), full.model.state_dict(), half.model.state_dict()
    assert distance(model, full.model) > 0
    for k in b:     # the same fine-tuning (same seed), then half of its change
        torch.testing.assert_close(h[k], b[k] + 0.5 * (f[k] - b[k]), atol=1e-6, rtol=0)
    assert any("interpolated" in n for n in half.notes)
    assert distance(interpolate_weights(model, full.model, 0.0), model) < 1e-6
    assert distance(interpolate_weights(model, full.model, 1.0), full.model) < 1e-6
    card_out = adapted_card(card, "base", case, AdaptSettings(interpolate=0.5), half, command="t")
    assert card_out["training"]["adapt_settings"]["interpolate"] == 0.5
    assert "0.5 x the fine-tuned change" in card_out["training"]["data"]["kept_from_base"]


def test_l2sp_holds_the_weights_near_the_base(tiny):
    model, card = tiny
    hu, labels = body_case()
    case = [AdaptCase(hu, labels, PIXEL_MM, [1, 3])]
    free = adapt_model(model, card, case, AdaptSettings(steps=6, lr=1e-2, batch_size=2,
                                                        interpolate=1.0))
    held = adapt_model(model, card, case, AdaptSettings(steps=6, lr=1e-2, batch_size=2,
                                                        interpolate=1.0, l2sp=100.0))
    assert distance(model, held.model) < 0.5 * distance(model, free.model)
    net = build_model(ModelConfig(width=4))
    anchors = [(p, p.detach().clone()) for p in net.parameters()]
    with torch.no_grad():
        assert float(l2sp_penalty(anchors)) == 0.0
        first = next(net.parameters())
        first.add_(2.0)
        assert float(l2sp_penalty(anchors)) == pytest.approx(4.0 * first.numel())


def test_a_replay_share_below_one_slice_still_replays():
    """0.1 of a batch of 4 is 0.4 slices: one replay slice in about 40 % of the steps (it
    used to round to none), 0.25 is one in every step without drawing (the default's random
    stream is unchanged), and a batch always keeps a corrected slice."""
    rng = np.random.default_rng(0)
    counts = [_replay_count(AdaptSettings(replay_fraction=0.1), rng) for _ in range(2000)]
    assert set(counts) == {0, 1} and 0.35 < np.mean(counts) < 0.45
    rng, fresh = np.random.default_rng(1), np.random.default_rng(1)
    assert [_replay_count(AdaptSettings(replay_fraction=0.25), rng) for _ in range(5)] == [1] * 5
    assert rng.random() == fresh.random()
    assert _replay_count(AdaptSettings(batch_size=1, replay_fraction=0.9), rng) == 0


@pytest.mark.parametrize("change, message", [({"l2sp": -1.0}, "l2sp must be"),
                                             ({"l2sp": float("nan")}, "l2sp must be"),
                                             ({"interpolate": 0.0}, "interpolate must be"),
                                             ({"interpolate": 1.5}, "interpolate must be")])
def test_bad_regularisation_settings_are_named(change, message):
    with pytest.raises(AdaptError, match=message):
        AdaptSettings(**change)


def test_cli_passes_interpolate_and_l2sp_into_the_card(files, capsys):
    from EPDSegmentationLib.cli.main import main
    from EPDSegmentationLib.core.model_io import load_model

    args = ["adapt", "--model", str(files / "base.safetensors"), "--image",
            str(files / "ct.nii.gz"), "--labels", str(files / "labels.nii.gz"),
            "--slices", "1,3", "--steps", "2"]
    out = files / "site.safetensors"
    assert main(args + ["--interpolate", "0", "-o", str(out)]) == 2
    assert "interpolate must be" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--interpolate", "0.4", "--l2sp", "0.5", "-o", str(out)]) == 0
    settings = load_model(out)[1]["training"]["adapt_settings"]
    assert (settings["interpolate"], settings["l2sp"]) == (0.4, 0.5)


def test_a_loss_mask_drops_pixels_and_changes_nothing_when_full():
    from EPDSegmentationLib.core.losses import LOSSES, Criterion

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 8, 8, requires_grad=True)
    target = torch.softmax(torch.randn(2, 6, 8, 8), dim=1)
    full = torch.ones(2, 1, 8, 8)
    half = full.clone()
    half[:, :, :, 4:] = 0.0
    for name, fn in LOSSES.items():
        assert float(fn(logits.detach(), target, full)) == pytest.approx(float(fn(logits.detach(), target)), rel=1e-5)
        # the masked-out pixels neither count nor get a gradient
        changed = target.clone()
        changed[:, :, :, 4:] = torch.roll(changed[:, :, :, 4:], 1, dims=1)
        assert float(fn(logits.detach(), changed, half)) == pytest.approx(float(fn(logits.detach(), target, half)),
                                                                 rel=1e-5), name
        logits.grad = None
        fn(logits, target, half).backward()
        assert logits.grad[:, :, :, 4:].abs().max() == 0 and logits.grad[:, :, :, :4].abs().max() > 0
    total, parts = Criterion(["mae", "dice"])(logits, target, half)
    assert set(parts) == {"mae", "dice"} and torch.isfinite(total)


def test_confident_replay_masks_the_hesitant_pixels(tiny):
    model, card = tiny
    hu, labels = body_case()
    result = adapt_model(model, card, [AdaptCase(hu, labels, PIXEL_MM, [1])],
                         AdaptSettings(steps=2, batch_size=2, replay_fraction=0.5,
                                       replay_confidence=0.3, zoom=0.1, rotate=5.0))
    note = [n for n in result.notes if "sure" in n]
    assert len(note) == 1 and np.isfinite(result.history).all()
    with pytest.raises(AdaptError, match="replay_confidence"):
        AdaptSettings(replay_confidence=1.0)
