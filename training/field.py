"""Give a model the field of view it was trained in (``python -m training field``): its
weights unchanged, its card's ``field`` set (EPDSegmentationLib/core/field.py), so that a
slice whose content fills more of the image than the training phantoms' did is padded with
air before the network and cropped back after.

The share is measured on phantoms drawn with the card's own recipe (its augmentation and
anatomy options, at each of its levels; subjects 0 to N-1, not the run's own training
subjects): the median share of the image rows that their content (HU above
field.CONTENT_HU) spans front to back. The output is a folder holding model.safetensors and model.json, as ``training
guide``'s; the card's validation metrics and evaluation are left out.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import numpy as np

from .derived import add_derived_arguments, save_derived


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_derived_arguments(p)
    p.add_argument("--subjects", type=int, default=60,
                   help="phantom subjects the share is measured on (default 60)")
    p.add_argument("--content-share", type=float, default=None,
                   help="set the share (0..1] instead of measuring it")


def measure_share(card: Mapping, subjects: int, progress: bool = True) -> Dict[str, float]:
    """Percentiles 5, 50 and 95 of the share of the image rows the content spans, over the
    recipe's phantoms (subjects 0 to subjects-1, one slice of each at each level, augmented
    by the recipe's Augment with a stream of its own per subject and level)."""
    from EPDSegmentationLib.core.field import CONTENT_HU
    from training.recipe import recipe_phantoms

    shares = []
    for hu, _ in recipe_phantoms(card, subjects, progress):
        rows = np.flatnonzero((hu > CONTENT_HU).any(axis=1))
        if rows.size:
            shares.append((rows[-1] - rows[0] + 1) / hu.shape[0])
    p5, p50, p95 = (float(v) for v in np.percentile(shares, [5, 50, 95]))
    return {"p5": p5, "median": p50, "p95": p95, "slices": len(shares)}


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> Path:
    from EPDSegmentationLib.core.field import KEY, check_field
    from EPDSegmentationLib.core.model_io import load_model


    model, card = load_model(args.model)
    if args.content_share is not None:
        spec: Dict[str, object] = {"content_share": float(args.content_share),
                                   "measured_on": "given on the command line"}
    else:
        if args.subjects < 1:
            raise ValueError(f"--subjects must be at least 1; got {args.subjects}")
        m = measure_share(card, args.subjects)
        spec = {"content_share": round(m["median"], 4),
                "measured_on": (f"{m['slices']} phantom slices of the card's recipe "
                                f"({args.subjects} subjects, each level): content rows share "
                                f"p5 {m['p5']:.3f}, median {m['median']:.3f}, "
                                f"p95 {m['p95']:.3f}")}
    problem = check_field(spec)
    if problem is not None:
        raise ValueError(problem)
    path = save_derived(model, card, KEY,
                        dict(spec, command="python -m training " + shlex.join(list(argv or []))),
                        args.output, args.overwrite)
    print(f"{path}: {args.model}'s weights; slices padded with air where their "
          f"content spans more than {spec['content_share']:.3f} of the rows "
          f"({json.dumps(spec['measured_on'])})")
    return path
