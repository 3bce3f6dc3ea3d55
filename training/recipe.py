"""A model card's training recipe as objects (``training field``, ``training fix-norms``,
Testing/tools): the augmentation, anatomy options and levels its training used, to draw
phantoms with them."""

from __future__ import annotations

import shlex
from typing import Dict, Iterator, Mapping, Tuple

import numpy as np


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


def recipe_phantoms(card: Mapping, subjects: int,
                    progress: bool = True) -> Iterator[Tuple[np.ndarray, float]]:
    """(HU (H, W) float32, pixel mm) of the card's recipe's phantoms: subjects 0 to
    subjects-1, one slice of each at each of its levels, augmented by its Augment with a
    stream of its own per subject and level; a tqdm bar over the subjects."""
    from tqdm import tqdm

    from training.phantom.generate import make_slice

    augment, anatomy, levels = card_recipe(card)
    for seed in tqdm(range(subjects), desc="phantoms", unit="subject", disable=not progress):
        for i, level in enumerate(levels):
            sl = make_slice(seed, level=level, anatomy="torso", **anatomy)
            hu, _ = augment(sl.hu.astype(np.float32), sl.labels,
                            np.random.default_rng([seed, i]), tissues=sl.tissues)
            yield hu, sl.pixel_mm
