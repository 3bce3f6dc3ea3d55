"""``python -m training train``: train the network on EPD (or nearest) downsampled data.

One process:        python -m training train --phantom-subjects 40 --factor 2 --output runs/f2
Several GPUs/CPUs:  torchrun --nproc-per-node 4 -m training train ... (same arguments)

--batch-size is the global batch: each of N ranks takes batch/N slices of it, gradients are
averaged by DistributedDataParallel, so N ranks follow the same trajectory as one process
(within float rounding). Data order depends only on (seed, epoch): distributed.RankBatches
shuffles the same permutation for any N and splits each global batch across the ranks
without repeats, and augmentation draws from
(seed, epoch, slice index). A checkpoint is written atomically after every epoch;
--resume continues from it exactly. At the end the weights are exported with their model
card (model_io.save_model) as <output>/model.safetensors + model.json.
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from EPDSegmentationLib.core.classes import KEYS, NUM_CLASSES
from EPDSegmentationLib.core.epd_torch import upsample_soft_torch
from EPDSegmentationLib.core.metrics import MetricStats
from EPDSegmentationLib.core.model import ModelConfig, build_model
from EPDSegmentationLib.core.model_card import DIVISOR, FACTORS, IMAGE_MODES, LABEL_MODES, make_card
from EPDSegmentationLib.core.model_io import save_model
from EPDSegmentationLib.core.windowing import DEFAULT_WINDOWS, check_windows

from . import distributed as D
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .phantom.options import add_anatomy_arguments, anatomy_kwargs
from .randomize import KIDNEY_UNENHANCED_HU, MUSCLE_MEAN_HU
from .data import (Augment, SliceDataset, SliceRecord, epd_target, manifest_records,
                   median_pixel_mm, model_inputs, phantom_records, planes_on_grid,
                   tight_field, tissues_on_grid, to_source_grid)
from EPDSegmentationLib.core.losses import DEFAULT_LOSS, Criterion, parse_loss

CHECKPOINT = "checkpoint.pt"
EXPORT = "model"
#: Plots are redrawn after an epoch when this many seconds passed since the last drawing,
#: and always after the last epoch (drawing costs about half a second).
PLOT_INTERVAL_S = 30.0
#: Arguments that may change when resuming (everything else must match the checkpoint).
RESUMABLE = ("epochs", "resume", "overwrite", "num_workers", "quiet", "device", "output")


# ----------------------------------------------------------------------------- arguments


def parse_windows(values: Optional[List[str]]):
    """['wide:-1000:1000', ...] -> ((name, lo, hi), ...); None -> DEFAULT_WINDOWS."""
    if not values:
        return DEFAULT_WINDOWS
    out = []
    for v in values:
        parts = v.rsplit(":", 2)
        if len(parts) != 3:
            raise ValueError(f"--windows {v!r}: use name:lo:hi in HU, e.g. fat:-200:0")
        try:
            out.append((parts[0], float(parts[1]), float(parts[2])))
        except ValueError:
            raise ValueError(f"--windows {v!r}: lo and hi must be numbers") from None
    return check_windows(out)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (a manifest, or the phantom generator)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path, help="CSV/JSON manifest (image,label,split[,subject])")
    src.add_argument("--phantom-subjects", type=int, metavar="N",
                     help="generate N phantom subjects in memory instead")
    g.add_argument("--phantom-slices", type=int, default=6, help="slices per phantom subject")
    g.add_argument("--phantom-size", type=int, default=512, help="phantom slice size, pixels")
    g.add_argument("--phantom-gap-mm", type=float, default=5.0, help="phantom slice gap, mm")
    g.add_argument("--phantom-levels", nargs=2, metavar=("FROM", "TO"), default=None,
                   help="phantom of the torso from vertebral level FROM to TO (e.g. T11 L5; "
                        "T11 .. S1), each subject's slices within them; default: around mid-L3")
    add_anatomy_arguments(g)
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="phantom subjects held out for validation")
    g.add_argument("--data-seed", type=int, default=0, help="phantom subject seed")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    g = p.add_argument_group("EPD and input")
    g.add_argument("--factor", type=int, choices=FACTORS, default=2, help="downsampling factor k")
    g.add_argument("--label-mode", choices=LABEL_MODES, default="epd")
    g.add_argument("--image-mode", choices=IMAGE_MODES, default="average")
    g.add_argument("--windows", nargs="+", metavar="NAME:LO:HI",
                   help="HU windows of the input channels (default: wide:-1000:1000 "
                        "soft_tissue:-160:240 fat:-200:0)")
    g.add_argument("--source-mm", type=float,
                   help="resample every slice to this pixel spacing before downsampling "
                        "(default: the median spacing of the training slices)")
    g.add_argument("--size", type=int, nargs=2, metavar=("ROWS", "COLS"),
                   help="crop/pad the resampled slices to this size (default: the largest)")
    g.add_argument("--no-augment", action="store_true", help="no flip / crop / blur")
    g.add_argument("--lowres", type=float, default=0.0, metavar="P",
                   help="probability of simulating a scan of coarser pixels (the HU shrunk "
                        "by 1.5 to --lowres-max times and enlarged back; default 0: off)")
    g.add_argument("--lowres-max", type=float, default=4.0, metavar="F",
                   help="largest shrink factor of --lowres (default 4: 0.865 mm -> 3.5 mm)")
    g.add_argument("--lowres-noise", type=float, default=0.0, metavar="P",
                   help="with --randomize and --lowres: share of the coarser scans whose "
                        "scanner noise is drawn on their coarse pixels, as a real coarse "
                        "scan's is (default 0: drawn on the training grid before the "
                        "shrink, which averages most of it away)")
    g.add_argument("--tissue-hu", type=float, default=0.0, metavar="P",
                   help="probability of shifting muscle HU by -30..+10 and organ HU by "
                        "-20..+20 (default 0: off)")
    g.add_argument("--randomize", type=float, default=0.0, metavar="P",
                   help="probability of drawing a slice's appearance anew (muscle -10..60 HU "
                        "with patchy fat, fat -130..-60 HU, organs 30..130 HU independent of "
                        "muscle, arms and table as background, field-of-view cuts, streaks, "
                        "kernel noise 5..30 HU; labels kept; default 0: off)")
    g.add_argument("--muscle-region-sd", type=float, default=12.0, metavar="HU",
                   help="with --randomize: SD of each connected muscle's own HU offset "
                        "(default 12; 0: one offset for all muscles)")
    g.add_argument("--organ-flatten", type=float, default=0.4, metavar="P",
                   help="with --randomize: share of slices whose organs lose most of their "
                        "inner contrast (default 0.4; 0: off)")
    g.add_argument("--organ-contact", type=float, default=0.0, metavar="P",
                   help="with --randomize: share of randomised slices whose fat planes "
                        "between organs and muscles close (kidney against psoas, as in thin "
                        "patients; default 0: off)")
    g.add_argument("--diaphragm-muscle", type=float, default=0.0, metavar="P",
                   help="with --randomize, phantom only: share of randomised slices whose "
                        "diaphragm takes the muscle's HU, not the organs' (default 0: off)")
    g.add_argument("--kidney-unenhanced", type=float, default=0.0, metavar="P",
                   help="with --randomize, phantom only: share of randomised slices whose "
                        "kidneys are unenhanced and homogeneous, at --kidney-hu, whatever "
                        "the other organs' phase (default 0: off)")
    g.add_argument("--kidney-hu", type=float, nargs=2, default=list(KIDNEY_UNENHANCED_HU),
                   metavar=("LO", "HI"),
                   help="with --kidney-unenhanced: the range the unenhanced kidneys' level is "
                        "drawn from, HU (default %g %g)" % KIDNEY_UNENHANCED_HU)
    g.add_argument("--canal-hu", type=float, default=0.0, metavar="P",
                   help="with --randomize, phantom only: share of randomised slices whose "
                        "spinal canal contents are drawn at 0..40 HU (default 0: off)")
    g.add_argument("--muscle-hu", type=float, nargs=2, default=list(MUSCLE_MEAN_HU),
                   metavar=("LO", "HI"),
                   help="with --randomize: the range of the muscle's new mean, HU, before "
                        "the fatty infiltration (default %g %g)" % MUSCLE_MEAN_HU)
    g.add_argument("--organ-texture", type=float, default=0.0, metavar="P",
                   help="with --randomize: share of randomised slices whose organs, kidneys "
                        "and diaphragm get a speckle and patches of their own, as the "
                        "muscle has (default 0: off)")
    g.add_argument("--thick-slices", type=float, default=0.0, metavar="P",
                   help="phantom only: share of training slices drawn as a thick slice, "
                        "0.6 to 5 mm: the phantom rendered 1 and 2 mm above and below, "
                        "given the slice's augmentation and appearance, and averaged over "
                        "the slice profile (partial volume across the slice); labels the "
                        "slice's own (default 0: off)")
    g.add_argument("--obese", type=float, default=0.3, metavar="P",
                   help="with --randomize: share of randomised slices whose subcutaneous fat "
                        "grows outward (obese bodies; default 0.3; 0: off)")
    g.add_argument("--cachectic", type=float, default=0.0, metavar="P",
                   help="with --randomize: share of randomised slices (not made obese) whose "
                        "subcutaneous fat over the front and flanks is cut down to 1..6 mm "
                        "(cachectic bodies; default 0: off)")
    g.add_argument("--zoom-out", type=float, default=0.0, metavar="P",
                   help="share of training slices shrunk by 0.75..1 into a frame of air, "
                        "placed at random, instead of the crop (which only enlarges): bodies "
                        "smaller than the phantom's (default 0: off)")
    g.add_argument("--tight-field", type=float, default=0.0, metavar="P",
                   help="share of training batches cropped to one frame tight around their "
                        "bodies (0.75..1 of its side), as a scan reconstructed close to the "
                        "body: the phantom's field is wider than most scans' (default 0: off)")
    g.add_argument("--metal", type=float, default=0.0, metavar="P",
                   help="with --randomize: share of randomised slices given spinal screws "
                        "and rods or surgical clips, with their streaks (default 0: off)")
    g.add_argument("--wall-gas", type=float, default=0.0, metavar="P",
                   help="with --randomize: share of randomised slices given one or two "
                        "gas-filled bowel loops pressed against the inside of the abdominal "
                        "wall, at the front or a flank (default 0: off)")
    g = p.add_argument_group("network and optimisation")
    g.add_argument("--width", type=int, default=16, help="channels at full resolution")
    g.add_argument("--init", type=Path, metavar="MODEL",
                   help="start from the weights of one of our model files (fine-tuning; its "
                        "architecture, windows and factor must match this run's)")
    g.add_argument("--loss", default=DEFAULT_LOSS,
                   help="'+'-joined losses from mae, dice, ce, focal, tversky (several: "
                        "learned uncertainty weights)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (fixed)")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--batch-size", type=int, default=8, help="global batch (all ranks)")
    g.add_argument("--epochs", type=int, default=50)
    g.add_argument("--average-from", type=int, default=0, metavar="EPOCH",
                   help="export the mean of the weights at the end of epochs EPOCH to the last "
                        "(1-based; GroupNorm, so nothing to recompute) instead of the last "
                        "epoch's; its validation is the card's (default 0: the last epoch's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on GPU")
    g = p.add_argument_group("run")
    g.add_argument("--output", type=Path, required=True, help="run folder")
    g.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint.pt")
    g.add_argument("--overwrite", action="store_true", help="start over in an existing run folder")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    g.add_argument("--num-workers", type=int, help="data-loader workers per rank "
                                                   "(default: 0 on the CPU, 4 on a GPU)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def check_args(args: argparse.Namespace) -> None:
    parse_loss(args.loss)
    args.window_list = [list(w) for w in parse_windows(args.windows)]
    for name in ("epochs", "batch_size", "width"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0; got {args.lr}")
    if not 0 <= args.average_from <= args.epochs:
        raise ValueError(f"--average-from is an epoch in 1..--epochs ({args.epochs}), or 0; "
                         f"got {args.average_from}")
    if not 0.0 <= args.lowres <= 1.0:
        raise ValueError(f"--lowres is a probability in 0..1; got {args.lowres}")
    for name in ("randomize", "organ_flatten", "obese", "organ_contact", "kidney_contact",
                 "diaphragm_muscle", "kidney_unenhanced", "canal_hu", "organ_texture",
                 "lowres_noise", "thick_slices", "cachectic", "metal", "zoom_out", "wall_gas",
                 "tight_field"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} is a probability in 0..1; "
                             f"got {getattr(args, name)}")
    if not -200.0 <= args.muscle_hu[0] < args.muscle_hu[1] <= 200.0:
        raise ValueError(f"--muscle-hu is LO HI with -200 <= LO < HI <= 200; got "
                         f"{args.muscle_hu}")
    if not -100.0 <= args.kidney_hu[0] < args.kidney_hu[1] <= 200.0:
        raise ValueError(f"--kidney-hu is LO HI with -100 <= LO < HI <= 200; got "
                         f"{args.kidney_hu}")
    if args.muscle_region_sd < 0:
        raise ValueError(f"--muscle-region-sd is an SD in HU, >= 0; got {args.muscle_region_sd}")
    if not 0.0 <= args.tissue_hu <= 1.0:
        raise ValueError(f"--tissue-hu is a probability in 0..1; got {args.tissue_hu}")
    if not args.lowres_max >= Augment.lowres_factor[0]:
        raise ValueError(f"--lowres-max must be >= {Augment.lowres_factor[0]}; "
                         f"got {args.lowres_max}")
    if args.source_mm is not None and not args.source_mm > 0:
        raise ValueError(f"--source-mm must be > 0; got {args.source_mm}")
    if args.thick_slices > 0 and args.manifest is not None:
        raise ValueError("--thick-slices needs the phantom's planes above and below each "
                         "slice: train on --phantom-subjects, not a manifest")
    if args.phantom_subjects is not None and args.phantom_subjects < 2:
        raise ValueError("--phantom-subjects must be >= 2 (one at least is held out)")


def _jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def args_dict(args: argparse.Namespace) -> Dict[str, object]:
    return {k: _jsonable(v) for k, v in sorted(vars(args).items()) if k != "func"}


# ----------------------------------------------------------------------------- data


def thick_planes(args) -> Tuple[float, ...]:
    """The heights (mm) the phantom's training slices are also rendered at: those of
    randomize.PLANE_OFFSETS_MM with --thick-slices, none without."""
    from .randomize import PLANE_OFFSETS_MM

    on = getattr(args, "thick_slices", 0.0) > 0 and not getattr(args, "no_augment", False)
    return tuple(PLANE_OFFSETS_MM) if on else ()


def load_records(args, progress: bool) -> Tuple[List[SliceRecord], List[SliceRecord], dict]:
    """(training slices, validation slices, data recipe for the card)."""
    if args.manifest is not None:
        import hashlib

        recs = manifest_records(args.manifest, ("train", "val"), progress=progress)
        recipe = {"source": "manifest", "manifest": str(Path(args.manifest).resolve()),
                  "manifest_sha256": hashlib.sha256(Path(args.manifest).read_bytes()).hexdigest()}
    else:
        recs = phantom_records(args.phantom_subjects, args.phantom_slices, args.phantom_size,
                               args.data_seed, args.val_fraction, args.phantom_gap_mm,
                               progress=progress, levels=args.phantom_levels,
                               plane_offsets_mm=thick_planes(args), **anatomy_kwargs(args))
        anatomy = anatomy_kwargs(args)
        recipe = {"source": "phantom", "generator": "training.phantom",
                  "subjects": args.phantom_subjects, "slices_per_subject": args.phantom_slices,
                  "size": args.phantom_size, "slice_gap_mm": args.phantom_gap_mm,
                  "levels": args.phantom_levels, **anatomy,
                  "seed": args.data_seed, "val_fraction": args.val_fraction,
                  "same_as": f"training.phantom.write_dataset(out, "
                             f"{args.phantom_subjects}, {args.phantom_slices}, "
                             f"seed={args.data_seed}, size={args.phantom_size}, "
                             f"val_fraction={args.val_fraction}"
                             + (f", levels={tuple(args.phantom_levels)!r}"
                                if args.phantom_levels else "")
                             + "".join(f", {k}={v}" for k, v in anatomy.items() if v) + ")"}
        if thick_planes(args):
            recipe["thick_planes_mm"] = list(thick_planes(args))
    train, val = recs["train"], recs.get("val", [])
    if not train:
        raise ValueError("no training slices (no case with split 'train')")
    recipe.update(train_slices=len(train), val_slices=len(val),
                  train_subjects=len({r.subject for r in train}),
                  val_subjects=len({r.subject for r in val}))
    return train, val, recipe


# ----------------------------------------------------------------------------- model


class TrainModule(nn.Module):
    """The network and the loss (with its uncertainty weights) as one module, so data
    parallelism averages the gradients of both."""

    def __init__(self, net: nn.Module, criterion: Criterion, bf16: bool):
        super().__init__()
        self.net, self.criterion, self.bf16 = net, criterion, bf16

    def forward(self, x: torch.Tensor, target: torch.Tensor):
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.net.logits(x)
        loss, parts = self.criterion(logits.float(), target)
        return loss, parts, logits.float()


def make_optimizer(module: TrainModule, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; the loss's uncertainty weights in a group without weight decay."""
    groups = [{"params": list(module.net.parameters()), "weight_decay": weight_decay}]
    extra = list(module.criterion.parameters())
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr)


