"""What an adapted model forgets: the bundled model adapted on the 2 most uncertain slices of
the shared ct_t11_l2 (TotalSegmentator's masks standing in for corrections, as adapt_curve
does) with replay 0 and 0.25, each then evaluated on held-out torso phantoms (not shifted).

    python -m training.adapt_forget runs/forget

Writes <out>/replay<R>.safetensors and <out>/eval_<name>/ (training evaluate's tables) and
prints the full-resolution Dice per class of the bundled and both adapted models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from EPDSegmentationLib.core.adapt import (AdaptCase, AdaptSettings, adapt_model,
                                           slice_uncertainty, suggest_slices)
from EPDSegmentationLib.core.inference import predict_volume
from EPDSegmentationLib.core.model_io import load_model, save_model
from EPDSegmentationLib.core.resources import bundled_model_path
from EPDSegmentationLib.io import read_volume

from .adapt_curve import TS, reference_labels

EVAL = ["--phantom-subjects", "6", "--phantom-slices", "4", "--data-seed", "7",
        "--phantom-levels", "T11", "L5", "--split", "all", "--device", "cpu", "--quiet",
        "--overwrite"]


def main(argv=None) -> int:
    from .__main__ import main as training_main

    out = Path((argv or sys.argv[1:])[0])
    out.mkdir(parents=True, exist_ok=True)
    ct = read_volume(TS / "ct_t11_l2.nii.gz")
    ref = reference_labels(ct, TS)
    si, sj, _ = ct.spacing
    model, card = load_model(bundled_model_path())
    base = predict_volume(ct.array, (sj, si), model, card, device="cpu",
                          ijk_to_ras=ct.ijk_to_ras)
    chosen = suggest_slices(slice_uncertainty(base.probabilities), 2)
    models = {"bundled": str(bundled_model_path())}
    for replay in (0.0, 0.25):
        case = AdaptCase(ct.array, ref, (sj, si), list(chosen), "ct_t11_l2", ct.ijk_to_ras)
        result = adapt_model(model, card, [case], AdaptSettings(replay_fraction=replay))
        save_model(out / f"replay{replay}", result.model, card, overwrite=True)
        models[f"replay{replay}"] = str(out / f"replay{replay}.safetensors")
    for name, path in models.items():
        training_main(["evaluate", "--model", path, "--output", str(out / f"eval_{name}"),
                       *EVAL])
        full = json.loads((out / f"eval_{name}" / "metrics.json").read_text())["full_resolution"]
        dice = {k: round(v["Dice"], 3) for k, v in full["per_class"].items()}
        print(name, f"slices {chosen}", dice, "mean", round(full["mean"]["Dice"], 3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
