"""Adapt a model to a site's scans from a few slices the user corrected: the one fine-tuning
implementation of the Slicer panel (mrml/adapt.py), ``epdseg adapt`` (cli/adapt.py) and
``python -m training adapt``.

    cases = [AdaptCase(hu, corrected_labels, pixel_mm, slices=[12, 20], name="case01")]
    result = adapt_model(model, card, cases, AdaptSettings(steps=60))
    save_adapted("site_model", result.model, adapted_card(card, "bundled", cases, settings,
                 result, command="..."))

What the network is trained on, exactly as inference prepares a slice (inference.py):
each corrected slice is resampled to the model's source spacing (card pixel_mm / factor;
bilinear HU, nearest labels), windowed into the card's channels and downsampled by the card's
factor (window mean or bilinear, the card's image mode); the target is the EPD soft labels of
the corrected hard labels at that factor (or the one-hot of the nearest label for a
``nearest`` model). Loss: the training loss (losses.Criterion, MAE + Dice with learned
uncertainty weights). Light augmentation: horizontal flip, a whole-slice HU offset and
(off by default) a random zoom and rotation.

Keeping what the model knew. Fine-tuned on two slices alone, the model forgets: adapted on
ct_t11_l2 (TotalSegmentator's masks standing in for corrections) it lost IMAT and muscle on
held-out phantoms (docs/adapt.md, training/adapt_forget.py). The default therefore trains
on the corrected slices only and then keeps 0.35 of the change of the weights
(``interpolate``: w_base + 0.35 (w_tuned - w_base); Wortsman et al. 2022, "WiSE-FT"): it
needs no data, so it works the same in Slicer. Measured on 2 corrected slices: muscle Dice
0.855 on the CT's other slices (0.910 with interpolate=1) and held-out phantoms mean Dice
0.866 (bundled 0.884; 0.698 with interpolate=1). Other ways, off by default and measured
there: replay (``replay_fraction``: a share of each batch from uncorrected slices of the same
case with the base model's own predictions as soft targets; ``replay_confidence``: only
where it is sure), which also replays its mistakes; and ``l2sp`` (Li et al. 2018). On a
strongly shifted phantom replay 0.25 kept more of what the corrections taught than the
interpolation does (docs/adapt.md): ``interpolate=1`` gives the case-only model.

torch is imported inside the functions: importing this module needs NumPy only.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .calibration import KEY as CALIBRATION_KEY, calibrate, class_weights, edge_cells, edge_mask
from .upsampling import KEY as UPSAMPLING_KEY
from .classes import NUM_CLASSES
from .epd import epd_labels, nearest_labels
from .inference import (Cancelled, prepare_slices, resample_planes, resampled_shape, run_network,
                        select_device, source_pixel_mm)
from .model_card import ModelFileError, make_card, model_paths
from .orientation import network_flips
from .resources import bundled_model_path
from .windowing import window_channels

#: Slices of the model's own predictions used for replay at most, per case.
MAX_REPLAY_SLICES = 16
#: AdaptSettings.train: which weights learn.
TRAIN_CHOICES = ("all", "decoder", "norm")


class AdaptError(ValueError):
    """Corrections, slices or a model that cannot be used for adapting; the message says why."""


@dataclass
class AdaptCase:
    """One corrected scan. hu: (K, J, I) HU; labels: (K, J, I) class indices 0..5 on the same
    grid (the corrected result; only ``slices`` are read); pixel_mm: (row, col) = (J, I) mm;
    slices: the corrected slice indices K; name: says where it came from (in the card);
    ijk_to_ras (4, 4): the grid's geometry, so the slices are put into the orientation the
    network was trained in (core.orientation; None: used as stored), as inference does."""

    hu: np.ndarray
    labels: np.ndarray
    pixel_mm: Tuple[float, float]
    slices: List[int]
    name: str = "case"
    ijk_to_ras: Optional[np.ndarray] = None


@dataclass
class AdaptSettings:
    """steps: optimiser steps; lr: AdamW learning rate; batch_size: slices per step;
    replay_fraction: share of each batch from replay slices (0 turns replay off);
    flip: probability of a horizontal flip; hu_shift: whole-slice offset drawn from
    +-hu_shift HU; zoom: scale drawn from 1 +- zoom and rotate: angle from +-rotate degrees
    (one affine per slice, HU and targets alike; 0 and 0: none); weight_decay: AdamW's on
    the network; loss: as training's --loss;
    train: which weights learn ("all"; "decoder": the up-convolutions, decoder blocks and
    head, the encoder frozen; "norm": the GroupNorm scales and shifts and the head);
    l2sp: alpha of the L2-SP penalty alpha * sum (w - w_base)^2 over the weights that learn
    (Li et al. 2018: held near the base model instead of near zero; 0: off);
    replay_confidence: replay targets only where the base model's highest class probability
    is at least this (the other pixels of a replay slice add no loss; 0: every pixel);
    interpolate: after fine-tuning the weights become w_base + interpolate * (w - w_base)
    (weight-space interpolation, Wortsman et al. 2022, "WiSE-FT"; 1: the fine-tuned weights);
    seed: all randomness; device: "cpu", "cuda", "auto"..."""

    steps: int = 60
    lr: float = 3e-4
    batch_size: int = 4
    replay_fraction: float = 0.0     # see interpolate; docs/adapt.md, the forgetting measure
    replay_confidence: float = 0.0
    flip: float = 0.5
    hu_shift: float = 20.0
    zoom: float = 0.0
    rotate: float = 0.0
    weight_decay: float = 1e-4
    loss: str = "mae+dice"
    train: str = "all"
    l2sp: float = 0.0
    interpolate: float = 0.35        # keeps what it knew (docs/adapt.md)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise AdaptError(f"steps must be a positive int; got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise AdaptError(f"batch_size must be a positive int; got {self.batch_size!r}")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise AdaptError(f"replay_fraction must be in [0, 1); got {self.replay_fraction!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise AdaptError(f"lr must be > 0; got {self.lr!r}")
        if not 0.0 <= self.replay_confidence < 1.0:
            raise AdaptError(f"replay_confidence must be in [0, 1); got {self.replay_confidence!r}")
        if not (math.isfinite(self.l2sp) and self.l2sp >= 0):
            raise AdaptError(f"l2sp must be >= 0; got {self.l2sp!r}")
        if not (math.isfinite(self.interpolate) and 0.0 < self.interpolate <= 1.0):
            raise AdaptError(f"interpolate must be in (0, 1]; got {self.interpolate!r}")
        if self.train not in TRAIN_CHOICES:
            raise AdaptError(f"train must be one of {', '.join(TRAIN_CHOICES)}; got {self.train!r}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class AdaptResult:
    """model: the adapted copy (eval mode, CPU); history: total loss per step;
    before / after: {"mae", "dice"} losses on the corrected slices (no augmentation) with the
    base and the adapted model; seconds: wall time of the fine-tuning; notes: what happened."""

    model: Any
    history: List[float]
    before: Dict[str, float]
    after: Dict[str, float]
    seconds: float
    notes: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- slices


def changed_slices(original: np.ndarray, corrected: np.ndarray) -> List[int]:
    """Slice indices K where the corrected labels (K, J, I) differ from the original result."""
    original, corrected = np.asarray(original), np.asarray(corrected)
    if original.shape != corrected.shape:
        raise AdaptError(f"the corrected labels {corrected.shape} are not on the grid of the "
                         f"original result {original.shape} (K, J, I)")
    diff = (original != corrected).reshape(original.shape[0], -1).any(axis=1)
    return [int(k) for k in np.flatnonzero(diff)]


def check_case(case: AdaptCase) -> AdaptCase:
    """The case with slices as sorted unique ints; AdaptError for labels on another grid,
    values outside the classes, no slices, slices out of range or slices with no labels."""
    hu, labels = np.asarray(case.hu), np.asarray(case.labels)
    if hu.ndim != 3:
        raise AdaptError(f"{case.name}: the image must be a (K, J, I) volume; got {hu.shape}")
    if labels.shape != hu.shape:
        raise AdaptError(f"{case.name}: the corrected labels {labels.shape} are not on the "
                         f"image's grid {hu.shape} (K, J, I)")
    if labels.dtype.kind not in "iu":
        raise AdaptError(f"{case.name}: labels must be integer classes; got {labels.dtype}")
    slices = sorted({int(k) for k in case.slices})
    if not slices:
        raise AdaptError(f"{case.name}: no corrected slices (correct some slices, or name them)")
    bad = [k for k in slices if not 0 <= k < hu.shape[0]]
    if bad:
        raise AdaptError(f"{case.name}: slice {bad[0]} is outside the volume's 0..{hu.shape[0] - 1}")
    sub = labels[slices]
    if sub.size and (sub.min() < 0 or sub.max() >= NUM_CLASSES):
        raise AdaptError(f"{case.name}: label values must be 0..{NUM_CLASSES - 1}; got "
                         f"{int(sub.min())}..{int(sub.max())}")
    empty = [k for k, s in zip(slices, sub) if not s.any()]
    if empty:
        raise AdaptError(f"{case.name}: slice(s) {empty} hold no labels: nothing was corrected "
                         f"there (only slices with a corrected segmentation can teach the model)")
    pixel_mm = tuple(float(v) for v in case.pixel_mm)
    if len(pixel_mm) != 2 or not all(math.isfinite(v) and v > 0 for v in pixel_mm):
        raise AdaptError(f"{case.name}: pixel_mm must be (row mm, column mm) > 0; got {case.pixel_mm!r}")
    if case.ijk_to_ras is not None:    # into the network's orientation, as inference does
        flip_rows, flip_cols, _ = network_flips(case.ijk_to_ras)
        axes = tuple(a for a, f in ((1, flip_rows), (2, flip_cols)) if f)
        if axes:
            hu, labels = np.flip(hu, axes), np.flip(labels, axes)
    return AdaptCase(hu, labels, pixel_mm, slices, case.name)


def soft_targets(labels: np.ndarray, pixel_mm: Sequence[float], card: Mapping[str, Any]) -> np.ndarray:
    """Hard labels (n, J, I) at pixel_mm -> the network's target float32 (n, C, h, w): resampled
    to the model's source spacing (nearest) and downsampled by its factor, EPD fractions (or
    the one-hot of the nearest label for a ``nearest`` model). Same grid as prepare_slices."""
    labels = np.asarray(labels, np.uint8)
    work = resampled_shape(labels.shape[-2:], pixel_mm, source_pixel_mm(card))
    lab = resample_planes(labels, work, labels=True)
    k = int(card["factor"])
    if card["label_mode"] == "nearest":
        return epd_labels(nearest_labels(lab, k), NUM_CLASSES, 1).astype(np.float32)
    return epd_labels(lab, NUM_CLASSES, k).astype(np.float32)


# ----------------------------------------------------------------------------- uncertainty


def entropy_map(probabilities: np.ndarray, class_axis: int = 0) -> np.ndarray:
    """Normalised entropy in 0..1 (1 = all classes equally likely) of soft maps, per pixel:
    probabilities (C, ...) -> (...). Highest along tissue boundaries and where the model
    hesitates between tissues."""
    p = np.clip(np.asarray(probabilities, np.float32), 1e-7, 1.0)
    c = p.shape[class_axis]
    return (-(p * np.log(p)).sum(axis=class_axis) / np.log(c)).astype(np.float32)


def slice_uncertainty(probabilities: np.ndarray) -> np.ndarray:
    """Per-slice uncertainty (n,) from probabilities (C, n, J, I): the mean normalised
    entropy over the slice (the same pixel count for every slice, so slices with more
    uncertain tissue score higher)."""
    return entropy_map(probabilities).reshape(probabilities.shape[1], -1).mean(axis=1)


def suggest_slices(scores: Sequence[float], n: int, slices: Optional[Sequence[int]] = None,
                   min_gap: int = 3, exclude: Sequence[int] = ()) -> List[int]:
    """The n most uncertain slices, at least ``min_gap`` slices apart (neighbours teach little
    more than one of them). scores: per slice (of ``slices``, default 0..n-1)."""
    scores = np.asarray(scores, np.float64)
    ks = list(range(len(scores))) if slices is None else [int(k) for k in slices]
    chosen: List[int] = []
    for i in np.argsort(-scores, kind="stable"):
        k = ks[int(i)]
        if k in exclude or any(abs(k - c) < min_gap for c in chosen):
            continue
        chosen.append(k)
        if len(chosen) == n:
            break
    return chosen


# ----------------------------------------------------------------------------- fine-tuning


def _check_model(model, card: Mapping[str, Any]) -> None:
    config = getattr(model, "config", None)
    if config is None or config.to_dict() != dict(card["architecture"]):
        raise AdaptError(f"the model is not the card's architecture {card['architecture']} "
                         f"(it is {config.to_dict() if config is not None else type(model).__name__}); "
                         f"load model and card together with model_io.load_model")


def trainable_parameters(net, train: str) -> list:
    """The parameters that learn under AdaptSettings.train; the others get
    requires_grad=False (so their gradients are not even computed)."""
    import torch

    if train == "all":
        chosen = list(net.parameters())
    elif train == "decoder":
        chosen = [p for name, p in net.named_parameters() if not name.startswith("encoder.")]
    else:   # "norm"
        chosen = [p for m in net.modules() if isinstance(m, torch.nn.GroupNorm)
                  for p in m.parameters()] + list(net.head.parameters())
    keep = {id(p) for p in chosen}
    for p in net.parameters():
        p.requires_grad_(id(p) in keep)
    return chosen


def _replay_slices(n_slices: int, corrected: Sequence[int], limit: int) -> List[int]:
    """Up to ``limit`` uncorrected slices spread evenly over the volume."""
    free = [k for k in range(n_slices) if k not in set(corrected)]
    if len(free) <= limit:
        return free
    return [free[int(i)] for i in np.linspace(0, len(free) - 1, limit).round()]


def _prepare(case: AdaptCase, card, model, device, settings: AdaptSettings, notes: List[str]):
    """Tensors of one case: hu on the model's source grid (n, H, W) and targets (n, C, h, w),
    for the corrected and the replay slices."""
    import torch

    work = resampled_shape(case.hu.shape[-2:], case.pixel_mm, source_pixel_mm(card))
    hu = torch.from_numpy(resample_planes(np.asarray(case.hu[case.slices], np.float32), work))
    target = torch.from_numpy(soft_targets(case.labels[case.slices], case.pixel_mm, card))
    # a calibrated model (core/calibration) is trained through its class weights: softmax of
    # logits + log w is the calibrated probability, so the corrections hold as segment shows them
    w = class_weights(card, case.pixel_mm)
    log_w = None if w is None else torch.from_numpy(np.log(w)).view(1, -1, 1, 1)
    out = {"hu": hu, "target": target, "replay_hu": None, "replay_target": None,
           "replay_mask": None, "log_w": log_w, "edge_cells": edge_cells(card)}
    if settings.replay_fraction > 0:
        ks = _replay_slices(case.hu.shape[0], case.slices, MAX_REPLAY_SLICES)
        if ks:
            x, _ = prepare_slices(case.hu[ks], case.pixel_mm, card)
            probs, _, _ = run_network(model, x, device, settings.batch_size, notes)
            probs = calibrate(probs, card, case.pixel_mm)
            out["replay_hu"] = torch.from_numpy(
                resample_planes(np.asarray(case.hu[ks], np.float32), work))
            out["replay_target"] = torch.from_numpy(probs)
            notes.append(f"{case.name}: replay of the base model's predictions on "
                         f"{len(ks)} uncorrected slice(s)")
            if settings.replay_confidence > 0:   # its hesitant pixels are not held
                keep = probs.max(axis=1, keepdims=True) >= settings.replay_confidence
                out["replay_mask"] = torch.from_numpy(keep.astype(np.float32))
                notes.append(f"{case.name}: replay on the {keep.mean():.0%} of its pixels where "
                             f"the base model is >= {settings.replay_confidence:g} sure")
    return out


def network_input(hu, card: Mapping[str, Any]):
    """torch HU (B, H, W) on the source grid -> network input (B, channels, h, w), as
    inference.prepare_slices makes it (window, then window mean or bilinear by the factor)."""
    from .epd_torch import bilinear_image_torch, epd_image_torch

    x = window_channels(hu, card["windows"])
    k = int(card["factor"])
    return epd_image_torch(x, k) if card["image_mode"] == "average" else bilinear_image_torch(x, k)


def _batch(data, n_fit: int, n_replay: int, rng: np.random.Generator, settings, card, device):
    import torch

    hus, targets, masks = [], [], []
    for key, n in (("", n_fit), ("replay_", n_replay)):
        if n == 0 or data[key + "hu"] is None:
            continue
        idx = torch.from_numpy(rng.integers(0, data[key + "hu"].shape[0], n))
        hus.append(data[key + "hu"][idx])
        targets.append(data[key + "target"][idx])
        m = data.get(key + "mask")      # corrected slices: every pixel counts
        masks.append(m[idx] if m is not None else torch.ones_like(targets[-1][:, :1]))
    hu, target = torch.cat(hus).to(device), torch.cat(targets).to(device)
    mask = torch.cat(masks).to(device) if data.get("replay_mask") is not None and n_replay else None
    b = hu.shape[0]
    shift = torch.from_numpy(rng.uniform(-settings.hu_shift, settings.hu_shift, b)
                             .astype(np.float32)).to(device)
    flip = torch.from_numpy(rng.random(b) < settings.flip).to(device)
    hu = hu + shift.view(-1, 1, 1)
    hu = torch.where(flip.view(-1, 1, 1), hu.flip(-1), hu)
    target = torch.where(flip.view(-1, 1, 1, 1), target.flip(-1), target)
    if mask is not None:
        mask = torch.where(flip.view(-1, 1, 1, 1), mask.flip(-1), mask)
    if settings.zoom > 0 or settings.rotate > 0:
        hu, target, mask = _affine(hu, target, rng, settings.zoom, settings.rotate, mask)
    return network_input(hu, card), target, mask


def _affine(hu, target, rng: np.random.Generator, zoom: float, rotate: float, mask=None):
    """One random zoom and rotation about the centre per slice, the same for the HU
    (B, H, W), bilinear, air (-1000 HU) outside, and the soft targets (B, C, h, w), bilinear
    (fractions stay fractions), background outside, and a loss mask (B, 1, h, w) or None
    (nearest). Both grids span the same field of view, so one normalised affine serves both.
    Returns (hu, target, mask)."""
    import torch
    from torch.nn import functional as F

    b = hu.shape[0]
    scale = rng.uniform(1.0 - zoom, 1.0 + zoom, b)
    angle = np.deg2rad(rng.uniform(-rotate, rotate, b))
    aspect = hu.shape[-2] / hu.shape[-1]        # H / W: rotate in pixels, not in -1..1
    theta = np.zeros((b, 2, 3), np.float32)
    theta[:, 0, 0], theta[:, 0, 1] = np.cos(angle) / scale, -np.sin(angle) * aspect / scale
    theta[:, 1, 0], theta[:, 1, 1] = np.sin(angle) / aspect / scale, np.cos(angle) / scale
    theta = torch.from_numpy(theta).to(hu.device)
    grid = F.affine_grid(theta, [b, 1] + list(hu.shape[-2:]), align_corners=False)
    hu = F.grid_sample((hu + 1000.0).unsqueeze(1), grid, align_corners=False).squeeze(1) - 1000.0
    grid = F.affine_grid(theta, list(target.shape), align_corners=False)
    target = F.grid_sample(target, grid, align_corners=False)
    outside = (1.0 - target.sum(dim=1)).clamp(min=0.0)
    target = torch.cat([target[:, :1] + outside.unsqueeze(1), target[:, 1:]], dim=1)
    if mask is not None:
        mask = F.grid_sample(mask, grid, mode="nearest", padding_mode="border", align_corners=False)
    return hu, target, mask


def _replay_count(settings: AdaptSettings, rng: np.random.Generator) -> int:
    """Replay slices in this step's batch: batch_size x replay_fraction, the fraction drawn
    (so 0.1 of a batch of 4 is one replay slice in 40 % of the steps, not always none), and
    at least one corrected slice."""
    share = settings.batch_size * settings.replay_fraction
    n = int(math.floor(share))
    if share - n > 1e-9:      # no draw when it is whole: the default's random stream is kept
        n += int(rng.random() < share - n)
    return min(n, settings.batch_size - 1)


def _anchors(net) -> list:
    """(parameter, detached copy of its base value) for the weights that learn: L2-SP's w_base."""
    return [(p, p.detach().clone()) for p in net.parameters() if p.requires_grad]


