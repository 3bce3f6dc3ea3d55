"""EPD and the baselines on torch tensors, for batches on the GPU during training.

Same windows, edge rule, sample positions and results as ``epd.py`` (tests check that they
agree); the index and weight tables come from there, so the geometry is defined once.
Tensors keep their device. Labels are counted class by class in blocks: no one-hot and no
wider copy of the input.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .epd import (Factor, check_up_shape, down_positions, up_positions, linear_taps,
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


#: Element bounds of one work block of ``epd_labels_torch``; blocks are also kept small against
#: the output, so that the block's temporaries (a padded copy, one comparison, the sums) stay a
#: fraction of the output.
_BLOCK_MIN = 1 << 16
_BLOCK_MAX = 1 << 24
#: Integer dtypes that comparisons and sums support on every device.
_NATIVE = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _chunks(t: torch.Tensor, limit: int, prefix=()):
    """Yield (prefix, start, sub) covering t in C order with sub.numel() <= limit (or one row):
    sub = t[prefix][start:start + len(sub)]. Views only."""
    if t.numel() <= limit or t.dim() == 0:
        yield prefix, 0, t
    elif t[0].numel() > limit:
        for i in range(t.shape[0]):
            yield from _chunks(t[i], limit, prefix + (i,))
    else:
        step = max(1, limit // max(1, t[0].numel()))
        for i0 in range(0, t.shape[0], step):
            yield prefix, i0, t[i0:i0 + step]


def _check_range(labels: torch.Tensor, num_classes: int, ignore: Optional[int],
                 limit: int) -> None:
    """ValueError naming the first label outside [0, C) (other than ``ignore``), in C order.
    Chunks of at most ``limit`` elements: a min/max per chunk, masks only for a chunk that
    needs them."""
    native = labels.dtype in _NATIVE
    for prefix, start, sub in _chunks(labels, limit):
        x = sub if native else sub.to(torch.int64)
        lo, hi = (int(v) for v in torch.aminmax(x))
        if lo >= 0 and hi < num_classes:
            continue
        bad = x >= num_classes
        if lo < 0:
            bad |= x < 0
        if ignore is not None:
            bad &= x != ignore
        if not bool(bad.any()):
            continue
        flat = int(torch.argmax(bad.reshape(-1).to(torch.uint8)))  # the first bad one
        j = np.unravel_index(flat, tuple(x.shape))
        where = tuple(prefix) + (start + int(j[0]),) + tuple(int(i) for i in j[1:])
        allowed = f"[0, {num_classes})"
        if ignore is not None:
            allowed += f" or ignore_index={ignore}"
        raise ValueError(f"labels must lie in {allowed}; found {x[tuple(j)].item()} at index "
                         f"{where}")


def epd_labels_torch(labels: torch.Tensor, num_classes: int, factor: Factor,
                     ignore_index: Optional[int] = None) -> torch.Tensor:
    """EPD soft labels of an integer tensor (..., H, W) -> float32 (..., C, h, w).

    Semantics (and results, bit for bit) as ``epd.epd_labels``. Works in blocks of slices
    (or of window rows of one big slice), class by class in the labels' own dtype: no one-hot,
    no int64 copy of the input; the temporaries of a block (a padded copy where the size is
    not a multiple of the window, one comparison, uint8 window sums) stay small against the
    output."""
    fac = normalize_factor(factor)
    _check(labels, fac, "labels")
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
    if not 1 <= int(num_classes) < 255:
        raise ValueError(f"num_classes must be an int in 1..254; got {num_classes!r}")
    C = int(num_classes)
    ignore = None if ignore_index is None else int(ignore_index)
    if labels.dtype == torch.bool:
        labels = labels.view(torch.uint8)
    nd = len(fac)
    spatial, lead = tuple(labels.shape[-nd:]), tuple(labels.shape[: labels.dim() - nd])
    low = tuple(-(-n // k) for n, k in zip(spatial, fac))
    out_bytes = 4 * C * int(np.prod(lead + low, dtype=np.int64))
    _check_range(labels, C, ignore, max(_BLOCK_MIN, min(_BLOCK_MAX, out_bytes // 8)))

    try:
        lab = labels.view((-1,) + spatial)
    except RuntimeError:
        # leading axes that no view merges: one call per leading index
        out = torch.empty(lead + (C,) + low, dtype=torch.float32, device=labels.device)
        for i in range(labels.shape[0]):
            out[i] = epd_labels_torch(labels[i], C, fac, ignore)
        return out
    if nd == 2:
        (kh, kw), kd = fac, 1
        lab4 = lab.unsqueeze(0)  # (1, B, H, W): each slice is a depth window of 1
    else:
        (kd, kh, kw) = fac
        lab4 = lab
    nb, d, h, w = lab4.shape
    do, ho, wo = -(-d // kd), -(-h // kh), -(-w // kw)
    volume = kd * kh * kw
    out = torch.empty((d, C, ho, wo) if nd == 2 else (nb, C, do, ho, wo), dtype=torch.float32,
                      device=labels.device)
    if ignore is None:
        plane = _extent_table((h, w), (kh, kw), labels.device)  # (ho, wo) pixels per window
        depth = _extent_table((d,), (kd,), labels.device)       # (do,) times this
    native = lab4.dtype in _NATIVE
    # padding never equals a class
    pad_value = 255 if lab4.dtype == torch.uint8 else -1

    item = lab4.element_size() if native else 8
    block = max(_BLOCK_MIN, min(_BLOCK_MAX, out.numel() * 4 // (4 * (2 + item))))
    unit = kd * ho * kh * wo * kw
    if unit <= block:
        g_max, ni_max = max(1, min(do, block // unit)), ho
    else:
        g_max, ni_max = 1, max(1, min(ho, block // (kd * kh * wo * kw)))
    for bi in range(nb):
        for u0 in range(0, do, g_max):
            u1 = min(do, u0 + g_max)
            for i0 in range(0, ho, ni_max):
                i1 = min(ho, i0 + ni_max)
                g, ni = u1 - u0, i1 - i0
                src = lab4[bi, u0 * kd: min(d, u1 * kd), i0 * kh: min(h, i1 * kh)]
                if not native:
                    src = src.to(torch.int64)
                pads = [0, wo * kw - w, 0, ni * kh - src.shape[1], 0, g * kd - src.shape[0]]
                if any(pads):
                    src = torch.nn.functional.pad(src, pads, value=pad_value)
                win = src.view(g, kd, ni, kh, wo, kw)
                tgt = out[u0:u1, :, i0:i1].transpose(0, 1) if nd == 2 else out[bi, :, u0:u1, i0:i1]
                for c in range(C):
                    if c == ignore:
                        tgt[c].zero_()
                        continue
                    eq = (win == c).view(torch.uint8)
                    if volume < 256:
                        cnt = eq.sum(dim=(1, 3, 5), dtype=torch.uint8)
                    else:
                        cnt = eq.sum(dim=5, dtype=torch.uint8 if kw < 256 else torch.int32)
                        cnt = cnt.sum(dim=(1, 3), dtype=torch.int32)
                    tgt[c].copy_(cnt)  # counts are exact in float32
                if ignore is None:
                    tgt.div_(plane[i0:i1] if kd == 1 else depth[u0:u1, None, None] * plane[i0:i1])
                else:
                    # fractions over labelled pixels; a window without one keeps zeros
                    tgt.div_(tgt.sum(dim=0, keepdim=True).clamp_min_(1.0))
    return out.view(lead + (C,) + low)


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
        out = _interp(out, out.dim() + axis, linear_taps(down_positions(n, k), n))
    return out


def upsample_soft_torch(soft: torch.Tensor, shape: Sequence[int], factor: Factor) -> torch.Tensor:
    """Soft maps (..., C, h, w) back to (..., C, *shape), as ``epd.upsample_soft``."""
    fac = normalize_factor(factor)
    shape = check_up_shape(tuple(soft.shape), shape, fac)
    out = soft.float()
    for axis, k, n in zip(range(-len(fac), 0), fac, shape):
        out = _interp(out, out.dim() + axis, linear_taps(up_positions(n, k), soft.shape[axis]))
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
