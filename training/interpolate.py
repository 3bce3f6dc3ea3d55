"""Interpolate the weights of two model files (``python -m training interpolate``):
w x A + (1 - w) x B, tensor by tensor, in float64 (a "model soup", Wortsman et al. 2022).

Meant for a fine-tuned model A and the model B it was fine-tuned from: the two lie in one
basin of the loss, and the mix keeps part of what each does well (docs/model.md: half of a
fine-tuning run on the randomised phantom and half of its starting point beat both on the
standard phantom validation). GroupNorm, so there are no statistics to recompute.

The output is a folder holding model.safetensors and model.json, as a training run's, so that
``training bundle --run`` takes it. Its card is A's, with ``training.weights`` saying what the
weights are and ``training.interpolated`` recording both inputs (path, SHA-256 of the weights)
and the command; A's validation metrics do not hold for the mix and are left out.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import List, Optional

#: card fields both models must share for their weights to mean the same thing
SAME = ("architecture", "classes", "windows", "factor", "label_mode", "image_mode", "pixel_mm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="model A (.safetensors)")
    p.add_argument("--with", dest="other", type=Path, required=True, metavar="MODEL",
                   help="model B (.safetensors): same architecture, windows, factor, modes")
    p.add_argument("--weight", type=float, required=True, metavar="W",
                   help="A's share in 0..1 (B gets 1 - W)")
    p.add_argument("--output", type=Path, required=True,
                   help="folder for model.safetensors and model.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model there")


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> Path:
    import torch

    from EPDSegmentationLib.cli.cohort import model_version
    from EPDSegmentationLib.core.model_io import load_model, save_model

    w = float(args.weight)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"--weight is A's share in 0..1; got {args.weight}")
    net, card = load_model(args.model)
    other, other_card = load_model(args.other)
    differ = [k for k in SAME if card.get(k) != other_card.get(k)]
    if differ:
        raise ValueError(f"{args.model} and {args.other} differ in {', '.join(differ)}: their "
                         f"weights cannot be mixed")
    a, b = net.state_dict(), other.state_dict()
    mixed = {k: (w * a[k].to(torch.float64) + (1.0 - w) * b[k].to(torch.float64)).to(a[k].dtype)
             for k in a}
    net.load_state_dict(mixed)
    card = dict(card)
    training = dict(card["training"])
    training["weights"] = f"{w:g} x {args.model} + {1.0 - w:g} x {args.other}"
    training["interpolated"] = {
        "a": {"path": str(args.model), "weights": model_version(args.model, False)},
        "b": {"path": str(args.other), "weights": model_version(args.other, False)},
        "weight_a": w,
        "command": "python -m training " + shlex.join(list(argv or [])),
    }
    card["training"] = training
    card["metrics"] = {}
    for key in ("evaluation", "bundle_command", "calibration"):
        card.pop(key, None)
    out = Path(args.output) / "model"
    save_model(out, net, card, overwrite=args.overwrite)
    print(f"{out}.safetensors: {training['weights']}")
    return out.with_suffix(".safetensors")
