"""The network: layout of the paper, any input size, probabilities, batch independence."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from EPDSegmentationLib.core.model import (EPDNet, ModelConfig, ResConvBlock, build_model,
                                      count_parameters)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model(ModelConfig(width=4)).eval()


def test_layout_matches_the_paper(net):
    encoder_blocks = [m for m in net.encoder.modules() if isinstance(m, ResConvBlock)]
    decoder_blocks = [m for m in net.decoder.modules() if isinstance(m, ResConvBlock)]
    up = [m for m in net.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(encoder_blocks) == 11
    assert len(decoder_blocks) == 4
    assert len(up) == 5
    # five max-pools: count the calls during one forward pass
    calls = []
    original = F.max_pool2d

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    F.max_pool2d = counting
    try:
        with torch.no_grad():
            net(torch.rand(1, 3, 32, 32))
    finally:
        F.max_pool2d = original
    assert len(calls) == 5
    assert net.head.out_channels == 6


def test_default_size_is_a_few_million_parameters():
    n = count_parameters(build_model())
    assert 1_000_000 < n < 6_000_000, n


@pytest.mark.parametrize("shape", [(32, 32), (45, 70), (17, 33), (1, 5)])
def test_any_input_size_gives_probabilities_of_that_size(net, shape):
    x = torch.rand(2, 3, *shape)
    with torch.no_grad():
        p = net(x)
    assert p.shape == (2, 6) + shape
    assert torch.all(p >= 0)
    assert torch.allclose(p.sum(dim=1), torch.ones(2, *shape), atol=1e-5)


def test_padding_is_zero_padding_cropped_back(net):
    """A 40 x 40 input is the top-left of the same input zero-padded to 64 x 64."""
    x = torch.rand(1, 3, 40, 40)
    padded = F.pad(x, (0, 24, 0, 24))
    with torch.no_grad():
        a = net(x)
        b = net(padded)[..., :40, :40]
    assert torch.allclose(a, b, atol=1e-6)


def test_output_of_a_slice_does_not_depend_on_its_batch(net):
    x = torch.rand(3, 3, 32, 48)
    with torch.no_grad():
        together = net(x)
        alone = net(x[1:2])
    assert torch.allclose(together[1:2], alone, atol=1e-5)


def test_res_conv_block_projects_and_learns_its_attention():
    torch.manual_seed(1)
    cfg = ModelConfig(width=4)
    block = ResConvBlock(3, 8, cfg)
    assert isinstance(block.project, nn.Sequential)
    assert isinstance(ResConvBlock(8, 8, cfg).project, nn.Identity)
    y = block(torch.rand(2, 3, 16, 16))
    assert y.shape == (2, 8, 16, 16) and torch.all(y >= 0)
    y.square().mean().backward()
    for part in (block.channel_attention, block.spatial_attention):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_logits_and_forward_agree(net):
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.softmax(net.logits(x), 1), net(x), atol=1e-6)


def test_bad_input_is_named(net):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="multipliers"):
        ModelConfig(multipliers=(1, 2, 3))
    with pytest.raises(ValueError, match="width"):
        ModelConfig(width=0)
    with pytest.raises(ValueError, match="unknown field"):
        build_model({"name": "EPDNet", "depth": 3})
    with pytest.raises(ValueError, match="not 'EPDNet'"):
        build_model({"name": "UNet"})


def test_config_round_trips_through_a_dict():
    cfg = ModelConfig(width=6, multipliers=(1, 2, 2, 4, 4, 4), in_channels=2, num_classes=4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(build_model(cfg.to_dict()), EPDNet)
