"""Evaluate a model on a real CT volume against binary tissue masks from another source.

    python -m training evaluate-real --model Resources/Models/EPDBodyComp_f2.safetensors \
        --ct ../shared/data/totalseg-example/ct_t11_l2.nii.gz \
        --mask MUS=../shared/data/totalseg-example/tissue_skeletal_muscle.nii.gz \
        --mask SAT=../shared/data/totalseg-example/tissue_subcutaneous_fat.nii.gz \
        --mask VAT=../shared/data/totalseg-example/tissue_torso_fat.nii.gz \
        --output runs/realct

Each ``--mask KEY[+KEY...]=FILE`` compares the union of our classes KEY... (hard labels: the
argmax of the predicted probabilities on the CT's grid) with the mask, on the slices where
the mask has any voxel. Writes metrics.json, table.md (Dice, and the areas per slice in cm^2,
soft and hard, against the mask's), and overlay PNGs of three slices (prediction | mask).
The masks are another model's output, not ground truth: agreement, not accuracy.

With ``--structures FILE`` (a TotalSegmentator "total" label map on the CT's grid) it also
reports, per vertebral level (each slice assigned to the vertebra with the most voxels in
it), the share of the paraspinal (autochthon) and psoas (iliopsoas) voxels we call MUS or
IMAT, and the share of kidney, liver and spleen voxels we call MUS or IMAT (should be 0),
with a row "below L5" (BELOW_L5) for the slices past L5 (the sacrum and the pelvis: no
goal; the phantom ends at the bottom of the S1 body; the iliopsoas there is the "psoas" column), in
levels.md, the same counts per slice in slices.csv (any run of slices can be summed), and
overlays of each level's middle slice with the muscles' outlines (levels.png):

    python -m training evaluate-real --model Resources/Models/EPDBodyComp_f2.safetensors \
        --ct ../shared/data/totalseg-example/ct_abdomen_pelvis.nii.gz \
        --structures ../shared/data/totalseg-example/ct_abdomen_pelvis_structures.nii.gz \
        --output runs/realct_levels

With ``--simulate metal`` (or ``cachexia``, which needs a SAT mask) the training's spinal
screws (or its thin subcutaneous fat) are first drawn into every slice, and the masks and
the structure labels lose the voxels the drawing removed (training/realsim.py): how a model
copes with hardware or a cachectic body on real anatomy. ``--simulate myosteatosis``
darkens the reference's own muscle (the MUS+IMAT mask, or the paraspinal and psoas labels of
``--structures``) by 20 HU with fattier patches: whether fattier muscle is still called
muscle. ``training bundle`` records draw 0 of each in the card.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from EPDSegmentationLib.cli.options import add_mirror_argument
from EPDSegmentationLib.core.atomic import write_text
from EPDSegmentationLib.core.classes import CLASSES, class_by_key
from EPDSegmentationLib.core.inference import predict_volume
from EPDSegmentationLib.core.levels import BELOW_L5
from EPDSegmentationLib.io import read_labels, read_volume
from EPDSegmentationLib.io.overlay import display_slice, overlay_rgb
from EPDSegmentationLib.io.readers import read_itk, same_grid

from .logs import save_figure
from .realsim import SIMULATIONS, simulate


#: TotalSegmentator "total" (v2) label values: vertebrae, and the structures counted per level
TS_VERTEBRAE = {33: "T11", 32: "T12", 31: "L1", 30: "L2", 29: "L3", 28: "L4", 27: "L5"}
TS_GROUPS = (("paraspinal", (86, 87)), ("psoas", (88, 89)), ("kidneys", (2, 3)),
             ("liver", (5,)), ("spleen", (1,)))
#: groups that are muscle (the share called MUS/IMAT should be high); the others should be 0
TS_MUSCLES = ("paraspinal", "psoas")


def parse_mask(spec: str) -> Tuple[List[int], Path]:
    """'MUS+IMAT=path' -> ([1, 2], Path('path'))."""
    keys, sep, path = spec.partition("=")
    if not sep or not keys or not path:
        raise ValueError(f"--mask wants KEY[+KEY...]=FILE; got {spec!r}")
    try:
        classes = [class_by_key(k).index for k in keys.split("+")]
    except KeyError as exc:
        raise ValueError(str(exc)) from None
    return classes, Path(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--ct", type=Path, required=True, help="CT volume (NIfTI, NRRD or DICOM)")
    p.add_argument("--mask", action="append", default=[], metavar="KEY[+KEY]=FILE",
                   help="binary mask on the CT's grid and the class keys it stands for")
    p.add_argument("--structures", type=Path, default=None, metavar="FILE",
                   help="TotalSegmentator 'total' label map on the CT's grid: per-level "
                        "shares of paraspinal and psoas voxels called muscle")
    p.add_argument("--simulate", choices=SIMULATIONS, default=None,
                   help="draw the training's spinal screws (metal) or thin subcutaneous fat "
                        "(cachexia: needs a SAT --mask) on every slice first, or darken the "
                        "reference's muscle by 20 HU and fatty patches (myosteatosis: needs "
                        "a MUS+IMAT --mask or --structures); masks and structures lose the "
                        "voxels it took (training/realsim.py): a stress check on real anatomy")
    p.add_argument("--simulate-seed", type=int, default=0, metavar="SEED")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--overwrite", action="store_true")
    add_mirror_argument(p)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return float("nan") if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def evaluate_masks(probabilities: np.ndarray, masks: Sequence[Tuple[str, List[int], np.ndarray]],
                   pixel_area_mm2: float) -> Dict[str, Dict[str, float]]:
    """probabilities (C, K, J, I); masks: (name, classes, bool (K, J, I)). Per mask, on its
    slices: Dice of the union of the classes' argmax pixels, and mean areas per slice (cm^2):
    the mask's, ours soft (sum of the classes' probabilities) and hard."""
    labels = probabilities.argmax(axis=0)
    px_cm2 = pixel_area_mm2 / 100.0
    out = {}
    for name, classes, mask in masks:
        ks = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
        ours = np.isin(labels[ks], classes)
        soft = probabilities[classes][:, ks].sum(axis=0)
        out[name] = {
            "dice": dice(ours, mask[ks]),
            "slices": int(len(ks)),
            "mask_area_cm2": float(mask[ks].sum() * px_cm2 / max(len(ks), 1)),
            "soft_area_cm2": float(soft.sum() * px_cm2 / max(len(ks), 1)),
            "hard_area_cm2": float(ours.sum() * px_cm2 / max(len(ks), 1)),
        }
    return out


def slice_levels(structures: np.ndarray) -> List[Optional[str]]:
    """structures int (K, J, I) -> per slice k the vertebra (TS_VERTEBRAE name) with the most
    voxels in it, or None where there is none."""
    names: List[Optional[str]] = []
    ids = np.array(sorted(TS_VERTEBRAE))
    for k in range(structures.shape[0]):
        counts = np.array([(structures[k] == i).sum() for i in ids])
        names.append(TS_VERTEBRAE[int(ids[counts.argmax()])] if counts.max() > 0 else None)
    return names


def level_slices_by_name(per_slice: Sequence[Optional[str]]) -> Dict[str, List[int]]:
    """slice_levels' result -> {level: its slices k}, cranial to caudal as TS_VERTEBRAE
    lists them, then BELOW_L5: the slices with no level on the far side of L5 from L4 (only
    when both are in the CT; which side is caudal follows from where L4 lies)."""
    out = {name: [k for k, n in enumerate(per_slice) if n == name]
           for name in TS_VERTEBRAE.values()}
    out = {name: ks for name, ks in out.items() if ks}
    l4, l5 = out.get("L4"), out.get("L5")
    if l4 and l5:
        beyond = (range(min(l5)) if min(l4) > max(l5) else
                  range(max(l5) + 1, len(per_slice)) if max(l4) < min(l5) else range(0))
        ks = [k for k in beyond if per_slice[k] is None]
        if ks:
            out[BELOW_L5] = ks
    return out


def vat_behind_back(labels: np.ndarray, structures: np.ndarray, ijk_to_ras,
                    pixel_area_mm2: float) -> List[Optional[float]]:
    """Per slice k, the area (cm2) of what we call VAT lying behind the middle of
    TotalSegmentator's paraspinal (autochthon) voxels in that slice, or None where it has
    none: anatomically no visceral fat lies there (the fat beside and behind the back
    muscles is subcutaneous), so this is an error of ours with no reference needed.
    labels, structures (K, J, I); ijk_to_ras 4 x 4 (RAS mm) for which way is posterior."""
    a = np.asarray(ijk_to_ras, np.float64)
    jj, ii = np.meshgrid(np.arange(labels.shape[1]), np.arange(labels.shape[2]), indexing="ij")
    anterior = a[1, 0] * ii + a[1, 1] * jj            # RAS A (mm, up to an offset) in the plane
    paraspinal = dict(TS_GROUPS)["paraspinal"]
    out: List[Optional[float]] = []
    for k in range(labels.shape[0]):
        back = np.isin(structures[k], paraspinal)
        if not back.any():
            out.append(None)
            continue
        behind = anterior < anterior[back].mean()
        out.append(float(((labels[k] == 4) & behind).sum() * pixel_area_mm2 / 100.0))
    return out


def slice_counts(labels: np.ndarray, structures: np.ndarray) -> np.ndarray:
    """labels uint8 (K, J, I) our classes, structures int (K, J, I) TotalSegmentator labels ->
    int64 (K, G, 2): per slice and TS_GROUPS group, its voxels and those we call MUS or
    IMAT."""
    muscle = np.isin(labels, (1, 2))
    out = np.zeros((labels.shape[0], len(TS_GROUPS), 2), np.int64)
    for g, (_, ids) in enumerate(TS_GROUPS):
        m = np.isin(structures, ids)
        out[:, g, 0] = m.sum(axis=(1, 2))
        out[:, g, 1] = (m & muscle).sum(axis=(1, 2))
    return out


def level_shares(labels: np.ndarray, structures: np.ndarray, ijk_to_ras=None,
                 pixel_area_mm2: Optional[float] = None,
                 counts: Optional[np.ndarray] = None,
                 per_slice: Optional[List[Optional[str]]] = None) -> Dict[str, Dict[str, object]]:
    """labels uint8 (K, J, I) our classes, structures int (K, J, I) TotalSegmentator labels ->
    {level: {"slices": n, group: {"voxels": n, "muscle_share": share of the group's voxels
    we call MUS or IMAT}}}, levels from cranial to caudal as TS_VERTEBRAE lists them, then
    BELOW_L5 where the CT reaches past L5 (level_slices_by_name). With
    the grid's ijk_to_ras and pixel area (mm2), also "vat_behind_back_cm2": the mean over
    the level's slices of vat_behind_back (goal 0). counts, per_slice: slice_counts' and
    slice_levels' results, if made."""
    if per_slice is None:
        per_slice = slice_levels(structures)
    if counts is None:
        counts = slice_counts(labels, structures)
    behind = (vat_behind_back(labels, structures, ijk_to_ras, pixel_area_mm2)
              if ijk_to_ras is not None and pixel_area_mm2 is not None else None)
    out: Dict[str, Dict[str, object]] = {}
    for name, ks in level_slices_by_name(per_slice).items():
        entry: Dict[str, object] = {"slices": len(ks)}
        for g, (group, _) in enumerate(TS_GROUPS):
            n, hit = (int(v) for v in counts[ks, g].sum(0))
            entry[group] = {"voxels": n, "muscle_share": hit / n if n else None}
        if behind is not None:
            areas = [behind[k] for k in ks if behind[k] is not None]
            entry["vat_behind_back_cm2"] = float(np.mean(areas)) if areas else None
        out[name] = entry
    return out


