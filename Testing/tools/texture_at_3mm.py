"""Texture at coarse pixels: the local SD (HU) over 3 x 3 voxels at 3 mm inside each
structure, in the shared real abdomen-pelvis CT at T12 to L1 (TotalSegmentator's labels)
and in training phantoms at L1 drawn with the bundled recipe's appearance and made a 3 mm
scan by ``--lowres`` (shrink 3.47), with the scanner noise drawn before the shrink (the
default) or on the coarse pixels (``--lowres-noise``). The recipe (appearance and anatomy
options) is read from the bundled model's card, so the numbers follow the model. Medians over the slices or
phantoms, each structure eroded by one voxel. docs/model.md, thirty-third round.

    .venv/bin/python Testing/tools/texture_at_3mm.py [--subjects 8] [--draws 2]

Needs ../shared/data/totalseg-example (the real rows are skipped without it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "EPDSegmentation"), str(REPO)]

from EPDSegmentationLib.io import read_volume  # noqa: E402
from EPDSegmentationLib.io.readers import read_itk  # noqa: E402
from training.recipe import card_recipe  # noqa: E402
from training.phantom.generate import make_slice  # noqa: E402
from training.phantom.tissues import CODE  # noqa: E402

REAL = REPO.parent / "shared" / "data" / "totalseg-example"
CARD = REPO / "Resources" / "Models" / "EPDBodyComp_f2.json"
#: ct_abdomen_pelvis slices at T12 to L1, and TotalSegmentator's labels read there
REAL_SLICES = range(88, 112)
REAL_LABELS = {"kidneys": (2, 3), "liver": (5,), "spleen": (1,), "psoas": (88, 89),
               "paraspinal": (86, 87)}
#: the phantoms' pixels (mm) and the shrink that makes them 3 mm
SOURCE_MM, SHRINK = 0.8654515943413332, 3.47


def local_sd(x: np.ndarray) -> np.ndarray:
    """(H, W) HU -> (H, W) SD over each pixel's 3 x 3 neighbourhood, HU."""
    m = ndi.uniform_filter(x, 3)
    return np.sqrt(np.maximum(ndi.uniform_filter(x * x, 3) - m * m, 0.0))


def median_inside(sd: np.ndarray, mask: np.ndarray) -> float:
    inner = ndi.binary_erosion(mask, iterations=1)
    return float(np.median(sd[inner])) if inner.sum() > 5 else float("nan")


def real_rows() -> dict:
    ct = read_volume(str(REAL / "ct_abdomen_pelvis.nii.gz")).array.astype(np.float32)
    st = read_itk(str(REAL / "ct_abdomen_pelvis_structures.nii.gz")).array.astype(int)
    rows: dict = {}
    for z in REAL_SLICES:
        sd = local_sd(ct[z])
        masks = {k: np.isin(st[z], v) for k, v in REAL_LABELS.items()}
        masks["fat"] = (ct[z] > -150) & (ct[z] < -50) & (st[z] == 0)
        for k, m in masks.items():
            rows.setdefault(k, []).append(median_inside(sd, m))
    return rows


def recipe(card_path: Path = CARD):
    """The card's training recipe: (its Augment, its make_slice anatomy keywords)."""
    augment, anatomy, _ = card_recipe(json.loads(card_path.read_text()))
    return augment, anatomy


def phantom_rows(lowres_noise: float, subjects: int, draws: int) -> dict:
    # the bundled recipe's appearance, every slice randomised and made a 3 mm scan, never
    # obese; no flip, crop, zoom or blur, so the tissue codes stay in place
    augment, anatomy = recipe()
    aug = dataclasses.replace(augment, flip=0.0, crop=0.0, blur=0.0, zoom_out=0.0,
                              lowres=1.0, lowres_factor=(SHRINK, SHRINK),
                              lowres_noise=lowres_noise, randomize=1.0, obese=0.0)
    rows: dict = {}
    for seed in range(subjects):
        sl = make_slice(seed, level="L1", anatomy="torso", pixel_mm=SOURCE_MM, **anatomy)
        # the coarse scan's pixel centres on the training grid: there the enlarged slice
        # holds the coarse pixels' values (resampling it again would smooth it once more)
        n = int(round(sl.hu.shape[0] / SHRINK))
        at = np.ix_(*(np.round((np.arange(n) + 0.5) * k / n - 0.5).astype(int)
                      for k in sl.hu.shape))
        codes = sl.tissues[at]
        for d in range(draws):
            hu, lab = aug(sl.hu.astype(np.float32), sl.labels,
                          np.random.default_rng(seed * 10 + d), tissues=sl.tissues)
            sd = local_sd(np.ascontiguousarray(hu[at]))
            lab3 = lab[at]
            masks = {"kidneys": np.isin(codes, (CODE["kidney_cortex"], CODE["kidney_medulla"])),
                     "liver": codes == CODE["liver"], "spleen": codes == CODE["spleen"],
                     "muscle": lab3 == 1, "fat": lab3 == 3}
            for k, m in masks.items():
                rows.setdefault(k, []).append(median_inside(sd, m))
    return rows


def show(name: str, rows: dict) -> None:
    print(f"{name:<40} " + "  ".join(f"{k} {np.nanmedian(v):.1f}" for k, v in rows.items()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--draws", type=int, default=2)
    a = ap.parse_args(argv)
    print("local SD over 3 x 3 voxels at 3 mm, HU (median)")
    if REAL.is_dir():
        show("real CT, T12 to L1", real_rows())
    for p in (0.0, 1.0):
        show(f"phantoms at L1, --lowres-noise {p:g}", phantom_rows(p, a.subjects, a.draws))


if __name__ == "__main__":
    main()