def l2sp_penalty(anchors):
    """sum over the anchored parameters of ||w - w_base||^2 (a scalar tensor; L2-SP without
    its alpha)."""
    return sum(((p - a) ** 2).sum() for p, a in anchors)


def interpolate_weights(base, tuned, t: float):
    """A copy of ``tuned`` with every floating weight and buffer base + t x (tuned - base)
    (t = 1: tuned, t = 0: base). base and tuned: the same architecture."""
    import torch

    out = copy.deepcopy(tuned)
    b, s = base.state_dict(), tuned.state_dict()
    with torch.no_grad():
        out.load_state_dict({k: (b[k].to(v.device) + t * (v - b[k].to(v.device)))
                             if v.is_floating_point() else v for k, v in s.items()})
    return out


def _calibrated(logits, d):
    """Logits (n, C, h, w) plus the case's log class weights, if the model has them (only
    near the network's own edges where its card says so, as calibration.calibrate)."""
    if d["log_w"] is None:
        return logits
    log_w = d["log_w"].to(logits.device, logits.dtype)
    if d.get("edge_cells") is not None:
        log_w = log_w * edge_mask(logits, d["edge_cells"]).to(logits.dtype)
    return logits + log_w


def _evaluate(net, datas, card, device) -> Dict[str, float]:
    """Mean MAE and Dice losses over the corrected slices (no augmentation)."""
    import torch

    from .losses import dice_loss, mae_loss

    net.eval()
    mae, dice, n = 0.0, 0.0, 0
    with torch.no_grad():
        for d in datas:
            for i in range(d["hu"].shape[0]):
                logits = _calibrated(net.logits(network_input(d["hu"][i:i + 1].to(device),
                                                              card)), d)
                t = d["target"][i:i + 1].to(device)
                mae += float(mae_loss(logits, t))
                dice += float(dice_loss(logits, t))
                n += 1
    return {"mae": mae / n, "dice": dice / n}