# ----------------------------------------------------------------------------- loops


def validate(module: TrainModule, loader, ctx: D.Context, cfg: dict) -> Dict[str, object]:
    """Validation loss and metrics, reduced over ranks: low resolution (against the exact
    EPD fractions of the true labels) and full resolution (probabilities upsampled with
    upsample_soft, against the labels), with the tissue-area errors."""
    module.eval()
    low, full = MetricStats(NUM_CLASSES), MetricStats(NUM_CLASSES)
    loss_sum = np.zeros(2)
    k = cfg["factor"]
    with torch.no_grad():
        for hu, lab in loader:
            hu, lab = hu.to(ctx.device), lab.to(ctx.device)
            x, q = model_inputs(hu, lab, factor=k, label_mode=cfg["label_mode"],
                                image_mode=cfg["image_mode"], windows=cfg["windows"])
            loss, _, logits = module(x, q)
            probs = torch.softmax(logits, dim=1)
            target = q if cfg["label_mode"] == "epd" else epd_target(lab, k)
            low.update(probs.cpu().numpy(), target.cpu().numpy(), cfg["pixel_area_mm2"] * k * k)
            up = upsample_soft_torch(probs, tuple(lab.shape[-2:]), k)
            full.update(up.cpu().numpy(), lab.cpu().numpy(), cfg["pixel_area_mm2"])
            loss_sum += [float(loss) * hu.shape[0], hu.shape[0]]
    reduced = D.all_reduce_sum(ctx, np.concatenate([loss_sum, low.to_array(), full.to_array()]))
    n_low = low.to_array().size
    low = MetricStats.from_array(NUM_CLASSES, reduced[2:2 + n_low])
    full = MetricStats.from_array(NUM_CLASSES, reduced[2 + n_low:])
    loss = float(reduced[0] / reduced[1]) if reduced[1] else math.nan
    return {"loss": loss, "slices": int(reduced[1]),
            "low": low.result(class_names=KEYS), "full": full.result(class_names=KEYS)}


