"""``epdseg adapt``: fine-tune a model on the slices a user corrected (core/adapt.py).

    epdseg adapt --image CT.nii.gz --labels corrected.seg.nrrd --slices 12,20 -o site.safetensors
    epdseg adapt --image CT.nii.gz --labels corrected.seg.nrrd --original result.seg.nrrd -o site
    epdseg adapt --image CT.nii.gz --suggest 5        # which slices to correct first

Corrected slices: --slices, else those where --labels differs from --original (the result as
segmented), else every slice of --labels that holds a label. Nothing is written when any
input is unusable.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from ..core.adapt import (AdaptCase, AdaptError, AdaptSettings, adapt_model, adapted_card,
                          changed_slices, check_destination, describe, save_adapted,
                          slice_uncertainty, suggest_slices)
from ..core.inference import DeviceError, select_device
from ..core.resources import bundled_model_path
from ..io import read_labels, read_volume
from .segment import parse_slices


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="model to adapt (.safetensors with its .json card); default: bundled")
    p.add_argument("--image", type=Path, required=True, help="the CT (NIfTI, NRRD or DICOM)")
    p.add_argument("--labels", type=Path, default=None,
                   help="the corrected segmentation (.seg.nrrd, or a label map 0..5) on the CT's grid")
    p.add_argument("--original", type=Path, default=None,
                   help="the result before correction: corrected slices are those that differ")
    p.add_argument("--slices", default=None, help="corrected slices K (0-based): 12,40-45")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="the new model (.safetensors; its .json card is written beside it)")
    p.add_argument("--suggest", type=int, default=0, metavar="N",
                   help="print the N most uncertain slices under the model (to correct next)")
    defaults = AdaptSettings()
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--replay", type=float, default=defaults.replay_fraction,
                   help="share of each batch from the model's own predictions on uncorrected "
                        "slices (default %(default)s)")
    p.add_argument("--interpolate", type=float, default=defaults.interpolate,
                   help="keep this share of the fine-tuned change of the weights, 0 < x <= 1 "
                        "(the rest stays the base model's; default %(default)s)")
    p.add_argument("--l2sp", type=float, default=defaults.l2sp,
                   help="L2-SP penalty alpha on the weights' distance to the base model "
                        "(default %(default)s: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> int:
    """Returns the exit status; bad input raises ValueError / InputError (main prints it)."""
    import numpy as np

    from ..core.model_io import load_model

    if args.labels is None and not args.suggest:
        raise AdaptError("give --labels (the corrected segmentation), or --suggest N")
    if args.labels is not None and args.output is None:
        raise AdaptError("give -o/--output, the new model file")
    if args.output is not None:
        check_destination(args.output, args.overwrite)

    try:
        select_device(args.device)
    except DeviceError as exc:          # a usage error here, not a traceback
        raise AdaptError(str(exc)) from None
    settings = AdaptSettings(steps=args.steps, lr=args.lr, replay_fraction=args.replay,
                             interpolate=args.interpolate, l2sp=args.l2sp,
                             seed=args.seed, device=args.device)
    model_path = args.model if args.model is not None else bundled_model_path()
    model, card = load_model(model_path)
    ct = read_volume(args.image)
    si, sj, _ = ct.spacing
    if args.suggest:
        from ..core.inference import predict_volume

        pred = predict_volume(ct.array, (sj, si), model, card, device=args.device,
                              ijk_to_ras=ct.ijk_to_ras)
        scores = slice_uncertainty(pred.probabilities)
        top = suggest_slices(scores, args.suggest)
        print("most uncertain slices (correct these first): " +
              ", ".join(f"{k} ({scores[k]:.3f})" for k in top))
        if args.labels is None:
            return 0
    labels = read_labels(args.labels, like=ct).array
    if args.slices is not None:
        slices = parse_slices(args.slices, ct.array.shape[0])
    elif args.original is not None:
        slices = changed_slices(read_labels(args.original, like=ct).array, labels)
        if not slices:
            raise AdaptError(f"{args.labels} does not differ from {args.original} on any slice: "
                             f"nothing was corrected")
    else:
        slices = [int(k) for k in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))]
        if not slices:
            raise AdaptError(f"{args.labels} holds no labels")
    case = AdaptCase(ct.array, labels, (sj, si), slices, str(args.image), ct.ijk_to_ras)
    print(f"adapting {model_path} on {len(slices)} corrected slice(s) {slices} of {args.image}")

    def progress(step: int, steps: int, loss: float) -> None:
        if step == steps or step % 10 == 0:
            print(f"  step {step}/{steps}: loss {loss:.4f}", flush=True)

    result = adapt_model(model, card, [case], settings, progress=progress)
    command = "epdseg adapt " + shlex.join(argv if argv is not None else sys.argv[2:])
    new_card = adapted_card(card, str(model_path), [case], settings, result, command)
    weights, card_path = save_adapted(args.output, result.model, new_card, overwrite=args.overwrite)
    print(describe(result))
    print(f"wrote {weights} and {card_path}")
    return 0
