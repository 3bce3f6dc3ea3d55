"""Learning curve of adapting from corrections on the shared real CT (docs/adapt/).

    nice -n 10 python -m training.adapt_curve --output docs/adapt

TotalSegmentator's tissue masks stand in for a user's corrections. Mapping to our classes:
tissue_skeletal_muscle -> MUS, tissue_subcutaneous_fat -> SAT, tissue_torso_fat -> VAT, every
other body voxel -> MSC, outside the body -> BG; body = HU > -500 with holes filled per slice
(lungs and bowel gas inside the body stay body). TotalSegmentator has no IMAT class (its
muscle mask holds what we would call IMAT). The masks are another model's output: agreement,
not accuracy.

For k = 0, 1, 2, 4, 8 corrected slices, chosen as the base model's most uncertain slices
(core.adapt.suggest_slices) or at random (several seeds), the bundled model is adapted with
core.adapt.adapt_model and the Dice of MUS, SAT and VAT (argmax on the CT grid) is measured on
the slices NOT corrected.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
from EPDSegmentationLib.core.adapt import (AdaptCase, AdaptSettings, adapt_model, slice_uncertainty,
                                           suggest_slices)
from EPDSegmentationLib.core.atomic import write_text
from EPDSegmentationLib.core.classes import class_by_key
from EPDSegmentationLib.core.inference import predict_volume
from EPDSegmentationLib.core.model_io import load_model
from EPDSegmentationLib.core.resources import bundled_model_path
from EPDSegmentationLib.io import read_labels, read_volume

from training.phantom import subject_slices

from .logs import save_figure

_REPO = Path(__file__).resolve().parents[1]
#: ../shared beside this checkout, or beside its folder of worktrees
TS = next((p for p in (_REPO.parent / "shared", _REPO.parent.parent / "shared") if p.is_dir()),
          _REPO.parent / "shared") / "data" / "totalseg-example"
MAPPING = (("tissue_skeletal_muscle", "MUS"), ("tissue_subcutaneous_fat", "SAT"),
           ("tissue_torso_fat", "VAT"))
BODY_HU = -500.0
REPORTED = ("MUS", "SAT", "VAT")


def reference_labels(ct, folder: Path) -> np.ndarray:
    """Our classes (K, J, I) from TotalSegmentator's masks (see the module docstring)."""
    from scipy.ndimage import binary_fill_holes

    body = np.stack([binary_fill_holes(s > BODY_HU) for s in ct.array])
    labels = np.where(body, class_by_key("MSC").index, 0).astype(np.uint8)
    for name, key in MAPPING:
        m = read_labels(folder / f"{name}.nii.gz", like=ct).array > 0
        labels[m] = class_by_key(key).index
    return labels


def shifted_phantom(seed: int, n_slices: int, size: int = 256, muscle_darker: float = 30.0,
                    blur: float = 1.2):
    """A held-out torso phantom (T11 to L4, slices spread evenly) of a shifted appearance:
    muscle ``muscle_darker`` HU darker and a smoother kernel (Gaussian blur, sigma ``blur``
    pixels). Returns (hu float32 (K, J, I), labels uint8 (K, J, I), pixel_mm (row, col))."""
    from scipy.ndimage import gaussian_filter

    slices = subject_slices(seed, n_slices, None, levels=("T11", "L4"), size=size)
    hu = np.stack([s.hu for s in slices]).astype(np.float32)
    labels = np.stack([s.labels for s in slices]).astype(np.uint8)
    hu[labels == class_by_key("MUS").index] -= muscle_darker
    hu = np.stack([gaussian_filter(h, blur) for h in hu]).astype(np.float32)
    mm = float(slices[0].pixel_mm)
    return hu, labels, (mm, mm)


