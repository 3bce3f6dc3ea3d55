"""Fit a model's class-prior calibration on phantoms (``python -m training calibrate``).

For each input pixel size (default 0.865, 1.5 and 3 mm: the training scale, thin and thick
clinical scans), phantom subjects are drawn at that size (supersampled, so each class's
area is exact, as ``area-bias`` draws them) and run through the network as ``segment``
runs it; per-class weights are then fitted so that the calibrated soft areas summed over
the subjects come as close to the exact ones as the weights' bound lets them
(multiplicative updates, background's weight fixed at 1; core/calibration.py applies
them). Only phantoms: no real scan is used. The default data
seed, 11, is neither the training's (0) nor the held-out evaluation's (7). ``--shrink``
pulls the weights towards 1 where the phantoms barely identify them; ``--bound`` caps how
far a weight may move; ``--edge-cells R`` fits and applies them only within R network
cells of the network's own class edges, where its excess area lies. Given several
strengths or bounds, each pixel size keeps the pair with the smallest tissue area error on
other phantom subjects (``--select-seed``, 13), so that neither is picked on a real scan.

The output is a folder holding model.safetensors (the same weights) and model.json (the
card with ``calibration``), as ``interpolate`` writes, so that ``training bundle --run``
takes it; the card's validation metrics and evaluation, measured uncalibrated, are left out.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from EPDSegmentationLib.cli.options import add_mirror_argument
from EPDSegmentationLib.core.calibration import MAX_EDGE_CELLS
from EPDSegmentationLib.core.classes import KEYS, NUM_CLASSES

from training.phantom.options import (add_anatomy_arguments, anatomy_kwargs, checked_anatomy,
                                      describe_anatomy)

from .derived import add_derived_arguments, save_derived

#: multiplicative updates: w *= (true / calibrated) ** STEP until no weight moves by more
#: than TOLERANCE (relative), at most ITERATIONS times
STEP, ITERATIONS, TOLERANCE = 0.7, 1000, 1e-5
#: each class's weight stays within 1 / BOUND .. BOUND of the background's. Unbounded, the
#: fit chases area the network puts in pixels it is sure of and gets wrong (thin visceral fat
#: blurred away at 3 mm): on step 8 the VAT weight passed 20 after 200 steps and 70 after
#: 1,000, still moving (docs/model.md); a prior shift that large overrides the network
BOUND = 2.0
#: --select-seed: the phantom subjects that choose among several --shrink strengths or
#: --bound values (neither the fit's 11, training's 0 nor evaluation's 7)
SELECT_SEED = 13


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_derived_arguments(p)
    p.add_argument("--pixel-mm", type=float, nargs="+", default=[0.865, 1.5, 3.0],
                   help="input pixel sizes to fit a row of weights at, mm (default 0.865 1.5 3)")
    p.add_argument("--phantom-subjects", type=int, default=6)
    p.add_argument("--phantom-slices", type=int, default=3, help="slices per subject")
    p.add_argument("--phantom-levels", nargs=2, default=["T11", "L4"], metavar=("FROM", "TO"))
    p.add_argument("--slice-gap-mm", type=float, default=12.0)
    add_anatomy_arguments(p)            # train's phantom options (all 0: as before)
    p.add_argument("--fov-mm", type=float, default=440.0)
    p.add_argument("--data-seed", type=int, default=11,
                   help="phantom subject seed (default 11: neither training's 0 nor "
                        "evaluation's 7)")
    p.add_argument("--shrink", type=float, nargs="+", default=[0.0], metavar="S",
                   help="pull each log weight towards 0 (weight 1) by this share every update, "
                        "so that a weight the phantoms barely identify stays near 1 (0: none, "
                        "the default); several values: the one whose weights give the "
                        "smallest area error on the --select-seed subjects, per pixel size")
    p.add_argument("--bound", type=float, nargs="+", default=[BOUND], metavar="B",
                   help=f"each class's weight stays within 1/B .. B of the background's "
                        f"(default {BOUND:g}; B > 1); several values: chosen as --shrink's "
                        f"are, together with them")
    p.add_argument("--edge-cells", type=int, default=None, metavar="R",
                   help="fit and apply the weights only within R network cells of a change of "
                        "the network's own most likely class (core/calibration.py; default: "
                        "everywhere)")
    p.add_argument("--select-seed", type=int, default=SELECT_SEED,
                   help=f"phantom subject seed that chooses among several --shrink or --bound "
                        f"values (default {SELECT_SEED})")
    p.add_argument("--device", default="cpu", choices=("auto", "cuda", "mps", "cpu"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_mirror_argument(p)


def network_areas(model, card, seeds: Sequence[int], n_slices: int, levels: Sequence[str],
                  pixel_mm: float, fov_mm: float, slice_gap_mm: float, device, mirror: bool,
                  progress: bool = False, **anatomy: float
                  ) -> Tuple[List[Tuple[np.ndarray, float]], np.ndarray]:
    """Phantom subjects drawn at ``pixel_mm``: (per subject the network's uncalibrated
    probabilities on its own grid, float32 (n, C, h, w), with that grid's pixel area in
    cm^2; the exact class areas summed over all slices, float64 (C,) cm^2). anatomy: the
    phantom options that are not 0 (phantom.options.checked_anatomy; generate.make_slice)."""
    from tqdm import tqdm

    from EPDSegmentationLib.core.calibration import KEY
    from EPDSegmentationLib.core.inference import network_slab
    from training.phantom.generate import subject_slices

    # fitted on the network's output for the phantoms as drawn: without a calibration, and
    # without the field's padding (core/field.py), which would change the grid below
    plain = {k: v for k, v in card.items() if k not in (KEY, "field")}
    size = int(round(fov_mm / pixel_mm))
    supersample = max(2, int(np.ceil(pixel_mm / 0.4)))
    probs, true = [], np.zeros(NUM_CLASSES)
    for seed in tqdm(list(seeds), desc=f"phantoms at {pixel_mm} mm", unit="subject",
                     disable=not progress):
        stack = subject_slices(int(seed), n_slices, slice_gap_mm, levels=tuple(levels),
                               size=size, pixel_mm=pixel_mm, supersample=supersample,
                               **anatomy)
        hu = np.stack([s.hu for s in stack])
        low, device, _ = network_slab(hu, (pixel_mm, pixel_mm), model, plain, device,
                                      len(stack), [], mirror=mirror)
        p = low.probs.float().cpu().numpy()
        # the network's grid covers the input's field of view
        cell_cm2 = hu.shape[1] * hu.shape[2] * pixel_mm * pixel_mm / 100.0 / (
            p.shape[2] * p.shape[3])
        probs.append((p, cell_cm2))
        true += sum(s.fractions.reshape(NUM_CLASSES, -1).sum(1, dtype=np.float64)
                    for s in stack) * pixel_mm * pixel_mm / 100.0
    return probs, true


def fit_weights(probs: Sequence[Tuple[np.ndarray, float]], true: np.ndarray,
                bound: float = BOUND, shrink: float = 0.0,
                edge_cells: Optional[int] = None) -> np.ndarray:
    """Class weights float64 (C,), background 1, the others within 1 / bound .. bound,
    whose calibrated soft areas (calibrated_areas of ``probs``, as network_areas gives
    them) come as close to ``true`` (C,) cm^2 as the bound lets them (projected
    multiplicative updates). shrink in [0, 1): each update also pulls every log weight
    towards 0 by that share, so the fit stops where a weight's pull on its area balances
    the pull to 1: a weight whose area barely responds (the network sure of those pixels)
    stays near 1 instead of running to the bound; 0 is the plain fit. edge_cells: the
    weights act only near the network's own edges (core.calibration.edge_mask), as the card
    will apply them."""
    if not 0.0 <= shrink < 1.0:
        raise ValueError(f"shrink is a share in [0, 1); got {shrink}")
    probs = with_edges(probs, edge_cells)
    w = np.ones(NUM_CLASSES)
    for _ in range(ITERATIONS):
        area = calibrated_areas(probs, w)
        new = w * (np.maximum(true, 1e-9) / np.maximum(area, 1e-9)) ** STEP
        new = new / new[0]
        if shrink:
            new = np.exp((1.0 - shrink) * np.log(new))
        new = np.clip(new, 1.0 / bound, bound)
        new[0] = 1.0
        done = np.max(np.abs(new / w - 1.0)) < TOLERANCE
        w = new
        if done:
            break
    return w


def with_edges(probs: Sequence[Tuple], edge_cells: Optional[int]) -> List[Tuple]:
    """``probs`` as network_areas gives them, each with its edge_mask (edge_cells) as a
    third item where it has none yet: the edges are the network's uncalibrated argmax's,
    they do not move with the weights, so they are found once for every fit and check."""
    if edge_cells is None:
        return list(probs)
    from EPDSegmentationLib.core.calibration import edge_mask

    return [item if len(item) > 2 else (item[0], item[1], edge_mask(item[0], edge_cells))
            for item in probs]


def calibrated_areas(probs: Sequence[Tuple], w: np.ndarray,
                     edge_cells: Optional[int] = None) -> np.ndarray:
    """The soft areas (C,) cm^2 of ``probs`` ((n, C, h, w) probabilities with their pixel
    area, as network_areas gives them; or with a third item, the edge_mask where the weights
    act) under class weights w (core.calibration; near the edges only with edge_cells)."""
    from EPDSegmentationLib.core.calibration import apply_weights

    total = np.zeros(NUM_CLASSES)
    for p, cell, *mask in probs:
        if mask:
            q = np.where(mask[0], apply_weights(p, w), p)
        else:
            q = apply_weights(p, w, edge_cells)
        total = total + q.sum((0, 2, 3), dtype=np.float64) * cell
    return total


def _choice(bound: float, shrink: float) -> str:
    return f"bound {bound:g} shrink {shrink:g}"


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> Path:
    from EPDSegmentationLib.core.calibration import KEY
    from EPDSegmentationLib.core.inference import select_device
    from EPDSegmentationLib.core.model_io import load_model

    from training.phantom.dataset import subject_seeds


    pixels = [float(v) for v in args.pixel_mm]
    if any(not v > 0 for v in pixels) or sorted(set(pixels)) != pixels:
        raise ValueError(f"--pixel-mm must be positive, ascending and distinct; got {pixels}")
    if args.phantom_subjects < 1 or args.phantom_slices < 1:
        raise ValueError("--phantom-subjects and --phantom-slices must be >= 1")
    bounds = [float(v) for v in args.bound]
    for v in bounds:
        if not v > 1.0:
            raise ValueError(f"--bound must be > 1; got {v:g}")
    shrinks = [float(v) for v in args.shrink]
    for v in shrinks:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"--shrink is a share in [0, 1); got {v}")
    choices = [(b, s) for b in bounds for s in shrinks]
    edge = args.edge_cells
    if edge is not None and not 1 <= edge <= MAX_EDGE_CELLS:
        raise ValueError(f"--edge-cells must be 1 to {MAX_EDGE_CELLS}; got {edge}")
    if len(choices) > 1 and args.select_seed == args.data_seed:
        raise ValueError("--select-seed must differ from --data-seed: the strength or bound "
                         "is chosen on subjects the fit has not seen")
    out = Path(args.output) / "model"
    if out.with_suffix(".safetensors").exists() and not args.overwrite:
        raise FileExistsError(f"{out}.safetensors exists; pass --overwrite to replace it")
    model, card = load_model(args.model)
    device, _ = select_device(args.device)
    seeds = subject_seeds(args.data_seed, args.phantom_subjects)
    rows, report = [], {}
    for px in pixels:
        draw = dict(n_slices=args.phantom_slices, levels=args.phantom_levels, pixel_mm=px,
                    fov_mm=args.fov_mm, slice_gap_mm=args.slice_gap_mm, device=device,
                    mirror=args.mirror, progress=not args.quiet,
                    **checked_anatomy(anatomy_kwargs(args), torso=True))
        probs, true = network_areas(model, card, seeds, **draw)
        probs = with_edges(probs, edge)
        fits = {c: fit_weights(probs, true, bound=c[0], shrink=c[1], edge_cells=edge)
                for c in choices}
        entry: Dict[str, object] = {}
        if len(choices) > 1:
            held = subject_seeds(args.select_seed, args.phantom_subjects)
            hp, ht = network_areas(model, card, held, **draw)
            hp = with_edges(hp, edge)
            # the tissue classes' summed absolute area error on subjects the fit did not see
            err = {c: float(np.abs(calibrated_areas(hp, w) - ht)[1:].sum())
                   / (len(held) * args.phantom_slices) for c, w in fits.items()}
            bound, shrink = min(choices, key=lambda c: err[c])
            entry["selection"] = {"select_seed": args.select_seed, "subjects": len(held),
                                  "tissue_abs_error_cm2": {_choice(*c): e
                                                           for c, e in err.items()}}
            print(f"{px} mm: held-out tissue area error, cm2 a slice: "
                  + ", ".join(f"{_choice(*c)} {e:.2f}" for c, e in err.items())
                  + f" -> {_choice(bound, shrink)}")
        else:
            bound, shrink = choices[0]
        w = fits[(bound, shrink)]
        rows.append([float(v) for v in w])
        n = len(seeds) * args.phantom_slices
        before = (calibrated_areas(probs, np.ones(NUM_CLASSES)) - true) / n
        after = (calibrated_areas(probs, w) - true) / n
        report[str(px)] = {"weights": dict(zip(KEYS, rows[-1])), "shrink": shrink,
                           "bound": bound,
                           "area_error_cm2_before": dict(zip(KEYS, before.tolist())),
                           "area_error_cm2_after": dict(zip(KEYS, after.tolist())), **entry}
        print(f"{px} mm: weights " + " ".join(f"{k} {v:.3f}" for k, v in zip(KEYS, w))
              + "; soft area - exact, cm2 a slice, before -> after: "
              + ", ".join(f"{k} {b:+.2f} -> {a:+.2f}"
                          for k, b, a in zip(KEYS[1:], before[1:], after[1:])))
    calibration = {
        "pixel_mm": pixels, "class_weights": rows,
        **({} if edge is None else {"edge_cells": int(edge)}),
        "fitted_on": (f"{len(seeds)} phantom subjects x {args.phantom_slices} slices "
                      f"({'-'.join(args.phantom_levels)}), data seed {args.data_seed}, drawn "
                      f"at each pixel size"
                      + (f", {describe_anatomy(args)}" if describe_anatomy(args) else "")
                      + "; soft areas against the exact class areas"
                      + ("" if edge is None else f", the weights within {edge} network "
                         f"cell(s) of the network's own class edges")),
        "mirror": bool(args.mirror), "fit": report,
        "command": "python -m training " + shlex.join(list(argv or [])),
    }
    path = save_derived(model, card, KEY, calibration, args.output, args.overwrite)
    print(path)
    return path
