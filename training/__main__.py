"""python -m training {train,evaluate,evaluate-real,bundle,experiment,report} ...: headless training and evaluation.

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


def build_parser() -> argparse.ArgumentParser:
    from . import bundle, evaluate, experiment, realct, report, train

    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model (one process, or under torchrun)")
    train.add_train_arguments(t)
    t.set_defaults(func=train.run)
    e = sub.add_parser("evaluate", help="evaluate a model on a dataset: tables and figures")
    evaluate.add_evaluate_arguments(e)
    e.set_defaults(func=evaluate.run)
    r = sub.add_parser("evaluate-real", help="a model on a real CT against binary tissue masks")
    realct.add_arguments(r)
    r.set_defaults(func=realct.run)
    b = sub.add_parser("bundle", help="evaluate a run and write it as the bundled model")
    bundle.add_arguments(b)
    b.set_defaults(func=bundle.run)
    x = sub.add_parser("experiment", help="the paper's experiment: train a grid of runs")
    experiment.add_arguments(x)
    x.set_defaults(func=experiment.run)
    rp = sub.add_parser("report", help="the results page of an experiment: tables, figures")
    report.add_arguments(rp)
    rp.set_defaults(func=report.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run a command; bad input (arguments, files, devices) -> one error line and exit 2.
    Anything else (a bug, a CUDA failure) keeps its traceback."""
    from EPDSegmentationLib.inference import DeviceError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        args.func(args, argv)
    except (ValueError, FileExistsError, FileNotFoundError, PermissionError, DeviceError) as exc:
        print(f"python -m training {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