def adapt_model(model, card: Mapping[str, Any], cases: Sequence[AdaptCase],
                settings: AdaptSettings = AdaptSettings(), *,
                progress: Optional[Callable[[int, int, float], None]] = None,
                should_cancel: Optional[Callable[[], bool]] = None) -> AdaptResult:
    """Fine-tune a copy of ``model`` (from model_io.load_model with its ``card``) on the
    corrected slices of ``cases``; the given model is left unchanged.

    progress(step, steps, loss) after each step; should_cancel() is checked before each step
    and raises inference.Cancelled (nothing is kept). AdaptError for unusable input."""
    import torch

    from .losses import Criterion, parse_loss

    _check_model(model, card)
    if not cases:
        raise AdaptError("no corrected cases given")
    cases = [check_case(c) for c in cases]
    notes: List[str] = []
    device, reason = select_device(settings.device)
    notes.append(f"device {device}: {reason}")
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    base = copy.deepcopy(model).to(device).eval()
    datas = [_prepare(c, card, base, device, settings, notes) for c in cases]
    net = copy.deepcopy(model).to(device)
    before = _evaluate(net, datas, card, device)
    criterion = Criterion(parse_loss(settings.loss)).to(device)
    groups = [{"params": trainable_parameters(net, settings.train),
               "weight_decay": settings.weight_decay}]
    if list(criterion.parameters()):
        groups.append({"params": list(criterion.parameters()), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=settings.lr)
    anchors = _anchors(net) if settings.l2sp > 0 else None
    # cases drawn in proportion to their corrected slices
    weights = np.array([len(c.slices) for c in cases], np.float64)
    weights /= weights.sum()
    history: List[float] = []
    t0 = time.perf_counter()
    for step in range(settings.steps):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"adapting cancelled after {step} of {settings.steps} steps")
        d = datas[int(rng.choice(len(datas), p=weights))]
        n_replay = _replay_count(settings, rng) if d["replay_hu"] is not None else 0
        x, target, mask = _batch(d, settings.batch_size - n_replay, n_replay, rng, settings,
                                 card, device)
        net.train()
        loss, _ = criterion(_calibrated(net.logits(x), d), target, mask)
        if anchors is not None:
            loss = loss + settings.l2sp * l2sp_penalty(anchors)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, settings.steps, history[-1])
    seconds = time.perf_counter() - t0
    if settings.interpolate < 1.0:
        net = interpolate_weights(base, net, settings.interpolate)
        notes.append(f"weights interpolated: base + {settings.interpolate:g} x the fine-tuned change")
    after = _evaluate(net, datas, card, device)
    net = net.cpu().eval()
    for p in net.parameters():
        p.requires_grad_(True)
    notes.append(f"{settings.steps} steps on {device} in {seconds:.1f} s")
    return AdaptResult(net, history, before, after, seconds, notes)


