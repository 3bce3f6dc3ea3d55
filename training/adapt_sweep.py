"""A small sweep of the fine-tuning settings (core.adapt.AdaptSettings) on held-out phantoms
of a shifted appearance, to choose the defaults without tuning on the real CT (which would
fit one patient). Outputs sweep.json and sweep.md under --output.

    nice -n 5 python -m training.adapt_sweep --output docs/adapt/sweep

For each phantom seed (training.adapt_curve.shifted_phantom: muscle 30 HU darker, Gaussian
blur), the bundled model's k most uncertain slices (suggest_slices, at least 3 apart) are
the corrected slices, their own phantom labels the corrections; each configuration adapts the
bundled model on them and the Dice of MUS, SAT and VAT is measured on the slices not corrected.
A configuration is a set of AdaptSettings fields changed from the defaults the sweep was run
against (``BASE``), so the table stays readable when the defaults change.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from EPDSegmentationLib.core.adapt import (AdaptCase, AdaptSettings, adapt_model,
                                           interpolate_weights, slice_uncertainty, suggest_slices)
from EPDSegmentationLib.core.atomic import write_text
from EPDSegmentationLib.core.inference import predict_volume
from EPDSegmentationLib.core.model_io import load_model
from EPDSegmentationLib.core.resources import bundled_model_path

from .adapt_curve import dice_on, shifted_phantom

#: The settings the sweep starts from (the defaults of core/adapt.py before the sweep;
#: interpolate 1.0 = the fine-tuned weights, as before that option existed).
BASE = {"steps": 60, "lr": 3e-4, "batch_size": 4, "replay_fraction": 0.25, "hu_shift": 20.0,
        "train": "all", "zoom": 0.0, "rotate": 0.0, "interpolate": 1.0}
#: name -> changes from BASE. Every configuration costs about the same network passes as the
#: base (steps x batch), except "decoder" ones (no encoder gradients: measured about half
#: the time per step, so twice the steps cost about the base's time).
CONFIGS = {
    "base": {},
    "lr 1e-3": {"lr": 1e-3},
    "no replay": {"replay_fraction": 0.0},
    "zoom +-10 %, rotation +-10 deg": {"zoom": 0.1, "rotate": 10.0},
    "decoder only": {"train": "decoder"},
    "replay 0.5": {"replay_fraction": 0.5},
    "decoder only, 120 steps": {"train": "decoder", "steps": 120},
    "120 steps of batch 2": {"steps": 120, "batch_size": 2},
    "HU offset +-60": {"hu_shift": 60.0},
    "lr 1e-4": {"lr": 1e-4},
    "lr 3e-3, norm + head only": {"lr": 3e-3, "train": "norm"},
    # keeping the model near the base (after the forgetting measure, training/adapt_forget.py)
    "no replay, interpolate 0.5": {"replay_fraction": 0.0, "interpolate": 0.5},
    "no replay, interpolate 0.4": {"replay_fraction": 0.0, "interpolate": 0.4},
    "no replay, interpolate 0.35": {"replay_fraction": 0.0, "interpolate": 0.35},
    "no replay, interpolate 0.3": {"replay_fraction": 0.0, "interpolate": 0.3},
    "no replay, L2-SP 0.1": {"replay_fraction": 0.0, "l2sp": 0.1},
    "no replay, L2-SP 1": {"replay_fraction": 0.0, "l2sp": 1.0},
    "replay 0.1": {"replay_fraction": 0.1},
    "replay 0.25, confident 0.9": {"replay_confidence": 0.9},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--phantom-seeds", type=int, nargs="+", default=[9001, 9002])
    p.add_argument("--phantom-slices", type=int, default=16)
    p.add_argument("--k", type=int, default=2, help="corrected slices per phantom")
    p.add_argument("--muscle-darker", type=float, default=30.0, help="HU (adapt_curve's 30)")
    p.add_argument("--blur", type=float, default=1.2, help="Gaussian sigma, pixels (1.2)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    args.output.mkdir(parents=True, exist_ok=True)
    rows = _earlier_rows(args)
    model, card = load_model(bundled_model_path())
    phantoms = []
    for seed in args.phantom_seeds:
        hu, ref, mm = shifted_phantom(seed, args.phantom_slices, muscle_darker=args.muscle_darker,
                                      blur=args.blur)
        base = predict_volume(hu, mm, model, card, device="cpu")
        chosen = suggest_slices(slice_uncertainty(base.probabilities), args.k)
        held = [i for i in range(hu.shape[0]) if i not in chosen]
        d0 = dice_on(base.probabilities.argmax(0), ref, held)
        phantoms.append((seed, hu, ref, mm, chosen, held, d0))
        print(json.dumps({"seed": seed, "slices": chosen, "bundled": d0}), flush=True)
    tuned = {}      # fine-tuned models by (settings without interpolate, seed): configurations
    # that differ only in interpolate share one fine-tuning (interpolated as adapt_model does)
    for name in args.configs:
        settings = AdaptSettings(**{**BASE, **CONFIGS[name]})
        for seed, hu, ref, mm, chosen, held, d0 in phantoms:
            if any(r["changes"] == CONFIGS[name] and r["seed"] == seed for r in rows):
                continue        # measured by an earlier, stopped run of the same sweep
            key = (json.dumps({**settings.to_dict(), "interpolate": 1.0}, sort_keys=True), seed)
            if key not in tuned:
                res = adapt_model(model, card, [AdaptCase(hu, ref, mm, chosen, f"phantom {seed}")],
                                  AdaptSettings(**{**settings.to_dict(), "interpolate": 1.0}))
                tuned[key] = (res.model, res.seconds)
            net, seconds = tuned[key]
            if settings.interpolate < 1.0:
                net = interpolate_weights(model, net, settings.interpolate)
            pred = predict_volume(hu, mm, net, card, device="cpu").probabilities.argmax(0)
            row = {"config": name, "changes": CONFIGS[name], "seed": seed, "slices": chosen,
                   "adapt_s": round(seconds, 1), "bundled": d0, "dice": dice_on(pred, ref, held)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        _write(args, phantoms, rows)
    return 0


def _earlier_rows(args) -> list:
    """Rows of an earlier run into the same folder with the same base, k and slices per
    phantom (a sweep stopped and started again with other configurations keeps them)."""
    path = args.output / "sweep.json"
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    if old.get("base") != BASE or old.get("k") != args.k or \
            old.get("phantom_slices", 16) != args.phantom_slices or \
            old.get("shift", [30.0, 1.2]) != [args.muscle_darker, args.blur]:
        return []
    args.earlier_commands = old.get("commands", [old["command"]])
    return [r for r in old["rows"] if r["seed"] in args.phantom_seeds]


def _write(args, phantoms, rows) -> None:
    """sweep.json and sweep.md after every configuration (a stopped sweep keeps its rows)."""
    command = "nice -n 5 python -m training.adapt_sweep " + shlex.join(sys.argv[1:])
    commands = getattr(args, "earlier_commands", []) + [command]
    write_text(args.output / "sweep.json", json.dumps(
        {"command": command, "commands": commands, "base": BASE,
         "phantom_seeds": args.phantom_seeds, "k": args.k, "phantom_slices": args.phantom_slices,
         "shift": [args.muscle_darker, args.blur],
         "rows": rows, "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=2),
        overwrite=True)
    seeds = [ph[0] for ph in phantoms]
    lines = ["Made by " + ", then ".join(f"`{c}`" for c in commands) +
             f" (bundled model, CPU, one thread): held-out phantoms {seeds} of shifted "
             f"appearance (muscle {args.muscle_darker:g} HU darker, Gaussian blur sigma "
             f"{args.blur:g} pixels), {args.k} corrected slices each (the most uncertain), "
             f"Dice on the other slices. Base settings: {BASE}.", "",
             "| settings | MUS mean | " + " | ".join(f"MUS {s}" for s in seeds) +
             " | SAT mean | VAT mean | adapt s (mean) |",
             "| --- | --- | " + " | ".join("---" for _ in seeds) + " | --- | --- | --- |"]
    mean = lambda vals: float(np.mean(vals))  # noqa: E731
    lines.append("| bundled (k = 0) | %.3f | %s | %.3f | %.3f | 0 |" % (
        mean([ph[6]["MUS"] for ph in phantoms]), " | ".join("%.3f" % ph[6]["MUS"] for ph in phantoms),
        mean([ph[6]["SAT"] for ph in phantoms]), mean([ph[6]["VAT"] for ph in phantoms])))
    for changes in {json.dumps(r["changes"], sort_keys=True): r["changes"] for r in rows}.values():
        rs = [r for r in rows if r["changes"] == changes]
        name = rs[-1]["config"]
        by_seed = {r["seed"]: r["dice"]["MUS"] for r in rs}
        lines.append("| %s | %.3f | %s | %.3f | %.3f | %.0f |" % (
            name, mean([r["dice"]["MUS"] for r in rs]),
            " | ".join("%.3f" % by_seed[s] if s in by_seed else "-" for s in seeds),
            mean([r["dice"]["SAT"] for r in rs]), mean([r["dice"]["VAT"] for r in rs]),
            mean([r["adapt_s"] for r in rs])))
    write_text(args.output / "sweep.md", "\n".join(lines) + "\n", overwrite=True)


if __name__ == "__main__":
    sys.exit(main())
