"""Losses against soft targets and the learned uncertainty weighting."""

from __future__ import annotations

import math

import pytest
import torch

from EPDSegmentationLib.core.losses import (LOSSES, Criterion, dice_loss, focal_loss, mae_loss, parse_loss,
                             soft_ce_loss, tversky_loss)
from training.train import TrainModule, make_optimizer
from EPDSegmentationLib.core.model import ModelConfig, build_model


def logits_for(p: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax over dim 1 is p."""
    return p.clamp_min(1e-12).log()


def test_values_on_a_hand_made_pixel():
    # one pixel, two classes: p = (0.25, 0.75), q = (0.5, 0.5)
    p = torch.tensor([0.25, 0.75]).reshape(1, 2, 1, 1)
    q = torch.tensor([0.5, 0.5]).reshape(1, 2, 1, 1)
    x = logits_for(p)
    assert mae_loss(x, q).item() == pytest.approx(0.25)
    assert soft_ce_loss(x, q).item() == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)))
    focal = -(0.5 * 0.75 ** 2 * math.log(0.25) + 0.5 * 0.25 ** 2 * math.log(0.75))
    assert focal_loss(x, q).item() == pytest.approx(focal, rel=1e-5)
    dice = 1 - ((2 * 0.125 + 1e-5) / (0.75 + 1e-5) + (2 * 0.375 + 1e-5) / (1.25 + 1e-5)) / 2
    assert dice_loss(x, q).item() == pytest.approx(dice, rel=1e-5)
    # Tversky: class 0 TP .125 FP .125 FN .375; class 1 TP .375 FP .375 FN .125
    t0 = (0.125 + 1e-5) / (0.125 + 0.3 * 0.125 + 0.7 * 0.375 + 1e-5)
    t1 = (0.375 + 1e-5) / (0.375 + 0.3 * 0.375 + 0.7 * 0.125 + 1e-5)
    assert tversky_loss(x, q).item() == pytest.approx(1 - (t0 + t1) / 2, rel=1e-5)


def test_overlap_losses_vanish_on_a_perfect_prediction():
    q = torch.zeros(2, 3, 4, 4)
    q[:, 0, :2] = 1
    q[:, 2, 2:] = 1
    x = q * 40.0  # softmax is one-hot up to e^-40
    for name in ("mae", "dice", "tversky"):
        assert LOSSES[name](x, q).item() == pytest.approx(0.0, abs=1e-5), name


def test_per_slice_means_make_data_parallel_equal_to_one_batch():
    """The mean over two halves equals the loss of the whole batch (what DDP relies on)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 6)
    q = torch.softmax(torch.randn(4, 3, 5, 6), 1)
    for name, fn in LOSSES.items():
        whole = fn(x, q)
        halves = (fn(x[:2], q[:2]) + fn(x[2:], q[2:])) / 2
        assert whole.item() == pytest.approx(halves.item(), rel=1e-6), name


def test_uncertainty_weighting_formula_and_gradient():
    torch.manual_seed(1)
    crit = Criterion(["mae", "dice"])
    with torch.no_grad():
        crit.sigmas.copy_(torch.tensor([0.5, 2.0]))
    x = torch.randn(2, 6, 8, 8)
    q = torch.softmax(torch.randn(2, 6, 8, 8), 1)
    total, parts = crit(x, q)
    expected = (parts["mae"] / (2 * 0.25) + math.log(1 + 0.25)
                + parts["dice"] / (2 * 4.0) + math.log(1 + 4.0))
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert crit.sigmas.grad is not None and torch.all(crit.sigmas.grad != 0)
    single = Criterion(["ce"])
    assert single.sigmas is None
    total, parts = single(x, q)
    assert total.item() == parts["ce"].item()


def test_uncertainty_weights_have_no_weight_decay():
    module = TrainModule(build_model(ModelConfig(width=4)), Criterion(["mae", "dice"]), False)
    opt = make_optimizer(module, 1e-3, 0.05)
    net_group, loss_group = opt.param_groups
    assert net_group["weight_decay"] == 0.05 and loss_group["weight_decay"] == 0.0
    assert loss_group["params"] == [module.criterion.sigmas]


def test_loss_names_are_checked():
    assert parse_loss("MAE + dice") == ["mae", "dice"]
    with pytest.raises(ValueError, match="use one or more of"):
        parse_loss("mae+hinge")
    with pytest.raises(ValueError, match="twice"):
        parse_loss("dice+dice")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        mae_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
