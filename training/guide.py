"""Give a model HU-guided upsampling (``python -m training guide``): its weights unchanged,
its card's ``upsampling`` field set (core/upsampling.py), so that every command restores
its soft maps to the input grid along the CT's edges rather than bilinearly.

The output is a folder holding model.safetensors and model.json, as a training run's, so that
``training bundle --run`` takes it. The card's validation metrics and evaluation, measured
with bilinear upsampling, are left out; its calibration, if any, is kept (applied on the
network's grid, before the upsampling).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import List, Optional

from .derived import add_derived_arguments, save_derived


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_derived_arguments(p)
    p.add_argument("--sigma-hu", type=float, default=30.0,
                   help="HU difference at which a network cell's weight falls to 0.61 "
                        "(default 30, chosen on phantoms: docs/model.md)")
    p.add_argument("--sigma-cells", type=float, default=1.0,
                   help="distance in network cells at which a cell's weight falls to 0.61 "
                        "(default 1)")
    p.add_argument("--radius", type=int, default=1,
                   help="network cells each side of a pixel's own that it draws on (1 to 3)")


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> Path:
    from EPDSegmentationLib.core.model_io import load_model

    from EPDSegmentationLib.core.upsampling import KEY, METHOD, check_upsampling

    up = {"method": METHOD, "sigma_hu": float(args.sigma_hu),
          "sigma_cells": float(args.sigma_cells), "radius_cells": int(args.radius)}
    if check_upsampling(up):
        raise ValueError(f"--sigma-hu and --sigma-cells must be positive and --radius 1 to 3; "
                         f"got {args.sigma_hu:g}, {args.sigma_cells:g}, {args.radius}")
    model, card = load_model(args.model)
    path = save_derived(model, card, KEY,
                        dict(up, command="python -m training " + shlex.join(list(argv or []))),
                        args.output, args.overwrite)
    print(f"{path}: {args.model}'s weights, upsampled guided by the HU "
          f"(sigma {up['sigma_hu']:g} HU)")
    return path
