"""Losses against soft targets, and their combination with learned uncertainty weights: the
one implementation that training (training/train.py) and fine-tuning from corrections
(core/adapt.py) share. Imports torch.

Every loss takes logits (B, C, H, W) and a soft target q (B, C, H, W) (EPD fractions, or the
one-hot of nearest labels), works on p = softmax(logits) in float32, and is the mean over the
batch of a per-slice value. Means over slices make a data-parallel step (each rank averages its
share, gradients averaged over ranks) equal to one process with the whole batch.

- ``mae``:      mean |p - q| over classes and pixels.
- ``dice``:     1 - mean over classes of (2 sum pq + eps) / (sum p + sum q + eps), per slice.
- ``ce``:       soft cross-entropy, -sum_c q log p, mean over pixels.
- ``focal``:    -sum_c q (1 - p)^gamma log p (gamma = 2), mean over pixels.
- ``tversky``:  1 - mean over classes of (TP + eps) / (TP + a FP + b FN + eps), with soft
                TP = sum pq, FP = sum p(1 - q), FN = sum (1 - p) q; a = 0.3, b = 0.7.

Every loss takes an optional mask (B, 1, H, W) of 0/1 (or weights): pixels with 0 add
nothing (the pixel means become means over the masked pixels of each slice, the region losses
sum over them); None: every pixel, exactly as without it. Fine-tuning masks the replay
targets with it (core/adapt.py, replay_confidence).

Several losses combine as sum_i L_i / (2 s_i^2) + ln(1 + s_i^2) with one learnable s_i per
loss (initialised to 1): the paper's learned uncertainty weighting. The ln(1 + s^2) form keeps
the regulariser positive, so no loss can be switched off by a negative log.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-5
FOCAL_GAMMA = 2.0
TVERSKY_ALPHA, TVERSKY_BETA = 0.3, 0.7


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 4 or logits.shape != target.shape:
        raise ValueError(f"logits and target must both be (B, C, H, W); got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")


def _pixel_mean(per_pixel: torch.Tensor, mask) -> torch.Tensor:
    """per_pixel (B, H, W) -> mean over the (masked) pixels of each slice, mean over slices."""
    if mask is None:
        return per_pixel.mean()
    m = mask.float()[:, 0]
    return ((per_pixel * m).sum(dim=(1, 2)) / m.sum(dim=(1, 2)).clamp_min(EPS)).mean()


def _masked(p: torch.Tensor, q: torch.Tensor, mask):
    return (p, q) if mask is None else (p * mask.float(), q * mask.float())


def mae_loss(logits: torch.Tensor, target: torch.Tensor, mask=None) -> torch.Tensor:
    _check(logits, target)
    p = torch.softmax(logits.float(), dim=1)
    return _pixel_mean((p - target.float()).abs().mean(dim=1), mask)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, mask=None) -> torch.Tensor:
    _check(logits, target)
    p, q = _masked(torch.softmax(logits.float(), dim=1), target.float(), mask)
    inter = (p * q).sum(dim=(2, 3))
    denom = p.sum(dim=(2, 3)) + q.sum(dim=(2, 3))
    return 1.0 - ((2 * inter + EPS) / (denom + EPS)).mean()


def soft_ce_loss(logits: torch.Tensor, target: torch.Tensor, mask=None) -> torch.Tensor:
    _check(logits, target)
    return _pixel_mean(-(target.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1), mask)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, mask=None,
               gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    _check(logits, target)
    logp = F.log_softmax(logits.float(), dim=1)
    weight = (1.0 - logp.exp()).pow(gamma)
    return _pixel_mean(-(target.float() * weight * logp).sum(dim=1), mask)


def tversky_loss(logits: torch.Tensor, target: torch.Tensor, mask=None,
                 alpha: float = TVERSKY_ALPHA, beta: float = TVERSKY_BETA) -> torch.Tensor:
    _check(logits, target)
    p, q = torch.softmax(logits.float(), dim=1), target.float()
    m = 1.0 if mask is None else mask.float()
    tp = (m * p * q).sum(dim=(2, 3))
    fp = (m * p * (1 - q)).sum(dim=(2, 3))
    fn = (m * (1 - p) * q).sum(dim=(2, 3))
    return 1.0 - ((tp + EPS) / (tp + alpha * fp + beta * fn + EPS)).mean()


LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mae": mae_loss,
    "dice": dice_loss,
    "ce": soft_ce_loss,
    "focal": focal_loss,
    "tversky": tversky_loss,
}
#: The paper's choice.
DEFAULT_LOSS = "mae+dice"


def parse_loss(spec: str) -> List[str]:
    """'mae+dice' -> ['mae', 'dice']; names from LOSSES, no repeats."""
    names = [s.strip().lower() for s in str(spec).split("+") if s.strip()]
    unknown = [n for n in names if n not in LOSSES]
    if not names or unknown:
        raise ValueError(f"--loss {spec!r}: use one or more of {', '.join(LOSSES)} joined by '+' "
                         f"(for example {DEFAULT_LOSS!r})")
    if len(set(names)) != len(names):
        raise ValueError(f"--loss {spec!r} names a loss twice")
    return names


class Criterion(nn.Module):
    """The training loss: one named loss, or several with learned uncertainty weights.

    forward(logits, target) -> (total, {name: loss value}). The s_i are the parameter
    ``sigmas`` (one per loss, only when there are several); the optimiser puts them in a
    group without weight decay."""

    def __init__(self, names: Sequence[str] = ("mae", "dice")):
        super().__init__()
        self.names = list(parse_loss("+".join(names)))
        if len(self.names) > 1:
            self.sigmas = nn.Parameter(torch.ones(len(self.names)))
        else:
            self.register_parameter("sigmas", None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                mask=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        parts = {n: LOSSES[n](logits, target, mask) for n in self.names}
        if self.sigmas is None:
            return parts[self.names[0]], parts
        s2 = self.sigmas.float() ** 2
        losses = torch.stack([parts[n] for n in self.names])
        total = (losses / (2 * s2) + torch.log1p(s2)).sum()
        return total, parts