def _slices_csv(levels: Sequence[Optional[str]], counts: np.ndarray) -> str:
    """slice_counts as CSV, one row per slice k (the CT's array index) with its vertebra:
    per group its voxels and those called MUS or IMAT, so any run of slices can be summed."""
    head = ["slice", "level"] + [f"{g}_{w}" for g, _ in TS_GROUPS for w in ("voxels", "muscle")]
    rows = [",".join(head)]
    for k, name in enumerate(levels):
        rows.append(",".join([str(k), name or ""] + [str(int(v)) for v in counts[k].ravel()]))
    return "\n".join(rows) + "\n"


def _levels_table(shares: Dict[str, Dict[str, object]]) -> List[str]:
    def cell(g):
        v = g["muscle_share"]
        return "-" if v is None else f"{v:.2f} ({g['voxels']})"

    groups = [g for g, _ in TS_GROUPS]
    behind = any("vat_behind_back_cm2" in e for e in shares.values())
    lines = ["| level | slices | " + " | ".join(
                 f"{g} called muscle" + (" (goal >= 0.90)" if g in TS_MUSCLES else " (goal 0)")
                 for g in groups)
             + (" | VAT behind the back muscles' middle, cm2/slice (goal 0)" if behind else "")
             + " |",
             "| --- | --- | " + " | ".join("---" for _ in groups) + (" | ---" if behind else "")
             + " |"]
    for level, e in shares.items():
        v = e.get("vat_behind_back_cm2")
        name = f"{level} (no goal)" if level == BELOW_L5 else level
        lines.append(f"| {name} | {e['slices']} | "
                     + " | ".join(cell(e[g]) for g in groups)
                     + ((" | -" if v is None else f" | {v:.1f}") if behind else "") + " |")
    return lines


