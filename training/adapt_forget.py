"""What an adapted model learns on the corrected case and what it forgets elsewhere, per
fine-tuning setting: the bundled model adapted on the 2 most uncertain slices of the shared
ct_t11_l2 (TotalSegmentator's masks standing in for corrections, as adapt_curve does), then
  - learned: Dice of MUS, SAT and VAT on the other slices of that CT (adapt_curve's measure);
  - forgotten: full-resolution Dice per class on held-out torso phantoms (not shifted):
    ``python -m training evaluate --model M`` + EVAL (6 subjects x 4 slices, seed 7, T11 to L5).

    nice -n 5 python -m training.adapt_forget runs/forget                 # the defaults
    nice -n 5 python -m training.adapt_forget runs/forget --configs "replay 0" "replay 0.25"

A configuration is a set of AdaptSettings fields changed from the current defaults (CONFIGS;
"defaults" changes none). Settings that differ only in ``interpolate`` share one fine-tuning
(the interpolation is applied afterwards, exactly as adapt_model does it). Writes
<out>/<config>.safetensors, <out>/eval_<config>/ (evaluate's tables), <out>/forget.json and
<out>/forget.md (after every configuration) and prints one JSON row per model.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from EPDSegmentationLib.core.adapt import (AdaptCase, AdaptSettings, adapt_model,
                                           interpolate_weights, slice_uncertainty, suggest_slices)
from EPDSegmentationLib.core.atomic import write_text
from EPDSegmentationLib.core.inference import predict_volume
from EPDSegmentationLib.core.model_io import load_model, save_model
from EPDSegmentationLib.core.resources import bundled_model_path
from EPDSegmentationLib.io import read_volume

from .adapt_curve import TS, dice_on, reference_labels

EVAL = ["--phantom-subjects", "6", "--phantom-slices", "4", "--data-seed", "7",
        "--phantom-levels", "T11", "L5", "--split", "all", "--device", "cpu", "--quiet",
        "--overwrite"]
#: name -> AdaptSettings fields changed from the current defaults (replay and interpolate
#: always named, so a name keeps its meaning when the defaults change).
CONFIGS = {
    "defaults": {},
    "defaults, seed 1": {"seed": 1},
    "defaults, seed 2": {"seed": 2},
    "replay 0": {"replay_fraction": 0.0, "interpolate": 1.0},
    "replay 0.25": {"replay_fraction": 0.25, "interpolate": 1.0},
    "replay 0.1": {"replay_fraction": 0.1, "interpolate": 1.0},
    "replay 0, interpolate 0.75": {"replay_fraction": 0.0, "interpolate": 0.75},
    "replay 0, interpolate 0.5": {"replay_fraction": 0.0, "interpolate": 0.5},
    "replay 0, interpolate 0.4": {"replay_fraction": 0.0, "interpolate": 0.4},
    "replay 0, interpolate 0.35": {"replay_fraction": 0.0, "interpolate": 0.35},
    "replay 0, interpolate 0.3": {"replay_fraction": 0.0, "interpolate": 0.3},
    "replay 0.25, interpolate 0.75": {"replay_fraction": 0.25, "interpolate": 0.75},
    "replay 0, L2-SP 0.1": {"replay_fraction": 0.0, "interpolate": 1.0, "l2sp": 0.1},
    "replay 0, L2-SP 1": {"replay_fraction": 0.0, "interpolate": 1.0, "l2sp": 1.0},
    "replay 0.25, 120 steps": {"replay_fraction": 0.25, "interpolate": 1.0, "steps": 120},
    "replay 0.25, confident 0.9": {"replay_fraction": 0.25, "interpolate": 1.0,
                                   "replay_confidence": 0.9},
}
CLASS_KEYS = ("MUS", "IMAT", "SAT", "VAT", "MSC")


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")


def phantom_dice(training_main, path: str, folder: Path) -> dict:
    """Full-resolution Dice per class and their mean on the held-out phantoms (EVAL)."""
    training_main(["evaluate", "--model", path, "--output", str(folder), *EVAL])
    full = json.loads((folder / "metrics.json").read_text())["full_resolution"]
    out = {k: round(v["Dice"], 3) for k, v in full["per_class"].items()}
    out["mean"] = round(full["mean"]["Dice"], 3)
    return out


def main(argv=None) -> int:
    from .__main__ import main as training_main

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", type=Path)
    p.add_argument("--configs", nargs="+", default=["defaults", "replay 0", "replay 0.25"], choices=list(CONFIGS))
    p.add_argument("--data", type=Path, default=TS)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    ct = read_volume(args.data / "ct_t11_l2.nii.gz")
    ref = reference_labels(ct, args.data)
    si, sj, _ = ct.spacing
    model, card = load_model(bundled_model_path())
    base = predict_volume(ct.array, (sj, si), model, card, device="cpu", ijk_to_ras=ct.ijk_to_ras)
    chosen = suggest_slices(slice_uncertainty(base.probabilities), 2)
    held = [k for k in range(ct.array.shape[0]) if k not in chosen]
    rows = [{"config": "bundled", "changes": None, "settings": None, "slices": chosen,
             "ct_dice": dice_on(base.probabilities.argmax(0), ref, held),
             "phantom_dice": phantom_dice(training_main, str(bundled_model_path()),
                                          out / "eval_bundled")}]
    print(json.dumps(rows[-1]), flush=True)
    tuned = {}      # the fine-tuned model per settings without interpolate
    for name in args.configs:
        settings = AdaptSettings(**CONFIGS[name])
        key = json.dumps({**settings.to_dict(), "interpolate": 1.0}, sort_keys=True)
        if key not in tuned:
            case = AdaptCase(ct.array, ref, (sj, si), list(chosen), "ct_t11_l2", ct.ijk_to_ras)
            res = adapt_model(model, card, [case],
                              AdaptSettings(**{**settings.to_dict(), "interpolate": 1.0}))
            tuned[key] = (res.model, res.seconds)
        net, seconds = tuned[key]
        if settings.interpolate < 1.0:
            net = interpolate_weights(model, net, settings.interpolate)
        pred = predict_volume(ct.array, (sj, si), net, card, device="cpu",
                              ijk_to_ras=ct.ijk_to_ras).probabilities.argmax(0)
        save_model(out / slug(name), net, card, overwrite=True)
        rows.append({"config": name, "changes": CONFIGS[name], "settings": settings.to_dict(),
                     "slices": chosen, "adapt_s": round(seconds, 1),
                     "ct_dice": dice_on(pred, ref, held),
                     "phantom_dice": phantom_dice(training_main, str(out / f"{slug(name)}.safetensors"),
                                                  out / f"eval_{slug(name)}")})
        print(json.dumps(rows[-1]), flush=True)
        _write(out, argv, rows)
    _write(out, argv, rows)
    return 0


def _write(out: Path, argv, rows) -> None:
    command = "nice -n 5 python -m training.adapt_forget " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    write_text(out / "forget.json", json.dumps({"command": command, "eval": EVAL, "rows": rows},
                                               indent=2), overwrite=True)
    lines = [f"Made by `{command}`: the bundled model adapted on the 2 most uncertain slices "
             f"{rows[0]['slices']} of ct_t11_l2 (TotalSegmentator's masks as corrections); Dice "
             f"on its other slices (CT) and full-resolution Dice on held-out torso phantoms "
             f"(`python -m training evaluate` {' '.join(EVAL[:-4])}).", "",
             "| setting | CT MUS | CT SAT | CT VAT | phantom " + " | phantom ".join(CLASS_KEYS) +
             " | phantom mean |", "| --- " * (5 + len(CLASS_KEYS)) + "|"]
    for r in rows:
        c, ph = r["ct_dice"], r["phantom_dice"]
        lines.append(f"| {r['config']} | {c['MUS']:.3f} | {c['SAT']:.3f} | {c['VAT']:.3f} | " +
                     " | ".join(f"{ph.get(k, float('nan')):.3f}" for k in CLASS_KEYS) +
                     f" | {ph['mean']:.3f} |")
    write_text(out / "forget.md", "\n".join(lines) + "\n", overwrite=True)


if __name__ == "__main__":
    raise SystemExit(main())
