"""Metric values on hand-made cases, against a brute-force loop, and Dice against MONAI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from EPDSegmentationLib.core.metrics import (HARD_METRICS, SOFT_METRICS, THRESHOLDS, MetricStats,
                                        segmentation_metrics)


def two_class(p1, labels):
    """(1, 2, 1, W) probabilities for class 1 = p1 and class 0 = 1 - p1; labels (1, 1, W)."""
    p1 = np.asarray(p1, np.float32)
    probs = np.stack([1 - p1, p1])[None, :, None, :]
    return probs, np.asarray(labels)[None, None, :]


def test_perfect_prediction():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (2, 8, 9))
    probs = (labels[:, None] == np.arange(4)[None, :, None, None]).astype(np.float32)
    r = segmentation_metrics(probs, labels, include_background=True)
    for m in ("ACC", "SPE", "SEN", "PRE", "Dice", "IoU", "softDice"):
        assert r["mean"][m] == pytest.approx(1.0)
    for m in ("RAD", "RD", "RMSE"):
        assert r["mean"][m] == pytest.approx(0.0, abs=1e-12)
    # every threshold in (0, 1] is perfect: the tie goes to 0.5
    assert set(r["threshold"].values()) == {0.5}


def test_threshold_search_hand_case():
    # class 1 on pixels 0 and 2; p = .8 .7 .6 .1. Thresholds in (0.1, 0.6] select {0, 1, 2}:
    # TP 2, FP 1, FN 0, TN 1 -> Dice 0.8, the best; the tie goes to t = 0.5.
    probs, labels = two_class([0.8, 0.7, 0.6, 0.1], [1, 0, 1, 0])
    r = segmentation_metrics(probs, labels)
    c1 = r["per_class"]["1"]
    assert r["threshold"]["1"] == 0.5
    assert c1["Dice"] == pytest.approx(0.8)
    assert c1["IoU"] == pytest.approx(2 / 3)
    assert c1["ACC"] == pytest.approx(3 / 4)
    assert c1["SPE"] == pytest.approx(1 / 2)
    assert c1["SEN"] == pytest.approx(1.0)
    assert c1["PRE"] == pytest.approx(2 / 3)
    # the mean excludes background by default
    assert r["mean"]["Dice"] == pytest.approx(0.8)


def test_threshold_is_the_largest_dice_not_0_5():
    # class 1 = pixels 0, 1; p = .9 .4 .3 0: only thresholds in (0.3, 0.4] are perfect.
    probs, labels = two_class([0.9, 0.4, 0.3, 0.0], [1, 1, 0, 0])
    r = segmentation_metrics(probs, labels)
    assert r["threshold"]["1"] == 0.4
    assert r["per_class"]["1"]["Dice"] == pytest.approx(1.0)
    # soft metrics by hand: sum pq = 1.3, sum p = 1.6, sum q = 2
    c1 = r["per_class"]["1"]
    assert c1["softDice"] == pytest.approx(2.6 / 3.6)
    assert c1["RAD"] == pytest.approx((0.1 + 0.6 + 0.3) / 2)
    assert c1["RD"] == pytest.approx(-0.2)
    assert c1["RMSE"] == pytest.approx(math.sqrt((0.01 + 0.36 + 0.09) / 4))


def test_soft_target_metrics_by_hand():
    # one class-1 map p against EPD fractions q (2 classes, 1 x 3 pixels)
    p1 = np.array([0.5, 0.25, 1.0], np.float32)
    q1 = np.array([0.75, 0.0, 1.0], np.float32)
    probs = np.stack([1 - p1, p1])[None, :, None, :]
    target = np.stack([1 - q1, q1])[None, :, None, :]
    c1 = segmentation_metrics(probs, target)["per_class"]["1"]
    assert c1["softDice"] == pytest.approx(2 * (0.375 + 1.0) / (1.75 + 1.75))
    assert c1["RAD"] == pytest.approx((0.25 + 0.25 + 0) / 1.75)
    assert c1["RD"] == pytest.approx(0.0)
    assert c1["RMSE"] == pytest.approx(math.sqrt((0.0625 + 0.0625) / 3))
    # hard target = argmax of q: class 1 on pixels 0 and 2
    assert c1["Dice"] == pytest.approx(1.0)


def test_absent_class_is_excluded_from_the_mean():
    labels = np.array([[[0, 1, 1, 0]]])
    probs = np.zeros((1, 3, 1, 4), np.float32)
    probs[0, 0] = [1, 0, 0, 1]
    probs[0, 1] = [0, 1, 0.5, 0]
    probs[0, 2] = [0, 0, 0.5, 0]
    r = segmentation_metrics(probs, labels)
    assert not r["present"]["2"]
    assert math.isnan(r["per_class"]["2"]["Dice"]) and math.isnan(r["per_class"]["2"]["softDice"])
    assert r["mean"]["Dice"] == r["per_class"]["1"]["Dice"]
    assert r["mean"]["softDice"] == pytest.approx(r["per_class"]["1"]["softDice"])


def test_tissue_area_error_in_cm2():
    # 2 x 2 pixels of 50 mm^2; class 1 truly covers 2 pixels (1 cm^2)
    labels = np.array([[[1, 1], [0, 0]]])
    probs = np.zeros((1, 2, 2, 2), np.float32)
    probs[0, 1] = [[0.9, 0.4], [0.3, 0.0]]   # soft area 1.6 px = 0.8 cm^2, argmax area 1 px
    probs[0, 0] = 1 - probs[0, 1]
    c1 = segmentation_metrics(probs, labels, 50.0)["per_class"]["1"]
    assert c1["area_cm2"] == pytest.approx(1.0)
    assert c1["soft_area_err_cm2"] == pytest.approx(-0.2)
    assert c1["soft_area_abs_err_cm2"] == pytest.approx(0.2)
    assert c1["hard_area_err_cm2"] == pytest.approx(-0.5)
    # two slices, errors of opposite sign: the signed mean cancels, the absolute does not
    probs2 = np.concatenate([probs, probs[:, :, ::-1]], 0)
    probs2[1, 1] = [[1.0, 1.0], [0.2, 0.0]]
    probs2[1, 0] = 1 - probs2[1, 1]
    c = segmentation_metrics(probs2, np.concatenate([labels, labels]), [50.0, 50.0])
    c1 = c["per_class"]["1"]
    assert c1["soft_area_err_cm2"] == pytest.approx((-0.2 + 0.1) / 2)
    assert c1["soft_area_abs_err_cm2"] == pytest.approx((0.2 + 0.1) / 2)


def random_case(seed=0, n=3, c=4, h=12, w=17):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, (n, h, w))
    logits = rng.normal(size=(n, c, h, w)) + 2.0 * (labels[:, None] == np.arange(c)[None, :, None, None])
    probs = np.exp(logits)
    probs /= probs.sum(1, keepdims=True)
    return probs.astype(np.float32), labels


def test_agrees_with_a_brute_force_threshold_loop():
    probs, labels = random_case()
    r = segmentation_metrics(probs, labels, include_background=True)
    for c in range(probs.shape[1]):
        y = labels == c
        best = None
        for t in THRESHOLDS:
            pred = probs[:, c] >= t
            tp, fp = np.sum(pred & y), np.sum(pred & ~y)
            fn, tn = np.sum(~pred & y), np.sum(~pred & ~y)
            dice = 2 * tp / (2 * tp + fp + fn)
            if best is None or dice > best[0] + 1e-12:
                best = (dice, tp, fp, fn, tn)
        dice, tp, fp, fn, tn = best
        got = r["per_class"][str(c)]
        assert got["Dice"] == pytest.approx(dice)
        assert got["IoU"] == pytest.approx(tp / (tp + fp + fn))
        assert got["ACC"] == pytest.approx((tp + tn) / y.size)
        assert got["SEN"] == pytest.approx(tp / (tp + fn))
        assert got["SPE"] == pytest.approx(tn / (tn + fp))
        assert got["PRE"] == pytest.approx(tp / (tp + fp))
        q = y.astype(np.float64)
        p = probs[:, c].astype(np.float64)
        assert got["softDice"] == pytest.approx(2 * (p * q).sum() / (p.sum() + q.sum()))
        assert got["RAD"] == pytest.approx(np.abs(p - q).sum() / q.sum())
        assert got["RMSE"] == pytest.approx(np.sqrt(((p - q) ** 2).mean()))


def test_hard_labels_and_their_one_hot_give_the_same_numbers():
    probs, labels = random_case(1)
    onehot = (labels[:, None] == np.arange(4)[None, :, None, None]).astype(np.float32)
    a = segmentation_metrics(probs, labels, 0.7)
    b = segmentation_metrics(probs, onehot, 0.7)
    for name in a["per_class"]:
        for m, v in a["per_class"][name].items():
            assert v == pytest.approx(b["per_class"][name][m]), (name, m)


def test_dice_matches_monai():
    monai_metrics = pytest.importorskip("monai.metrics")
    import torch

    probs, labels = random_case(2, n=2, c=5, h=20, w=24)
    r = segmentation_metrics(probs, labels, include_background=True)
    # MONAI on the same binarised maps at the chosen thresholds, all slices as one image
    thr = np.array([r["threshold"][str(c)] for c in range(5)], np.float32)
    pred = (probs >= thr[None, :, None, None]).astype(np.float32)
    onehot = (labels[:, None] == np.arange(5)[None, :, None, None]).astype(np.float32)
    as_one = lambda a: torch.from_numpy(np.concatenate(list(a), axis=-1))[None]  # noqa: E731
    dice = monai_metrics.compute_dice(as_one(pred), as_one(onehot), include_background=True)
    for c in range(5):
        assert r["per_class"][str(c)]["Dice"] == pytest.approx(float(dice[0, c]), abs=1e-6)


def test_statistics_add_across_batches_and_ranks():
    probs, labels = random_case(3, n=4)
    whole = MetricStats(4).update(probs, labels, 0.5)
    a = MetricStats(4).update(probs[:1], labels[:1], 0.5)
    b = MetricStats(4).update(probs[1:], labels[1:], 0.5)
    assert np.allclose((a + b).to_array(), whole.to_array())
    again = MetricStats.from_array(4, whole.to_array())
    assert again.result() == whole.result()
    with pytest.raises(ValueError, match="statistics vector"):
        MetricStats.from_array(5, whole.to_array())


def test_result_lists_every_metric():
    probs, labels = random_case(4)
    r = segmentation_metrics(probs, labels, 1.0)
    assert set(HARD_METRICS + SOFT_METRICS) <= set(r["mean"])
    assert "hard_area_abs_err_cm2" in r["mean"]


def test_bad_input_is_named():
    probs, labels = random_case()
    with pytest.raises(ValueError, match=r"probs must be \(N, 4, H, W\)"):
        MetricStats(4).update(probs[0], labels)
    with pytest.raises(ValueError, match="target must be labels"):
        MetricStats(4).update(probs, labels[:, :5])
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 4\)"):
        MetricStats(4).update(probs, labels + 1)
    with pytest.raises(ValueError, match="must be integers"):
        MetricStats(4).update(probs, labels.astype(np.float32))
