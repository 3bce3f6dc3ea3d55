"""Tissue-area bias of a model on held-out phantoms drawn at a chosen pixel size, against the
phantom's exact class fractions (``python -m training area-bias``).

Why: the model is judged on real CT by tissue areas (SMI is muscle area / height^2), and the
shared real CTs come at 3 mm pixels, where runs that score alike on the standard phantom
validation differ by 10 cm^2 of muscle per slice. The standard validation cannot see this: it
draws the phantom at the training resolution and compares against hard labels, whose own
majority rule moves area between classes at coarse pixels (thin IMAT goes to muscle). Here
the phantom is drawn directly at ``--pixel-mm`` (supersampled, so the truth is each class's
exact area), run through the same inference as ``epdseg segment`` (resampled to the model's
grid, network, probabilities restored to the input grid), and the soft areas (sum of the
probabilities x pixel area) are compared with the truth per slice. No real scan is used.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from EPDSegmentationLib.cli.options import add_mirror_argument
from EPDSegmentationLib.core.atomic import write_text
from EPDSegmentationLib.core.classes import KEYS, NUM_CLASSES

from training.phantom.options import add_anatomy_arguments, anatomy_kwargs, checked_anatomy


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="model weights (.safetensors)")
    p.add_argument("--pixel-mm", type=float, default=3.0,
                   help="the phantom's pixel size, mm (default 3: the shared real CTs')")
    p.add_argument("--fov-mm", type=float, default=440.0,
                   help="field of view, mm (pixels per side = fov / pixel; default 440)")
    p.add_argument("--phantom-subjects", type=int, default=12)
    p.add_argument("--phantom-slices", type=int, default=3, help="slices per subject")
    p.add_argument("--phantom-levels", nargs=2, default=["T11", "L4"], metavar=("FROM", "TO"))
    p.add_argument("--slice-gap-mm", type=float, default=12.0)
    add_anatomy_arguments(p)            # train's phantom options (all 0: as before)
    p.add_argument("--data-seed", type=int, default=7,
                   help="phantom subject seed (default 7: subjects no training run has seen)")
    p.add_argument("--device", default="cpu", choices=("auto", "cuda", "mps", "cpu"))
    p.add_argument("--output", type=Path, help="also write the result as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_mirror_argument(p)


def area_bias(model, card, seeds: Sequence[int], n_slices: int, levels: Sequence[str],
              pixel_mm: float, fov_mm: float, slice_gap_mm: float = 12.0, device="cpu",
              progress: bool = False, mirror: bool = True,
              **anatomy: float) -> Dict[str, object]:
    """Per slice true and soft areas (cm^2), float64 (n, C) each, of the phantom subjects
    ``seeds`` drawn at ``pixel_mm`` mm pixels; and per class the mean true area, mean error
    (soft - true) and mean absolute error, cm^2 per slice. anatomy: the phantom options
    (generate.make_slice keywords, checked by phantom.options.checked_anatomy)."""
    from tqdm import tqdm

    from EPDSegmentationLib.core.inference import predict_volume
    from training.phantom.generate import subject_slices

    if not pixel_mm > 0 or not fov_mm > pixel_mm:
        raise ValueError(f"--pixel-mm must be > 0 and below --fov-mm; got {pixel_mm}, {fov_mm}")
    size = int(round(fov_mm / pixel_mm))
    # enough subpixels that the truth is exact to well below a pixel's area
    supersample = max(2, int(np.ceil(pixel_mm / 0.4)))
    pixel_cm2 = pixel_mm * pixel_mm / 100.0
    true, soft = [], []
    for seed in tqdm(list(seeds), desc="phantom subjects", unit="subject", disable=not progress):
        stack = subject_slices(int(seed), n_slices, slice_gap_mm, levels=tuple(levels),
                               size=size, pixel_mm=pixel_mm, supersample=supersample,
                               **checked_anatomy(anatomy, torso=True))
        # a subject's slices share one grid: one call, the network batched
        p = predict_volume(np.stack([s.hu for s in stack]), (pixel_mm, pixel_mm), model, card,
                           device=device, mirror=mirror).probabilities     # (C, n, H, W)
        soft += list(p.reshape(p.shape[0], len(stack), -1).sum(2, dtype=np.float64).T
                     * pixel_cm2)
        true += [s.fractions.reshape(NUM_CLASSES, -1).sum(1, dtype=np.float64) * pixel_cm2
                 for s in stack]
    true_a, soft_a = np.array(true), np.array(soft)
    err = soft_a - true_a
    per_class = {k: {"true_cm2": float(true_a[:, i].mean()), "error_cm2": float(err[:, i].mean()),
                     "abs_error_cm2": float(np.abs(err[:, i]).mean())}
                 for i, k in enumerate(KEYS)}
    return {"slices": len(true), "pixel_mm": pixel_mm, "size": size, "per_class": per_class,
            "true_cm2": true_a, "soft_cm2": soft_a}


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> Dict[str, object]:
    from EPDSegmentationLib.core.model_io import load_model

    from training.phantom.dataset import subject_seeds

    if args.phantom_subjects < 1 or args.phantom_slices < 1:
        raise ValueError("--phantom-subjects and --phantom-slices must be >= 1")
    if args.output is not None and args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
    model, card = load_model(args.model)
    res = area_bias(model, card, subject_seeds(args.data_seed, args.phantom_subjects),
                    args.phantom_slices, args.phantom_levels, args.pixel_mm, args.fov_mm,
                    args.slice_gap_mm, args.device, progress=not args.quiet,
                    mirror=args.mirror, **anatomy_kwargs(args))
    print(f"{args.model}: {res['slices']} phantom slices at {args.pixel_mm} mm "
          f"({'-'.join(args.phantom_levels)}, data seed {args.data_seed}); cm2 per slice")
    print(f"{'class':6s} {'true':>8s} {'soft-true':>10s} {'|error|':>8s}")
    for k in KEYS[1:]:
        v = res["per_class"][k]
        print(f"{k:6s} {v['true_cm2']:8.1f} {v['error_cm2']:+10.2f} {v['abs_error_cm2']:8.2f}")
    if args.output is not None:
        out = {k: v for k, v in res.items() if k not in ("true_cm2", "soft_cm2")}
        out["command"] = "python -m training " + shlex.join(argv or [])
        out["mirror"] = args.mirror
        write_text(args.output, json.dumps(out, indent=2) + "\n", overwrite=args.overwrite)
    return res
