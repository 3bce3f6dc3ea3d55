"""Compare the evaluations of model cards side by side (``python -m training compare``).

    python -m training compare Resources/Models/EPDBodyComp_f2.json runs/scratch/EPDBodyComp_f2.json

Each argument is a model card (``.json``) or its weights (``.safetensors``, the card beside
them) whose ``evaluation`` section ``training bundle`` wrote. One markdown table, a column
per card and a row per number: held-out phantom Dice (mid-L3 and the torso levels), the
phantoms' tissue-area bias at coarse pixels (cm^2 a slice), each real-CT mask's Dice and
soft area, per vertebral level the share of TotalSegmentator's psoas, paraspinal and kidney
voxels called muscle and the VAT behind the back muscles, and the same for every simulation
(screws, thin fat, fattier muscle). What candidates are compared on when one may replace the
bundled model (docs/model.md); a number a card lacks shows as "-".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from EPDSegmentationLib.core.atomic import write_text

#: the classes whose phantom Dice and area bias are listed (background left out)
TISSUES = ("MUS", "IMAT", "SAT", "VAT", "MSC")
#: per level, the TotalSegmentator groups whose share called muscle is listed
GROUPS = ("psoas", "paraspinal", "kidneys")

Row = Tuple[str, List[Optional[str]]]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cards", type=Path, nargs="+", metavar="CARD",
                   help="model cards (.json) or their weights (.safetensors)")
    p.add_argument("--output", type=Path, help="also write the table here (markdown)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def read_evaluation(path: Path) -> Dict:
    """The ``evaluation`` section of the card at ``path`` (.json, or the .json beside a
    .safetensors)."""
    card = Path(path)
    if card.suffix == ".safetensors":
        card = card.with_suffix(".json")
    if not card.is_file():
        raise FileNotFoundError(f"{card}: no model card there")
    try:
        data = json.loads(card.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{card}: not a JSON model card ({exc})") from None
    evaluation = data.get("evaluation") if isinstance(data, dict) else None
    if not evaluation:
        raise ValueError(f"{card}: the card has no evaluation (made by `training bundle`)")
    return evaluation


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(v, spec: str) -> Optional[str]:
    return None if v is None else format(v, spec)


def _sections(evaluations: Sequence[Dict], where: Sequence[str]):
    """Each evaluation's dict at ``where`` ({} if absent), and their keys in first-seen order."""
    found = [_get(e, *where) or {} for e in evaluations]
    return found, list(dict.fromkeys(k for d in found for k in d))


def _level_rows(prefix: str, evaluations: Sequence[Dict], where: Sequence[str]) -> List[Row]:
    shares, levels = _sections(evaluations, where)
    rows: List[Row] = []
    for group in GROUPS:
        for lv in levels:
            vals = [_fmt(_get(s, lv, group, "muscle_share"), ".3f") for s in shares]
            if any(v is not None for v in vals):
                rows.append((f"{prefix}{group} {lv} called muscle", vals))
    for lv in levels:
        vals = [_fmt(_get(s, lv, "vat_behind_back_cm2"), ".1f") for s in shares]
        if any(v is not None for v in vals):
            rows.append((f"{prefix}VAT behind the back muscles {lv}, cm2/slice", vals))
    return rows


def _mask_rows(prefix: str, evaluations: Sequence[Dict], where: Sequence[str]) -> List[Row]:
    results, names = _sections(evaluations, where)
    rows: List[Row] = []
    for n in names:
        rows.append((f"{prefix}{n}: Dice", [_fmt(_get(r, n, "dice"), ".3f") for r in results]))
        rows.append((f"{prefix}{n}: soft area, cm2/slice (mask's)",
                     [None if _get(r, n, "soft_area_cm2") is None else
                      f"{r[n]['soft_area_cm2']:.1f} ({r[n].get('mask_area_cm2', float('nan')):.1f})"
                      for r in results]))
    return rows


def rows(evaluations: Sequence[Dict]) -> List[Row]:
    """The table's rows: (what, one formatted value or None per evaluation)."""
    out: List[Row] = [("mirror averaging", [_fmt(_get(e, "mirror"), "") for e in evaluations])]
    for key, name in (("phantom_held_out", "mid-L3"), ("phantom_torso_held_out", "torso")):
        for c in TISSUES:
            out.append((f"held-out phantoms ({name}) Dice {c}",
                        [_fmt(_get(e, key, "full_resolution_dice", c), ".3f")
                         for e in evaluations]))
    px = next((_get(e, "phantom_area_bias", "pixel_mm") for e in evaluations
               if _get(e, "phantom_area_bias", "pixel_mm") is not None), None)
    at = "" if px is None else f" at {px:g} mm"
    for c in TISSUES:
        out.append((f"phantom area bias{at} {c}, cm2/slice",
                    [_fmt(_get(e, "phantom_area_bias", "error_cm2", c), "+.2f")
                     for e in evaluations]))
    both = []
    for e in evaluations:
        m, i = (_get(e, "phantom_area_bias", "error_cm2", k) for k in ("MUS", "IMAT"))
        both.append(None if m is None or i is None else f"{m + i:+.2f}")
    out.append((f"phantom area bias{at} MUS + IMAT, cm2/slice", both))
    out += _mask_rows("real CT ", evaluations, ("real_ct", "results"))
    out += _level_rows("real CT levels: ", evaluations, ("real_ct_levels", "shares"))
    simulated, names = _sections(evaluations, ("real_ct_simulated",))
    for k in (n for n in names if any(isinstance(d.get(n), dict) for d in simulated)):
        out += _mask_rows(f"simulated {k}: ", evaluations, ("real_ct_simulated", k, "results"))
        out += _level_rows(f"simulated {k}: ", evaluations, ("real_ct_simulated", k, "shares"))
    return [(what, vals) for what, vals in out if any(v is not None for v in vals)]


def table(paths: Sequence[Path], evaluations: Sequence[Dict]) -> str:
    """The markdown table: a column per card."""
    lines = ["| | " + " | ".join(f"`{p}`" for p in paths) + " |",
             "| --- |" + " --- |" * len(paths)]
    for what, vals in rows(evaluations):
        lines.append(f"| {what} | " + " | ".join("-" if v is None else v for v in vals) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> str:
    if args.output is not None and args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
    evaluations = [read_evaluation(p) for p in args.cards]
    text = table(args.cards, evaluations)
    print(text, end="")
    if args.output is not None:
        write_text(args.output, text, overwrite=args.overwrite)
    return text
