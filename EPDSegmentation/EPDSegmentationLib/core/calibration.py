"""Class-prior calibration of a model's probabilities, by input pixel size.

A network's soft areas can be biased: on held-out phantoms with exact class fractions the
bundled model gave MUS 4 to 5 % too much area and other tissue too little (docs/model.md),
and by a different amount at 0.87 mm pixels than at 3 mm. A card may carry per-class
weights w (one set per fitted pixel size); each probability vector p (C,) becomes
p * w / sum(p * w): a prior shift, as when a classifier's class priors change. It keeps the
probabilities in 0..1, summing to one, and a class's ranking between pixels; it moves
area between classes where the network hesitates and barely where it is sure.

Card field (``training calibrate`` writes it, fitted on phantoms only)::

    "calibration": {"pixel_mm": [0.865, 1.5, 3.0],            # ascending, input pixel mm
                    "class_weights": [[1.0, 0.7, ...], ...],  # one row of C per pixel size
                    "edge_cells": 1,                          # optional, see below
                    "command": "...", "fitted_on": "..."}

With ``edge_cells`` R the weights act only on the network cells within R cells (the
(2 R + 1)^2 window) of a change of the network's own, uncalibrated, most likely class; every
other cell keeps the network's probabilities. On phantoms the network's excess muscle lies
at the edges, in the partial-volume pixels (+5.2 of +7.2 cm^2 a slice at 3 mm), and weights
fitted and applied there correct the soft areas as well as weights everywhere; weights
everywhere also overrule the inside of a muscle the network is unsure of (the real psoas,
docs/model.md, thirtieth round).

Between fitted pixel sizes the weights are interpolated linearly in log weight against log
pixel size; outside, the nearest row holds. Weights are applied to the network's output
on its own grid, after mirror averaging, before the probabilities are restored to the
input grid.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

KEY = "calibration"
#: the widest edge band a card may name, in network cells (R = 3: 7 x 7 cells, 12 mm at the
#: bundled model's 1.73 mm cells: wider is the whole muscle again)
MAX_EDGE_CELLS = 3


def parameters(card: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The card's class weights by pixel size ({"pixel_mm", "class_weights"}), what
    provenance, DICOM SEG and the model version record (the same weights calibrated give
    other numbers), or None when the card has no calibration."""
    cal = card.get(KEY)
    if not isinstance(cal, Mapping):
        return None
    out = {k: cal.get(k) for k in ("pixel_mm", "class_weights")}
    if cal.get("edge_cells") is not None:
        out["edge_cells"] = cal["edge_cells"]
    return out


def check_calibration(cal: Any, num_classes: int) -> Optional[str]:
    """None if ``cal`` is a valid calibration for ``num_classes`` classes, else what is
    wrong (for the card validator's error)."""
    if not isinstance(cal, Mapping):
        return "calibration must be an object"
    px, rows = cal.get("pixel_mm"), cal.get("class_weights")
    if not isinstance(px, list) or not px or not isinstance(rows, list) or len(rows) != len(px):
        return "calibration needs pixel_mm (a list) and class_weights (a row per pixel size)"
    try:
        p = [float(v) for v in px]
        w = np.array(rows, dtype=np.float64)
    except (TypeError, ValueError):
        return "calibration pixel_mm and class_weights must be numbers"
    if any(not (v > 0 and math.isfinite(v)) for v in p) or any(b <= a for a, b in zip(p, p[1:])):
        return f"calibration pixel_mm must be positive and ascending; got {px!r}"
    if w.shape != (len(p), num_classes) or not np.all(np.isfinite(w)) or not np.all(w > 0):
        return (f"calibration class_weights must be {len(p)} rows of {num_classes} positive "
                f"numbers")
    edge = cal.get("edge_cells")
    if edge is not None and (not isinstance(edge, int) or isinstance(edge, bool)
                             or not 1 <= edge <= MAX_EDGE_CELLS):
        return f"calibration edge_cells must be an int 1 to {MAX_EDGE_CELLS}; got {edge!r}"
    return None


def edge_cells(card: Mapping[str, Any]) -> Optional[int]:
    """The card's calibration edge_cells (the weights act only near the network's own class
    edges), or None (they act everywhere)."""
    cal = card.get(KEY)
    edge = cal.get("edge_cells") if isinstance(cal, Mapping) else None
    return None if edge is None else int(edge)


def class_weights(card: Mapping[str, Any], pixel_mm: Sequence[float]) -> Optional[np.ndarray]:
    """The card's class weights float32 (C,) for an input of ``pixel_mm`` (row, col) mm
    (their geometric mean), or None when the card has no calibration."""
    cal = card.get(KEY)
    if cal is None:
        return None
    px = np.log(np.array(cal["pixel_mm"], np.float64))
    logw = np.log(np.array(cal["class_weights"], np.float64))
    at = 0.5 * (math.log(float(pixel_mm[0])) + math.log(float(pixel_mm[1])))
    row = np.array([np.interp(at, px, logw[:, c]) for c in range(logw.shape[1])])
    return np.exp(row).astype(np.float32)


def edge_mask(scores, cells: int):
    """Where class weights act with ``edge_cells``: the cells of scores (n, C, h, w)
    (probabilities or logits: the same most likely class), a NumPy array or torch tensor,
    whose (2 cells + 1)^2 window, the edge cells repeated beyond the edges, holds more than
    one most likely class. Bool (n, 1, h, w), the same type and device back."""
    import torch
    from torch.nn import functional as F

    r = int(cells)
    t = torch.as_tensor(scores)
    with torch.no_grad():
        c = t.argmax(1, keepdim=True).to(torch.float32)
        c = F.pad(c, (r, r, r, r), mode="replicate")
        hi = F.max_pool2d(c, 2 * r + 1, stride=1)
        lo = -F.max_pool2d(-c, 2 * r + 1, stride=1)
        edge = hi != lo
    return edge.cpu().numpy() if isinstance(scores, np.ndarray) else edge


def apply_weights(probs, weights, edge_cells: Optional[int] = None):
    """probs (n, C, h, w), a NumPy array or torch tensor, times ``weights`` (C,) along C,
    renormalised to sum to one; the same type and device back. With edge_cells, only in the
    cells edge_mask gives; the rest unchanged."""
    if isinstance(probs, np.ndarray):
        q = probs * np.asarray(weights, probs.dtype)[None, :, None, None]
        q = q / np.maximum(q.sum(1, keepdims=True), np.finfo(probs.dtype).tiny)
        return q if edge_cells is None else np.where(edge_mask(probs, edge_cells), q, probs)
    import torch

    w = torch.as_tensor(np.asarray(weights), dtype=probs.dtype, device=probs.device)
    q = probs * w.view(1, -1, 1, 1)
    q = q / q.sum(1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    return q if edge_cells is None else torch.where(edge_mask(probs, edge_cells), q, probs)


def calibrate(probs, card: Mapping[str, Any], pixel_mm: Sequence[float]):
    """The network's probabilities (n, C, h, w) calibrated for an input of ``pixel_mm``
    (class_weights, apply_weights, near the edges only with the card's edge_cells);
    unchanged when the card has no calibration."""
    w = class_weights(card, pixel_mm)
    return probs if w is None else apply_weights(probs, w, edge_cells(card))