# ----------------------------------------------------------------------------- saving


def adapted_card(base_card: Mapping[str, Any], base_model: str, cases: Sequence[AdaptCase],
                 settings: AdaptSettings, result: AdaptResult, command: str) -> Dict[str, Any]:
    """The card of an adapted model: the base card's architecture, windows, factor, modes and
    spacing; training records the base model, the cases and slices, the settings and the
    losses on the corrected slices before and after. The base's metrics and evaluation no
    longer describe this model: they are kept under training.data.base_model. A calibrated
    base's class weights stay with the model: it was fine-tuned through them; so does the
    base's HU-guided upsampling (core/upsampling.py)."""
    skip = {"format", "format_version", "architecture", "classes", "windows", "factor",
            "label_mode", "image_mode", "pixel_mm", "input_size", "training", "metrics"}
    base_extra = {k: v for k, v in base_card.items() if k not in skip}
    data = {
        "kind": "adapted from corrected slices",
        "base_model": {"path": str(base_model), "training": dict(base_card["training"]),
                       "metrics": dict(base_card.get("metrics", {})), **base_extra},
        "cases": [{"name": c.name, "slices": [int(k) for k in c.slices],
                   "pixel_mm": [float(v) for v in c.pixel_mm],
                   "shape_kji": [int(v) for v in np.shape(c.hu)]} for c in cases],
        "replay": ("the base model's predictions on up to %d uncorrected slices per case%s"
                   % (MAX_REPLAY_SLICES, "" if not settings.replay_confidence else
                      ", where its highest probability is >= %g" % settings.replay_confidence))
        if settings.replay_fraction > 0 else "none",
        "kept_from_base": "; ".join(
            ["weights = base + %g x the fine-tuned change" % settings.interpolate] +
            (["L2-SP alpha %g" % settings.l2sp] if settings.l2sp else [])),
    }
    training = {"data": data, "command": command, "seed": settings.seed,
                "adapt_settings": settings.to_dict(),
                "corrected_loss": {"before": result.before, "after": result.after},
                "seconds": round(result.seconds, 2)}
    return make_card(base_card["architecture"], windows=base_card["windows"],
                     factor=base_card["factor"], label_mode=base_card["label_mode"],
                     image_mode=base_card["image_mode"], pixel_mm=base_card["pixel_mm"],
                     input_size=base_card["input_size"], training=training, metrics={},
                     adapted_from=str(base_model),
                     # trained through the base's class weights (_calibrated): they go with it;
                     # its maps reach the input grid as the base's did
                     **{key: base_card[key] for key in (CALIBRATION_KEY, UPSAMPLING_KEY)
                        if key in base_card})