def _row_from_validation(v: Dict[str, object]) -> Dict[str, float]:
    low, full = v["low"]["mean"], v["full"]["mean"]
    row = {"val_loss": v["loss"], "val_dice": low["Dice"], "val_iou": low["IoU"],
           "val_soft_dice": low["softDice"], "val_full_dice": full["Dice"],
           "val_full_iou": full["IoU"], "val_full_acc": full["ACC"],
           "val_area_abs_err_cm2": full.get("soft_area_abs_err_cm2", math.nan)}
    for key in KEYS[1:]:
        row[f"val_full_dice_{key}"] = v["full"]["per_class"][key]["Dice"]
    return row


def _card_metrics(v: Dict[str, object]) -> Dict[str, object]:
    """What the model card records of the final validation."""
    def pick(r):
        return {"mean": r["mean"], "per_class": r["per_class"], "threshold": r["threshold"]}

    return {"split": "val", "slices": v["slices"], "loss": v["loss"],
            "low_resolution": pick(v["low"]), "full_resolution": pick(v["full"])}


#: card fields fitted to or chosen for the init model's outputs, which a fine-tuned network
#: does not inherit, and the command that makes each for the new model
NOT_CARRIED = (("calibration", "python -m training calibrate"),
               ("upsampling", "python -m training guide"),
               ("field", "python -m training field"))


