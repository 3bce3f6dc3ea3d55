"""Statistics that compare the phantom with real CT, measured the same way on both.

Image statistics use only HU (so they run on real scans): the body outline, fat and soft
tissue areas and mean HU by plain HU rules (GUIDE section 6), and the local noise in fat.
Label statistics (phantom, or any label map): IMAT share of muscle, mixed windows under
downsampling, what nearest and argmax-of-EPD do to each tissue's area, and how close EPD of
the hard labels comes to the true fractions.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import numpy as np

from EPDSegmentationLib.core.classes import NUM_CLASSES
from EPDSegmentationLib.core.epd import epd_image, epd_labels, nearest_labels

FAT_HU = (-190.0, -30.0)
SOFT_HU = (-29.0, 150.0)
MUS, IMAT, SAT, VAT, MSC = 1, 2, 3, 4, 5


def body_mask(hu: np.ndarray, pixel_mm: float) -> np.ndarray:
    """The patient's body in an axial slice (H, W): HU > -500, thin table lines and arms cut
    off by a 3 mm opening, the largest piece kept, holes (bowel gas) filled."""
    from scipy import ndimage

    mask = hu > -500
    r = max(1, int(round(3.0 / pixel_mm)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    mask = ndimage.binary_opening(mask, structure=(xx ** 2 + yy ** 2) <= r * r)
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
    return ndimage.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))


def image_stats(hu: np.ndarray, pixel_mm: float) -> Dict[str, float]:
    """Body width and depth (cm), fat and soft tissue area (cm^2) and mean HU inside the
    body, and the local noise SD in fat (HU): median over 5 x 5 windows wholly inside fat
    that is at least 3 mm from any other tissue."""
    from scipy import ndimage

    body = body_mask(hu, pixel_mm)
    rows, cols = np.nonzero(body)
    px_cm2 = (pixel_mm / 10) ** 2
    fat = body & (hu >= FAT_HU[0]) & (hu <= FAT_HU[1])
    soft = body & (hu >= SOFT_HU[0]) & (hu <= SOFT_HU[1])
    out = {
        "width_cm": (cols.max() - cols.min() + 1) * pixel_mm / 10 if len(cols) else 0.0,
        "ap_cm": (rows.max() - rows.min() + 1) * pixel_mm / 10 if len(rows) else 0.0,
        "fat_cm2": float(fat.sum() * px_cm2),
        "fat_mean_hu": float(hu[fat].mean()) if fat.any() else float("nan"),
        "soft_cm2": float(soft.sum() * px_cm2),
        "soft_mean_hu": float(hu[soft].mean()) if soft.any() else float("nan"),
    }
    # uniform fat: a smoothed fat mask, eroded so every 5 x 5 window lies in fat
    smooth_fat = body & (ndimage.uniform_filter(hu, 5) < -60) & (ndimage.uniform_filter(hu, 5) > -160)
    r = max(2, int(round(3.0 / pixel_mm)))
    core = ndimage.binary_erosion(smooth_fat, iterations=r)
    if core.sum() > 50:
        m1 = ndimage.uniform_filter(hu.astype(np.float64), 5)
        m2 = ndimage.uniform_filter(hu.astype(np.float64) ** 2, 5)
        sd = np.sqrt(np.maximum(m2 - m1 ** 2, 0) * 25 / 24)
        out["fat_noise_sd_hu"] = float(np.median(sd[core]))
    else:
        out["fat_noise_sd_hu"] = float("nan")
    return out


def label_stats(labels: np.ndarray, hu: Optional[np.ndarray] = None,
                pure: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Tissue areas in pixels, IMAT as % of muscle, and (with hu) mean HU per class over
    ``pure`` pixels (default: every pixel of the class)."""
    counts = np.bincount(labels.ravel(), minlength=NUM_CLASSES).astype(float)
    out = {"imat_pct_of_muscle": 100 * counts[IMAT] / max(counts[MUS], 1)}
    if hu is not None:
        for c, key in ((MUS, "muscle"), (SAT, "sat"), (VAT, "vat"), (IMAT, "imat")):
            sel = labels == c
            if pure is not None:
                sel &= pure
            out[f"{key}_mean_hu"] = float(hu[sel].mean()) if sel.any() else float("nan")
    return out


def mixed_window_pct(labels: np.ndarray, k: int, merge_other: bool = False) -> float:
    """% of the k x k windows of a label map (H, W) holding more than one class. With
    merge_other, class 5 (other tissue) counts as background, as in a label map that
    holds only muscle, IMAT, SAT and VAT."""
    lab = labels.copy()
    if merge_other:
        lab[lab == MSC] = 0
    soft = epd_labels(lab, NUM_CLASSES, k, workers=1)
    return float(100 * np.mean(soft.max(axis=0) < 1))


def downsampling_area_errors(labels: np.ndarray, k: int, cls: int) -> Dict[str, float]:
    """Relative area errors (%) of one class after downsampling a hard label map by k:
    nearest (signed), and argmax of the EPD fractions (signed); EPD itself keeps it."""
    full = float(np.sum(labels == cls))
    if full == 0:
        return {"nearest_pct": float("nan"), "epd_argmax_pct": float("nan")}
    near = float(np.sum(nearest_labels(labels, k) == cls)) * k * k
    soft = epd_labels(labels, NUM_CLASSES, k, workers=1)
    arg = float(np.sum(np.argmax(soft, axis=0) == cls)) * k * k
    return {"nearest_pct": 100 * (near - full) / full, "epd_argmax_pct": 100 * (arg - full) / full}


def epd_vs_truth(labels: np.ndarray, fractions: np.ndarray, k: int) -> Dict[str, object]:
    """How close EPD of the hard labels (H, W) comes to the true fractions (C, H, W) at 1/k.

    The true fractions at 1/k are the window means of the true fractions at full size (area
    fractions average exactly). Returns the mean absolute difference over all windows and
    classes ('mae'), the same over mixed windows only ('mae_mixed'), the same for nearest
    labels as one-hot ('mae_nearest'), and per class the hard-label area error against the
    true area in % ('area_err_pct', which EPD keeps unchanged at every k)."""
    truth = epd_image(fractions, k)
    est = epd_labels(labels, NUM_CLASSES, k, workers=1)
    near = nearest_labels(labels, k)
    near_1h = (near[None] == np.arange(NUM_CLASSES)[:, None, None]).astype(np.float32)
    diff = np.abs(est - truth)
    mixed = truth.max(axis=0) < 1 - 1e-6
    true_area = fractions.reshape(NUM_CLASSES, -1).sum(axis=1)
    hard_area = np.bincount(labels.ravel(), minlength=NUM_CLASSES)
    with np.errstate(divide="ignore", invalid="ignore"):
        area_err = 100 * (hard_area - true_area) / true_area
    return {"mae": float(diff.mean()),
            "mae_mixed": float(diff[:, mixed].mean()) if mixed.any() else 0.0,
            "mae_nearest": float(np.abs(near_1h - truth).mean()),
            "area_err_pct": area_err.tolist()}


def summarize(values: Iterable[float]) -> str:
    """'mean (min..max)' of finite values."""
    v = np.array([x for x in values if np.isfinite(x)], float)
    if len(v) == 0:
        return "n/a"
    return f"{v.mean():.1f} ({v.min():.1f}..{v.max():.1f})"


def mean_abs(values: Sequence[float]) -> float:
    v = np.array([x for x in values if np.isfinite(x)], float)
    return float(np.abs(v).mean()) if len(v) else float("nan")
