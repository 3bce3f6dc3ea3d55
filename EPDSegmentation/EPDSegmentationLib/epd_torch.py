"""EPD and the baselines on torch tensors, for batches on the GPU during training.

Same windows, edge rule, sample positions and results as ``epd.py`` (tests check that they
agree); the index and weight tables come from there, so the geometry is defined once.
Tensors keep their device. Labels are counted class by class: no one-hot of the input.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .epd import (Factor, _check_up_shape, _down_positions, _up_positions, linear_taps,
                  normalize_factor, window_centres)

__all__ = ["epd_labels_torch", "epd_image_torch", "nearest_labels_torch",
           "bilinear_image_torch", "upsample_soft_torch", "downsample_pair_torch"]


def _check(t: torch.Tensor, fac, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() < len(fac):
        raise ValueError(f"{what} needs at least {len(fac)} axes for factor {fac}; got {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(t.shape)})")


def _pad_to_windows(t: torch.Tensor, fac, value) -> torch.Tensor:
    pads = []
    for n, k in zip(reversed(t.shape[-len(fac):]), reversed(fac)):
        pads += [0, (-n) % k]
    if any(pads):
        t = torch.nn.functional.pad(t, pads, value=value)
    return t


def _window_sum(t: torch.Tensor, fac, dtype) -> torch.Tensor:
    """Sum of each window over the trailing axes of a padded tensor."""
    lead = t.shape[: t.dim() - len(fac)]
    shape = list(lead)
    for n, k in zip(t.shape[-len(fac):], fac):
        shape += [n // k, k]
    axes = tuple(len(lead) + 2 * i + 1 for i in range(len(fac)))
    return t.reshape(shape).sum(dim=axes, dtype=dtype)


def _extent_table(shape, fac, device) -> torch.Tensor:
    """Input pixels per window, shape of the downsampled trailing axes (float32)."""
    table = torch.ones((), dtype=torch.float32, device=device)
    for n, k in zip(shape, fac):
        ext = np.full(-(-n // k), k, np.float32)
        ext[-1] = n - k * (len(ext) - 1)
        table = table[..., None] * torch.as_tensor(ext, device=device)
    return table


def epd_labels_torch(labels: torch.Tensor, num_classes: int, factor: Factor,
                     ignore_index: Optional[int] = None) -> torch.Tensor:
    """EPD soft labels of an integer tensor (..., H, W) -> float32 (..., C, h, w).

    Semantics as ``epd.epd_labels``."""
    fac = normalize_factor(factor)
    _check(labels, fac, "labels")
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
    if not 1 <= int(num_classes) < 255:
        raise ValueError(f"num_classes must be an int in 1..254; got {num_classes!r}")
    lab = labels.long()
    bad = (lab < 0) | (lab >= num_classes)
    if ignore_index is not None:
        bad &= lab != ignore_index
    if bool(bad.any()):
        value = lab[bad][0].item()
        raise ValueError(f"labels must lie in [0, {num_classes}) or equal ignore_index="
                         f"{ignore_index}; found {value}")
    if ignore_index is not None:
        lab = torch.where(lab == ignore_index, torch.full_like(lab, -1), lab)
    lab = _pad_to_windows(lab, fac, -1)
    counts = [_window_sum(lab == c, fac, torch.int32) for c in range(int(num_classes))]
    counts = torch.stack(counts, dim=lab.dim() - len(fac)).float()
    if ignore_index is None:
        totals = _extent_table(labels.shape[-len(fac):], fac, labels.device)
    else:
        totals = counts.sum(dim=lab.dim() - len(fac), keepdim=True)
    return torch.where(totals > 0, counts / totals.clamp_min(1), torch.zeros_like(counts))


def epd_image_torch(image: torch.Tensor, factor: Factor) -> torch.Tensor:
    """The plain window mean of (..., H, W) -> float32 (..., h, w), partial windows included."""
    fac = normalize_factor(factor)
    _check(image, fac, "image")
    x = image.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("image holds a non-finite value")
    sums = _window_sum(_pad_to_windows(x, fac, 0.0), fac, torch.float32)
    return sums / _extent_table(image.shape[-len(fac):], fac, image.device)


def nearest_labels_torch(labels: torch.Tensor, factor: Factor) -> torch.Tensor:
    """The label nearest each window centre, as ``epd.nearest_labels``."""
    fac = normalize_factor(factor)
    _check(labels, fac, "labels")
    out = labels
    for axis, k in zip(range(-len(fac), 0), fac):
        idx = torch.as_tensor(window_centres(labels.shape[axis], k), device=labels.device)
        out = out.index_select(out.dim() + axis, idx)
    return out


def _interp(x: torch.Tensor, axis: int, taps) -> torch.Tensor:
    i0, i1, wt = (torch.as_tensor(a, device=x.device) for a in taps)
    shape = [1] * x.dim()
    shape[axis] = -1
    wt = wt.to(x.dtype).reshape(shape)
    a = x.index_select(axis, i0)
    return a + (x.index_select(axis, i1) - a) * wt


def bilinear_image_torch(image: torch.Tensor, factor: Factor) -> torch.Tensor:
    """(Tri)linear interpolation at the window centres, as ``epd.bilinear_image``."""
    fac = normalize_factor(factor)
    _check(image, fac, "image")
    out = image.float()
    for axis, k in zip(range(-len(fac), 0), fac):
        n = image.shape[axis]
        out = _interp(out, out.dim() + axis, linear_taps(_down_positions(n, k), n))
    return out


def upsample_soft_torch(soft: torch.Tensor, shape: Sequence[int], factor: Factor) -> torch.Tensor:
    """Soft maps (..., C, h, w) back to (..., C, *shape), as ``epd.upsample_soft``."""
    fac = normalize_factor(factor)
    shape = _check_up_shape(tuple(soft.shape), shape, fac)
    out = soft.float()
    for axis, k, n in zip(range(-len(fac), 0), fac, shape):
        out = _interp(out, out.dim() + axis, linear_taps(_up_positions(n, k), soft.shape[axis]))
    return out


def downsample_pair_torch(image: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          factor: Factor, *, label_mode: str = "epd",
                          image_mode: str = "average", ignore_index: Optional[int] = None):
    """Torch twin of ``epd.downsample_pair``: (small image, soft labels (..., C, h, w))."""
    fac = normalize_factor(factor)
    if tuple(image.shape[-len(fac):]) != tuple(labels.shape[-len(fac):]):
        raise ValueError(f"image and labels must share their grid; got image "
                         f"{tuple(image.shape)} and labels {tuple(labels.shape)}")
    if image_mode == "average":
        small = epd_image_torch(image, fac)
    elif image_mode == "bilinear":
        small = bilinear_image_torch(image, fac)
    else:
        raise ValueError(f"image_mode must be 'average' or 'bilinear'; got {image_mode!r}")
    if label_mode == "epd":
        soft = epd_labels_torch(labels, num_classes, fac, ignore_index)
    elif label_mode == "nearest":
        soft = epd_labels_torch(nearest_labels_torch(labels, fac), num_classes,
                                (1,) * len(fac), ignore_index)
    else:
        raise ValueError(f"label_mode must be 'epd' or 'nearest'; got {label_mode!r}")
    return small, soft
