"""Evaluate a model on a real CT volume against binary tissue masks from another source.

    python -m training evaluate-real --model Resources/Models/EPDBodyComp_f2.safetensors \
        --ct ../shared/data/totalseg-example/ct_t11_l2.nii.gz \
        --mask MUS=../shared/data/totalseg-example/tissue_skeletal_muscle.nii.gz \
        --mask SAT=../shared/data/totalseg-example/tissue_subcutaneous_fat.nii.gz \
        --mask VAT=../shared/data/totalseg-example/tissue_torso_fat.nii.gz \
        --output runs/realct

Each ``--mask KEY[+KEY...]=FILE`` compares the union of our classes KEY... (hard labels: the
argmax of the predicted probabilities on the CT's grid) with the mask, on the slices where
the mask has any voxel. Writes metrics.json, table.md (Dice, and the areas per slice in cm^2,
soft and hard, against the mask's), and overlay PNGs of three slices (prediction | mask).
The masks are another model's output, not ground truth: agreement, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from EPDSegmentationLib.core.atomic import write_text
from EPDSegmentationLib.core.classes import CLASSES, class_by_key
from EPDSegmentationLib.core.inference import predict_volume
from EPDSegmentationLib.io import read_labels, read_volume
from EPDSegmentationLib.io.overlay import display_slice, overlay_rgb

from .logs import save_figure


def parse_mask(spec: str) -> Tuple[List[int], Path]:
    """'MUS+IMAT=path' -> ([1, 2], Path('path'))."""
    keys, sep, path = spec.partition("=")
    if not sep or not keys or not path:
        raise ValueError(f"--mask wants KEY[+KEY...]=FILE; got {spec!r}")
    try:
        classes = [class_by_key(k).index for k in keys.split("+")]
    except KeyError as exc:
        raise ValueError(str(exc)) from None
    return classes, Path(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--ct", type=Path, required=True, help="CT volume (NIfTI, NRRD or DICOM)")
    p.add_argument("--mask", action="append", required=True, metavar="KEY[+KEY]=FILE",
                   help="binary mask on the CT's grid and the class keys it stands for")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--overwrite", action="store_true")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return float("nan") if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def evaluate_masks(probabilities: np.ndarray, masks: Sequence[Tuple[str, List[int], np.ndarray]],
                   pixel_area_mm2: float) -> Dict[str, Dict[str, float]]:
    """probabilities (C, K, J, I); masks: (name, classes, bool (K, J, I)). Per mask, on its
    slices: Dice of the union of the classes' argmax pixels, and mean areas per slice (cm^2):
    the mask's, ours soft (sum of the classes' probabilities) and hard."""
    labels = probabilities.argmax(axis=0)
    px_cm2 = pixel_area_mm2 / 100.0
    out = {}
    for name, classes, mask in masks:
        ks = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
        ours = np.isin(labels[ks], classes)
        soft = probabilities[classes][:, ks].sum(axis=0)
        out[name] = {
            "dice": dice(ours, mask[ks]),
            "slices": int(len(ks)),
            "mask_area_cm2": float(mask[ks].sum() * px_cm2 / max(len(ks), 1)),
            "soft_area_cm2": float(soft.sum() * px_cm2 / max(len(ks), 1)),
            "hard_area_cm2": float(ours.sum() * px_cm2 / max(len(ks), 1)),
        }
    return out


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> Path:
    from EPDSegmentationLib.core.model_io import load_model

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} holds results; pass --overwrite to replace them")
    model, card = load_model(args.model)
    ct = read_volume(args.ct)
    masks = []
    for spec in args.mask:
        classes, path = parse_mask(spec)
        m = read_labels(path, like=ct).array > 0
        masks.append(("+".join(CLASSES[c].key for c in classes) + f" vs {path.name}",
                      classes, m))
    si, sj, _ = ct.spacing
    pred = predict_volume(ct.array, (sj, si), model, card, device=args.device,
                          batch_size=args.batch_size, ijk_to_ras=ct.ijk_to_ras)
    result = evaluate_masks(pred.probabilities, masks, ct.pixel_area_mm2)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m training " + shlex.join(argv or [])
    payload = {"model": str(args.model), "ct": str(args.ct), "command": command,
               "device": pred.device, "notes": pred.notes, "results": result}
    write_text(out / "metrics.json", json.dumps(payload, indent=2), overwrite=True)
    lines = [f"Model `{args.model}` on `{args.ct}` ({ct.array.shape[2]} x {ct.array.shape[1]} "
             f"x {ct.array.shape[0]}, {si:.2f} x {sj:.2f} mm pixels). Made by `{command}`.", "",
             "| ours vs mask | slices | Dice | mask cm2/slice | ours soft | ours hard |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in result.items():
        lines.append(f"| {name} | {r['slices']} | {r['dice']:.3f} | {r['mask_area_cm2']:.1f} | "
                     f"{r['soft_area_cm2']:.1f} | {r['hard_area_cm2']:.1f} |")
    write_text(out / "table.md", "\n".join(lines) + "\n", overwrite=True)
    _figure(out / "overlays.png", ct, pred.probabilities.argmax(0).astype(np.uint8), masks,
            display_slice, overlay_rgb)
    print("\n".join(lines))
    return out


def _figure(path: Path, ct, labels, masks, display_slice, overlay_rgb) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the masks as one label map in our classes (first class of each mask), for display
    theirs = np.zeros_like(labels)
    for _, classes, m in masks:
        theirs[m & (theirs == 0)] = classes[0]
    ks = np.flatnonzero(theirs.reshape(theirs.shape[0], -1).any(axis=1))
    picks = [int(ks[len(ks) * i // 4]) for i in (1, 2, 3)] if len(ks) else [0]
    fig, axes = plt.subplots(2, len(picks), figsize=(4 * len(picks), 7.6), squeeze=False)
    for j, k in enumerate(picks):
        hu = display_slice(ct, k)
        axes[0, j].imshow(overlay_rgb(hu, display_slice(ct, k, labels)), interpolation="nearest")
        axes[0, j].set_title(f"ours, slice {k}")
        axes[1, j].imshow(overlay_rgb(hu, display_slice(ct, k, theirs)), interpolation="nearest")
        axes[1, j].set_title(f"reference masks, slice {k}")
    for ax in axes.ravel():
        ax.set_axis_off()
    save_figure(fig, path, dpi=90)
