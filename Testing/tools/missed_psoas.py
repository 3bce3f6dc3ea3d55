"""Where a model misses the psoas on the shared abdomen-pelvis CT: per vertebral level,
TotalSegmentator's iliopsoas voxels (structures 88, 89), how many the model does not call
MUS or IMAT, what it calls them instead, and their median HU against the psoas voxels it
does call muscle; with --figure, one slice per level (the CT and the model's labels, the
psoas outlined in red and the vertebra in yellow). docs/model.md, thirty-seventh round.

    .venv/bin/python Testing/tools/missed_psoas.py [--model M] [--figure out.png]

Needs ../shared/data/totalseg-example.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "EPDSegmentation"), str(REPO)]

from EPDSegmentationLib.core.classes import class_by_key  # noqa: E402

MODEL = REPO / "Resources" / "Models" / "EPDBodyComp_f2.safetensors"
DATA = REPO.parent / "shared" / "data" / "totalseg-example"
PSOAS = (88, 89)
#: TotalSegmentator's vertebrae, C1 to S1 (its total task's ids 25 to 50)
VERTEBRAE = (25, 50)
LEVELS = ("L1", "L2", "L3", "L4", "L5")
MUS, IMAT = class_by_key("MUS").index, class_by_key("IMAT").index


def misses(labels: np.ndarray, hu: np.ndarray, structures: np.ndarray,
           levels: Sequence[Optional[str]]) -> Dict[str, Dict[str, object]]:
    """Per level of ``levels`` (one name or None per slice): labels (Z, H, W) our classes,
    hu (Z, H, W) HU, structures (Z, H, W) TotalSegmentator's ids -> {level: {"voxels",
    "missed", "called" {class index: voxels}, "hu_missed", "hu_hit" (medians, None where
    there are none), "slice" (the level's middle slice)}}; missed: psoas voxels we call
    neither MUS nor IMAT."""
    psoas = np.isin(structures, PSOAS)
    out: Dict[str, Dict[str, object]] = {}
    for level in LEVELS:
        k = [i for i, lv in enumerate(levels) if lv == level]
        if not k:
            continue
        m, p, h = psoas[k], labels[k], hu[k]
        miss = m & ~np.isin(p, (MUS, IMAT))
        values, counts = np.unique(p[miss], return_counts=True)
        out[level] = {"voxels": int(m.sum()), "missed": int(miss.sum()),
                      "called": {int(v): int(c) for v, c in zip(values, counts)},
                      "hu_missed": float(np.median(h[miss])) if miss.any() else None,
                      "hu_hit": float(np.median(h[m & ~miss])) if (m & ~miss).any() else None,
                      "slice": k[len(k) // 2]}
    return out


def main(argv=None) -> None:
    from EPDSegmentationLib.core.classes import CLASSES
    from EPDSegmentationLib.core.inference import predict_volume
    from EPDSegmentationLib.core.model_io import load_model
    from EPDSegmentationLib.io import read_volume
    from EPDSegmentationLib.io.readers import read_itk
    from training.realct import slice_levels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--figure", type=Path, help="write one slice per level here (PNG)")
    a = ap.parse_args(argv)
    if not DATA.is_dir():
        sys.exit(f"{DATA} is absent: nothing to measure")
    model, card = load_model(a.model)
    ct = read_volume(DATA / "ct_abdomen_pelvis.nii.gz")
    st = read_itk(DATA / "ct_abdomen_pelvis_structures.nii.gz").array.astype(np.int32)
    si, sj, _ = ct.spacing
    pred = predict_volume(ct.array, (sj, si), model, card, device="cpu",
                          ijk_to_ras=ct.ijk_to_ras)
    labels = pred.probabilities.argmax(0)
    found = misses(labels, ct.array, st, slice_levels(st))
    print(f"{a.model} on {DATA.name}/ct_abdomen_pelvis.nii.gz ({si:.1f} mm voxels)")
    print("level  psoas voxels  missed  called instead                    HU missed / hit")
    for level, r in found.items():
        called = ", ".join(f"{CLASSES[c].key} {n}" for c, n in r["called"].items())
        med = ["-" if v is None else f"{v:.0f}" for v in (r["hu_missed"], r["hu_hit"])]
        print(f"{level:<6} {r['voxels']:>12}  {r['missed']:>6}  {called:<33} "
              f"{med[0]} / {med[1]}")
    shown = [(level, r["slice"]) for level, r in found.items()]
    if a.figure is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        psoas = np.isin(st, PSOAS)
        vert = (st >= VERTEBRAE[0]) & (st <= VERTEBRAE[1])
        fig, axes = plt.subplots(2, len(shown), figsize=(4 * len(shown), 8), squeeze=False)
        for j, (level, z) in enumerate(shown):
            rows, cols = np.nonzero(psoas[z] | vert[z])
            r0, c0 = max(rows.min() - 15, 0), max(cols.min() - 15, 0)
            r1, c1 = rows.max() + 15, cols.max() + 15
            for ax, img in zip(axes[:, j], ("ct", "labels")):
                if img == "ct":
                    ax.imshow(np.clip(ct.array[z, r0:r1, c0:c1], -200, 250), cmap="gray")
                else:
                    ax.imshow(labels[z, r0:r1, c0:c1], cmap="tab10", vmin=0, vmax=9,
                              interpolation="nearest")
                ax.contour(psoas[z, r0:r1, c0:c1], [0.5], colors="r")
                ax.contour(vert[z, r0:r1, c0:c1], [0.5], colors="y")
                ax.set_title(f"{level}, slice {z}")
                ax.axis("off")
        fig.suptitle("labels: tab10 colours 0 BG, 1 MUS, 2 IMAT, 3 SAT, 4 VAT, 5 MSC")
        fig.savefig(a.figure, dpi=80, bbox_inches="tight")
        print(f"figure: {a.figure}")


if __name__ == "__main__":
    main()
