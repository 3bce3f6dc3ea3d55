"""HU-guided upsampling of the network's soft maps (joint bilateral upsampling).

The network predicts class fractions on a grid k times coarser than the resampled slice
(1.73 mm pixels for the bundled model). Plain bilinear upsampling draws every boundary
smooth, through the middle of the mixed cells, whatever the CT shows there; the CT itself
says where the edge is. Each full-resolution pixel here
takes the fractions of the nearby network cells weighted by distance and by how close the
cell's mean HU (the network's own input, the k x k window mean) is to the pixel's HU:

    p(x) = sum_y w_s(x, y) w_r(x, y) P(y) / sum_y w_s(x, y) w_r(x, y)
    w_s = exp(-|x - y|^2 / (2 sigma_cells^2))   (distance in network cells)
    w_r = exp(-(HU(x) - g(y))^2 / (2 sigma_hu^2))

over the (2 radius + 1)^2 cells around the pixel's own (Kopf et al. 2007, "Joint bilateral
upsampling"). Where all the nearby cells hold the same tissue (a muscle darkened by fat, or
noise) the range weights are alike and cancel in the normalisation, so a pixel is moved
only where the cells around it differ; the result still sums to one per pixel. It does not
preserve each cell's class fractions exactly (no upsampling that follows edges can), so the
soft areas it gives are measured (docs/model.md), not assumed.

Card field (``training guide`` writes it)::

    "upsampling": {"method": "hu-guided", "sigma_hu": 30.0, "sigma_cells": 1.0,
                   "radius_cells": 1, "command": "..."}

Without it a model's maps are upsampled bilinearly, as before; with it, too, for a slice
whose pixels are no smaller than the network's cells (a 3 mm scan and the bundled model's
1.73 mm cells): such a slice's HU, interpolated onto the finer grid, cannot say where an
edge lies inside a cell, and on the T11-L2 CT the guided maps lost subcutaneous fat (Dice
0.883 against 0.904 bilinear; measured, docs/model.md; the voxels not traced).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence

KEY = "upsampling"
METHOD = "hu-guided"


def check_upsampling(up: Any) -> Optional[str]:
    """None if ``up`` is a valid card "upsampling" field, else what is wrong."""
    if not isinstance(up, Mapping):
        return "upsampling must be an object"
    if up.get("method") != METHOD:
        return f"upsampling method must be {METHOD!r}; got {up.get('method')!r}"
    try:
        sigma_hu, sigma_cells = float(up["sigma_hu"]), float(up["sigma_cells"])
        radius = up["radius_cells"]
    except (KeyError, TypeError, ValueError):
        return "upsampling needs sigma_hu and sigma_cells (numbers) and radius_cells"
    if not (sigma_hu > 0 and math.isfinite(sigma_hu) and sigma_cells > 0
            and math.isfinite(sigma_cells)):
        return "upsampling sigma_hu and sigma_cells must be positive"
    if not isinstance(radius, int) or isinstance(radius, bool) or not 1 <= radius <= 3:
        return f"upsampling radius_cells must be an int 1 to 3; got {radius!r}"
    return None


def guided(card: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    """The card's HU-guided upsampling parameters, or None (bilinear)."""
    up = card.get(KEY)
    if up is None:
        return None
    problem = check_upsampling(up)
    if problem:
        raise ValueError(f"model card: {problem}")
    return up


def parameters(card: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The card's upsampling field less its command (what provenance, DICOM SEG and the
    model version record: the same weights upsampled otherwise give other numbers), or
    None when the card has none."""
    up = card.get(KEY)
    return {k: v for k, v in up.items() if k != "command"} if isinstance(up, Mapping) else None


def applies(card: Mapping[str, Any], cells: Sequence[int], input_shape: Sequence[int]) -> bool:
    """Whether the card's maps are upsampled guided by the HU for a slice: it says so and the
    slice's grid input_shape (J, I) is finer than the network's cells (h, w) on both axes."""
    return (guided(card) is not None and int(input_shape[0]) > int(cells[0])
            and int(input_shape[1]) > int(cells[1]))


def describe(card: Mapping[str, Any]) -> str:
    """One line for notes and the panel: how this model's maps reach the input grid."""
    up = guided(card)
    if up is None:
        return "soft maps upsampled bilinearly"
    return (f"soft maps upsampled guided by the HU (sigma {float(up['sigma_hu']):g} HU; "
            f"in network pixels, sigma {float(up['sigma_cells']):g}, radius "
            f"{int(up['radius_cells'])})")


def _window_max(x, r: int):
    """Maximum over the (2 r + 1)^2 cells around each cell of x (n, C, h, w), the edge
    cells repeated beyond the edges."""
    import torch
    from torch.nn import functional as F

    h, w = int(x.shape[-2]), int(x.shape[-1])
    xp = F.pad(x, (r, r, r, r), mode="replicate")
    rows = xp[..., 0:h, :]
    for d in range(1, 2 * r + 1):
        rows = torch.maximum(rows, xp[..., d:d + h, :])
    out = rows[..., 0:w]
    for d in range(1, 2 * r + 1):
        out = torch.maximum(out, rows[..., d:d + w])
    return out


#: Cells whose neighbours all give one class at least 1 - this are upsampled bilinearly:
#: those probability vectors differ by at most this, both results are weighted means of
#: them, so they differ there by at most this too; most of a slice (air, the inside of
#: organs and fat) is spared.
TOLERANCE = 0.01


