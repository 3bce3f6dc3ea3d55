"""Fix a model's normalisation statistics (``python -m training fix-norms``): the same
weights, every GroupNorm replaced by a FixedGroupNorm (core/model.py) whose group means and
variances are those the network met on its own recipe's phantoms, so that what it calls a
pixel no longer depends on how much of the image is air, fat or organ.

Measured on phantoms drawn with the card's recipe (its augmentation and anatomy options, at
each of its levels; subjects 0 to N-1, not the run's own training subjects), each slice run
through the network as inference runs it (windows, the network's pixel size, no mirror, no
field of view): for each norm, the mean over slices of each slice's own group mean and group
variance, the statistics GroupNorm used for a typical training slice. The output is a folder
holding model.safetensors and model.json, as ``training guide``'s; the card's calibration is
left out (it was fitted to the old network's outputs: run ``training calibrate`` again), and
its validation metrics and evaluation, measured without the change.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from .derived import add_derived_arguments, save_derived


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_derived_arguments(p)
    p.add_argument("--subjects", type=int, default=12,
                   help="phantom subjects the statistics are measured on (default 12)")


def measure_norms(model, card: Mapping, subjects: int,
                  progress: bool = True) -> Tuple[Dict[str, tuple], int]:
    """({norm module name: (group means (G,), group variances (G,)) float32 tensors}, slices
    measured): each GroupNorm's input statistics per slice, averaged over the recipe's
    phantoms (subjects 0 to subjects-1, one slice of each at each level, augmented by the
    recipe's Augment with a stream of its own per subject and level, as ``training field``)."""
    import torch
    from torch import nn

    from EPDSegmentationLib.core.inference import predict_volume
    from training.recipe import recipe_phantoms

    plain = {k: v for k, v in card.items() if k not in ("field", "calibration")}
    sums: Dict[str, torch.Tensor] = {}
    n = 0

    def hook(name):
        def record(module, inputs):
            x = inputs[0].detach().double()
            xg = x.reshape(x.shape[0], module.num_groups, -1)
            s = torch.stack([xg.mean(-1), xg.var(-1, unbiased=False)], -1).sum(0)
            sums[name] = sums.get(name, 0) + s
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, nn.GroupNorm)]
    try:
        for hu, pixel_mm in recipe_phantoms(card, subjects, progress):
            predict_volume(hu[None], (pixel_mm, pixel_mm), model, plain, device="cpu",
                           mirror=False)
            n += 1
    finally:
        for h in handles:
            h.remove()
    return {name: ((s[:, 0] / n).float(), (s[:, 1] / n).float())
            for name, s in sums.items()}, n


def fixed_model(model, stats: Mapping[str, tuple]):
    """A network of model's architecture with norm "fixed": model's weights, each
    FixedGroupNorm's buffers from stats (measure_norms)."""
    from EPDSegmentationLib.core.model import FixedGroupNorm, build_model

    config = dataclasses.replace(model.config, norm="fixed")
    net = build_model(config)
    missing, unexpected = net.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(("group_mean", "group_var")) for k in missing)
    for name, m in net.named_modules():
        if isinstance(m, FixedGroupNorm):
            mean, var = stats[name]
            m.group_mean.copy_(mean)
            m.group_var.copy_(var)
    return net.eval()


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> Path:
    from EPDSegmentationLib.core.model_card import NORM_STATISTICS_KEY as KEY
    from EPDSegmentationLib.core.model_io import load_model


    if args.subjects < 1:
        raise ValueError(f"--subjects must be at least 1; got {args.subjects}")
    model, card = load_model(args.model)
    if model.config.norm != "group":
        raise ValueError(f"--model {args.model}: its normalisation is already fixed "
                         f"({card.get(KEY, {}).get('measured_on', 'no record of where')}); "
                         f"fix the statistics of the model it was made from")
    stats, n = measure_norms(model, card, args.subjects)
    net = fixed_model(model, stats)
    dropped = "calibration" in card
    card = {k: v for k, v in card.items() if k != "calibration"}
    card["architecture"] = net.config.to_dict()
    spec = {"measured_on": (f"{n} phantom slices of the card's recipe ({args.subjects} "
                            f"subjects, each level), each slice's own group statistics "
                            f"averaged"),
            "command": "python -m training " + shlex.join(list(argv or []))}
    path = save_derived(net, card, KEY, spec, args.output, args.overwrite)
    print(f"{path}: {args.model}'s weights with fixed normalisation statistics "
          f"({spec['measured_on']})")
    if dropped:
        print(f"note: {args.model}'s calibration is not carried over (it was fitted to the "
              f"network's outputs before); run `python -m training calibrate` on {path}")
    return path
