"""What the muscle Dice's gap on the shared real CT is made of: a model's muscle (MUS + IMAT,
hard labels) on ct_t11_l2 against TotalSegmentator's skeletal muscle mask, the voxels we
call muscle and it does not split by where they lie (its organs, its fat masks, the
one-voxel ring round its muscle by the muscle group nearest, further out), cm² a slice.
docs/model.md, "What the muscle Dice's gap is made of" and the thirty-fourth round.

    .venv/bin/python Testing/tools/muscle_gap.py [--model M.safetensors] [--no-mirror]

ct_t11_l2 is slices 82 to 111 of ct_abdomen_pelvis (the same voxels, checked here), so
TotalSegmentator's structure labels of the larger scan name the organs and muscles.
Needs ../shared/data/totalseg-example.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "EPDSegmentation"), str(REPO)]

REAL = REPO.parent / "shared" / "data" / "totalseg-example"
MODEL = REPO / "Resources" / "Models" / "EPDBodyComp_f2.safetensors"
#: ct_t11_l2's slices in ct_abdomen_pelvis
FIRST, COUNT = 82, 30
#: TotalSegmentator "total" labels (ct_abdomen_pelvis_structures.nii.gz)
ORGANS = {"kidneys": (2, 3), "liver": (5,), "spleen": (1,)}
GROUPS = {"paraspinal": (86, 87), "psoas": (88, 89)}      # the rest of its muscle: "wall"
#: distance bands (mm) beyond the one-voxel ring, for what lies in none of its masks
BANDS = ((6.0, "beyond the ring, to 6 mm"), (12.0, "6 to 12 mm"), (np.inf, "beyond 12 mm"))


def muscle_groups(muscle: np.ndarray, structures: np.ndarray) -> np.ndarray:
    """(K, J, I) bool muscle mask, its structure labels -> int (K, J, I): 1 paraspinal,
    2 psoas, 3 the rest (wall, diaphragm's crura, ...), 0 no muscle; per slice, each
    connected piece of the mask goes to the group holding most of it (over 30 %)."""
    out = np.zeros(muscle.shape, np.int8)
    for k in range(muscle.shape[0]):
        pieces, n = ndi.label(muscle[k])
        for i in range(1, n + 1):
            piece = pieces == i
            group = 3
            for g, ids in enumerate(GROUPS.values(), start=1):
                if np.isin(structures[k][piece], ids).mean() > 0.3:
                    group = g
                    break
            out[k][piece] = group
    return out


def decompose(ours: np.ndarray, muscle: np.ndarray, fat: np.ndarray,
              structures: np.ndarray, voxel_mm: float) -> Dict[str, float]:
    """Split the disagreement of two muscle masks.

    ours, muscle: (K, J, I) bool, ours and the reference's muscle; fat: (K, J, I) bool, the
    reference's fat masks together; structures: (K, J, I) int labels; voxel_mm: in-plane
    voxel size (mm), square. Returns cm² a slice: "ours", "its", "agree", "its only", the
    parts of "ours only" ("in its <organ>", "in its other structures", "in its fat", "ring
    <group>" for the voxels beside its muscle (edge neighbours, one voxel) by the nearest
    group, then BANDS' names by distance from its muscle), and the
    Dice with and without the organs' voxels and the ring. The parts of "ours only" sum
    to it."""
    per = voxel_mm * voxel_mm / 100.0 / ours.shape[0]
    cm2 = lambda m: float(m.sum()) * per                                  # noqa: E731
    only = ours & ~muscle
    r: Dict[str, float] = {"ours": cm2(ours), "its": cm2(muscle), "agree": cm2(ours & muscle),
                           "its only": cm2(muscle & ~ours), "ours only": cm2(only)}
    left = only.copy()
    organs = np.zeros_like(only)
    for name, ids in ORGANS.items():
        m = left & np.isin(structures, ids)
        r[f"in its {name}"] = cm2(m)
        organs |= m
        left &= ~m
    m = left & (structures > 0) & ~np.isin(structures, [i for v in GROUPS.values() for i in v])
    r["in its other structures"] = cm2(m)
    left &= ~m
    m = left & fat
    r["in its fat"] = cm2(m)
    left &= ~m
    groups = muscle_groups(muscle, structures)
    ring = np.zeros_like(only)
    names = (*GROUPS, "wall")
    r.update({f"ring {name}": 0.0 for name in names})
    r.update({name: 0.0 for _, name in BANDS})
    for k in range(ours.shape[0]):
        if not groups[k].any():             # no reference muscle here: all of it far out
            r[BANDS[-1][1]] += float(left[k].sum()) * per
            continue
        dist, (ii, jj) = ndi.distance_transform_edt(groups[k] == 0, return_indices=True)
        near = groups[k][ii, jj]
        in_ring = left[k] & (dist <= 1.0)
        ring[k] = in_ring
        for g, name in enumerate(names, start=1):
            r[f"ring {name}"] += float((in_ring & (near == g)).sum()) * per
        lo = 1.0
        for hi, name in BANDS:
            band = left[k] & (dist > lo) & (dist * voxel_mm <= hi)
            r[name] += float(band.sum()) * per
            lo = max(lo, hi / voxel_mm)
    dice = lambda a, b: 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))  # noqa: E731
    r["dice"] = dice(ours, muscle)
    r["dice without its organs' voxels"] = dice(ours & ~organs, muscle)
    r["dice without the ring"] = dice(ours & ~ring, muscle)
    r["dice without both"] = dice(ours & ~organs & ~ring, muscle)
    return r


def main(argv=None) -> None:
    from EPDSegmentationLib.core.inference import predict_volume
    from EPDSegmentationLib.core.model_io import load_model
    from EPDSegmentationLib.io import read_volume
    from EPDSegmentationLib.io.readers import read_itk

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--no-mirror", dest="mirror", action="store_false")
    a = ap.parse_args(argv)
    big = read_volume(str(REAL / "ct_abdomen_pelvis.nii.gz"))
    small = read_volume(str(REAL / "ct_t11_l2.nii.gz"))
    if not np.array_equal(big.array[FIRST:FIRST + COUNT], small.array):
        raise SystemExit("ct_t11_l2 is not slices 82 to 111 of ct_abdomen_pelvis here")
    structures = read_itk(str(REAL / "ct_abdomen_pelvis_structures.nii.gz")).array.astype(
        np.int32)[FIRST:FIRST + COUNT]
    masks = {n: read_itk(str(REAL / f"tissue_{n}.nii.gz")).array > 0
             for n in ("skeletal_muscle", "subcutaneous_fat", "torso_fat")}
    model, card = load_model(a.model)
    si, sj, _ = small.spacing
    pred = predict_volume(small.array, (sj, si), model, card, device="cpu",
                          ijk_to_ras=small.ijk_to_ras, mirror=a.mirror)
    ours = np.isin(pred.probabilities.argmax(0), (1, 2))
    r = decompose(ours, masks["skeletal_muscle"],
                  masks["subcutaneous_fat"] | masks["torso_fat"], structures, float(si))
    print(f"{a.model} on ct_t11_l2 against TotalSegmentator's skeletal muscle, cm2 a slice")
    for k, v in r.items():
        print(f"  {k:<34} {v:.3f}" if k.startswith("dice") else f"  {k:<34} {v:.1f}")


if __name__ == "__main__":
    main()
