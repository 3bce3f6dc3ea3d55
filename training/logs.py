"""Run logs on rank 0: the per-epoch CSV, TensorBoard scalars and PNG plots of loss and metrics.

The CSV and plots are rewritten from the whole history after every epoch (atomically), so a
resumed run's log is the uninterrupted run's log.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Dict, List, Sequence

from EPDSegmentationLib.core.atomic import atomic_write

Row = Dict[str, float]


def atomic_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (core.atomic.atomic_write)."""

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def write_csv(path: Path, history: Sequence[Row]) -> None:
    """One row per epoch; columns are the union of the rows' keys in first-seen order."""
    columns: List[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    atomic_bytes(Path(path), buf.getvalue().encode())


def read_csv(path: Path) -> List[Dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
                for row in csv.DictReader(f)]


def _fmt(v):
    if isinstance(v, float):  # also NumPy floats
        return repr(float(v))  # every bit, so logs of two runs compare exactly
    return v


class TensorBoard:
    """Scalars under <run>/tensorboard, one step per epoch (1-based). Events an earlier run
    in the folder logged from the start epoch on are purged (all of them when starting
    over), so the curves show the resumed run once."""

    def __init__(self, folder: Path, start_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=start_epoch + 1)

    def log(self, row: Row) -> None:
        epoch = int(row["epoch"])
        for key, value in row.items():
            if key == "epoch" or not isinstance(value, (int, float)) or math.isnan(value):
                continue
            group = "train" if key.startswith(("train_", "sigma_")) else (
                "val" if key.startswith("val_") else "run")
            self.writer.add_scalar(f"{group}/{key}", value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def plot_history(folder: Path, history: Sequence[Row]) -> List[Path]:
    """loss.png (training and validation loss) and metrics.png (validation metrics, low and
    full resolution) in ``folder``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in history]
    written = []

    def col(key):
        return [r.get(key, math.nan) for r in history]

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(epochs, col("train_loss"), "o-", label="training")
    if any(not math.isnan(v) for v in col("val_loss")):
        ax.plot(epochs, col("val_loss"), "s-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(save_figure(fig, folder / "loss.png"))

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, label in (("val_dice", "Dice (low res)"), ("val_iou", "IoU (low res)"),
                       ("val_soft_dice", "soft Dice (low res)"),
                       ("val_full_dice", "Dice (full res)"), ("val_full_iou", "IoU (full res)")):
        values = col(key)
        if any(not math.isnan(v) for v in values):
            ax.plot(epochs, values, "o-", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean over tissue classes")
    ax.set_ylim(0, 1)
    ax.set_title("Validation metrics")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(save_figure(fig, folder / "metrics.png"))
    return written


def save_figure(fig, path: Path, tight: bool = True, dpi=None) -> Path:
    """Write a matplotlib figure as PNG atomically (dpi: matplotlib's default when None)
    and close it; returns ``path``."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        if tight:
            fig.tight_layout()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    atomic_bytes(path, buf.getvalue())
    return path