def check_destination(path, overwrite: bool = False) -> None:
    """Before any work: ModelFileError for the bundled model's files or folder (even with
    overwrite), FileExistsError for existing files without overwrite."""
    weights, card_path = model_paths(path)
    try:
        bundled = [p.resolve() for p in model_paths(bundled_model_path())]
    except FileNotFoundError:       # a build without the bundled model: nothing to protect
        bundled = []
    if bundled and (weights.resolve() in bundled or card_path.resolve() in bundled
                    or weights.resolve().parent == bundled[0].parent):
        raise ModelFileError(f"{weights}: an adapted model is never written over or beside the "
                             f"bundled model; choose another folder")
    if not overwrite:
        for p in (weights, card_path):
            if p.exists():
                raise FileExistsError(f"{p} exists; pass overwrite=True (--overwrite) to replace it")


def save_adapted(path, model, card: Mapping[str, Any], *, overwrite: bool = False):
    """Save an adapted model as a NEW file (model_io.save_model: atomic, safetensors + card).
    Refuses the bundled model's files even with overwrite, and existing files without it."""
    from .model_io import save_model

    check_destination(path, overwrite)
    return save_model(path, model, card, overwrite=overwrite)


def describe(result: AdaptResult) -> str:
    """One line: the loss on the corrected slices before and after, and the time."""
    b, a = result.before, result.after
    return (f"corrected slices: MAE {b['mae']:.4f} -> {a['mae']:.4f}, Dice loss "
            f"{b['dice']:.4f} -> {a['dice']:.4f}; {len(result.history)} steps in "
            f"{result.seconds:.1f} s")


__all__ = ["AdaptCase", "AdaptError", "AdaptResult", "AdaptSettings", "adapt_model",
           "adapted_card", "changed_slices", "check_case", "check_destination", "describe", "entropy_map",
           "interpolate_weights", "l2sp_penalty",
           "save_adapted", "slice_uncertainty", "soft_targets", "suggest_slices"]
