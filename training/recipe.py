"""A model card's training recipe as objects (``training field``, Testing/tools): the
augmentation, anatomy options and levels its training used, to draw phantoms with them."""

from __future__ import annotations

import shlex
from typing import Dict, Mapping, Tuple


def card_recipe(card: Mapping) -> Tuple[object, Dict[str, float], Tuple[str, ...]]:
    """The card's training recipe: (its Augment, its make_slice anatomy keywords, its
    phantom levels, in order); read from the card's command and augment fields."""
    from training.__main__ import build_parser
    from training.data import Augment
    from training.phantom.options import anatomy_kwargs
    from training.phantom.torso import LEVELS

    training = card["training"]
    words = shlex.split(training["command"])
    args = build_parser().parse_args(words[words.index("train"):])
    levels = LEVELS
    if args.phantom_levels:
        lo, hi = (LEVELS.index(v.upper()) for v in args.phantom_levels)
        levels = LEVELS[lo:hi + 1]
    return Augment(**training["augment"]), anatomy_kwargs(args), tuple(levels)
