"""How a model's accuracy depends on the field of view, on held-out phantoms with exact
labels: each slice (the card's recipe appearance, every slice randomised, no crop, flip or
zoom) scored as drawn, cropped tight to the body (its labels' bounding box and 5 mm, the
arms and table cut away: a scan reconstructed tight to the body), and that crop run with a
field of view (core/field.py: padded with air where its content spans more than the
share of the rows), both at the phantom's pixels and as a 3 mm scan. docs/model.md,
"The field of view".

    .venv/bin/python Testing/tools/field_of_view.py [--model M] [--share 0.621]
        [--subjects 12]

Mean Dice of MUS + IMAT, SAT, VAT and MSC (argmax) over the slices, on the crop's pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "EPDSegmentation"), str(REPO)]

MODEL = REPO / "Resources" / "Models" / "EPDBodyComp_f2.safetensors"
LEVELS = ("T12", "L1", "L3")
MARGIN_MM = 5.0


def dice(pred: np.ndarray, true: np.ndarray, classes) -> float:
    a, b = np.isin(pred, classes), np.isin(true, classes)
    s = int(a.sum() + b.sum())
    return 2.0 * float((a & b).sum()) / s if s else float("nan")


def tight_box(labels: np.ndarray, pixel_mm: float, margin_mm: float = MARGIN_MM):
    """(row0, row1, col0, col1): the body's (labels > 0) bounding box and margin_mm."""
    rows = np.flatnonzero((labels > 0).any(1))
    cols = np.flatnonzero((labels > 0).any(0))
    m = int(round(margin_mm / pixel_mm))
    return (max(0, rows[0] - m), min(labels.shape[0], rows[-1] + 1 + m),
            max(0, cols[0] - m), min(labels.shape[1], cols[-1] + 1 + m))


def main(argv=None) -> None:
    from EPDSegmentationLib.core.inference import predict_volume, resample_planes
    from EPDSegmentationLib.core.model_io import load_model
    from training.recipe import card_recipe
    from training.phantom.generate import make_slice

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--share", type=float, default=None,
                    help="the field's share (default: the card's, or 0.621 without one)")
    ap.add_argument("--subjects", type=int, default=12)
    a = ap.parse_args(argv)
    model, card = load_model(a.model)
    share = a.share if a.share is not None else float(
        card.get("field", {}).get("content_share", 0.621))
    plain = {k: v for k, v in card.items() if k != "field"}
    fielded = dict(plain, field={"content_share": share})
    augment, anatomy, _ = card_recipe(card)
    augment = dataclasses.replace(augment, flip=0.0, crop=0.0, blur=0.0, zoom_out=0.0,
                                  obese=0.0, randomize=1.0, lowres=0.0)
    rows = {}
    for seed in range(7000, 7000 + a.subjects):          # not a training subject's seed
        for level in LEVELS:
            sl = make_slice(seed, level=level, anatomy="torso", **anatomy)
            hu, lab = augment(sl.hu.astype(np.float32), sl.labels,
                              np.random.default_rng(seed), tissues=sl.tissues)
            px = sl.pixel_mm
            r0, r1, c0, c1 = tight_box(lab, px)
            crop_hu, crop_lab = hu[r0:r1, c0:c1], lab[r0:r1, c0:c1]
            k = 3.0 / px
            shape3 = (int(crop_hu.shape[0] / k), int(crop_hu.shape[1] / k))
            hu3 = resample_planes(np.ascontiguousarray(crop_hu), shape3)
            lab3 = resample_planes(np.ascontiguousarray(crop_lab), shape3, labels=True)
            px3 = (crop_hu.shape[0] * px / shape3[0], crop_hu.shape[1] * px / shape3[1])
            runs = (("as drawn", hu, (px, px), plain, (r0, r1, c0, c1), crop_lab),
                    ("tight", crop_hu, (px, px), plain, None, crop_lab),
                    ("tight, with the field", crop_hu, (px, px), fielded, None, crop_lab),
                    ("tight 3 mm", hu3, px3, plain, None, lab3),
                    ("tight 3 mm, with the field", hu3, px3, fielded, None, lab3))
            for name, x, pixel, c, box, truth in runs:
                pred = predict_volume(x[None], pixel, model, c, device="cpu")
                p = pred.probabilities.argmax(0)[0]
                if box is not None:
                    p = p[box[0]:box[1], box[2]:box[3]]
                rows.setdefault(name, []).append(
                    [dice(p, truth, (1, 2)), dice(p, truth, (3,)), dice(p, truth, (4,)),
                     dice(p, truth, (5,))])
    print(f"{a.model}, field share {share:g}; {a.subjects} held-out phantoms x {len(LEVELS)} "
          f"levels; mean Dice on the crop's pixels")
    print(f"{'':<28} MUS+IMAT   SAT    VAT    MSC")
    for name, v in rows.items():
        m = np.nanmean(np.array(v, float), 0)
        print(f"{name:<28} " + "  ".join(f"{x:.3f}" for x in m))
    print(json.dumps({k: np.nanmean(np.array(v, float), 0).round(4).tolist()
                      for k, v in rows.items()}))


if __name__ == "__main__":
    main()
