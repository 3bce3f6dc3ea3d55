"""Fixed normalisation statistics (core/model.py FixedGroupNorm, training/norms.py): the
network's norms take each group's mean and variance from the weights instead of each image,
measured on the card's recipe's phantoms by ``training fix-norms``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from EPDSegmentationLib.core.model import FixedGroupNorm, build_model
from EPDSegmentationLib.core.model_card import ModelConfig, ModelFileError, validate_card
from EPDSegmentationLib.core.model_io import load_model


def test_fixed_statistics_equal_to_an_images_own_give_groupnorm():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 9, 7) * 3 + 2
    gn = nn.GroupNorm(3, 6)
    nn.init.normal_(gn.weight)
    nn.init.normal_(gn.bias)
    fixed = FixedGroupNorm(3, 6)
    fixed.load_state_dict(gn.state_dict(), strict=False)
    xg = x.reshape(1, 3, -1)
    fixed.group_mean.copy_(xg.mean(-1)[0])
    fixed.group_var.copy_(xg.var(-1, unbiased=False)[0])
    torch.testing.assert_close(fixed(x), gn(x), atol=1e-5, rtol=1e-5)
    # another image is normalised with the same numbers, not its own: fixed is affine in
    # its input, GroupNorm is blind to the input's scale
    zero = fixed(torch.zeros_like(x))
    torch.testing.assert_close(fixed(2 * x) - zero, 2 * (fixed(x) - zero), atol=1e-4,
                               rtol=1e-4)
    torch.testing.assert_close(gn(2 * x), gn(x), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(fixed(2 * x), fixed(x), atol=1e-2)


def test_the_card_lists_norm_only_when_fixed():
    assert "norm" not in ModelConfig(width=4).to_dict()
    assert ModelConfig(width=4, norm="fixed").to_dict()["norm"] == "fixed"
    assert ModelConfig.from_dict(ModelConfig(width=4, norm="fixed").to_dict()).norm == "fixed"
    with pytest.raises(ValueError, match="norm must be one of group, fixed"):
        ModelConfig(width=4, norm="batch")


def test_a_fixed_card_must_say_where_its_statistics_came_from(tiny_model_path):
    _, card = load_model(tiny_model_path)
    card = dict(card, architecture=dict(card["architecture"], norm="fixed"))
    with pytest.raises(ModelFileError, match="norm_statistics.measured_on"):
        validate_card(card)
    validate_card(dict(card, norm_statistics={"measured_on": "here"}))


def _recipe_model(tiny_model_path, tmp_path, **extra):
    _, card = load_model(tiny_model_path)
    src = tmp_path / "src"
    src.mkdir()
    card = dict(card, training=dict(card["training"], command=(
        "python -m training train --phantom-subjects 2 --phantom-levels L3 L3 "
        "--output x"), augment={}), **extra)
    (src / "model.json").write_text(json.dumps(card))
    (src / "model.safetensors").write_bytes(
        tiny_model_path.with_suffix(".safetensors").read_bytes())
    return src / "model.safetensors"


def test_fix_norms_measures_each_norms_statistics_on_the_recipe(tiny_model_path, tmp_path):
    """training fix-norms: every norm's buffers are the mean over the recipe's phantom
    slices of each slice's own group statistics (measured again here with hooks on the old
    network); the other weights are unchanged; the calibration is dropped with a note."""
    from EPDSegmentationLib.core.inference import predict_volume
    from training.__main__ import main as training_main
    from training.phantom.generate import make_slice
    from training.recipe import card_recipe

    cal = {"pixel_mm": [1.6], "class_weights": [[1.0] * 6], "fitted_on": "t", "mirror": True}
    src = _recipe_model(tiny_model_path, tmp_path, calibration=cal)
    training_main(["fix-norms", "--model", str(src), "--output", str(tmp_path / "out"),
                   "--subjects", "2"])
    net, card = load_model(tmp_path / "out" / "model.safetensors")
    assert card["architecture"]["norm"] == "fixed" and "calibration" not in card
    assert card["norm_statistics"]["measured_on"].startswith("2 phantom slices")
    assert card["norm_statistics"]["command"].startswith("python -m training fix-norms")

    old, old_card = load_model(src)
    seen = {}

    def hook(name):
        def record(m, inputs):
            xg = inputs[0].double().reshape(inputs[0].shape[0], m.num_groups, -1)
            seen.setdefault(name, []).append(torch.stack([xg.mean(-1)[0],
                                                          xg.var(-1, unbiased=False)[0]]))
        return record

    for name, m in old.named_modules():
        if isinstance(m, nn.GroupNorm):
            m.register_forward_pre_hook(hook(name))
    augment, anatomy, levels = card_recipe(old_card)
    assert len(levels) == 1
    plain = {k: v for k, v in old_card.items() if k != "calibration"}
    for seed in range(2):
        sl = make_slice(seed, level=levels[0], anatomy="torso", **anatomy)
        hu, _ = augment(sl.hu.astype(np.float32), sl.labels, np.random.default_rng([seed, 0]),
                        tissues=sl.tissues)
        predict_volume(hu[None], (sl.pixel_mm,) * 2, old, plain, device="cpu", mirror=False)
    fixed = dict(net.named_modules())
    assert len(seen) == sum(isinstance(m, FixedGroupNorm) for m in fixed.values()) > 10
    for name, stats in seen.items():
        want = torch.stack(stats).mean(0).float()
        torch.testing.assert_close(fixed[name].group_mean, want[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fixed[name].group_var, want[1], atol=1e-5, rtol=1e-4)
    new = net.state_dict()
    for k, v in old.state_dict().items():
        assert torch.equal(new[k], v)


def test_fix_norms_refuses_a_fixed_model(tiny_model_path, tmp_path, capsys):
    from training.__main__ import main as training_main

    src = _recipe_model(tiny_model_path, tmp_path)
    training_main(["fix-norms", "--model", str(src), "--output", str(tmp_path / "a"),
                   "--subjects", "1"])
    assert training_main(["fix-norms", "--model", str(tmp_path / "a" / "model.safetensors"),
                          "--output", str(tmp_path / "b"), "--subjects", "1"]) == 2
    assert "already fixed" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_fixed_model_round_trips_and_is_not_an_init_for_a_group_run(tiny_model_path,
                                                                       tmp_path):
    """Saved and loaded with its buffers; train --init refuses it by its architecture."""
    from types import SimpleNamespace

    from EPDSegmentationLib.core.model_io import save_model
    from training.train import init_from

    net, card = load_model(tiny_model_path)
    config = dataclasses.replace(net.config, norm="fixed")
    fixed = build_model(config)
    fixed.load_state_dict(net.state_dict(), strict=False)
    for m in fixed.modules():
        if isinstance(m, FixedGroupNorm):
            m.group_mean.fill_(0.5)
    card = dict(card, architecture=config.to_dict(), norm_statistics={"measured_on": "t"})
    save_model(tmp_path / "m", fixed, card)
    back, _ = load_model(tmp_path / "m")
    assert all(bool((m.group_mean == 0.5).all()) for m in back.modules()
               if isinstance(m, FixedGroupNorm))
    args = SimpleNamespace(window_list=[list(w) for w in card["windows"]], factor=card["factor"])
    with pytest.raises(ValueError, match="the model differs: architecture"):
        init_from(build_model(net.config), tmp_path / "m.safetensors",
                  net.config.to_dict(), args, {})


def test_the_panel_names_fixed_statistics():
    from EPDSegmentationLib.mrml.workflow import describe_model

    card = {"name": "M", "factor": 2, "pixel_mm": [1.73, 1.73],
            "architecture": {"norm": "fixed"}}
    assert "Normalisation: fixed statistics" in describe_model(card)
    assert "Normalisation" not in describe_model(dict(card, architecture={}))
