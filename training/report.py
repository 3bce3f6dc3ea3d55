"""``python -m training report``: the results page of ``python -m training experiment``.

    python -m training report --runs runs/paper_cpu --output docs/results --overwrite

Reads every finished run (its model card's final validation metrics and its log.csv) and
writes to --output:
- tables.md: the paper's layout (hard and soft metrics per configuration, mean +- SD over
  seeds) at the training resolution and at full resolution, the IoU gain of EPD over the
  conventional method beside the paper's, the ablations, per-class IoU, the larger set, and
  the cost side (seconds per epoch, slices per second, peak memory);
- summary.json: the same numbers, per configuration;
- iou_dice_vs_factor.png: IoU and Dice against the factor for both methods, the
  full-resolution baseline as a line;
- downsampling.png: a phantom slice downsampled both ways (the paper's Fig. 3);
- progress.png: the full-resolution IoU of every planned run against the epoch (log.csv),
  finished or not;
- gain_vs_factor.png: EPD's IoU gain at full resolution against the factor, per seed, beside
  the paper's and, with --reference, an earlier experiment's (e.g. another base resolution).
An experiment still running is reported as far as it got: its finished runs, and for the
planned runs not finished yet, how far each got (epochs, seconds per epoch) and the gain of
each pair at the last epoch both reached (from log.csv; no card yet).
Metrics are those ``train`` logs on the validation subjects after the last epoch (no epoch
is picked on validation). Hard metrics and soft Dice are given in percent.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from EPDSegmentationLib.cli.demo import soft_rgb
from EPDSegmentationLib.core.classes import KEYS, color_table
from EPDSegmentationLib.core.epd import bilinear_image, epd_image, epd_labels, nearest_labels
from EPDSegmentationLib.core.metrics import HARD_METRICS, SOFT_METRICS

from training.phantom import make_slice

from .experiment import DOWN_FACTORS, PRESETS, epochs_of, iter_runs, spec_from_folder
from .logs import atomic_bytes, read_csv, save_figure

#: The paper's IoU gains of EPD over conventional downsampling (points; arXiv:2404.03991v1,
#: abstract). Its tables could not be read here, so only these stand beside our numbers.
PAPER_IOU_GAIN = {2: 2.85, 4: 8.65, 8: 11.89}
PERCENT = set(HARD_METRICS) | {"softDice"}
LABELS = {"softDice": "soft Dice", "soft_area_abs_err_cm2": "area err cm²"}
METHOD_NAMES = {"baseline": "Baseline", "conventional": "Conventional", "epd": "EPD",
                "epd_labels": "EPD labels + bilinear", "epd_images": "nearest + window mean"}
OUTPUTS = ("tables.md", "summary.json", "iou_dice_vs_factor.png", "downsampling.png",
           "gain_vs_factor.png", "progress.png")


# ----------------------------------------------------------------------------- collecting


def run_result(folder: Path) -> Dict[str, object]:
    """Final validation metrics and cost of one run: {'low': {metric: v}, 'full': {...},
    'low_class'/'full_class': {class: {metric: v}}, 'seconds_per_epoch', 'slices_per_s',
    'peak_mib', 'epochs', 'device'}."""
    card = json.loads((folder / "model.json").read_text())
    m = card["metrics"]
    log = read_csv(folder / "log.csv")

    def nan(v):
        return math.nan if v is None else float(v)

    def clean(d):
        return {k: nan(v) for k, v in d.items()}

    peaks = [r.get("peak_mib", math.nan) for r in log]
    return {
        "low": clean(m["low_resolution"]["mean"]),
        "full": clean(m["full_resolution"]["mean"]),
        "low_class": {c: clean(v) for c, v in m["low_resolution"]["per_class"].items()},
        "full_class": {c: clean(v) for c, v in m["full_resolution"]["per_class"].items()},
        "seconds_per_epoch": float(np.median([r["seconds"] for r in log])),
        "slices_per_s": float(np.median([r["slices_per_s"] for r in log])),
        "peak_mib": float(np.nanmax(peaks)) if not all(math.isnan(p) for p in peaks) else math.nan,
        "epochs": int(card["training"]["epochs"]),
        "device": card["training"]["device"],
        "input_size": card["input_size"],
        "pixel_mm": card["pixel_mm"],
    }


def collect(runs_dir: Path) -> Dict[tuple, Dict[int, Dict[str, object]]]:
    """(dataset, method, factor, augment) -> {seed: run_result}."""
    out: Dict[tuple, Dict[int, Dict[str, object]]] = defaultdict(dict)
    for spec, folder in iter_runs(runs_dir):
        out[(spec.dataset, spec.method, spec.factor, spec.augment)][spec.seed] = run_result(folder)
    return dict(out)


def unfinished(runs_dir: Path, meta: Dict[str, object]) -> List[Dict[str, object]]:
    """The planned runs (experiment.json's "runs") without a model card: {'run', 'epochs_done',
    'epochs', 'seconds_per_epoch' (median, NaN before the first epoch), 'val_full_iou' (at
    the last epoch done, NaN before it)}, in the planned order."""
    settings = dict(meta.get("settings") or PRESETS.get(str(meta.get("preset")), {}))
    out = []
    for name in meta.get("runs", []):
        folder = Path(runs_dir) / "runs" / name
        if (folder / "model.json").exists():
            continue
        log = read_csv(folder / "log.csv") if (folder / "log.csv").exists() else []
        out.append({"run": name, "epochs_done": len(log),
                    "epochs": epochs_of(spec_from_folder(name), settings),
                    "seconds_per_epoch": float(np.median([r["seconds"] for r in log]))
                    if log else math.nan,
                    "val_full_iou": log[-1]["val_full_iou"] if log else math.nan})
    return out


def pairs_at_common_epoch(runs_dir: Path, meta: Dict[str, object]) -> List[Dict[str, object]]:
    """For each planned conventional / EPD pair (same set, factor, augmentation, seed) with
    at least one run unfinished and both past their first epoch: the full-resolution IoU of
    both and the gain at the last epoch both reached (log.csv's val_full_iou, the metric the
    card records at the end)."""
    names = set(meta.get("runs", []))
    out = []
    for name in meta.get("runs", []):
        if "/conventional_" not in name or name.replace("/conventional_", "/epd_") not in names:
            continue
        pair = [Path(runs_dir) / "runs" / n for n in (name, name.replace("/conventional_", "/epd_"))]
        if all((f / "model.json").exists() for f in pair) or \
                not all((f / "log.csv").exists() for f in pair):
            continue
        conv, epd = (read_csv(f / "log.csv") for f in pair)
        e = min(len(conv), len(epd))
        if e:
            c, d = conv[e - 1]["val_full_iou"], epd[e - 1]["val_full_iou"]
            out.append({"pair": name.replace("/conventional_", "/{conventional,epd}_"),
                        "epoch": e, "conventional": c, "epd": d, "gain": d - c})
    return out


def _at(run: Dict[str, object], path) -> float:
    for p in path:
        run = run[p]
    return float(run)


def _mean_sd(values) -> tuple:
    """(mean, SD with n - 1 (NaN for one value), n) of the values that are not NaN."""
    a = np.asarray([v for v in values if not math.isnan(v)])
    if a.size == 0:
        return math.nan, math.nan, 0
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan, int(a.size)


def stat(runs: Dict[int, Dict[str, object]], *path) -> tuple:
    """(mean, SD, n) over seeds of the value at ``path`` (e.g. 'low', 'IoU'); SD with n - 1."""
    return _mean_sd(_at(r, path) for r in runs.values())


def paired_gain(a: Dict[int, dict], b: Dict[int, dict], *path) -> tuple:
    """(mean, SD, n) over the seeds both have of b - a at ``path``."""
    return _mean_sd(_at(b[s], path) - _at(a[s], path) for s in sorted(set(a) & set(b)))


# ----------------------------------------------------------------------------- formatting


def fmt(mean: float, sd: float, metric: str = "", digits: Optional[int] = None) -> str:
    if math.isnan(mean):
        return "–"
    scale = 100.0 if metric in PERCENT else 1.0
    if digits is None:
        digits = 2 if metric in PERCENT or metric.endswith("cm2") else 4
    s = f"{mean * scale:.{digits}f}"
    if not math.isnan(sd):
        s += f" ± {sd * scale:.{digits}f}"
    return s


def _row_name(method: str, k: int) -> str:
    return METHOD_NAMES[method] + ("" if k == 1 else f" 1/{k}")


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def metric_table(data, dataset: str, augment: bool, res: str,
                 methods=("conventional", "epd"), extra=()) -> List[str]:
    metrics = list(HARD_METRICS) + list(SOFT_METRICS) + list(extra)
    keys = [("baseline", 1)] + [(m, k) for k in DOWN_FACTORS for m in methods]
    rows = []
    for method, k in keys:
        runs = data.get((dataset, method, k, augment))
        if not runs:
            continue
        rows.append([_row_name(method, k), str(len(runs))]
                    + [fmt(*stat(runs, res, m)[:2], m) for m in metrics])
    return _md(["configuration", "seeds"] + [LABELS.get(m, m) for m in metrics], rows)


def gain_table(data, dataset: str) -> List[str]:
    rows = []
    for k in DOWN_FACTORS:
        row = [f"1/{k}"]
        for augment in (True, False):
            conv = data.get((dataset, "conventional", k, augment), {})
            epd = data.get((dataset, "epd", k, augment), {})
            for res in ("low", "full"):
                g = paired_gain(conv, epd, res, "IoU")
                row.append(fmt(g[0], g[1], "IoU") if g[2] else "–")
        row.append(f"+{PAPER_IOU_GAIN[k]:.2f}")
        rows.append(row)
    return _md(["factor", "aug, training res", "aug, full res", "no aug, training res",
                "no aug, full res", "paper"], rows)


def ablation_table(data, dataset: str = "small") -> List[str]:
    methods = ("conventional", "epd_images", "epd_labels", "epd")
    header = ["factor"] + [f"{METHOD_NAMES[m]} ({res})" for m in methods
                           for res in ("training res", "full res")]
    rows = []
    for k in DOWN_FACTORS:
        row = [f"1/{k}"]
        for m in methods:
            runs = data.get((dataset, m, k, True), {})
            for res in ("low", "full"):
                row.append(fmt(*stat(runs, res, "IoU")[:2], "IoU") if runs else "–")
        rows.append(row)
    return _md(header, rows)


def class_table(data, dataset: str = "small", augment: bool = True) -> List[str]:
    keys = [("baseline", 1)] + [(m, k) for k in DOWN_FACTORS for m in ("conventional", "epd")]
    rows = []
    for method, k in keys:
        runs = data.get((dataset, method, k, augment))
        if not runs:
            continue
        rows.append([_row_name(method, k)]
                    + [fmt(*stat(runs, "full_class", c, "IoU")[:2], "IoU") for c in KEYS[1:]]
                    + [fmt(*stat(runs, "full_class", c, "soft_area_abs_err_cm2")[:2],
                           "soft_area_abs_err_cm2") for c in KEYS[1:]])
    return _md(["configuration"] + [f"IoU {c}" for c in KEYS[1:]]
               + [f"area err {c} cm²" for c in KEYS[1:]], rows)


def cost_table(data, dataset: str = "small", augment: bool = True) -> List[str]:
    keys = [("baseline", 1)] + [(m, k) for k in DOWN_FACTORS for m in ("conventional", "epd")]
    base = data.get((dataset, "baseline", 1, augment))
    b_sec = stat(base, "seconds_per_epoch")[0] if base else math.nan
    b_mem = stat(base, "peak_mib")[0] if base else math.nan
    rows = []
    for method, k in keys:
        runs = data.get((dataset, method, k, augment))
        if not runs:
            continue
        sec, mem = stat(runs, "seconds_per_epoch")[0], stat(runs, "peak_mib")[0]
        size = next(iter(runs.values()))["input_size"]
        rows.append([_row_name(method, k), f"{size[0]} x {size[1]}", f"{sec:.1f}",
                     f"{stat(runs, 'slices_per_s')[0]:.1f}",
                     "–" if math.isnan(b_sec) else f"{b_sec / sec:.2f}",
                     f"{mem:.0f}", "–" if math.isnan(b_mem) else f"{mem / b_mem:.2f}"])
    return _md(["configuration", "network input", "s / epoch", "slices / s", "speed-up",
                "peak MiB", "/ baseline"], rows)


# ----------------------------------------------------------------------------- figures


def plot_vs_factor(data, path: Path, dataset: str = "small") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 7), dpi=100, sharex=True)
    styles = {("conventional", True): ("tab:orange", "o-", "conventional"),
              ("conventional", False): ("tab:orange", "o--", "conventional, no aug"),
              ("epd", True): ("tab:blue", "s-", "EPD"),
              ("epd", False): ("tab:blue", "s--", "EPD, no aug")}
    for i, res in enumerate(("low", "full")):
        for j, metric in enumerate(("IoU", "Dice")):
            ax = axes[i, j]
            for (method, augment), (color, style, label) in styles.items():
                ks, means, sds = [], [], []
                for k in DOWN_FACTORS:
                    runs = data.get((dataset, method, k, augment))
                    if runs:
                        m, s, _ = stat(runs, res, metric)
                        ks.append(k)
                        means.append(100 * m)
                        sds.append(0.0 if math.isnan(s) else 100 * s)
                if ks:
                    ax.errorbar(ks, means, yerr=sds, fmt=style, color=color, label=label,
                                capsize=3)
            for augment, ls in ((True, "-"), (False, "--")):
                base = data.get((dataset, "baseline", 1, augment))
                if base:
                    m = 100 * stat(base, res, metric)[0]
                    ax.axhline(m, color="0.3", ls=ls, lw=1,
                               label="baseline (full res)" + ("" if augment else ", no aug"))
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(DOWN_FACTORS), [f"1/{k}" for k in DOWN_FACTORS])
            ax.set_title(f"{metric}, {'training' if res == 'low' else 'full'} resolution")
            ax.set_ylabel(f"mean {metric} over tissues, %")
            ax.grid(alpha=0.3)
    axes[1, 0].set_xlabel("downsampling factor")
    axes[1, 1].set_xlabel("downsampling factor")
    axes[0, 0].legend(fontsize=7)
    fig.text(0.5, 0.005, "training resolution: means over the classes present in the "
             "low-resolution target's argmax, which loses thin classes (IMAT) at large "
             "factors; full resolution: all five tissues", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    save_figure(fig, path)


def plot_downsampling(path: Path, seed: int = 0, size: int = 512) -> None:
    """A phantom slice (posterior quarter: paraspinal muscles, psoas, kidney) at full
    resolution and at 1/2, 1/4, 1/8: bilinear image, window-mean image, nearest labels, EPD
    labels (class colours mixed by fraction). Display window -160..240 HU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = make_slice(seed, size=size)
    hu, lab = s.hu.astype(np.float32), s.labels
    rows, cols = np.nonzero(lab)
    cy, cx = int(np.median(rows)), int(np.median(cols))
    half = size // 4
    # rows from just above the body's centre to behind the spine, columns from the
    # patient's right flank to just past the midline
    y0 = min(max(cy - half // 2, 0), size - 2 * half)
    x0 = min(max(cx - 3 * half // 2, 0), size - 2 * half)
    y0, x0 = y0 - y0 % 8, x0 - x0 % 8
    crop = (slice(y0, y0 + 2 * half), slice(x0, x0 + 2 * half))
    colors = color_table()

    def show(ax, img, title):
        ax.imshow(img, cmap="gray", vmin=-160, vmax=240, interpolation="nearest")
        ax.set_title(title, fontsize=9)

    fig, axes = plt.subplots(4, 4, figsize=(11, 11.5), dpi=90)
    show(axes[0, 0], hu[crop], f"CT {size} x {size} (crop)")
    axes[0, 1].imshow(colors[lab[crop]], interpolation="nearest")
    axes[0, 1].set_title("labels", fontsize=9)
    for ax in axes[0, 2:]:
        ax.axis("off")
    for i, k in enumerate(DOWN_FACTORS, start=1):
        sub = (slice(y0 // k, (y0 + 2 * half) // k), slice(x0 // k, (x0 + 2 * half) // k))
        show(axes[i, 0], bilinear_image(hu, k)[sub], f"1/{k}: bilinear image")
        show(axes[i, 1], epd_image(hu, k)[sub], f"1/{k}: window-mean image (EPD)")
        axes[i, 2].imshow(colors[nearest_labels(lab, k)[sub]], interpolation="nearest")
        axes[i, 2].set_title(f"1/{k}: nearest labels", fontsize=9)
        soft = epd_labels(lab, len(KEYS), k)
        axes[i, 3].imshow(soft_rgb(soft[(slice(None),) + sub]), interpolation="nearest")
        axes[i, 3].set_title(f"1/{k}: EPD labels (colours mixed)", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=colors[i], label=KEYS[i]) for i in range(1, len(KEYS))],
               loc="upper right", bbox_to_anchor=(0.98, 0.96), ncol=1, fontsize=9)
    fig.suptitle(f"Phantom subject seed {seed}, mid-L3, {s.pixel_mm:.2f} mm pixels: "
                 f"conventional (columns 1, 3) and EPD (columns 2, 4) downsampling")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    save_figure(fig, path)


# ----------------------------------------------------------------------------- page


def _summary(data) -> Dict[str, object]:
    out = {}
    for (dataset, method, k, augment), runs in sorted(data.items()):
        name = f"{dataset}/{method}_f{k}_{'aug' if augment else 'noaug'}"
        entry = {"seeds": sorted(runs)}
        for res in ("low", "full"):
            entry[res] = {m: dict(zip(("mean", "sd", "n"), stat(runs, res, m)))
                          for m in next(iter(runs.values()))[res]}
        for key in ("seconds_per_epoch", "slices_per_s", "peak_mib"):
            entry[key] = dict(zip(("mean", "sd", "n"), stat(runs, key)))
        first = next(iter(runs.values()))
        entry.update(epochs=first["epochs"], device=first["device"],
                     input_size=first["input_size"], pixel_mm=first["pixel_mm"])
        out[name] = entry
    return out


def _gains(data) -> Dict[str, object]:
    """Paired IoU gains of EPD over conventional, per set / augmentation / factor and
    resolution: mean, SD, n and the per-seed values (so a later report can plot them)."""
    out = {}
    for dataset in sorted({key[0] for key in data}):
        for augment in (True, False):
            for k in DOWN_FACTORS:
                conv = data.get((dataset, "conventional", k, augment), {})
                epd = data.get((dataset, "epd", k, augment), {})
                seeds = sorted(set(conv) & set(epd))
                if not seeds:
                    continue
                entry = {"seeds": seeds}
                for res in ("low", "full"):
                    entry[res] = dict(zip(("mean", "sd", "n"), paired_gain(conv, epd, res, "IoU")))
                    entry[res]["per_seed"] = [_at(epd[s], (res, "IoU")) - _at(conv[s], (res, "IoU"))
                                              for s in seeds]
                out[f"{dataset}/f{k}_{'aug' if augment else 'noaug'}"] = entry
    return out


def reference_gains(summary: Dict[str, object], dataset: str = "small",
                    augment: bool = True) -> Dict[int, tuple]:
    """factor -> (mean, SD) of the full-resolution IoU gain in another experiment's
    summary.json: its "gains" when it has them, else the difference of the two methods'
    means (the paired mean when both ran the same seeds) with no SD."""
    tag = "aug" if augment else "noaug"
    gains, configs = summary.get("gains") or {}, summary.get("configurations", {})
    out = {}
    for k in DOWN_FACTORS:
        g = gains.get(f"{dataset}/f{k}_{tag}")
        if g:
            sd = g["full"]["sd"]
            out[k] = (g["full"]["mean"], math.nan if sd is None else sd)
            continue
        conv, epd = (configs.get(f"{dataset}/{m}_f{k}_{tag}") for m in ("conventional", "epd"))
        if conv and epd and conv["seeds"] == epd["seeds"]:
            out[k] = (epd["full"]["IoU"]["mean"] - conv["full"]["IoU"]["mean"], math.nan)
    return out


def base_label(summary_or_meta: Dict[str, object]) -> str:
    """'512 x 512' from an experiment record's settings (or a summary's experiment)."""
    meta = summary_or_meta.get("experiment", summary_or_meta)
    size = (meta.get("settings") or {}).get("size")
    return f"{size} x {size}" if size else str(meta.get("preset", "?"))


def plot_gain_vs_factor(data, path: Path, label: str, reference=None,
                        reference_label: str = "", partial=()) -> None:
    """EPD's full-resolution IoU gain (points) against the factor: this experiment's seeds
    (dots) and mean, the ``reference`` experiment's gains (factor -> (mean, SD)), unfinished
    pairs at their last common epoch (hollow), and the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=100)
    ax.plot(list(DOWN_FACTORS), [PAPER_IOU_GAIN[k] for k in DOWN_FACTORS], "k^-",
            label="the paper (512 x 512, real CT)")
    if reference:
        ks = sorted(reference)
        ax.errorbar(ks, [100 * reference[k][0] for k in ks],
                    yerr=[0 if math.isnan(reference[k][1]) else 100 * reference[k][1] for k in ks],
                    fmt="o--", color="tab:gray", capsize=3, label=reference_label)
    ks, means = [], []
    for k in DOWN_FACTORS:
        conv = data.get(("small", "conventional", k, True), {})
        epd = data.get(("small", "epd", k, True), {})
        seeds = sorted(set(conv) & set(epd))
        if not seeds:
            continue
        per_seed = [100 * (_at(epd[s], ("full", "IoU")) - _at(conv[s], ("full", "IoU")))
                    for s in seeds]
        ax.plot([k] * len(per_seed), per_seed, "o", color="tab:blue", alpha=0.5, ms=4)
        ks.append(k)
        means.append(float(np.mean(per_seed)))
    if ks:
        ax.plot(ks, means, "s-", color="tab:blue", label=f"{label}, mean of seeds (dots)")
    for p in partial:
        k = int(p["pair"].split("_f")[1].split("_")[0])
        ax.plot([k], [100 * p["gain"]], "o", mfc="none", color="tab:red")
        ax.annotate(f"epoch {p['epoch']}", (k, 100 * p["gain"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    if partial:
        ax.plot([], [], "o", mfc="none", color="tab:red",
                label=f"{label}, unfinished pair at its last common epoch")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(DOWN_FACTORS), [f"1/{k}" for k in DOWN_FACTORS])
    ax.set_xlabel("downsampling factor")
    ax.set_ylabel("IoU gain of EPD at full resolution, points")
    ax.set_title("EPD over conventional downsampling, with augmentation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_progress(runs_dir: Path, meta: Dict[str, object], path: Path) -> bool:
    """Full-resolution validation IoU (%) against the epoch of every planned run with a
    log.csv (conventional orange, EPD blue, baseline grey; one line style per factor).
    Returns False (and draws nothing) when no run has finished an epoch."""
    logs = {}
    for name in meta.get("runs", []):
        f = Path(runs_dir) / "runs" / name / "log.csv"
        if f.exists():
            logs[name] = read_csv(f)
    if not any(logs.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"conventional": "tab:orange", "epd": "tab:blue", "baseline": "0.3"}
    styles = {1: "-", 2: "-.", 4: "--", 8: "-"}
    markers = {0: "o", 1: "s", 2: "^"}
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=100)
    for name, log in logs.items():
        spec = spec_from_folder(name)
        ax.plot([r["epoch"] for r in log], [100 * r["val_full_iou"] for r in log],
                styles.get(spec.factor, ":"), marker=markers.get(spec.seed, "x"), ms=3,
                color=colors.get(spec.method, "k"),
                label=f"{spec.method} 1/{spec.factor} seed {spec.seed}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean IoU over tissues at full resolution, %")
    ax.set_title(f"Validation during training ({base_label(meta)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def _nan_to_none(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def unfinished_markdown(todo: List[Dict[str, object]], pairs: List[Dict[str, object]]) -> List[str]:
    if not todo:
        return []
    lines = ["## Planned runs not finished", "",
             "Not in the tables above (no model card yet); epochs done so far, the median "
             "seconds per epoch, and the full-resolution IoU at the last epoch done.", ""]
    lines += _md(["run", "epochs done", "s / epoch", "IoU full res at that epoch, %"],
                 [[t["run"], f"{t['epochs_done']} / {t['epochs']}",
                   "–" if math.isnan(t["seconds_per_epoch"]) else f"{t['seconds_per_epoch']:.0f}",
                   fmt(t["val_full_iou"], math.nan, "IoU")] for t in todo]) + [""]
    if pairs:
        lines += ["Unfinished pairs, compared at the last epoch both reached (full-resolution "
                  "IoU, %; not final numbers):", ""]
        lines += _md(["pair", "epoch", "conventional", "EPD", "gain"],
                     [[p["pair"], str(p["epoch"]), fmt(p["conventional"], math.nan, "IoU"),
                       fmt(p["epd"], math.nan, "IoU"), fmt(p["gain"], math.nan, "IoU")]
                      for p in pairs]) + [""]
    return lines


def tables_markdown(data, meta: Dict[str, object], command: str, todo=(), pairs=()) -> str:
    settings = meta.get("settings", {})
    lines = [f"# Results tables: {meta.get('preset', '?')} preset", "",
             f"Made by `{command}` from the runs of `{meta.get('command', '?')}`.", "",
             f"Settings: {json.dumps(settings)}. Metrics on the validation subjects after "
             f"the last epoch; mean ± SD over seeds; hard metrics (at the threshold that "
             f"maximises Dice) and soft Dice in %, means over the five tissue classes.", ""]
    if not data:
        lines += ["No run has finished yet.", ""]
        return "\n".join(lines + unfinished_markdown(list(todo), list(pairs)))
    for dataset, title in (("small", "Paper-sized set"), ("large", "Larger set")):
        if not any(key[0] == dataset for key in data):
            continue
        for augment in (True, False):
            if not any(key[0] == dataset and key[3] == augment for key in data):
                continue
            aug = "with augmentation" if augment else "without augmentation"
            lines += [f"## {title}, {aug}: at the training resolution", "",
                      "Against the exact EPD fractions of the true labels on the network's "
                      "grid (the same truth for both methods).", ""]
            lines += metric_table(data, dataset, augment, "low") + [""]
            lines += [f"## {title}, {aug}: at full resolution", "",
                      "Probabilities upsampled to the source grid, against its labels; "
                      "last column: mean absolute error of the soft tissue area per slice.", ""]
            lines += metric_table(data, dataset, augment, "full",
                                  extra=("soft_area_abs_err_cm2",)) + [""]
        lines += [f"## {title}: IoU gain of EPD over conventional (points)", "",
                  "Paired by seed (same seed, same data order); the paper's gains are from "
                  "its abstract.", ""]
        lines += gain_table(data, dataset) + [""]
    if any(key[1] in ("epd_labels", "epd_images") for key in data):
        lines += ["## Ablation: which half carries the gain (IoU, %, with augmentation)", ""]
        lines += ablation_table(data) + [""]
    lines += ["## Per class at full resolution (with augmentation)", ""]
    lines += class_table(data) + [""]
    lines += ["## Cost (with augmentation)", "",
              "Median seconds per training epoch and slices per second over the epochs; peak "
              "memory: on a GPU the peak tensor memory of an epoch, on the CPU the peak "
              "resident memory of the training process (data, model and interpreter "
              "included); speed-up and memory against the baseline.", ""]
    lines += cost_table(data) + [""]
    lines += unfinished_markdown(list(todo), list(pairs))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=Path, required=True, help="experiment folder")
    p.add_argument("--output", type=Path, required=True, help="folder for the results page")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results")
    p.add_argument("--reference", type=Path, metavar="SUMMARY",
                   help="another experiment's summary.json (e.g. docs/results/summary.json) "
                        "whose gains gain_vs_factor.png shows beside these")


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> None:
    runs_dir, out = Path(args.runs), Path(args.output)
    meta_path = runs_dir / "experiment.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: is {runs_dir} an experiment folder?")
    meta = json.loads(meta_path.read_text())
    data = collect(runs_dir)
    todo, pairs = unfinished(runs_dir, meta), pairs_at_common_epoch(runs_dir, meta)
    if not data and not any(t["epochs_done"] for t in todo):
        raise ValueError(f"nothing to report: no finished run and no epoch done under "
                         f"{runs_dir / 'runs'}")
    reference = None
    if args.reference is not None:
        if not Path(args.reference).exists():
            raise FileNotFoundError(f"--reference {args.reference} not found")
        reference = json.loads(Path(args.reference).read_text())
    existing = [n for n in OUTPUTS if (out / n).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m training " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    atomic_bytes(out / "tables.md", tables_markdown(data, meta, command, todo, pairs).encode())
    summary = {"command": command, "experiment": meta, "configurations": _summary(data),
               "gains": _gains(data), "unfinished": todo, "unfinished_pairs": pairs}
    atomic_bytes(out / "summary.json",
                 (json.dumps(_nan_to_none(summary), indent=1) + "\n").encode())
    written = ["tables.md", "summary.json"]
    if data:  # a figure of nothing would look like a result
        plot_vs_factor(data, out / "iou_dice_vs_factor.png")
        written.append("iou_dice_vs_factor.png")
    plot_downsampling(out / "downsampling.png")
    plot_gain_vs_factor(data, out / "gain_vs_factor.png", f"ours at {base_label(meta)}",
                        reference_gains(reference) if reference else None,
                        f"ours at {base_label(reference)}" if reference else "", pairs)
    written += ["downsampling.png", "gain_vs_factor.png"]
    if plot_progress(runs_dir, meta, out / "progress.png"):
        written.append("progress.png")
    n = sum(len(v) for v in data.values())
    print(f"{n} finished runs in {len(data)} configurations -> {out}/" + ", ".join(written)
          + (f"; {len(todo)} planned run(s) not finished" if todo else ""), file=sys.stderr)


__all__ = ["collect", "run_result", "stat", "paired_gain", "tables_markdown", "PAPER_IOU_GAIN",
           "unfinished", "pairs_at_common_epoch", "reference_gains"]