def guided_upsample(probs, guide, factor: int, *, sigma_hu: float, sigma_cells: float = 1.0,
                    radius_cells: int = 1, tolerance: float = TOLERANCE):
    """Soft maps (n, C, h, w) torch float -> (n, C, rows, cols) float32 on their device,
    guided by ``guide`` (n, rows, cols), the slices' HU on the full-resolution grid the
    network's input was averaged from (rows <= h k, cols <= w k; the window means at the
    far edges over the pixels they hold, as the network's input).

    Output pixel j (per axis) lies at network coordinate (j + 0.5) / k - 0.5, as in the
    bilinear path (inference.upsample_soft_fast); the cells beyond the edges repeat the edge
    cell's. Only the cells whose (2 radius + 1)^2 neighbourhood is not one class at
    1 - ``tolerance`` or more throughout are computed (gathered, k x k pixels each); the rest
    keep the bilinear result (see TOLERANCE)."""
    import torch
    from torch.nn import functional as F

    k = int(factor)
    n, C, h, w = (int(v) for v in probs.shape)
    rows, cols = int(guide.shape[-2]), int(guide.shape[-1])
    if int(guide.shape[0]) != n or not (0 < rows <= h * k and 0 < cols <= w * k) \
            or rows <= (h - 1) * k or cols <= (w - 1) * k:
        raise ValueError(f"guide {tuple(guide.shape)} does not match soft maps "
                         f"{tuple(probs.shape)} at factor {k}")
    p = probs.float()
    if k == 1:
        return p
    g = guide.to(device=p.device, dtype=torch.float32)
    r = int(radius_cells)
    bil = F.interpolate(p, scale_factor=(k, k), mode="bilinear", align_corners=False,
                        recompute_scale_factor=False).contiguous()       # (n, C, h k, w k)
    # the cells whose neighbourhood holds one class at >= 1 - tolerance everywhere: their
    # probability vectors differ by at most the tolerance (one pass over the classes, then
    # running extremes of one channel: a third of the time of the extremes of every class)
    top, cls = p.max(1, keepdim=True)                                            # (n, 1, h, w)
    cls = cls.to(p.dtype)
    sure = ((-_window_max(-top, r) >= 1.0 - float(tolerance))
            & (_window_max(cls, r) == -_window_max(-cls, r)))
    cells = torch.nonzero(~sure.reshape(-1)).reshape(-1)
    if cells.numel():
        # the network input's window means, partial windows at the far edges over their pixels
        cell_hu = F.avg_pool2d(g[:, None], k, stride=k, ceil_mode=True)           # (n, 1, h, w)
        hp, wp = h + 2 * r, w + 2 * r
        pp = F.pad(p, (r, r, r, r), mode="replicate").transpose(0, 1).reshape(C, -1)  # (C, n hp wp)
        gp = F.pad(cell_hu, (r, r, r, r), mode="replicate").reshape(-1)
        ni, rest = cells // (h * w), cells % (h * w)
        yi, xi = rest // w, rest % w
        offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
        shift = torch.tensor([dy * wp + dx for dy, dx in offsets], device=p.device)
        tap = ((ni * (hp * wp) + (yi + r) * wp + (xi + r))[None, :]
               + shift[:, None])                                                    # (T, m)
        T_ = len(offsets)
        taps_g = gp[tap]                                                            # (T, m)
        taps_p = pp[:, tap]                                                         # (C, T, m)
        # each cell's k x k pixels (their flat index in one output plane), those beyond the
        # grid's edge clamped to it for the guide; cells last, so that the weights' softmax
        # and the weighted sum run along contiguous cells, not along 9 taps or 6 classes
        a = torch.arange(k, device=p.device)
        prow = (yi * k)[None, :] + a[:, None]                                       # (k, m)
        pcol = (xi * k)[None, :] + a[:, None]
        at = (prow[:, None, :] * (w * k) + pcol[None, :, :]).reshape(k * k, -1)     # (k k, m)
        pix = g.reshape(-1)[((ni * rows)[None, None, :]
                             + torch.clamp(prow, max=rows - 1)[:, None, :]) * cols
                            + torch.clamp(pcol, max=cols - 1)[None, :, :]].reshape(k * k, -1)
        u = (torch.arange(k, dtype=torch.float32, device=p.device) + 0.5) / k - 0.5
        dy_t = torch.tensor([o[0] for o in offsets], dtype=torch.float32, device=p.device)
        dx_t = torch.tensor([o[1] for o in offsets], dtype=torch.float32, device=p.device)
        dist2 = ((u[None, :, None] - dy_t[:, None, None]) ** 2
                 + (u[None, None, :] - dx_t[:, None, None]) ** 2)                  # (T, k, k)
        log_s = -dist2.reshape(T_, k * k, 1) / (2.0 * float(sigma_cells) ** 2)
        diff = pix[None] - taps_g[:, None, :]                                       # (T, k k, m)
        wgt = torch.softmax(torch.addcmul(log_s, diff, diff,
                                          value=-1.0 / (2.0 * float(sigma_hu) ** 2)), dim=0)
        res = wgt[0].unsqueeze(1) * taps_p[:, 0].unsqueeze(0)                       # (k k, C, m)
        for t in range(1, T_):
            res.addcmul_(wgt[t].unsqueeze(1), taps_p[:, t].unsqueeze(0))
        # into bil (n, C, h k, w k): plane (ni, c), pixel at
        plane = (ni[:, None] * C + torch.arange(C, device=p.device)[None]) * (h * k * w * k)
        flat = at[:, None, :] + plane.t()[None]                                     # (k k, C, m)
        bil.view(-1).index_put_((flat.reshape(-1),), res.reshape(-1))
    return bil[..., :rows, :cols]
