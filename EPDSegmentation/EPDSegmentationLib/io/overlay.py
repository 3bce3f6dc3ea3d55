"""Quick-review PNG: one CT slice with the tissue overlay, a legend and the tissue areas."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Tuple

import numpy as np

from ..core.atomic import atomic_file, check_target
from ..core.classes import TISSUES, color_table


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
                      protocol_cm2: Optional[Mapping[str, float]] = None,
                      title: str = "", overwrite: bool = False) -> Path:
    """Write the overlay of one slice, with a title and a legend of the tissue areas.

    hu: (J, I) HU; labels: (J, I) classes; areas_cm2: tissue key -> (soft, hard) area in cm^2;
    protocol_cm2: tissue key -> HU-protocol area in cm^2 (``--protocol``), a line of its own
    so that it is not read as the network's.
    Drawn with Pillow (a fraction of matplotlib's time, which matters for one-slice runs).
    Written atomically; an existing file is kept unless ``overwrite``.
    """
    from PIL import Image, ImageDraw, ImageFont

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_target(path, overwrite)  # fail before the work, not after
    rgb = (overlay_rgb(hu, labels) * 255 + 0.5).astype(np.uint8)
    scale = max(1, 512 // max(rgb.shape[:2]))  # small grids are enlarged, pixel for pixel
    image = Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale),
                                        Image.NEAREST)
    font = ImageFont.load_default(size=14)
    line, cols = 22, 2
    rows = -(-len(TISSUES) // cols) + (1 if protocol_cm2 else 0)
    width = max(image.width, 560)
    canvas = Image.new("RGB", (width, image.height + line * (rows + 1) + 8), "black")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 4), title, fill="white", font=font)
    canvas.paste(image, ((width - image.width) // 2, line))
    colours = color_table(np.uint8)
    for n, c in enumerate(TISSUES):
        x = 8 + (n % cols) * (width // cols)
        y = image.height + line + 6 + (n // cols) * line
        draw.rectangle([x, y + 2, x + 14, y + 16], fill=tuple(int(v) for v in colours[c.index]))
        text = c.key
        if areas_cm2 and c.key in areas_cm2:
            soft, hard = areas_cm2[c.key]
            text += f"  {soft:.1f} cm^2 (hard {hard:.1f})"
        draw.text((x + 20, y), text, fill="white", font=font)
    if protocol_cm2:
        draw.text((8, image.height + line + 6 + (rows - 1) * line),
                  "HU protocol: " + ", ".join(f"{k} {v:.1f}" for k, v in protocol_cm2.items())
                  + " cm^2", fill="white", font=font)
    with atomic_file(path, overwrite) as tmp:
        canvas.save(tmp, format="PNG")
    return path