def _levels_figure(path: Path, ct, labels, structures, shares, per_slice) -> None:
    """One column per level of ``shares``: its middle slice, our labels, TotalSegmentator's
    paraspinal (cyan) and psoas (white) outlines. per_slice: slice_levels' result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = level_slices_by_name(per_slice)
    levels = list(shares)
    fig, axes = plt.subplots(1, max(len(levels), 1), figsize=(3.6 * max(len(levels), 1), 3.8),
                             squeeze=False)
    for j, level in enumerate(levels):
        ks = by_name[level]
        k = ks[len(ks) // 2]
        hu = display_slice(ct, k)
        ax = axes[0, j]
        ax.imshow(overlay_rgb(hu, display_slice(ct, k, labels)), interpolation="nearest")
        st = display_slice(ct, k, structures)
        for (_, ids), colour in zip(TS_GROUPS[:2], ("cyan", "white")):
            m = np.isin(st, ids)
            if m.any():
                ax.contour(m.astype(float), [0.5], colors=colour, linewidths=0.8)
        ps = shares[level]["psoas"]["muscle_share"]
        pa = shares[level]["paraspinal"]["muscle_share"]
        ax.set_title(f"{level} (slice {k}): paraspinal {pa if pa is None else round(pa, 2)}, "
                     f"psoas {ps if ps is None else round(ps, 2)}", fontsize=8)
        ax.set_axis_off()
    save_figure(fig, path, dpi=90)


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> Path:
    from EPDSegmentationLib.core.model_io import load_model

    if not args.mask and args.structures is None:
        raise ValueError("give at least one --mask or --structures")
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} holds results; pass --overwrite to replace them")
    model, card = load_model(args.model)
    ct = read_volume(args.ct)
    masks = []
    for spec in args.mask:
        classes, path = parse_mask(spec)
        m = read_labels(path, like=ct).array > 0
        masks.append(("+".join(CLASSES[c].key for c in classes) + f" vs {path.name}",
                      classes, m))
    structures = None
    if args.structures is not None:
        st = read_itk(args.structures)
        problem = same_grid(st, ct)
        if problem is not None:
            raise ValueError(f"{args.structures}: not on the CT's grid: {problem}")
        structures = st.array.astype(np.int32)
    lost = None
    if args.simulate is not None:
        sat = [m for _, classes, m in masks if class_by_key("SAT").index in classes]
        muscle = [m for _, classes, m in masks if class_by_key("MUS").index in classes]
        if not muscle and structures is not None:
            muscle = [np.isin(structures, [i for name, ids in TS_GROUPS
                                           if name in TS_MUSCLES for i in ids])]
        ct, lost = simulate(ct, args.simulate, args.simulate_seed,
                            np.logical_or.reduce(sat) if sat else None,
                            np.logical_or.reduce(muscle) if muscle else None)
        masks = [(name, classes, m & ~lost) for name, classes, m in masks]
    si, sj, _ = ct.spacing
    pred = predict_volume(ct.array, (sj, si), model, card, device=args.device,
                          batch_size=args.batch_size, ijk_to_ras=ct.ijk_to_ras,
                          mirror=args.mirror)
    result = evaluate_masks(pred.probabilities, masks, ct.pixel_area_mm2)
    labels = pred.probabilities.argmax(0).astype(np.uint8)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m training " + shlex.join(argv or [])
    payload = {"model": str(args.model), "ct": str(args.ct), "command": command,
               "device": pred.device, "notes": pred.notes, "mirror": args.mirror,
               "results": result,
               "simulate": None if args.simulate is None else {
                   "what": args.simulate, "seed": args.simulate_seed}}
    if structures is not None:
        if lost is not None:
            structures[lost] = 0        # the drawing's voxels are no structure's
        counts, per_slice = slice_counts(labels, structures), slice_levels(structures)
        shares = level_shares(labels, structures, ct.ijk_to_ras, ct.pixel_area_mm2, counts,
                              per_slice)
        payload["levels"] = {"structures": str(args.structures), "shares": shares}
        write_text(out / "slices.csv", _slices_csv(per_slice, counts), overwrite=True)
        table = _levels_table(shares)
        write_text(out / "levels.md", "\n".join(
            [f"Model `{args.model}` on `{args.ct}`: share of TotalSegmentator's voxels of "
             f"each structure that we call MUS or IMAT, per vertebral level (voxels in "
             f"brackets). Made by `{command}`.", "", *table]) + "\n", overwrite=True)
        _levels_figure(out / "levels.png", ct, labels, structures, shares, per_slice)
        print("\n".join(table))
    write_text(out / "metrics.json", json.dumps(payload, indent=2), overwrite=True)
    drawn = ("" if args.simulate is None else
             f" With simulated {args.simulate} (seed {args.simulate_seed})"
             + (", masks changed to match." if lost.any() else ", masks unchanged."))
    lines = [f"Model `{args.model}` on `{args.ct}` ({ct.array.shape[2]} x {ct.array.shape[1]} "
             f"x {ct.array.shape[0]}, {si:.2f} x {sj:.2f} mm pixels).{drawn} Made by "
             f"`{command}`.", "",
             "| ours vs mask | slices | Dice | mask cm2/slice | ours soft | ours hard |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in result.items():
        lines.append(f"| {name} | {r['slices']} | {r['dice']:.3f} | {r['mask_area_cm2']:.1f} | "
                     f"{r['soft_area_cm2']:.1f} | {r['hard_area_cm2']:.1f} |")
    if masks:
        write_text(out / "table.md", "\n".join(lines) + "\n", overwrite=True)
        _figure(out / "overlays.png", ct, labels, masks, display_slice, overlay_rgb)
        print("\n".join(lines))
    return out


def _figure(path: Path, ct, labels, masks, display_slice, overlay_rgb) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the masks as one label map in our classes (first class of each mask), for display
    theirs = np.zeros_like(labels)
    for _, classes, m in masks:
        theirs[m & (theirs == 0)] = classes[0]
    ks = np.flatnonzero(theirs.reshape(theirs.shape[0], -1).any(axis=1))
    picks = [int(ks[len(ks) * i // 4]) for i in (1, 2, 3)] if len(ks) else [0]
    fig, axes = plt.subplots(2, len(picks), figsize=(4 * len(picks), 7.6), squeeze=False)
    for j, k in enumerate(picks):
        hu = display_slice(ct, k)
        axes[0, j].imshow(overlay_rgb(hu, display_slice(ct, k, labels)), interpolation="nearest")
        axes[0, j].set_title(f"ours, slice {k}")
        axes[1, j].imshow(overlay_rgb(hu, display_slice(ct, k, theirs)), interpolation="nearest")
        axes[1, j].set_title(f"reference masks, slice {k}")
    for ax in axes.ravel():
        ax.set_axis_off()
    save_figure(fig, path, dpi=90)
