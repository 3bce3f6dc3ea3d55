"""A sagittal picture of how the vertebral levels were found, so a person can check them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..core.atomic import atomic_file, check_target


def write_level_png(path, sagittal_hu: np.ndarray, spacing_jk_mm: Sequence[float], levels,
                    chosen: Optional[str] = "L3", *, k_up: bool = True, title: str = "",
                    overwrite: bool = False) -> Path:
    """Write the midline sagittal image (K, J) in HU with a thin line at each disc found, a
    label at each level centre and a thick line at ``chosen``.

    spacing_jk_mm: (J, K) pixel size in mm, so the picture has true proportions; k_up: K
    runs towards superior (drawn upwards). ``levels`` is a core.levels.Levels. Atomic; an
    existing file is kept unless ``overwrite``."""
    from PIL import Image, ImageDraw, ImageFont

    path = Path(path)
    check_target(path, overwrite)
    sag = np.asarray(sagittal_hu, np.float32)
    K, J = sag.shape
    sj, sk = (float(s) for s in spacing_jk_mm)
    grey = (np.clip((sag + 200.0) / 900.0, 0, 1) * 255 + 0.5).astype(np.uint8)
    grey = grey[::-1] if k_up else grey          # image rows run downwards
    # 1 pixel = 1 mm at least, 600 px high at most
    scale = min(4.0, 600.0 / max(K * sk, 1.0))
    size = (max(1, int(J * sj * scale)), max(1, int(K * sk * scale)))
    image = Image.fromarray(grey).resize(size, Image.BILINEAR).convert("RGB")

    def row(k: float) -> float:
        y = (k + 0.5) * sk * scale
        return size[1] - y if k_up else y

    font = ImageFont.load_default(size=13)
    margin = 180
    canvas = Image.new("RGB", (size[0] + margin, size[1] + 24), "black")
    canvas.paste(image, (0, 24))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill="white", font=font)
    for name, k in zip(levels.disc_names, levels.discs):
        y = 24 + row(k)
        draw.line([(0, y), (size[0], y)], fill=(0, 200, 255), width=1)
        draw.text((size[0] + 4, y - 7), f"disc {name}", fill=(0, 200, 255), font=font)
    y = 24 + row(levels.crest_k)
    draw.line([(0, y), (size[0], y)], fill=(255, 160, 0), width=1)
    draw.text((size[0] + 4, y - 7), "iliac crest", fill=(255, 160, 0), font=font)
    for name, k in levels.centres.items():
        y = 24 + row(k)
        bold = chosen is not None and name == chosen.upper()
        colour = (255, 60, 60) if bold else (255, 255, 0)
        draw.line([(0, y), (size[0], y)], fill=colour, width=3 if bold else 1)
        draw.text((size[0] + 90, y - 7), f"{name} K={k:.1f}", fill=colour, font=font)
    with atomic_file(path, overwrite) as tmp:
        canvas.save(tmp, format="PNG")
    return path
