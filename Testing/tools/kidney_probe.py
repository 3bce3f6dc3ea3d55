"""The real kidneys at T12/L1 called muscle, and what in the scan makes the network say so:
ct_t11_l2 slices 10 to 21 (TotalSegmentator's kidney voxels), the share of them a model
calls MUS or IMAT (argmax) with the scan as it is, the kidney alone smoothed in-plane,
everything beyond R mm of the kidneys set to fat, and the integrated gradients of the mean
MUS + IMAT probability over the kidneys' network cells from the scan with fat beyond 60 mm
to the scan as it is, summed by region. docs/model.md, thirty-third and thirty-fourth
rounds (their /tmp probes, kept here).

    .venv/bin/python Testing/tools/kidney_probe.py [--model M.safetensors] [--radii 6 15 30 60]
        [--ig-steps 24]

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
#: ct_t11_l2's slices in ct_abdomen_pelvis, and the probe's slices of ct_t11_l2 (T12/L1)
FIRST, COUNT, SLICES = 82, 30, tuple(range(10, 22))
KIDNEYS = (2, 3)
#: fat drawn in place of a region: HU, and its SD (a 3 mm scan's fat)
FAT_HU, FAT_SD = -100.0, 14.0
#: regions for the integrated gradients, in order (a later one overrides an earlier one)
REGIONS = ("unlabelled, -30 to 150 HU", "unlabelled, other HU", "its muscle",
           "its subcutaneous fat", "its torso fat", "liver", "spleen", "bowel and stomach",
           "bone", "other organs")


def fat_beyond(hu: np.ndarray, dist_mm: np.ndarray, radius_mm: float,
               rng: np.random.Generator) -> np.ndarray:
    """(n, J, I) HU with every body voxel (above -500 HU) farther than radius_mm from the
    kidneys (dist_mm: (n, J, I) mm) drawn as fat (FAT_HU, SD FAT_SD); the rest unchanged."""
    out = hu.copy()
    far = (dist_mm > radius_mm) & (hu > -500)
    out[far] = FAT_HU + rng.normal(0.0, FAT_SD, int(far.sum()))
    return out


def smooth_inside(hu: np.ndarray, mask: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """(n, J, I) HU with the voxels in mask replaced by the in-plane Gaussian (sigma in
    voxels) of the slice; the rest unchanged."""
    out = hu.copy()
    out[mask] = ndi.gaussian_filter(hu, (0, sigma, sigma))[mask]
    return out


def region_map(hu: np.ndarray, structures: np.ndarray, masks: Dict[str, np.ndarray]) -> np.ndarray:
    """(n, J, I) int index into REGIONS for each voxel: TotalSegmentator's tissue masks
    (masks: "skeletal_muscle", "subcutaneous_fat", "torso_fat") and structure labels over
    the HU's split of what neither names."""
    r = np.where((hu >= -30) & (hu < 150), 0, 1)
    r[masks["skeletal_muscle"]] = 2
    r[masks["subcutaneous_fat"]] = 3
    r[masks["torso_fat"]] = 4
    r[structures == 5] = 5
    r[structures == 1] = 6
    r[np.isin(structures, (6, 18, 19, 20))] = 7
    r[np.isin(structures, list(range(25, 51)) + list(range(92, 118)))] = 8   # vertebrae, ribs
    r[np.isin(structures, (4, 7, 8, 9, 52, 63, 64))] = 9
    return r


def main(argv=None) -> None:
    import torch
    from torch.nn import functional as F

    from EPDSegmentationLib.core.inference import (network_slab, prepare_slices_torch,
                                                   resample_planes)
    from EPDSegmentationLib.core.model_io import load_model
    from EPDSegmentationLib.core.orientation import network_flips
    from EPDSegmentationLib.io import read_volume
    from EPDSegmentationLib.io.readers import read_itk

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--radii", type=float, nargs="*", default=[6, 15, 30, 60])
    ap.add_argument("--ig-steps", type=int, default=24, help="0: no integrated gradients")
    a = ap.parse_args(argv)
    ct = read_volume(str(REAL / "ct_t11_l2.nii.gz"))
    zs = list(SLICES)
    base = ct.array[zs].astype(np.float32)
    structures = read_itk(str(REAL / "ct_abdomen_pelvis_structures.nii.gz")).array.astype(
        np.int32)[FIRST:FIRST + COUNT][zs]
    kid = np.isin(structures, KIDNEYS)
    si, sj, _ = ct.spacing
    dist = np.stack([ndi.distance_transform_edt(~k) * float(si) for k in kid])
    flips = tuple(network_flips(ct.ijk_to_ras)[:2])
    model, card = load_model(a.model)
    rng = np.random.default_rng(0)

    def called(hu: np.ndarray) -> float:
        low, _, _ = network_slab(hu, (sj, si), model, card, torch.device("cpu"), len(zs), [],
                                 flips=flips)
        labels = low.restore().cpu().numpy().argmax(0)
        return float(np.isin(labels[kid], (1, 2)).mean())

    print(f"{a.model}: TotalSegmentator's kidney voxels at T12/L1 (ct_t11_l2 slices "
          f"{zs[0]} to {zs[-1]}) called MUS or IMAT")
    print(f"  {'as they are':<37}{called(base):.2f}")
    print(f"  {'the kidney alone smoothed (1 voxel)':<37}{called(smooth_inside(base, kid)):.2f}")
    for r in a.radii:
        print(f"  {'fat beyond %g mm' % r:<37}{called(fat_beyond(base, dist, r, rng)):.2f}")
    if a.ig_steps <= 0:
        return
    masks = {n: read_itk(str(REAL / f"tissue_{n}.nii.gz")).array[zs] > 0
             for n in ("skeletal_muscle", "subcutaneous_fat", "torso_fat")}
    baseline = fat_beyond(base, dist, 60.0, np.random.default_rng(0))
    far = (dist > 60.0) & (base > -500)
    flip = lambda v: np.ascontiguousarray(v[:, ::-1 if flips[0] else 1,   # noqa: E731
                                             ::-1 if flips[1] else 1])
    x1, work = prepare_slices_torch(flip(base), (sj, si), card)
    x0, _ = prepare_slices_torch(flip(baseline), (sj, si), card)
    k = int(card["factor"])

    def cells(m: np.ndarray):
        t = torch.from_numpy(flip(m.astype(np.float32)))
        return F.avg_pool2d(resample_planes(t, work)[:, None], k, stride=k,
                            ceil_mode=True)[:, 0] > 0.5

    kc = cells(kid)
    model.eval()

    def f(x):
        p = model(x)
        return (p[:, 1] + p[:, 2])[kc].mean()

    grad = torch.zeros_like(x1)
    for i in range(a.ig_steps):
        x = (x0 + (i + 0.5) / a.ig_steps * (x1 - x0)).requires_grad_(True)
        f(x).backward()
        grad += x.grad
    attr = ((x1 - x0) * grad / a.ig_steps).sum(1).numpy()
    with torch.no_grad():
        print(f"integrated gradients, mean MUS + IMAT probability over the kidneys' cells: "
              f"{float(f(x0)):.2f} with fat beyond 60 mm, {float(f(x1)):.2f} as they are; "
              f"summed {attr.sum():+.3f}")
    regions, farc = region_map(base, structures, masks), cells(far).numpy()
    for i, name in enumerate(REGIONS):
        m = cells(regions == i).numpy() & farc
        print(f"  beyond 60 mm, {name:<28} {attr[m].sum():+.3f}")
    print(f"  within 60 mm{'':<30} {attr[~farc].sum():+.3f}")


if __name__ == "__main__":
    main()