def init_norm(path: Optional[Path]) -> Tuple[str, Optional[dict]]:
    """(norm, the card's norm_statistics) of --init's model: a model with fixed
    normalisation statistics (training fix-norms) trains on with them fixed, as buffers, and
    its card keeps the record of where they were measured; ("group", None) without --init."""
    from EPDSegmentationLib.core.model_card import NORM_STATISTICS_KEY, model_paths, read_card

    if path is None:
        return "group", None
    card = read_card(model_paths(path)[1])
    norm = card["architecture"].get("norm", "group")
    return norm, (card.get(NORM_STATISTICS_KEY) if norm == "fixed" else None)


def init_from(net: nn.Module, path: Path, architecture: dict, args, recipe: dict) -> List[str]:
    """Copy the weights of model file ``path`` into ``net`` (read with model_io.load_model:
    safetensors only, validated); refuse a model of another architecture, windows or factor.
    The data recipe records where the weights came from, and which of the init card's
    NOT_CARRIED fields the new model starts without; returned as notes for the user."""
    from EPDSegmentationLib.core.model_io import load_model

    model, card = load_model(path)
    differ = [f"{name} {theirs!r} (this run: {ours!r})" for name, theirs, ours in (
        ("architecture", card["architecture"], architecture),
        ("windows", [list(w) for w in card["windows"]], args.window_list),
        ("factor", card["factor"], args.factor)) if theirs != ours]
    if differ:
        raise ValueError(f"--init {path}: the model differs: " + "; ".join(differ))
    net.load_state_dict(model.state_dict())
    recipe["init"] = {"model": str(path), "trained_with": card["training"].get("command")}
    left = [(key, command) for key, command in NOT_CARRIED if key in card]
    if left:
        recipe["init"]["not_carried"] = [key for key, _ in left]
    return [f"note: --init {path}: its {key} is not carried over to the new model (it was "
            f"made for that model's outputs); run `{command}` on the new model to add one"
            for key, command in left]


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this rank, MiB: on a GPU the largest tensor allocation during the epoch
    (torch.cuda.max_memory_allocated, reset at its start); on the CPU the process's peak
    resident memory so far (ru_maxrss: data, model, activations and the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # not on Windows
        return math.nan
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def command_line(argv: List[str], ctx: D.Context) -> str:
    cmd = "python -m training " + shlex.join(argv)
    if ctx.world_size > 1:
        cmd = f"torchrun --nproc-per-node {ctx.world_size} -m training " + shlex.join(argv)
    return cmd


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> Optional[Path]:
    """Train; returns the exported model path on rank 0 (None on other ranks)."""
    from tqdm import tqdm

    check_args(args)
    argv = list(sys.argv[1:] if argv is None else argv)
    ctx = D.setup(args.device)
    try:
        return _run(args, argv, ctx, tqdm)
    finally:
        D.cleanup(ctx)


@dataclass
class RunData:
    """What the data phase hands to training: datasets and loaders on this rank, the
    batch sampler and its per-step loss weights, the EPD/windowing settings (cfg), the data
    recipe for the card, the slice size and spacing, and the augmentation."""

    train_ds: SliceDataset
    val_ds: SliceDataset
    loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    sampler: D.RankBatches
    loss_weights: list
    cfg: dict
    recipe: dict
    size: Tuple[int, int]
    source_mm: float
    augment: Optional[Augment]


@dataclass
class RunState:
    """What the model phase hands to training: the module (network + loss), its DDP wrapper
    (the module itself on one process), the optimizer, the history so far and the first
    epoch to run."""

    config: ModelConfig
    module: TrainModule
    ddp: nn.Module
    optimizer: torch.optim.Optimizer
    history: List[Dict[str, float]]
    start: int
    bf16: bool
    #: --average-from: the running mean of the network's weights (float64, on the CPU) and
    #: how many epochs' weights it holds
    average: Optional[Dict[str, torch.Tensor]] = None
    averaged: int = 0


def manifest_digest(manifest) -> Optional[str]:
    """SHA-256 of the manifest file's bytes, or None without a manifest."""
    if manifest is None:
        return None
    import hashlib

    return hashlib.sha256(Path(manifest).read_bytes()).hexdigest()


def resume_differences(state: dict, args) -> List[str]:
    """The arguments of this run that differ from the checkpoint's, as 'name old -> new'.

    An argument newer than the checkpoint counts as its default (the run used that
    behaviour). The manifest is compared by content, so a run folder moved together with its
    data resumes; a checkpoint from before digests were stored accepts a moved manifest only
    when its old path no longer exists and the file name is the same."""
    old, new = state["args"], args_dict(args)
    defaults = argparse.ArgumentParser()
    add_train_arguments(defaults)
    diff = []
    for k in sorted(set(old) | set(new)):
        if k in RESUMABLE:
            continue
        before = old[k] if k in old else defaults.get_default(k)
        if k == "manifest" and before is not None and new.get(k) is not None:
            digest = state.get("manifest_sha256")
            if digest is not None:
                same = digest == manifest_digest(new[k])
            else:
                same = (Path(before) == Path(new[k]) or (
                    not Path(before).exists() and Path(before).name == Path(new[k]).name))
            if not same:
                diff.append(f"manifest {before!r} -> {new[k]!r} (another file)")
            continue
        if before != new.get(k):
            diff.append(f"{k} {before!r} -> {new.get(k)!r}")
    return diff


def prepare_output(args, ctx: D.Context) -> Optional[dict]:
    """Check and create the run folder; the checkpoint's state when resuming (its arguments
    must match this run's but for RESUMABLE ones), else None."""
    out = Path(args.output)
    ckpt_path = out / CHECKPOINT
    if args.batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {args.batch_size} is the global batch and must be a "
                         f"multiple of the {ctx.world_size} ranks")
    if ctx.is_main:
        if ckpt_path.exists() and not (args.resume or args.overwrite):
            raise FileExistsError(f"{out} already holds a run; pass --resume to continue it "
                                  f"or --overwrite to start over")
        if args.resume and not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no {ckpt_path}")
        out.mkdir(parents=True, exist_ok=True)
    D.barrier(ctx)

    state = load_checkpoint(ckpt_path) if args.resume else None
    if state is not None:
        diff = resume_differences(state, args)
        if diff:
            raise ValueError("--resume: arguments differ from the checkpoint's: "
                             + ", ".join(diff))
    return state


