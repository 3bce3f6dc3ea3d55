"""The phantom-versus-real statistics table of docs/data.md.

    python -m training.phantom stats --subjects 40

Phantom: one mid-L3 slice (z = 0, 512 x 512) of each of subjects 0..n-1. Real: the shared
TotalSegmentator sample (clinical DICOM series at T11/T12; abdomen NIfTI at L3, 3 mm voxels;
tissue masks on the T11-L2 NIfTI), measured by the same functions (stats.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from EPDSegmentationLib.io import read_labels, read_volume
from EPDSegmentationLib.io.images import read_itk

from .generate import make_slice
from .sheet import SHARED_CANDIDATES, shared_sample_dir
from .stats import (IMAT, MUS, SAT, VAT, downsampling_area_errors, epd_vs_truth, image_stats,
                    label_stats, mean_abs, mixed_window_pct, summarize)

FACTORS = (2, 4, 8)


def phantom_rows(n_subjects: int, progress: bool = True) -> List[Dict[str, object]]:
    from tqdm import tqdm

    rows = []
    for seed in tqdm(range(n_subjects), desc="phantom slices", disable=not progress):
        s = make_slice(seed)
        row: Dict[str, object] = dict(image_stats(s.hu, s.pixel_mm))
        pure = s.fractions.max(axis=0) >= 1.0
        row.update(label_stats(s.labels, s.hu, pure))
        for k in FACTORS:
            row[f"mixed_{k}"] = mixed_window_pct(s.labels, k)
            row[f"mixed4_{k}"] = mixed_window_pct(s.labels, k, merge_other=True)
            for c, key in ((IMAT, "imat"), (MUS, "mus"), (SAT, "sat"), (VAT, "vat")):
                e = downsampling_area_errors(s.labels, k, c)
                row[f"near_{key}_{k}"] = e["nearest_pct"]
                row[f"argmax_{key}_{k}"] = e["epd_argmax_pct"]
            t = epd_vs_truth(s.labels, s.fractions, k)
            row[f"epd_mae_{k}"] = t["mae"]
            row[f"epd_mae_mixed_{k}"] = t["mae_mixed"]
            row[f"near_mae_{k}"] = t["mae_nearest"]
            if k == FACTORS[0]:
                for c, key in ((MUS, "mus"), (IMAT, "imat"), (SAT, "sat"), (VAT, "vat")):
                    row[f"hard_area_err_{key}"] = t["area_err_pct"][c]
        rows.append(row)
    return rows


def real_rows(shared: Path) -> Dict[str, List[Dict[str, float]]]:
    """Image statistics per real slice: 'dicom' (T11/T12, 0.98 mm), 'l3' (3 mm), and mean HU
    inside the TotalSegmentator tissue masks ('masks')."""
    out: Dict[str, List[Dict[str, float]]] = {"dicom": [], "l3": [], "masks": []}
    dcm = shared / "ct_dicom"
    if dcm.is_dir():
        v = read_volume(dcm)
        out["dicom"] = [image_stats(a, v.spacing[0]) for a in v.array]
    abd, struct = shared / "ct_abdomen_pelvis.nii.gz", shared / "ct_abdomen_pelvis_structures.nii.gz"
    if abd.is_file() and struct.is_file():
        v = read_volume(abd)
        lab = read_itk(struct).array
        for k in np.nonzero((lab == 29).any(axis=(1, 2)))[0]:
            out["l3"].append(image_stats(v.array[k], v.spacing[0]))
    ct = shared / "ct_t11_l2.nii.gz"
    names = {"muscle": "skeletal_muscle", "sat": "subcutaneous_fat", "vat": "torso_fat"}
    if ct.is_file():
        v = read_volume(ct)
        masks = {key: read_labels(shared / f"tissue_{n}.nii.gz", like=v).array > 0
                 for key, n in names.items()}
        for k in range(v.array.shape[0]):
            row = {f"{key}_mean_hu": float(v.array[k][m[k]].mean()) for key, m in masks.items()
                   if m[k].any()}
            out["masks"].append(row)
    return out


def _col(rows, key, fmt=summarize):
    return fmt([r.get(key, float("nan")) for r in rows])


def report(n_subjects: int = 40, shared: Optional[Path] = None, progress: bool = True) -> str:
    """The markdown tables (phantom beside real CT)."""
    shared = (shared_sample_dir() or SHARED_CANDIDATES[0]) if shared is None else Path(shared)
    ph = phantom_rows(n_subjects, progress)
    real = real_rows(shared) if shared.is_dir() else {"dicom": [], "l3": [], "masks": []}
    lines = [f"Phantom: {n_subjects} subjects (seeds 0..{n_subjects - 1}), one mid-L3 slice "
             f"each. Values: mean (min..max) over slices.", "",
             "| statistic | real L3, 13 clinical CTs (GUIDE section 6) | real, shared "
             "DICOM (T11/T12, 20 slices) | real, shared NIfTI at L3 (3 mm, "
             f"{len(real['l3'])} slices) | phantom |",
             "| --- | --- | --- | --- | --- |"]
    guide = {"width_cm": "27 to 38", "ap_cm": "18 to 30", "fat_cm2": "40 to 500",
             "fat_mean_hu": "-69 to -114", "soft_cm2": "190 to 420",
             "soft_mean_hu": "36 to 58", "fat_noise_sd_hu": "11 to 16"}
    names = {"width_cm": "body width (cm)", "ap_cm": "body front to back (cm)",
             "fat_cm2": "fat -190..-30 HU in body (cm^2)", "fat_mean_hu": "its mean HU",
             "soft_cm2": "soft tissue -29..150 HU (cm^2)", "soft_mean_hu": "its mean HU",
             "fat_noise_sd_hu": "noise: local SD in fat, 5x5 (HU)"}
    for key, label in names.items():
        lines.append(f"| {label} | {guide[key]} | {_col(real['dicom'], key)} | "
                     f"{_col(real['l3'], key)} | {_col(ph, key)} |")
    lines += ["", "| mean HU inside the tissue | real (shared T11-L2 NIfTI, TotalSegmentator "
                  "masks; GUIDE: 18, -92, -84) | phantom (pure pixels of the class) |",
              "| --- | --- | --- |"]
    for key, label in (("muscle", "skeletal muscle"), ("sat", "SAT"), ("vat", "VAT (real: torso fat)")):
        lines.append(f"| {label} | {_col(real['masks'], key + '_mean_hu')} | "
                     f"{_col(ph, key + '_mean_hu')} |")
    lines.append(f"| IMAT (% of muscle area) | no IMAT mask (GUIDE: a few %) | "
                 f"{_col(ph, 'imat_pct_of_muscle')} |")
    lines += ["", "Downsampling the hard 512 x 512 labels (GUIDE: a real L3 label map of muscle, "
                  "SAT, VAT, IMAT, 12 slices):", "",
              "| at 1/k | mixed windows, GUIDE | phantom, MSC as background | phantom, all 6 "
              "classes | nearest IMAT area error, GUIDE | phantom (mean abs, signed range) | "
              "IMAT lost by argmax of EPD, GUIDE | phantom |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    g_mixed, g_near, g_arg = {2: "3%", 4: "10%", 8: "22%"}, {2: "5%", 4: "9%", 8: "26%"}, \
        {2: "29%", 4: "36%", 8: "88%"}
    for k in FACTORS:
        near = [r[f"near_imat_{k}"] for r in ph]
        lines.append(f"| 1/{k} | {g_mixed[k]} | {_col(ph, f'mixed4_{k}')}% | "
                     f"{_col(ph, f'mixed_{k}')}% | {g_near[k]} | {mean_abs(near):.1f}% "
                     f"({min(near):+.0f}..{max(near):+.0f}) | {g_arg[k]} | "
                     f"{-np.mean([r[f'argmax_imat_{k}'] for r in ph]):.0f}% |")
    lines.append("")
    lines.append("Nearest downsampling, mean absolute area error of the large tissues "
                 "(GUIDE: 0.1 to 0.8%): " + ", ".join(
                     f"1/{k}: " + " ".join(f"{key.upper()} {mean_abs([r[f'near_{key}_{k}'] for r in ph]):.2f}%"
                                            for key in ("mus", "sat", "vat")) for k in FACTORS))
    lines += ["", "EPD of the hard 512 x 512 labels against the true fractions (window means of "
                  "the exact per-pixel fractions), mean absolute difference per class and "
                  "window:", "",
              "| at 1/k | EPD of hard labels, all windows | EPD, mixed windows only | "
              "nearest (one-hot), all windows |", "| --- | --- | --- | --- |"]
    for k in FACTORS:
        lines.append(f"| 1/{k} | {np.mean([r[f'epd_mae_{k}'] for r in ph]):.4f} | "
                     f"{np.mean([r[f'epd_mae_mixed_{k}'] for r in ph]):.4f} | "
                     f"{np.mean([r[f'near_mae_{k}'] for r in ph]):.4f} |")
    lines += ["", "Area of each class in the hard 512 labels against its true area (EPD keeps "
                  "the hard-label area at every factor, so this is EPD's area error against "
                  "the truth): " + ", ".join(
                      f"{key.upper()} {_col(ph, 'hard_area_err_' + key)}%"
                      for key in ("mus", "imat", "sat", "vat")) + " (signed, mean (min..max))."]
    return "\n".join(lines)
