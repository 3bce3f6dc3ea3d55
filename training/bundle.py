"""Make the bundled model: a trained run's weights plus a card that states measured accuracy.

    python -m training bundle --run runs/bundled_f2 --name EPDBodyComp_f2 \
        --output Resources/Models --report docs/model \
        --eval-subjects 12 --eval-seed 7 --real-dir ../shared/data/totalseg-example

1. ``python -m training evaluate`` on held-out phantom subjects (a data seed the run never
   saw) -> <report>/phantom/ (tables, figures);
2. ``python -m training evaluate-real`` on the real CT with TotalSegmentator's tissue masks,
   when --real-dir exists -> <report>/real/ (Dice, areas, overlays);
   and, when the folder also holds the abdomen-pelvis CT with TotalSegmentator's structure
   labels, the per-level share of paraspinal and psoas voxels called muscle ->
   <report>/real_levels/ (levels.md, levels.png); and both again with the training's
   spinal screws drawn into every slice, and with the reference's muscle darkened
   (myosteatosis), and ct_t11_l2 with its subcutaneous fat cut down (``evaluate-real
   --simulate metal|myosteatosis|cachexia``, draw 0: training/realsim.py) ->
   <report>/real_metal/, real_myosteatosis/, real_cachexia/, real_levels_metal/,
   real_levels_myosteatosis/;
   and ``python -m training area-bias``: soft tissue areas on held-out phantoms drawn at 3 mm
   pixels against their exact fractions -> <report>/area_bias.json;
3. the run's weights and card, with an ``evaluation`` section holding both results and the
   exact commands, written to <output>/<name>.safetensors and .json.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Dict, List, Optional

from EPDSegmentationLib.cli.options import add_mirror_argument

from . import areabias, evaluate, realct
from .phantom.options import add_anatomy_arguments, anatomy_argv
from .realsim import SIMULATIONS

#: The real sample's masks, and the classes each stands for (TotalSegmentator has no IMAT:
#: its skeletal muscle mask covers the muscle compartment, so it is compared with MUS + IMAT;
#: its torso fat is fat inside the body wall, roughly our VAT).
REAL_CT = "ct_t11_l2.nii.gz"
REAL_MASKS = (("MUS+IMAT", "tissue_skeletal_muscle.nii.gz"),
              ("SAT", "tissue_subcutaneous_fat.nii.gz"),
              ("VAT", "tissue_torso_fat.nii.gz"))
#: the second real CT (T12 to the pelvis) and its TotalSegmentator "total" labels
REAL_LEVELS_CT = "ct_abdomen_pelvis.nii.gz"
REAL_STRUCTURES = "ct_abdomen_pelvis_structures.nii.gz"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help="a training run folder")
    p.add_argument("--name", required=True, help="file stem of the bundled model")
    p.add_argument("--output", type=Path, required=True, help="folder for the model files")
    p.add_argument("--report", type=Path, required=True, help="folder for evaluation reports")
    p.add_argument("--eval-subjects", type=int, default=12)
    p.add_argument("--eval-slices", type=int, default=6)
    p.add_argument("--eval-seed", type=int, default=7, help="phantom data seed for evaluation")
    p.add_argument("--eval-levels", nargs=2, metavar=("FROM", "TO"),
                   help="also evaluate on held-out torso phantoms at these levels "
                        "(e.g. T11 L5) -> <report>/phantom_torso")
    # the held-out phantoms (evaluate, area-bias) drawn with train's phantom options
    add_anatomy_arguments(p.add_argument_group("held-out phantoms' anatomy (train's options)"))
    p.add_argument("--real-dir", type=Path, default=None,
                   help="folder of the real CT sample with TotalSegmentator tissue masks")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    add_mirror_argument(p)


def _per_class(result: Dict, metric: str) -> Dict[str, Optional[float]]:
    return {k: v.get(metric) for k, v in result["per_class"].items()}


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> Path:
    from EPDSegmentationLib.core.model_io import load_model, save_model

    weights = Path(args.run) / "model.safetensors"
    model, card = load_model(weights)
    report = Path(args.report)
    # every number below measured as `epdseg segment` and the module run by default
    evaluation: Dict[str, object] = {"mirror": args.mirror}
    no_mirror = [] if args.mirror else ["--no-mirror"]

    runs = [("phantom_held_out", "phantom", [])]
    if args.eval_levels:
        runs.append(("phantom_torso_held_out", "phantom_torso",
                     ["--phantom-levels", *args.eval_levels]))
    for key, folder, extra in runs:
        ev_argv = ["evaluate", "--model", str(weights), "--phantom-subjects",
                   str(args.eval_subjects), "--phantom-slices", str(args.eval_slices),
                   "--data-seed", str(args.eval_seed), *extra,
                   *anatomy_argv(args, torso=bool(extra)), "--split", "all",
                   "--output", str(report / folder), "--device", args.device,
                   "--quiet"] + (["--overwrite"] if args.overwrite else []) + no_mirror
        _call(evaluate.add_evaluate_arguments, evaluate.run, ev_argv)
        ph = json.loads((report / folder / "metrics.json").read_text())
        evaluation[key] = {
            "command": ph["command"], "data": ph["data"], "slices": ph["slices"],
            "full_resolution_dice": _per_class(ph["full_resolution"], "Dice"),
            "full_resolution_iou": _per_class(ph["full_resolution"], "IoU"),
            "low_resolution_dice": _per_class(ph["low_resolution"], "Dice"),
            "metric": "Dice/IoU after the per-class threshold search (docs/training.md)",
        }

    # tissue areas at 3 mm pixels, against the phantom's exact fractions: what area bias a
    # user of coarse scans should expect (training/areabias.py)
    ab_argv = ["area-bias", "--model", str(weights), "--phantom-subjects",
               str(args.eval_subjects), "--data-seed", str(args.eval_seed), *anatomy_argv(args),
               "--output", str(report / "area_bias.json"), "--device", args.device,
               "--quiet"] + (["--overwrite"] if args.overwrite else []) + no_mirror
    _call(areabias.add_arguments, areabias.run, ab_argv)
    ab = json.loads((report / "area_bias.json").read_text())
    evaluation["phantom_area_bias"] = {
        "command": ab["command"], "slices": ab["slices"], "pixel_mm": ab["pixel_mm"],
        "error_cm2": {k: v["error_cm2"] for k, v in ab["per_class"].items()},
        "true_cm2": {k: v["true_cm2"] for k, v in ab["per_class"].items()},
        "metric": "mean soft area - exact area per slice (cm^2), held-out phantoms drawn at "
                  "3 mm pixels (T11-L4)",
    }

    def evaluate_real(ct: Path, inputs: List[str], folder: str) -> Dict:
        re_argv = ["evaluate-real", "--model", str(weights), "--ct", str(ct), *inputs,
                   "--output", str(report / folder), "--device", args.device]
        re_argv += (["--overwrite"] if args.overwrite else []) + no_mirror
        _call(realct.add_arguments, realct.run, re_argv)
        return json.loads((report / folder / "metrics.json").read_text())

    simulated: Dict[str, object] = {}
    if args.real_dir is not None and (Path(args.real_dir) / REAL_CT).is_file():
        real = Path(args.real_dir)
        masks = [a for keys, name in REAL_MASKS for a in ("--mask", f"{keys}={real / name}")]
        rc = evaluate_real(real / REAL_CT, masks, "real")
        for what in SIMULATIONS:
            sim = evaluate_real(real / REAL_CT, [*masks, "--simulate", what,
                                                 "--simulate-seed", "0"], f"real_{what}")
            simulated[what] = {"command": sim["command"], "ct": REAL_CT,
                               "results": sim["results"]}
        evaluation["real_ct"] = {
            "command": rc["command"], "ct": REAL_CT,
            "reference": "TotalSegmentator tissue_types masks (another model, not ground "
                         "truth); no IMAT class; torso fat is roughly VAT",
            "results": rc["results"], "metric": "Dice of the argmax on the mask's slices",
        }
    else:
        evaluation["real_ct"] = None
    if (args.real_dir is not None and (Path(args.real_dir) / REAL_LEVELS_CT).is_file()
            and (Path(args.real_dir) / REAL_STRUCTURES).is_file()):
        real = Path(args.real_dir)
        structures = ["--structures", str(real / REAL_STRUCTURES)]
        lv = evaluate_real(real / REAL_LEVELS_CT, structures, "real_levels")
        for what in ("metal", "myosteatosis"):  # cachexia needs a SAT mask this CT lacks
            sim = evaluate_real(real / REAL_LEVELS_CT, [*structures, "--simulate", what,
                                                        "--simulate-seed", "0"],
                                f"real_levels_{what}")
            simulated[f"{what}_levels"] = {"command": sim["command"], "ct": REAL_LEVELS_CT,
                                           "shares": sim["levels"]["shares"]}
        evaluation["real_ct_levels"] = {
            "command": lv["command"], "ct": REAL_LEVELS_CT,
            "reference": "TotalSegmentator 'total' structure labels (another model)",
            "shares": lv["levels"]["shares"],
            "metric": "share of the structure's voxels whose argmax is MUS or IMAT, per "
                      "vertebral level (each slice to the vertebra with most voxels in it)",
        }
    else:
        evaluation["real_ct_levels"] = None
    evaluation["real_ct_simulated"] = dict(
        simulated, reference="the same TotalSegmentator masks and labels, less the voxels "
                             "the simulation removed (metal, cut fat; myosteatosis darkens "
                             "their muscle and removes nothing)",
        metric="as real_ct and real_ct_levels") if simulated else None

    card = dict(card)
    card["name"] = args.name
    card["evaluation"] = evaluation
    card["bundle_command"] = "python -m training " + shlex.join(list(argv or []))
    Path(args.output).mkdir(parents=True, exist_ok=True)
    save_model(Path(args.output) / args.name, model, card, overwrite=args.overwrite)
    print(json.dumps(evaluation, indent=1))
    return Path(args.output) / f"{args.name}.safetensors"


def _call(add_arguments, fn, argv: List[str]) -> None:
    p = argparse.ArgumentParser(prog=f"python -m training {argv[0]}")
    add_arguments(p)
    fn(p.parse_args(argv[1:]), argv)
