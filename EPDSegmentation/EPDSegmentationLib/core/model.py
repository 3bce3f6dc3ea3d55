"""The paper's lightweight encoder-decoder (Ali et al., arXiv:2404.03991), in torch.

Layout (``width`` w, level widths w * (1, 2, 4, 8, 8, 8) by default):

    encoder  level 0: 2 Res-Conv blocks   (full resolution)
             max-pool, level 1: 2 blocks  ... level 4: 2 blocks
             max-pool, level 5: 1 block   (1/32)                 = 11 blocks, 5 max-pools
    decoder  transposed conv 1/32 -> 1/16, concat skip, 1 block  ... down to 1/2
                                                                  = 4 blocks, 4 up-convs
             transposed conv 1/2 -> 1, concat the level-0 skip   = the 5th up-conv
    head     3 x 3 convolution to C classes, softmax over classes

A Res-Conv block: two 3 x 3 conv + GroupNorm (+ ReLU after the first), the features
re-weighted by channel attention (squeeze-excitation: global mean -> 1x1 conv -> ReLU ->
1x1 conv -> sigmoid, one weight per channel) and spatial attention (channel mean and max
-> 7 x 7 conv -> sigmoid, one weight per pixel), added to the block's input (projected by a
1 x 1 conv + GroupNorm when the width changes), then ReLU.

GroupNorm rather than BatchNorm: the network behaves the same in training and inference
and does not depend on the batch, so data-parallel training equals one process with the
same global batch. GroupNorm takes each image's own statistics, so what the network calls a
pixel depends on the whole image (how much of it is air, fat or organ); with ``norm
"fixed"`` (FixedGroupNorm) each group's mean and variance are stored with the weights,
measured on training phantoms (``python -m training fix-norms``), and a pixel's features
depend on the image only through the attention's means. Any input size is accepted: the input is zero-padded (zero is air in
every HU window) at the bottom and right to a multiple of 32 and the output cropped back.

This module imports torch; import it only where torch is available.
"""

from __future__ import annotations

from math import gcd
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .model_card import ARCHITECTURE, DIVISOR, ModelConfig

__all__ = ["ARCHITECTURE", "DIVISOR", "ModelConfig", "EPDNet", "FixedGroupNorm", "ResConvBlock",
           "build_model", "count_parameters"]


class FixedGroupNorm(nn.GroupNorm):
    """GroupNorm with each group's mean and variance fixed (buffers ``group_mean``,
    ``group_var``, shape (G,)) instead of taken from each image; the affine weight and bias
    as GroupNorm's. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps=eps)
        self.register_buffer("group_mean", torch.zeros(num_groups))
        self.register_buffer("group_var", torch.ones(num_groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per = self.num_channels // self.num_groups
        inv = torch.rsqrt(self.group_var + self.eps).repeat_interleave(per)
        scale = self.weight * inv
        shift = self.bias - self.group_mean.repeat_interleave(per) * scale
        return x * scale[:, None, None].to(x.dtype) + shift[:, None, None].to(x.dtype)


def _norm(channels: int, cfg: ModelConfig) -> nn.GroupNorm:
    groups = gcd(channels, cfg.norm_groups)
    if cfg.norm == "fixed":
        return FixedGroupNorm(groups, channels)
    return nn.GroupNorm(groups, channels)


class ChannelAttention(nn.Module):
    """One weight in (0, 1) per channel from the global mean (squeeze-excitation)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(w))))


class SpatialAttention(nn.Module):
    """One weight in (0, 1) per pixel from the channel mean and maximum."""

    def __init__(self, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class ResConvBlock(nn.Module):
    """(B, c_in, H, W) -> (B, c_out, H, W): input (projected) + attention-weighted conv features."""

    def __init__(self, c_in: int, c_out: int, cfg: ModelConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = _norm(c_out, cfg)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(c_out, cfg)
        self.channel_attention = ChannelAttention(c_out, cfg.reduction)
        self.spatial_attention = SpatialAttention(cfg.spatial_kernel)
        if c_in == c_out:
            self.project: nn.Module = nn.Identity()
        else:
            self.project = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False),
                                         _norm(c_out, cfg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.relu(self.norm1(self.conv1(x)))
        f = self.norm2(self.conv2(f))
        f = f * self.channel_attention(f)
        f = f * self.spatial_attention(f)
        return F.relu(self.project(x) + f)


class EPDNet(nn.Module):
    """The segmentation network. ``forward`` gives class probabilities (B, C, H, W) for
    windowed input (B, in_channels, H, W); ``logits`` gives the pre-softmax scores (for
    losses that need log-probabilities)."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        w = config.widths
        blocks_per_level = (2, 2, 2, 2, 2, 1)
        self.encoder = nn.ModuleList()
        c_prev = config.in_channels
        for level, n in enumerate(blocks_per_level):
            stage = nn.Sequential(*[ResConvBlock(c_prev if i == 0 else w[level], w[level], config)
                                    for i in range(n)])
            self.encoder.append(stage)
            c_prev = w[level]
        # up[i] goes from level i+1 to level i; decoder[i] refines level i (i = 1..4).
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2)
                                 for i in range(5)])
        self.decoder = nn.ModuleDict({str(i): ResConvBlock(2 * w[i], w[i], config)
                                      for i in range(1, 5)})
        self.head = nn.Conv2d(2 * w[0], config.num_classes, 3, padding=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"input must be (B, {self.config.in_channels}, H, W); got "
                             f"{tuple(x.shape)}")
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % DIVISOR, (-w) % DIVISOR
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        skips = []
        for level, stage in enumerate(self.encoder):
            if level:
                x = F.max_pool2d(x, 2)
            x = stage(x)
            skips.append(x)
        for level in range(4, -1, -1):
            x = torch.cat([self.up[level](x), skips[level]], dim=1)
            if level:
                x = self.decoder[str(level)](x)
        return self.head(x)[..., :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


def build_model(config: Any = None) -> EPDNet:
    """An EPDNet from a ModelConfig, a card's architecture dict, or None (the defaults)."""
    if config is None:
        config = ModelConfig()
    elif isinstance(config, Mapping):
        config = ModelConfig.from_dict(config)
    elif not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig or a dict; got {type(config).__name__}")
    return EPDNet(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
