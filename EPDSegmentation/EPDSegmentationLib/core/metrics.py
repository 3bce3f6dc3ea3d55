"""Segmentation metrics of the paper, and the tissue-area error, from summable statistics.

Inputs are probability maps ``probs`` (N, C, H, W) in 0..1 and a target: soft fractions
(N, C, H, W) (EPD) or hard labels (N, H, W) (integers 0..C-1, taken as one-hot).

Hard metrics (ACC, SPE, SEN, PRE, Dice, IoU) follow the paper's threshold search: for each
class c, the probability map is thresholded at every t in {0, 0.01, ..., 1} (pixel positive
when p >= t) and the t with the best Dice against the hard target is kept (ties go to the t
nearest 0.5); all hard metrics are reported at that t. The hard target of a soft target is its
argmax over classes (a partition of the pixels, ties to the lower class index), the same hard
map ``epd.soft_to_labels`` gives.

Soft metrics compare the probability map p with the soft target q directly:
soft Dice = 2 sum(p q) / (sum p + sum q); RAD = sum |p - q| / sum q; RD = (sum p - sum q) / sum q;
RMSE = sqrt(mean (p - q)^2) over pixels.

Tissue area (cm^2, per slice): soft area = sum of p times the pixel area; hard area = pixels
whose argmax is c, times the pixel area; true area = sum of q times the pixel area (for hard
labels: the pixel count). Errors are predicted minus true, summarised as the mean signed and
mean absolute error per slice.

All sums are pooled over every pixel of every slice seen (micro-averaging), so one threshold
per class serves the whole evaluation set. The statistics are a flat float64 vector
(``MetricStats.to_array``) that adds across batches and across ranks (all-reduce sum), so
distributed evaluation gives the same numbers as one process. Per-class results are averaged
over the classes present in the target (hard metrics: at least one hard-target pixel; soft
metrics and areas: sum q > 0), background excluded unless asked for.

NumPy only (no torch), vectorised: one bincount per batch builds the 101-threshold histogram.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

#: The threshold grid t = 0, 0.01, ..., 1 (float32, compared with float32 probabilities).
THRESHOLDS = (np.arange(101, dtype=np.float64) / 100.0).astype(np.float32)
HARD_METRICS = ("ACC", "SPE", "SEN", "PRE", "Dice", "IoU")
SOFT_METRICS = ("softDice", "RAD", "RD", "RMSE")
#: Pixels per work chunk in ``update`` (bounds the scratch memory to a few hundred MB).
_CHUNK = 1 << 22


def _as_target(target, shape) -> tuple:
    """(soft (N, C, H, W) float or None, hard (N, H, W) int) from a soft or hard target."""
    n, c, h, w = shape
    target = np.asarray(target)
    if target.shape == (n, h, w):
        if target.dtype.kind not in "iub":
            raise ValueError(f"hard target labels must be integers; got dtype {target.dtype}")
        if target.size and (target.min() < 0 or target.max() >= c):
            raise ValueError(f"target labels must lie in [0, {c}); found "
                             f"{target.min()} .. {target.max()}")
        return None, target
    if target.shape == (n, c, h, w):
        if target.dtype.kind != "f":
            raise ValueError(f"a soft target must be float; got dtype {target.dtype}")
        return target, np.argmax(target, axis=1)
    raise ValueError(f"target must be labels (N, H, W) = {(n, h, w)} or fractions "
                     f"(N, C, H, W) = {(n, c, h, w)}; got {target.shape}")


class MetricStats:
    """Summable statistics for the metrics of C classes; see the module docstring.

    update(probs, target, pixel_area_mm2) adds a batch; result() gives the metrics.
    """

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        c, t = num_classes, len(THRESHOLDS)
        self.num_classes = c
        self.pos = np.zeros((c, t), np.float64)    # target-positive pixels per threshold bin
        self.total = np.zeros((c, t), np.float64)  # all pixels per threshold bin
        self.sums = np.zeros((5, c), np.float64)   # sum p, sum q, sum p q, sum |p-q|, sum (p-q)^2
        self.area = np.zeros((5, c), np.float64)   # true, soft err, |soft err|, hard err, |hard err| (mm^2)
        self.counts = np.zeros(2, np.float64)      # pixels per class map, slices with an area

    # ------------------------------------------------------------------ accumulation
    def update(self, probs, target, pixel_area_mm2=None) -> "MetricStats":
        """Add a batch. probs: (N, C, H, W) probabilities; target: (N, C, H, W) fractions or
        (N, H, W) labels; pixel_area_mm2: scalar or (N,) mm^2 per pixel, or None to skip the
        area statistics."""
        probs = np.asarray(probs, dtype=np.float32)
        if probs.ndim != 4 or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs must be (N, {self.num_classes}, H, W); got {probs.shape}")
        soft, hard = _as_target(target, probs.shape)
        n, c, h, w = probs.shape
        p = np.clip(probs, 0.0, 1.0)
        q = soft.astype(np.float32) if soft is not None else None

        # Histogram of threshold bins: bin b = the largest k with THRESHOLDS[k] <= p, so
        # "p >= t_k" is "bin >= k" and the counts above each threshold are suffix sums.
        per = max(1, _CHUNK // max(1, c * h * w))
        offsets = (np.arange(c, dtype=np.int64) * len(THRESHOLDS))[None, :, None, None]
        for i in range(0, n, per):
            pc = p[i:i + per]
            idx = np.searchsorted(THRESHOLDS, pc, side="right").astype(np.int64) - 1 + offsets
            is_pos = hard[i:i + per, None, :, :] == np.arange(c)[None, :, None, None]
            size = c * len(THRESHOLDS)
            self.total += np.bincount(idx.ravel(), minlength=size).reshape(c, -1)
            self.pos += np.bincount(idx[is_pos], minlength=size).reshape(c, -1)

        axes = (0, 2, 3)
        if q is None:
            onehot_sum = np.stack([np.count_nonzero(hard == k) for k in range(c)]).astype(np.float64)
            # With one-hot q: sum p q = sum of p over the class's pixels, |p - q| and (p - q)^2
            # follow from p alone on and off the class.
            pq = np.stack([p[:, k][hard == k].sum(dtype=np.float64) for k in range(c)])
            sum_p = p.sum(axis=axes, dtype=np.float64)
            abs_d = (sum_p - 2 * pq + onehot_sum)
            sq = (p.astype(np.float64) ** 2).sum(axis=axes) - 2 * pq + onehot_sum
            self.sums += np.stack([sum_p, onehot_sum, pq, abs_d, sq])
            per_slice_true = np.stack([(hard == k).sum(axis=(1, 2)) for k in range(c)], 1)
        else:
            d = p - q
            self.sums += np.stack([p.sum(axis=axes, dtype=np.float64),
                                   q.sum(axis=axes, dtype=np.float64),
                                   (p * q).sum(axis=axes, dtype=np.float64),
                                   np.abs(d).sum(axis=axes, dtype=np.float64),
                                   (d.astype(np.float64) ** 2).sum(axis=axes)])
            per_slice_true = q.sum(axis=(2, 3), dtype=np.float64)
        self.counts[0] += n * h * w

        if pixel_area_mm2 is not None:
            a = np.broadcast_to(np.asarray(pixel_area_mm2, np.float64), (n,))[:, None]
            pred_hard = np.argmax(p, axis=1)
            per_slice_hard = np.stack([(pred_hard == k).sum(axis=(1, 2)) for k in range(c)], 1)
            soft_err = (p.sum(axis=(2, 3), dtype=np.float64) - per_slice_true) * a
            hard_err = (per_slice_hard - per_slice_true) * a
            self.area += np.stack([(per_slice_true * a).sum(0), soft_err.sum(0),
                                   np.abs(soft_err).sum(0), hard_err.sum(0),
                                   np.abs(hard_err).sum(0)])
            self.counts[1] += n
        return self

    # ------------------------------------------------------------------ reduction
    def to_array(self) -> np.ndarray:
        """All statistics as one float64 vector (add these across ranks)."""
        return np.concatenate([self.pos.ravel(), self.total.ravel(), self.sums.ravel(),
                               self.area.ravel(), self.counts])

    @classmethod
    def from_array(cls, num_classes: int, array) -> "MetricStats":
        s = cls(num_classes)
        a = np.asarray(array, np.float64)
        parts = [s.pos, s.total, s.sums, s.area, s.counts]
        expected = sum(x.size for x in parts)
        if a.shape != (expected,):
            raise ValueError(f"statistics vector for {num_classes} classes has {expected} "
                             f"values; got shape {a.shape}")
        i = 0
        for x in parts:
            x[...] = a[i:i + x.size].reshape(x.shape)
            i += x.size
        return s

    def __add__(self, other: "MetricStats") -> "MetricStats":
        if other.num_classes != self.num_classes:
            raise ValueError("cannot add statistics of different class counts")
        return MetricStats.from_array(self.num_classes, self.to_array() + other.to_array())

    # ------------------------------------------------------------------ results
    def confusion(self) -> Dict[str, np.ndarray]:
        """Counts at every threshold: tp, fp, fn, tn, each (C, 101)."""
        # suffix sums: pixels with bin >= k are those with p >= t_k
        tp = np.cumsum(self.pos[:, ::-1], axis=1)[:, ::-1]
        pred = np.cumsum(self.total[:, ::-1], axis=1)[:, ::-1]
        positives = self.pos.sum(axis=1, keepdims=True)
        n = self.counts[0]
        fp = pred - tp
        fn = positives - tp
        tn = n - tp - fp - fn
        return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}

    def result(self, include_background: bool = False,
               class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
        """Metrics: {"per_class": {name: {metric: value}}, "mean": {metric: value},
        "threshold": {name: t (NaN when absent)}, "present": {name: bool}}. Values are floats (NaN where a
        class is absent or a ratio undefined); means skip NaN and, unless include_background,
        class 0."""
        c = self.num_classes
        names = list(class_names) if class_names is not None else [str(k) for k in range(c)]
        if len(names) != c:
            raise ValueError(f"{len(names)} class names for {c} classes")
        cm = self.confusion()
        tp, fp, fn, tn = cm["tp"], cm["fp"], cm["fn"], cm["tn"]
        dice_t = _ratio(2 * tp, 2 * tp + fp + fn)
        # best Dice, ties to the threshold nearest 0.5
        score = np.where(np.isnan(dice_t), -1.0, dice_t)
        best = score.max(axis=1, keepdims=True)
        dist = np.abs(THRESHOLDS.astype(np.float64) - 0.5)[None, :]
        k = np.argmin(np.where(score >= best, dist, np.inf), axis=1)
        rows = np.arange(c)
        tp, fp, fn, tn = tp[rows, k], fp[rows, k], fn[rows, k], tn[rows, k]
        hard_present = self.pos.sum(axis=1) > 0
        hard = {
            "ACC": _ratio(tp + tn, tp + tn + fp + fn),
            "SPE": _ratio(tn, tn + fp),
            "SEN": _ratio(tp, tp + fn),
            "PRE": _ratio(tp, tp + fp),
            "Dice": _ratio(2 * tp, 2 * tp + fp + fn),
            "IoU": _ratio(tp, tp + fp + fn),
        }
        sum_p, sum_q, sum_pq, sum_abs, sum_sq = self.sums
        soft_present = sum_q > 0
        soft = {
            "softDice": _ratio(2 * sum_pq, sum_p + sum_q),
            "RAD": _ratio(sum_abs, sum_q),
            "RD": _ratio(sum_p - sum_q, sum_q),
            "RMSE": np.sqrt(_ratio(sum_sq, np.full(c, self.counts[0]))),
        }
        values: Dict[str, np.ndarray] = {}
        for name, v in hard.items():
            values[name] = np.where(hard_present, v, np.nan)
        for name, v in soft.items():
            values[name] = np.where(soft_present, v, np.nan)
        if self.counts[1] > 0:
            slices = self.counts[1]
            true, s_err, s_abs, h_err, h_abs = self.area
            area = {"area_cm2": true / slices / 100.0,
                    "soft_area_err_cm2": s_err / slices / 100.0,
                    "soft_area_abs_err_cm2": s_abs / slices / 100.0,
                    "hard_area_err_cm2": h_err / slices / 100.0,
                    "hard_area_abs_err_cm2": h_abs / slices / 100.0}
            for name, v in area.items():
                values[name] = np.where(soft_present, v, np.nan)
        keep = np.ones(c, bool)
        if not include_background:
            keep[0] = False
        per_class = {names[i]: {m: float(v[i]) for m, v in values.items()} for i in range(c)}
        mean = {}
        for m, v in values.items():
            sel = v[keep & ~np.isnan(v)]
            mean[m] = float(sel.mean()) if sel.size else float("nan")
        return {
            "per_class": per_class,
            "mean": mean,
            "threshold": {names[i]: int(k[i]) / 100.0 if hard_present[i] else float("nan")
                          for i in range(c)},
            "present": {names[i]: bool(hard_present[i] or soft_present[i]) for i in range(c)},
            "pixels": float(self.counts[0]),
            "slices_with_area": float(self.counts[1]),
        }


def _ratio(num, den) -> np.ndarray:
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def segmentation_metrics(probs, target, pixel_area_mm2=None, *, include_background=False,
                         class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """All metrics of one batch (N, C, H, W); see ``MetricStats.result``."""
    probs = np.asarray(probs)
    stats = MetricStats(probs.shape[1]).update(probs, target, pixel_area_mm2)
    return stats.result(include_background=include_background, class_names=class_names)
