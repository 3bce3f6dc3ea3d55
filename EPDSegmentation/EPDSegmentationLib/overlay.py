"""Quick-review PNG: one CT slice with the tissue overlay, a legend and the tissue areas."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Tuple

import numpy as np

from .atomic import atomic_file, check_target
from .classes import TISSUES, color_table


def display_slice(volume, k: int, array: Optional[np.ndarray] = None) -> np.ndarray:
    """Slice k (J, I) of ``volume`` (or of ``array`` on its grid) turned to radiological
    display: anterior up, the patient's right on the left. Oblique grids come as stored."""
    a = (volume.array if array is None else array)[k]
    d = volume.directions
    if abs(d[0, 0]) < 0.9 or abs(d[1, 1]) < 0.9:
        return a
    if d[0, 0] > 0:        # I towards the patient's right: flip columns
        a = a[:, ::-1]
    if d[1, 1] > 0:        # J towards anterior: flip rows
        a = a[::-1, :]
    return a


def overlay_rgb(hu: np.ndarray, labels: np.ndarray, window: Tuple[float, float] = (-160, 240),
                alpha: float = 0.45) -> np.ndarray:
    """Grey CT (window in HU) with class colours blended in: (H, W) -> (H, W, 3) in 0..1."""
    lo, hi = window
    grey = np.clip((np.asarray(hu, np.float32) - lo) / (hi - lo), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    colours = color_table(np.float32)[np.asarray(labels)]
    mask = (np.asarray(labels) > 0)[..., None]
    return np.where(mask, (1 - alpha) * rgb + alpha * colours, rgb)


def write_overlay_png(path, hu: np.ndarray, labels: np.ndarray, *,
                      areas_cm2: Optional[Mapping[str, Tuple[float, float]]] = None,
                      title: str = "", overwrite: bool = False) -> Path:
    """Write the overlay of one slice.

    hu: (J, I) HU; labels: (J, I) classes; areas_cm2: tissue key -> (soft, hard) area in cm^2,
    printed in the legend. Written atomically; an existing file is kept unless ``overwrite``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_target(path, overwrite)  # fail before the work, not after
    fig, ax = plt.subplots(figsize=(7, 7.8))
    ax.imshow(overlay_rgb(hu, labels), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    colours = color_table()
    handles = []
    for c in TISSUES:
        label = c.key
        if areas_cm2 and c.key in areas_cm2:
            soft, hard = areas_cm2[c.key]
            label += f"  {soft:.1f} cm\u00b2 (hard {hard:.1f})"
        handles.append(Patch(color=colours[c.index], label=label))
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    try:
        with atomic_file(path, overwrite) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return path