def build_data(args, ctx: D.Context, show: bool) -> RunData:
    """Slices on the source grid, the augmentation, datasets, sampler and loaders."""
    train_recs, val_recs, recipe = load_records(args, progress=show)
    source_mm = args.source_mm or median_pixel_mm(train_recs)
    size = tuple(args.size) if args.size else None
    train_hu, train_lab, size = to_source_grid(train_recs, source_mm, size)
    if val_recs:
        val_hu, val_lab, _ = to_source_grid(val_recs, source_mm, size)
    else:
        val_hu = np.zeros((0,) + size, np.float32)
        val_lab = np.zeros((0,) + size, np.uint8)
    cfg = {"factor": args.factor, "label_mode": args.label_mode, "image_mode": args.image_mode,
           "windows": args.window_list, "pixel_area_mm2": source_mm * source_mm}
    recipe.update(source_pixel_mm=source_mm, source_size=list(size))

    augment = None if args.no_augment else Augment(
        lowres=args.lowres, lowres_factor=(Augment.lowres_factor[0], args.lowres_max),
        lowres_noise=args.lowres_noise,
        tissue_hu=args.tissue_hu, randomize=args.randomize, obese=args.obese,
        muscle_region_sd_hu=args.muscle_region_sd, organ_flatten=args.organ_flatten,
        organ_contact=args.organ_contact, diaphragm_muscle=args.diaphragm_muscle,
        kidney_unenhanced=args.kidney_unenhanced, kidney_hu=tuple(args.kidney_hu),
        canal_hu=args.canal_hu,
        organ_texture=args.organ_texture, muscle_mean_hu=tuple(args.muscle_hu),
        thick=args.thick_slices, cachectic=args.cachectic, metal=args.metal,
        zoom_out=args.zoom_out, wall_gas=args.wall_gas)
    # check_args refuses --thick-slices with a manifest, so the phantom's records have planes
    planes = planes_on_grid(train_recs, source_mm, size) if thick_planes(args) else None
    tissues = None
    needs_codes = max(args.diaphragm_muscle, args.kidney_unenhanced, args.canal_hu) > 0
    if augment is not None and (needs_codes or args.wall_gas > 0):
        # --wall-gas uses the codes when there are any (bowel as well as visceral fat)
        tissues = tissues_on_grid(train_recs, source_mm, size)
        if tissues is None and needs_codes:
            raise ValueError("--diaphragm-muscle, --kidney-unenhanced and --canal-hu need the "
                             "phantom's tissue codes: train on --phantom-subjects, not a "
                             "manifest")
    train_ds = SliceDataset(train_hu, train_lab, augment, seed=args.seed, tissues=tissues,
                            planes=planes)
    val_ds = SliceDataset(val_hu, val_lab)
    per_rank = args.batch_size // ctx.world_size
    sampler = D.RankBatches(len(train_ds), args.batch_size, ctx.world_size, ctx.rank, args.seed)
    workers = args.num_workers if args.num_workers is not None else (
        4 if ctx.device.type == "cuda" else 0)
    pin = ctx.device.type == "cuda"
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler,
                                         num_workers=workers, pin_memory=pin)
    val_subset = torch.utils.data.Subset(val_ds, list(range(ctx.rank, len(val_ds), ctx.world_size)))
    val_loader = torch.utils.data.DataLoader(val_subset, batch_size=per_rank, shuffle=False,
                                             num_workers=workers, pin_memory=pin)
    return RunData(train_ds, val_ds, loader, val_loader, sampler, sampler.weights(), cfg,
                   recipe, size, source_mm, augment)


