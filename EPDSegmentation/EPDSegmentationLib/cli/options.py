"""Command-line options shared by ``epdseg`` and ``python -m training``."""
from __future__ import annotations

import argparse


def add_mirror_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-mirror`` -> ``args.mirror`` False: the network once per slice instead of
    twice (inference.forward's mirror averaging, the default)."""
    parser.add_argument("--no-mirror", dest="mirror", action="store_false",
                        help="run the network once per slice, not also on its left-right "
                             "mirror image (half the network's time; mirror averaging is "
                             "the default, docs/model.md)")
