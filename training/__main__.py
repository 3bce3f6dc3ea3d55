"""python -m training {train,evaluate,evaluate-real,bundle,experiment,report,adapt,area-bias,
interpolate,calibrate,guide,field,fix-norms,compare} ...: headless training and evaluation.

    python -m training train --phantom-subjects 40 --factor 2 --output runs/f2
    torchrun --nproc-per-node 4 -m training train --manifest data/manifest.csv --output runs/x
    python -m training evaluate --model runs/f2/model.safetensors --phantom-subjects 10 \
        --data-seed 1 --output runs/f2/eval

See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from EPDSegmentationLib.core.errors import EPDError

from . import (adapt, areabias, bundle, calibrate, compare, evaluate, experiment, field,
               guide, interpolate, norms, realct, report, train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (
        ("train", "train a model (one process, or under torchrun)", train.add_train_arguments,
         train.run),
        ("evaluate", "evaluate a model on a dataset: tables and figures",
         evaluate.add_evaluate_arguments, evaluate.run),
        ("evaluate-real", "a model on a real CT against binary tissue masks",
         realct.add_arguments, realct.run),
        ("bundle", "evaluate a run and write it as the bundled model", bundle.add_arguments,
         bundle.run),
        ("experiment", "the paper's experiment: train a grid of runs", experiment.add_arguments,
         experiment.run),
        ("report", "the results page of an experiment: tables, figures", report.add_arguments,
         report.run),
        ("adapt", "fine-tune a model on corrected cases (the panel's fine-tuning)",
         adapt.add_arguments, adapt.run),
        ("area-bias", "a model's tissue-area error on phantoms at coarse pixels (exact truth)",
         areabias.add_arguments, areabias.run),
        ("interpolate", "mix two models' weights (w x A + (1 - w) x B) into a model folder",
         interpolate.add_arguments, interpolate.run),
        ("calibrate", "fit a model's class-prior calibration on phantoms into a model folder",
         calibrate.add_arguments, calibrate.run),
        ("guide", "give a model HU-guided upsampling (its card) in a model folder",
         guide.add_arguments, guide.run),
        ("field", "give a model its training phantoms' field of view (its card) in a model "
                  "folder", field.add_arguments, field.run),
        ("fix-norms", "fix a model's normalisation statistics on its recipe's phantoms into a "
                      "model folder", norms.add_arguments, norms.run),
        ("compare", "model cards' evaluations side by side (markdown)", compare.add_arguments,
         compare.run),
    )
    for name, help_text, add_arguments, run in commands:
        command = sub.add_parser(name, help=help_text)
        add_arguments(command)
        command.set_defaults(func=run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run a command; bad input (arguments, files, devices) -> one error line and exit 2.
    Anything else (a bug, a CUDA failure) keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        args.func(args, argv)
    except (EPDError, ValueError, FileExistsError, FileNotFoundError, PermissionError) as exc:
        print(f"python -m training {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