def build_state(args, ctx: D.Context, state: Optional[dict], recipe: dict) -> RunState:
    """The network (from --init or the checkpoint when given), loss, optimizer and history;
    the random states restored from the checkpoint; wrapped in DDP on several ranks."""
    config = ModelConfig(in_channels=len(args.window_list), num_classes=NUM_CLASSES,
                         width=args.width, norm=init_norm(args.init)[0])
    net = build_model(config)
    if args.init is not None and state is None:
        for note in init_from(net, args.init, config.to_dict(), args, recipe):
            if ctx.is_main:
                print(note, file=sys.stderr)
    criterion = Criterion(parse_loss(args.loss))
    bf16 = ctx.device.type == "cuda" and not args.no_bf16
    module = TrainModule(net, criterion, bf16).to(ctx.device)
    optimizer = make_optimizer(module, args.lr, args.weight_decay)
    history: List[Dict[str, float]] = []
    start = 0
    if state is not None:
        module.net.load_state_dict(state["model"])
        module.criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
        start = int(state["epoch"])
        if len(state["rng"]) == ctx.world_size:
            set_rng_state(state["rng"][ctx.rank], ctx.device)
        elif ctx.is_main:
            print(f"note: checkpoint from {len(state['rng'])} rank(s), now {ctx.world_size}: "
                  f"random states not restored (data order and augmentation are unaffected)",
                  file=sys.stderr)
    ddp = module
    if ctx.distributed:
        ddp = nn.parallel.DistributedDataParallel(
            module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    run = RunState(config, module, ddp, optimizer, history, start, bf16)
    if state is not None and state.get("average") is not None:
        run.average, run.averaged = state["average"], int(state.get("averaged", 0))
    return run


def update_average(run: RunState) -> None:
    """Add the network's weights now to the running mean (--average-from); float64 on the
    CPU, so the mean of many epochs does not drift."""
    weights = {k: v.detach().to("cpu", torch.float64)
               for k, v in run.module.net.state_dict().items()}
    n = run.averaged + 1
    if run.average is None:
        run.average = weights
    else:
        for k, v in weights.items():
            run.average[k] += (v - run.average[k]) / n
    run.averaged = n


def load_average(run: RunState) -> None:
    """Put the running mean into the network (for the final validation and the export)."""
    current = run.module.net.state_dict()
    run.module.net.load_state_dict({k: v.to(current[k].dtype) for k, v in run.average.items()})


def train_one_epoch(args, ctx: D.Context, data: RunData, run: RunState, epoch: int,
                    show: bool, tqdm) -> Tuple[Dict[str, float], float, float]:
    """One pass over the training slices: (the epoch's log row so far: training loss and its
    parts reduced over ranks, the uncertainty weights; seconds; slices trained, all ranks)."""
    parts_names = run.module.criterion.names
    data.sampler.set_epoch(epoch)
    data.train_ds.set_epoch(epoch)
    run.module.train()
    sums = np.zeros(2 + len(parts_names))
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t0 = time.perf_counter()
    bar = tqdm(data.loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
               disable=not show, leave=False)
    for step, (hu, lab) in enumerate(bar):
        hu = hu.to(ctx.device, non_blocking=True)
        lab = lab.to(ctx.device, non_blocking=True)
        # its own stream per rank and step: a resumed run draws the same frames
        frame_rng = np.random.default_rng([args.seed, epoch, step, ctx.rank, 12])
        if frame_rng.random() < args.tight_field:
            hu, lab = tight_field(hu, lab, frame_rng, multiple=args.factor * DIVISOR)
        with torch.no_grad():
            x, q = model_inputs(hu, lab, factor=args.factor, label_mode=args.label_mode,
                                image_mode=args.image_mode, windows=args.window_list)
        loss, parts, _ = run.ddp(x, q)
        run.optimizer.zero_grad(set_to_none=True)
        # 1.0 but for a short last batch split unevenly across ranks (RankBatches)
        (loss * data.loss_weights[step]).backward()
        run.optimizer.step()
        n = hu.shape[0]
        values = torch.stack([loss.detach()] + [parts[p].detach() for p in parts_names])
        values = values.cpu().tolist()
        sums += [values[0] * n, n] + [v * n for v in values[1:]]
        bar.set_postfix(loss=f"{values[0]:.4f}")
    seconds = time.perf_counter() - t0
    sums = D.all_reduce_sum(ctx, sums)
    row: Dict[str, float] = {"epoch": epoch + 1, "train_loss": float(sums[0] / sums[1])}
    for i, p in enumerate(parts_names):
        row[f"train_{p}"] = float(sums[2 + i] / sums[1])
    sigmas = run.module.criterion.sigmas
    if sigmas is not None:
        for p, s in zip(parts_names, sigmas.detach().cpu().tolist()):
            row[f"sigma_{p}"] = s
    return row, seconds, float(sums[1])


def save_epoch(args, ctx: D.Context, run: RunState, row: Dict[str, float], epoch: int,
               tb, show: bool, last_plot: float) -> float:
    """Checkpoint (atomically), log.csv, TensorBoard and plots after an epoch, on rank 0
    (every rank takes part in gathering the random states); returns the time of the last
    plot."""
    out = Path(args.output)
    rngs = D.all_gather_object(ctx, rng_state(ctx.device))
    if ctx.is_main:
        save_checkpoint(out / CHECKPOINT, {
            "epoch": epoch + 1, "args": args_dict(args), "history": run.history, "rng": rngs,
            "manifest_sha256": manifest_digest(args.manifest),
            "model": run.module.net.state_dict(), "criterion": run.module.criterion.state_dict(),
            "optimizer": run.optimizer.state_dict(), "average": run.average,
            "averaged": run.averaged})
        from .logs import plot_history, write_csv

        write_csv(out / "log.csv", run.history)
        tb.log(row)
        if epoch + 1 == args.epochs or time.monotonic() - last_plot >= PLOT_INTERVAL_S:
            plot_history(out / "plots", run.history)
            last_plot = time.monotonic()
        if show:
            msg = f"epoch {epoch + 1}/{args.epochs}: loss {row['train_loss']:.4f}"
            if "val_loss" in row:
                msg += (f", val loss {row['val_loss']:.4f}, val Dice {row['val_dice']:.3f} "
                        f"(full res {row['val_full_dice']:.3f})")
            print(msg + f", {row['slices_per_s']:.1f} slices/s", file=sys.stderr)
    return last_plot


def export_model(args, argv, ctx: D.Context, data: RunData, run: RunState,
                 last_val) -> Path:
    """<output>/model.safetensors + model.json: the final weights and their card."""
    k = args.factor
    size = data.size
    norm, stats = init_norm(args.init)
    fixed = {} if norm != "fixed" else {"norm_statistics": dict(stats, measured_on=(
        f"{stats['measured_on']}; for {args.init}'s network, kept fixed while trained "
        f"further"))}
    card = make_card(
        run.config.to_dict(), windows=args.window_list, factor=k, label_mode=args.label_mode,
        image_mode=args.image_mode, pixel_mm=(data.source_mm * k, data.source_mm * k),
        input_size=(-(-size[0] // k), -(-size[1] // k)),
        training={"data": data.recipe, "command": command_line(argv, ctx), "seed": args.seed,
                  "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                  "weight_decay": args.weight_decay, "optimizer": "AdamW", "loss": args.loss,
                  "augment": data.augment.to_dict() if data.augment else None,
                  "world_size": ctx.world_size, "device": ctx.device.type, "bf16": run.bf16,
                  "weights": (f"mean of epochs {args.average_from} to {args.epochs} "
                              f"({run.averaged} epochs)" if run.average is not None
                              else f"epoch {len(run.history)}"),
                  "final_train_loss": run.history[-1]["train_loss"] if run.history else None},
        metrics=_card_metrics(last_val) if last_val else {}, **fixed)
    weights, _ = save_model(Path(args.output) / EXPORT, run.module.net, card, overwrite=True)
    return weights


def _run(args, argv, ctx: D.Context, tqdm) -> Optional[Path]:
    """The phases: run folder and checkpoint, seeds, data, model, the epoch loop, export."""
    show = ctx.is_main and not args.quiet
    state = prepare_output(args, ctx)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    data = build_data(args, ctx, show)
    run = build_state(args, ctx, state, data.recipe)
    size, k = data.size, args.factor
    if show:
        print(f"training on {ctx.world_size} rank(s), {ctx.device_reason}; "
              f"{len(data.train_ds)} training / {len(data.val_ds)} validation slices of "
              f"{size[0]} x {size[1]} at {data.source_mm:.4g} mm, factor {k} -> network input "
              f"{-(-size[0] // k)} x {-(-size[1] // k)}", file=sys.stderr)
        if data.sampler.dropped:
            print(f"note: the last batch of each epoch ({data.sampler.dropped} slice(s)) has "
                  f"fewer slices than the {ctx.world_size} ranks and is left out",
                  file=sys.stderr)
    tb = None
    if ctx.is_main:
        from .logs import TensorBoard

        tb = TensorBoard(Path(args.output) / "tensorboard", run.start)
    last_val = None
    last_plot = time.monotonic()
    for epoch in range(run.start, args.epochs):
        row, seconds, slices = train_one_epoch(args, ctx, data, run, epoch, show, tqdm)
        if args.average_from and epoch + 1 >= args.average_from:
            update_average(run)
        if len(data.val_ds):
            last_val = validate(run.module, data.val_loader, ctx, data.cfg)
            row.update(_row_from_validation(last_val))
        row.update({"seconds": seconds, "slices_per_s": slices / seconds, "lr": args.lr,
                    "peak_mib": peak_memory_mib(ctx.device)})
        run.history.append(row)
        last_plot = save_epoch(args, ctx, run, row, epoch, tb, show, last_plot)
        D.barrier(ctx)
    if tb is not None:
        tb.close()

    if run.average is not None:
        load_average(run)
        last_val = None                 # the card's validation is the exported weights'
        if show:
            print(f"exporting the mean of the weights of epochs {args.average_from} to "
                  f"{args.epochs}", file=sys.stderr)
    if last_val is None and len(data.val_ds) and run.history:
        # resumed after the last epoch, or the averaged weights
        last_val = validate(run.module, data.val_loader, ctx, data.cfg)
    if not ctx.is_main:
        return None
    weights = export_model(args, argv, ctx, data, run, last_val)
    if show:
        print(f"exported {weights} and {weights.with_suffix('.json')}", file=sys.stderr)
    return weights
