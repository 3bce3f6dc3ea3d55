"""CT intensity windows: HU slices to the network's three input channels.

Each window (lo, hi) in HU maps linearly to 0..1 and clips outside; the three windowed copies of
a slice are stacked as channels. The windows a model was trained with are recorded in its model
card and must be used at inference.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

#: HU of air: what the project pads images with (the field of view, training crops and
#: shifts, the randomised truncation)
AIR_HU = -1024.0

#: (name, lo HU, hi HU): a wide window (air, fat, soft tissue, bone), the abdominal soft-tissue
#: window (W400 L40), and a fat window that separates adipose tissue from muscle and water.
DEFAULT_WINDOWS: Tuple[Tuple[str, float, float], ...] = (
    ("wide", -1000.0, 1000.0),
    ("soft_tissue", -160.0, 240.0),
    ("fat", -200.0, 0.0),
)


def check_windows(windows: Sequence[Sequence]) -> Tuple[Tuple[str, float, float], ...]:
    """Validate (name, lo, hi) triples; lo < hi in HU."""
    out = []
    for w in windows:
        if len(w) != 3:
            raise ValueError(f"a window is (name, lo HU, hi HU); got {w!r}")
        name, lo, hi = str(w[0]), float(w[1]), float(w[2])
        if not lo < hi:
            raise ValueError(f"window {name!r} needs lo < hi; got {lo} .. {hi} HU")
        out.append((name, lo, hi))
    if not out:
        raise ValueError("at least one window is needed")
    return tuple(out)


def window_channels(hu, windows: Sequence[Sequence] = DEFAULT_WINDOWS):
    """Stack windowed copies of ``hu`` as channels.

    hu: HU values (..., H, W), NumPy array or torch tensor.
    Returns float32 (..., len(windows), H, W) in 0..1, of the same kind (NumPy or torch, on
    the same device).
    """
    windows = check_windows(windows)
    if type(hu).__module__.startswith("torch"):
        import torch

        x = hu.float().unsqueeze(-3)
        lo = torch.tensor([w[1] for w in windows], device=x.device).reshape(-1, 1, 1)
        hi = torch.tensor([w[2] for w in windows], device=x.device).reshape(-1, 1, 1)
        return (x - lo).div_(hi - lo).clamp_(0.0, 1.0)      # one scratch, the rest in place
    x = np.asarray(hu, dtype=np.float32)[..., None, :, :]
    lo = np.array([w[1] for w in windows], np.float32).reshape(-1, 1, 1)
    hi = np.array([w[2] for w in windows], np.float32).reshape(-1, 1, 1)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)
