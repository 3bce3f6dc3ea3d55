"""``python -m training adapt``: adapt a model to many corrected cases at once, with the same
fine-tuning as the Slicer panel and ``epdseg adapt`` (EPDSegmentationLib/core/adapt.py).

    python -m training adapt --model Resources/Models/EPDBodyComp_f2.safetensors \
        --manifest corrections.csv --output runs/site/model.safetensors

Manifest: the training manifest format (image, label, split; see docs/data.md). Each label
file holds the corrected slices of its case; the slices with any label are the corrected
ones (slices left empty are not used). --split picks rows (default: every row).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import List, Optional

import numpy as np
from EPDSegmentationLib.core.adapt import (AdaptCase, AdaptError, AdaptSettings, adapt_model,
                                           adapted_card, check_destination, describe, save_adapted)
from EPDSegmentationLib.io import read_labels, read_manifest, read_volume


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="model to adapt (.safetensors + card)")
    p.add_argument("--manifest", type=Path, required=True, help="CSV/JSON: image, label, split")
    p.add_argument("--split", action="append", default=None,
                   help="use only rows of this split (repeatable); default every row")
    p.add_argument("--output", type=Path, required=True, help="the new model (.safetensors)")
    defaults = AdaptSettings()
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--replay", type=float, default=defaults.replay_fraction)
    p.add_argument("--interpolate", type=float, default=defaults.interpolate,
                   help="share of the fine-tuned weight change kept (core.adapt.AdaptSettings)")
    p.add_argument("--l2sp", type=float, default=defaults.l2sp,
                   help="L2-SP alpha (core.adapt.AdaptSettings; 0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> Path:
    from EPDSegmentationLib.core.model_io import load_model

    check_destination(args.output, args.overwrite)
    settings = AdaptSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                             replay_fraction=args.replay, interpolate=args.interpolate,
                             l2sp=args.l2sp, seed=args.seed, device=args.device)
    model, card = load_model(args.model)
    rows = [r for r in read_manifest(args.manifest) if args.split is None or r["split"] in args.split]
    if not rows:
        raise AdaptError(f"{args.manifest}: no rows in split(s) {args.split}")
    cases = []
    for row in rows:
        ct = read_volume(row["image"])
        labels = read_labels(row["label"], like=ct).array
        slices = [int(k) for k in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))]
        if not slices:
            raise AdaptError(f"{row['label']}: holds no labels (no corrected slice)")
        si, sj, _ = ct.spacing
        cases.append(AdaptCase(ct.array, labels, (sj, si), slices, str(row["image"]),
                               ct.ijk_to_ras))
        print(f"{row['image']}: {len(slices)} corrected slice(s)")
    result = adapt_model(model, card, cases, settings,
                         progress=lambda s, n, loss: print(f"  step {s}/{n}: loss {loss:.4f}")
                         if s % 10 == 0 or s == n else None)
    command = "python -m training " + shlex.join(argv or [])
    new_card = adapted_card(card, str(args.model), cases, settings, result, command)
    weights, card_path = save_adapted(args.output, result.model, new_card, overwrite=args.overwrite)
    print(describe(result))
    print(f"wrote {weights} and {card_path}")
    return weights
