"""``python -m training evaluate``: a model on a dataset, the paper-style tables and figures.

Every slice goes through the inference path (inference.prepare_slices / run_network /
restore_probabilities: resample to the model's spacing, window, downsample, predict,
upsample back), then:
- low resolution: the network's probabilities against the exact EPD class fractions of the
  true labels on the network's grid (whatever label mode the model was trained with);
- full resolution: the probabilities on the input grid against the input labels;
- tissue area per slice, cm^2 (soft: sum of probabilities; hard: argmax pixels).

Writes to --output: metrics.json, table.md, table.csv, figures/examples.png,
figures/dice_per_class.png, figures/area_agreement.png.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from EPDSegmentationLib.cli.options import add_mirror_argument
from EPDSegmentationLib.core.calibration import calibrate
from EPDSegmentationLib.core.classes import CLASSES, KEYS, NUM_CLASSES, color_table
from EPDSegmentationLib.core.epd import epd_labels
from EPDSegmentationLib.core.inference import (prepare_slices, resample_planes,
                                               restore_probabilities, run_network, select_device)
from EPDSegmentationLib.core.upsampling import applies
from EPDSegmentationLib.core.metrics import HARD_METRICS, SOFT_METRICS, MetricStats
from EPDSegmentationLib.core.model_io import load_model

from .data import SliceRecord, manifest_records, phantom_records
from .logs import atomic_bytes, save_figure
from .phantom.options import anatomy_kwargs
from .train import add_data_arguments

OUTPUTS = ("metrics.json", "table.md", "table.csv")
METRIC_LABELS = {"softDice": "soft Dice"}


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="<stem>.safetensors (card beside it)")
    add_data_arguments(p)
    p.add_argument("--split", choices=("train", "val", "test", "all"),
                   help="which cases (default: test if the manifest has any, else val; "
                        "phantom: val)")
    p.add_argument("--output", type=Path, required=True, help="folder for tables and figures")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--examples", type=int, default=4, help="slices shown in examples.png")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_mirror_argument(p)


def load_split(args) -> (List[SliceRecord], str):
    if args.manifest is not None:
        from EPDSegmentationLib.io import read_manifest

        splits = sorted({r["split"] for r in read_manifest(args.manifest)})
        split = args.split or ("test" if "test" in splits else "val")
        wanted = ("train", "val", "test") if split == "all" else (split,)
        recs = manifest_records(args.manifest, wanted, progress=not args.quiet)
        records = [r for s in wanted for r in recs.get(s, [])]
        what = f"manifest {args.manifest} ({split})"
    else:
        split = args.split or "val"
        if split == "test":
            raise ValueError("the phantom has train and val splits; for unseen subjects use "
                             "another --data-seed with --split all")
        recs = phantom_records(args.phantom_subjects, args.phantom_slices, args.phantom_size,
                               args.data_seed, args.val_fraction, args.phantom_gap_mm,
                               progress=not args.quiet, levels=args.phantom_levels,
                               **anatomy_kwargs(args))
        records = recs["train"] + recs["val"] if split == "all" else recs[split]
        where = "mid-L3" if args.phantom_levels is None else "-".join(args.phantom_levels)
        what = (f"phantom: {args.phantom_subjects} subjects x {args.phantom_slices} slices "
                f"({where}), size {args.phantom_size}, data seed {args.data_seed} ({split})")
    if not records:
        raise ValueError(f"no slices in split {split!r} of {what}")
    return records, what


def _groups(records: Sequence[SliceRecord], batch: int):
    """Runs of consecutive records with the same shape and spacing, at most ``batch`` long."""
    group: List[SliceRecord] = []
    for r in records:
        if group and (len(group) == batch or r.hu.shape != group[0].hu.shape
                      or r.pixel_mm != group[0].pixel_mm):
            yield group
            group = []
        group.append(r)
    if group:
        yield group


def evaluate(model, card, records: Sequence[SliceRecord], *, device="auto", batch_size=8,
             examples: int = 4, progress: bool = False, mirror: bool = True
             ) -> Dict[str, object]:
    """Metrics of a model on slices: {"low": result, "full": result, "areas": per-slice
    true and predicted areas (cm^2), "examples": a few slices for figures, "notes": ...}.
    mirror: mirror averaging (inference.forward), as ``segment`` does by default."""
    from tqdm import tqdm

    dev, reason = select_device(device) if isinstance(device, str) else (device, "given")
    notes = [f"device {dev}: {reason}"]
    k = int(card["factor"])
    low, full = MetricStats(NUM_CLASSES), MetricStats(NUM_CLASSES)
    true_area, soft_area, shown = [], [], []
    bar = tqdm(total=len(records), desc="evaluating", unit="slice", disable=not progress)
    for group in _groups(records, batch_size):
        hu = np.stack([r.hu for r in group]).astype(np.float32)
        lab = np.stack([r.labels for r in group])
        row_mm, col_mm = group[0].pixel_mm
        x, work, hu_work = prepare_slices(hu, (row_mm, col_mm), card, keep_hu=True)
        probs, dev, batch_size = run_network(model, x, dev, batch_size, notes, mirror=mirror)
        probs = calibrate(probs, card, (row_mm, col_mm))    # as segment applies the card's
        # the network's grid: the resampled slice downsampled by k
        work_area = (row_mm * hu.shape[1] / work[0]) * (col_mm * hu.shape[2] / work[1])
        target = epd_labels(resample_planes(lab, work, labels=True), NUM_CLASSES, k)
        low.update(probs, target, work_area * k * k)
        guide = hu_work if applies(card, probs.shape[-2:], hu.shape[1:]) else None
        up = restore_probabilities(probs, work, hu.shape[1:], card, guide)
        full.update(up, lab, row_mm * col_mm)
        pixel_cm2 = row_mm * col_mm / 100.0
        true_area.append(np.stack([(lab == c).sum(axis=(1, 2)) for c in range(NUM_CLASSES)], 1)
                         * pixel_cm2)
        soft_area.append(up.sum(axis=(2, 3), dtype=np.float64) * pixel_cm2)
        for i in range(len(group)):
            if len(shown) < examples:
                shown.append({"hu": hu[i], "labels": lab[i], "pred": np.argmax(up[i], 0),
                              "name": group[i].name})
        bar.update(len(group))
    bar.close()
    return {"low": low.result(class_names=KEYS), "full": full.result(class_names=KEYS),
            "areas": {"true_cm2": np.concatenate(true_area), "soft_cm2": np.concatenate(soft_area)},
            "examples": shown, "notes": notes, "slices": len(records)}


# ----------------------------------------------------------------------------- tables


def _fmt(v: float, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_table(result: Dict[str, object], title: str) -> str:
    cols = list(HARD_METRICS) + list(SOFT_METRICS)
    head = "| class | " + " | ".join(METRIC_LABELS.get(c, c) for c in cols) + " | threshold |"
    lines = [f"### {title}", "", head, "|" + " --- |" * (len(cols) + 2)]
    for cls in CLASSES[1:]:
        v = result["per_class"][cls.key]
        lines.append(f"| {cls.key} | " + " | ".join(_fmt(v[c]) for c in cols)
                     + f" | {_fmt(result['threshold'][cls.key], 2)} |")
    lines.append("| **mean** | " + " | ".join(_fmt(result["mean"][c]) for c in cols) + " | |")
    return "\n".join(lines)


def area_table(result: Dict[str, object]) -> str:
    cols = (("area_cm2", "true area"), ("soft_area_err_cm2", "soft error"),
            ("soft_area_abs_err_cm2", "soft abs. error"), ("hard_area_err_cm2", "argmax error"),
            ("hard_area_abs_err_cm2", "argmax abs. error"))
    lines = ["### Tissue area per slice (cm^2, full resolution; error = predicted - true)", "",
             "| class | " + " | ".join(c[1] for c in cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for cls in CLASSES[1:]:
        v = result["per_class"][cls.key]
        lines.append(f"| {cls.key} | " + " | ".join(_fmt(v.get(c[0], math.nan), 2) for c in cols) + " |")
    return "\n".join(lines)


def csv_table(results: Dict[str, Dict[str, object]]) -> str:
    cols = list(HARD_METRICS) + list(SOFT_METRICS)
    area_cols = ["area_cm2", "soft_area_err_cm2", "soft_area_abs_err_cm2", "hard_area_err_cm2",
                 "hard_area_abs_err_cm2"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["resolution", "class"] + cols + ["threshold"] + area_cols)
    for res_name, r in results.items():
        for cls in CLASSES[1:]:
            v = r["per_class"][cls.key]
            w.writerow([res_name, cls.key] + [repr(v[c]) for c in cols]
                       + [r["threshold"][cls.key]] + [repr(v.get(c, math.nan)) for c in area_cols])
        w.writerow([res_name, "mean"] + [repr(r["mean"][c]) for c in cols] + [""]
                   + [repr(r["mean"].get(c, math.nan)) for c in area_cols])
    return buf.getvalue()


# ----------------------------------------------------------------------------- figures


def _overlay(hu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    gray = np.clip((hu + 160.0) / 400.0, 0, 1)[..., None] * np.ones(3)
    colors = color_table()
    rgb = gray.copy()
    body = labels > 0
    rgb[body] = 0.45 * gray[body] + 0.55 * colors[labels[body]]
    return rgb


def figures(out: Path, ev: Dict[str, object], title: str) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    shown = ev["examples"]
    if shown:
        fig, axes = plt.subplots(len(shown), 3, figsize=(9, 3 * len(shown)), dpi=100, squeeze=False)
        for row, ex in zip(axes, shown):
            row[0].imshow(np.clip((ex["hu"] + 160.0) / 400.0, 0, 1), cmap="gray")
            row[1].imshow(_overlay(ex["hu"], ex["labels"]))
            row[2].imshow(_overlay(ex["hu"], ex["pred"].astype(np.uint8)))
            for a, t in zip(row, (f"CT (W400 L40)\n{ex['name']}", "truth",
                                  "prediction (argmax)")):
                a.set_title(t, fontsize=7)
                a.axis("off")
        handles = [Patch(color=np.array(c.color) / 255, label=c.key) for c in CLASSES[1:]]
        fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout(rect=(0, 0.04, 1, 0.97))
        paths.append(save_figure(fig, out / "examples.png", tight=False))

    keys = [c.key for c in CLASSES[1:]]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    xs = np.arange(len(keys))
    for i, (name, label) in enumerate((("low", "low resolution"), ("full", "full resolution"))):
        vals = [ev[name]["per_class"][k]["Dice"] for k in keys]
        ax.bar(xs + (i - 0.5) * 0.38, np.nan_to_num(vals), 0.38, label=label)
    ax.set_xticks(xs, keys)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice (best threshold)")
    ax.set_title("Dice per class", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    paths.append(save_figure(fig, out / "dice_per_class.png", tight=False))

    true, soft = ev["areas"]["true_cm2"], ev["areas"]["soft_cm2"]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    colors = color_table()
    for c in range(1, NUM_CLASSES):
        ax.scatter(true[:, c], soft[:, c], s=10, color=colors[c], label=KEYS[c])
    top = float(max(true.max(), soft.max(), 1.0)) * 1.05
    ax.plot([0, top], [0, top], "k--", lw=0.8)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("true area per slice (cm$^2$)")
    ax.set_ylabel("predicted soft area (cm$^2$)")
    ax.set_title("Tissue area agreement", fontsize=10)
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, out / "area_agreement.png", tight=False))
    return paths

# ----------------------------------------------------------------------------- command


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(args.output)
    existing = [out / n for n in OUTPUTS if (out / n).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace the results")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    model, card = load_model(args.model)
    records, what = load_split(args)
    ev = evaluate(model, card, records, device=args.device, batch_size=args.batch_size,
                  examples=args.examples, progress=not args.quiet, mirror=args.mirror)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m training " + shlex.join(argv)
    k = card["factor"]
    title = (f"{Path(args.model).name} (factor {k}, {card['label_mode']} labels, "
             f"{card['image_mode']} images) on {what}")
    text = "\n\n".join([
        f"## Evaluation: {title}",
        f"{ev['slices']} slices. Regenerate with:\n\n    {command}",
        "Hard metrics at the threshold (per class) that maximises Dice; soft metrics on the "
        "probabilities. Means over the tissue classes present.",
        markdown_table(ev["low"], f"Low resolution (1/{k}), against the EPD fractions of the "
                                  f"true labels"),
        markdown_table(ev["full"], "Full resolution (probabilities upsampled to the input "
                                   "grid), against the labels"),
        area_table(ev["full"]),
    ]) + "\n"
    metrics = {"model": str(args.model), "data": what, "command": command, "slices": ev["slices"],
               "notes": ev["notes"], "mirror": args.mirror, "low_resolution": ev["low"],
               "full_resolution": ev["full"]}
    atomic_bytes(out / "metrics.json", json.dumps(_jsonable(metrics), indent=1).encode())
    atomic_bytes(out / "table.md", text.encode())
    atomic_bytes(out / "table.csv", csv_table({"low": ev["low"], "full": ev["full"]}).encode())
    figures(out / "figures", ev, title)
    if not args.quiet:
        print(text)
    return out / "table.md"