def dice_on(pred: np.ndarray, ref: np.ndarray, ks: List[int]) -> Dict[str, float]:
    out = {}
    for key in REPORTED:
        c = class_by_key(key).index
        a, b = pred[ks] == c, ref[ks] == c
        s = int(a.sum()) + int(b.sum())
        out[key] = float("nan") if s == 0 else 2.0 * int((a & b).sum()) / s
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--data", type=Path, default=TS)
    p.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--random-seeds", type=int, default=2)
    defaults = AdaptSettings()
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--replay", type=float, default=defaults.replay_fraction)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--interpolate", type=float, default=defaults.interpolate)
    p.add_argument("--l2sp", type=float, default=defaults.l2sp)
    p.add_argument("--phantom-seed", type=int, default=None,
                   help="use a held-out phantom of shifted appearance (this seed) instead")
    p.add_argument("--phantom-slices", type=int, default=16)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.phantom_seed is None:
        ct = read_volume(args.data / "ct_t11_l2.nii.gz")
        hu, ref = ct.array, reference_labels(ct, args.data)
        si, sj, _ = ct.spacing
        m = ct.ijk_to_ras    # the NIfTI is stored RAS+: flipped for the network (orientation)
        source = f"the real CT {args.data / 'ct_t11_l2.nii.gz'} with TotalSegmentator's masks"
    else:
        hu, ref, (sj, si) = shifted_phantom(args.phantom_seed, args.phantom_slices)
        m = None             # phantom slices are stored as the network was trained
        source = (f"a held-out torso phantom (seed {args.phantom_seed}, {args.phantom_slices} "
                  f"slices T11 to L4) with muscle 30 HU darker and a smoother kernel")
    model, card = load_model(bundled_model_path())
    base = predict_volume(hu, (sj, si), model, card, device="cpu", ijk_to_ras=m)
    order = suggest_slices(slice_uncertainty(base.probabilities), hu.shape[0],
                           min_gap=1)
    K = hu.shape[0]
    settings = AdaptSettings(steps=args.steps, replay_fraction=args.replay, lr=args.lr,
                             interpolate=args.interpolate, l2sp=args.l2sp)  # the other
    # fields (batch, augmentation, which weights train) at core/adapt.py's defaults
    rows = []
    for k in args.ks:
        strategies = [("uncertain", None)] if k else [("none", None)]
        if k:
            strategies += [("random", s) for s in range(args.random_seeds)]
        for strategy, seed in strategies:
            if strategy == "uncertain":
                chosen = suggest_slices(slice_uncertainty(base.probabilities), k)
            elif strategy == "random":
                chosen = sorted(np.random.default_rng(seed).choice(K, k, replace=False).tolist())
            else:
                chosen = []
            t0 = time.perf_counter()
            if chosen:
                res = adapt_model(model, card, [AdaptCase(hu, ref, (sj, si), chosen, "curve", m)],
                                  settings)
                net, secs = res.model, res.seconds
            else:
                net, secs = model, 0.0
            held = [i for i in range(K) if i not in chosen]
            pred = predict_volume(hu, (sj, si), net, card, device="cpu",
                                  ijk_to_ras=m).probabilities.argmax(0)
            row = {"k": k, "strategy": strategy, "seed": seed, "slices": chosen,
                   "adapt_s": round(secs, 1), "dice": dice_on(pred, ref, held)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del t0
    args.output.mkdir(parents=True, exist_ok=True)
    command = "python -m training.adapt_curve " + shlex.join(argv or sys.argv[1:])
    write_text(args.output / "curve.json", json.dumps(
        {"command": command, "source": source, "settings": settings.to_dict(), "uncertainty_order": order,
         "rows": rows}, indent=2), overwrite=True)
    lines = [f"Made by `{command}` (bundled model, CPU, one thread) on {source}. Dice on the "
             f"slices not corrected, of {K}.", "",
             "| k | slices chosen | corrected slices | adapt s | MUS | SAT | VAT |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        d = r["dice"]
        name = r["strategy"] + (f" (seed {r['seed']})" if r["seed"] is not None else "")
        lines.append(f"| {r['k']} | {name} | {r['slices']} | {r['adapt_s']} | {d['MUS']:.3f} | "
                     f"{d['SAT']:.3f} | {d['VAT']:.3f} |")
    write_text(args.output / "curve.md", "\n".join(lines) + "\n", overwrite=True)
    _figure(args.output / "curve.png", rows)
    print("\n".join(lines))
    return 0


def _figure(path: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(REPORTED), figsize=(4 * len(REPORTED), 3.4), squeeze=False)
    for ax, key in zip(axes[0], REPORTED):
        for strategy, style in (("uncertain", "o-"), ("random", "s--")):
            ks = sorted({r["k"] for r in rows})
            ys = []
            for k in ks:
                vals = [r["dice"][key] for r in rows if r["k"] == k and
                        (r["strategy"] == strategy or r["k"] == 0)]
                ys.append(np.mean(vals) if vals else np.nan)
            ax.plot(ks, ys, style, label=strategy + (" (mean of seeds)" if strategy == "random" else ""))
        ax.set_title(f"{key}: Dice on uncorrected slices")
        ax.set_xlabel("corrected slices k")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path, dpi=90)


if __name__ == "__main__":
    sys.exit(main())
