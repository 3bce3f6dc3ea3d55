"""The phantom's anatomy options as command-line flags, defined once for every tool that draws
phantoms (train, evaluate, calibrate, area-bias, bundle), so that a new option reaches all of
them: add it here and to generate.make_slice.

    add_anatomy_arguments(parser)            # --kidney-contact ... --psoas-apart
    subject_slices(seed, ..., **anatomy_kwargs(args))
    evaluate_argv += anatomy_argv(args)      # forwarded to a tool run from another
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Mapping, Tuple

#: (make_slice keyword, metavar, a share in 0..1, the torso anatomy only, help), in the order
#: the flags are listed; every default is 0 (the phantom as before the option existed).
ANATOMY_OPTIONS: Tuple[Tuple[str, str, bool, bool, str], ...] = (
    ("kidney_contact", "P", True, True,
     "with --phantom-levels: share of phantom subjects whose kidneys lie on the quadratus "
     "lumborum and psoas with no fat between (default 0)"),
    ("kidney_rise", "MM", False, True,
     "with --phantom-levels: the phantom's kidneys this much higher (20 puts them at T12 to "
     "L3, as in real patients; default 0)"),
    ("kidney_tilt", "DEG", False, True,
     "with --phantom-levels: the phantom's kidneys' long axes lean this many degrees towards "
     "the midline going up, upper poles beside the crura as in real patients (default 0: "
     "upright)"),
    ("costal_diaphragm", "P", True, True,
     "with --phantom-levels: the share of phantom subjects whose lower ribs the diaphragm "
     "lines on the inside, as in real patients (default 0: diaphragm only near the lung "
     "bases)"),
    ("flank_sat", "P", True, False,
     "the share of phantom subjects whose visceral compartment is closed at the back, the fat "
     "beside the back muscles subcutaneous, as in real patients (default 0: visceral)"),
    ("psoas_apart", "P", True, True,
     "with --phantom-levels: the share of phantom subjects whose psoas at L5 lies apart from "
     "the vertebral body and the iliacus, with fat between, as in many adults (default 0: "
     "joined to both)"),
    ("back_sat", "P", True, False,
     "the share of phantom subjects whose fat behind the back muscles (behind the erector "
     "spinae and the spinous process) is subcutaneous, as in real patients (default 0: "
     "visceral)"),
    ("crura_front", "P", True, True,
     "with --phantom-levels: the share of phantom subjects whose diaphragm crura arise from "
     "the front of the upper lumbar bodies, beside the aorta, as in real patients (default "
     "0: from the bodies' sides, where the real psoas lies)"),
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_anatomy_arguments(p) -> None:
    """Add every anatomy option to ``p`` (a parser or an argument group) as a float flag."""
    for name, metavar, _, _, text in ANATOMY_OPTIONS:
        p.add_argument(_flag(name), type=float, default=0.0, metavar=metavar, help=text)


def anatomy_kwargs(args: argparse.Namespace) -> Dict[str, float]:
    """The options as generate.make_slice keywords (float), from parsed arguments."""
    return {name: float(getattr(args, name)) for name, *_ in ANATOMY_OPTIONS}


def checked_anatomy(values: Mapping[str, float], torso: bool) -> Dict[str, float]:
    """The options of ``values`` (make_slice keywords) that are not 0, checked: a share must
    lie in 0..1, and a torso-only option needs the torso anatomy (``torso``); ValueError
    naming the flag otherwise."""
    out: Dict[str, float] = {}
    for name, _, share, torso_only, _ in ANATOMY_OPTIONS:
        value = float(values.get(name, 0.0))
        if share and not 0.0 <= value <= 1.0:
            raise ValueError(f"{_flag(name)} is a share in 0..1; got {value}")
        if value:
            if torso_only and not torso:
                raise ValueError(f"{_flag(name)} needs the torso anatomy (--phantom-levels)")
            out[name] = value
    return out


def anatomy_argv(args: argparse.Namespace, torso: bool = True) -> List[str]:
    """The options that are not 0 as command-line flags, to pass on to another tool; with
    torso=False only those the lumbar anatomy (no --phantom-levels) takes."""
    out: List[str] = []
    values = anatomy_kwargs(args)
    for name, _, _, torso_only, _ in ANATOMY_OPTIONS:
        if values[name] and (torso or not torso_only):
            out += [_flag(name), f"{values[name]:g}"]
    return out


def describe_anatomy(args: argparse.Namespace) -> str:
    """The options that are not 0, as "flank_sat 0.5, psoas_apart 0.5" ("" when none)."""
    return ", ".join(f"{name} {value:g}" for name, value in anatomy_kwargs(args).items()
                     if value)
