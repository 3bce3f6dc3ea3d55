"""The demo job: EPD against nearest downsampling on the built-in label map.

Prints, for factors 2, 4 and 8, each tissue's area (cm^2) at full resolution, after nearest
downsampling and after EPD, and writes a comparison PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from ..core.atomic import atomic_file
from ..core.classes import CLASSES, NUM_CLASSES, TISSUES, color_table
from ..core.epd import epd_labels, nearest_labels, soft_pixel_counts
from ..core.example import PIXEL_MM, example_labels


def area_table(labels: np.ndarray, factors: Sequence[int], pixel_mm: float) -> Dict:
    """Per tissue and factor, area in cm^2: {'full': (C,), k: {'nearest': (C,), 'epd': (C,)}}."""
    px_cm2 = (pixel_mm / 10.0) ** 2
    full = np.bincount(labels.ravel(), minlength=NUM_CLASSES) * px_cm2
    table: Dict = {"full": full}
    for k in factors:
        near = nearest_labels(labels, k)
        soft = epd_labels(labels, NUM_CLASSES, k)
        table[k] = {
            # a low-resolution pixel stands for k x k input pixels
            "nearest": np.bincount(near.ravel(), minlength=NUM_CLASSES) * px_cm2 * k * k,
            "epd": soft_pixel_counts(soft, labels.shape, k) * px_cm2,
            "soft": soft,
            "near": near,
        }
    return table


def format_table(table: Dict, factors: Sequence[int]) -> str:
    head = f"{'tissue':<6} {'full cm2':>9}"
    for k in factors:
        head += f" | 1/{k} nearest  err%    EPD  err%"
    lines = [head, "-" * len(head)]
    for c in TISSUES:
        full = table["full"][c.index]
        row = f"{c.key:<6} {full:9.2f}"
        for k in factors:
            n, e = table[k]["nearest"][c.index], table[k]["epd"][c.index]
            row += (f" | {n:12.2f} {100 * (n - full) / full:+5.1f} {e:6.2f}"
                    f" {100 * (e - full) / full:+5.1f}")
        lines.append(row)
    return "\n".join(lines)


def soft_rgb(soft: np.ndarray) -> np.ndarray:
    """Blend class colours by their fractions: (C, h, w) -> (h, w, 3) in 0..1."""
    return np.einsum("chw,cd->hwd", soft, color_table())


def write_figure(labels: np.ndarray, table: Dict, factors: Sequence[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = color_table()
    # A crop of the back muscles, where IMAT streaks are one or two pixels thin.
    y0, y1, x0, x1 = 296, 392, 152, 280
    fig, axes = plt.subplots(2, len(factors) + 1, figsize=(3.2 * (len(factors) + 1), 6.4))
    for row in axes:
        row[0].imshow(colors[labels[y0:y1, x0:x1]], interpolation="nearest")
        row[0].set_title("full resolution")
    for j, k in enumerate(factors, start=1):
        sl = (slice(y0 // k, -(-y1 // k)), slice(x0 // k, -(-x1 // k)))
        axes[0, j].imshow(colors[table[k]["near"][sl]], interpolation="nearest")
        axes[0, j].set_title(f"nearest 1/{k}")
        axes[1, j].imshow(soft_rgb(table[k]["soft"][(slice(None),) + sl]), interpolation="nearest")
        axes[1, j].set_title(f"EPD 1/{k} (colours mixed by fraction)")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.legend(handles=[Patch(color=colors[c.index], label=c.key) for c in TISSUES],
               loc="lower center", ncol=len(TISSUES))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    try:
        with atomic_file(path, overwrite=True) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def run(output_dir: Path, factors: Sequence[int] = (2, 4, 8), overwrite: bool = False) -> Path:
    """Run the demo; returns the PNG path. Refuses to replace an existing PNG unless asked."""
    output_dir = Path(output_dir)
    path = output_dir / "epd_vs_nearest.png"
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    output_dir.mkdir(parents=True, exist_ok=True)
    labels = example_labels()
    table = area_table(labels, factors, PIXEL_MM)
    print(f"Built-in label map {labels.shape[0]} x {labels.shape[1]}, {PIXEL_MM} mm pixels: "
          f"tissue area (cm^2) kept by each downsampling")
    print(format_table(table, factors))
    write_figure(labels, table, factors, path)
    print(f"wrote {path}")
    return path


__all__ = ["run", "area_table", "format_table", "CLASSES"]
