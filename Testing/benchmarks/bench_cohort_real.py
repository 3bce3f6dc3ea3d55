"""Measure the cohort tools on the shared real CT (../shared/data/totalseg-example):

1. vertebral levels (core/levels.py) against the TotalSegmentator vertebra labels of
   ct_abdomen_pelvis (used only to measure: truth = mean K of the anterior half of each
   label, i.e. the vertebral body), on the CT as it is and resampled (thin slices, finer
   pixels), and the refusal of ct_t11_l2 (T11 to upper L2);
2. network soft areas against HU-protocol areas (core/indices.py), each against the
   TotalSegmentator tissue masks of ct_t11_l2 (bundled model, CPU, about 30 s), and the
   Dice of the network's hard labels and of the protocol's (core.indices.protocol_labels)
   with the same masks.

    PYTHONPATH=EPDSegmentation:. .venv/bin/python Testing/benchmarks/bench_cohort_real.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from EPDSegmentationLib.core.indices import protocol_labels, protocol_masks
from EPDSegmentationLib.core.levels import LevelError, find_levels
from EPDSegmentationLib.io import read_volume
from EPDSegmentationLib.io.images import read_itk

_ROOT = Path(__file__).resolve().parents[2]
#: ../shared beside this checkout, or beside its folder of worktrees
DATA = next((p / "shared" / "data" / "totalseg-example" for p in (_ROOT.parent, _ROOT.parent.parent)
             if (p / "shared" / "data" / "totalseg-example").is_dir()),
            _ROOT.parent / "shared" / "data" / "totalseg-example")
LABELS = {"L5": 27, "L4": 28, "L3": 29, "L2": 30, "L1": 31, "T12": 32}


def truth_k(structures: np.ndarray, label: int) -> float:
    z, j, _ = np.nonzero(structures == label)
    return float(z[j > np.median(j)].mean())


def levels(data: Path) -> None:
    v = read_volume(data / "ct_abdomen_pelvis.nii.gz")
    s = read_itk(data / "ct_abdomen_pelvis_structures.nii.gz").array
    sk = v.spacing[2]
    for zoom in [(1, 1, 1), (3, 1, 1), (3, 2, 2), (2, 1, 1)]:
        arr = v.array if zoom == (1, 1, 1) else ndi.zoom(v.array.astype(np.float32), zoom,
                                                          order=1)
        m = v.ijk_to_ras.copy()
        m[:3, :3] = m[:3, :3] / np.array(zoom[::-1], float)[None, :]
        lv = find_levels(arr, m)
        errs = {n: (lv.centres[n] - truth_k(s, lab) * zoom[0]) * sk / zoom[0]
                for n, lab in LABELS.items() if n in lv.centres}
        grid = f"{sk / zoom[0]:.1f} mm slices, {v.spacing[0] / zoom[2]:.1f} mm pixels"
        print(f"{grid}: " + ", ".join(f"{n} {e:+.1f} mm" for n, e in errs.items()))
    short = read_volume(data / "ct_t11_l2.nii.gz")
    try:
        find_levels(short.array, short.ijk_to_ras)
        print("ct_t11_l2: NOT refused")
    except LevelError as exc:
        print(f"ct_t11_l2: refused: {exc}")


def soft_or_protocol(data: Path) -> None:
    from EPDSegmentationLib.core import inference
    from EPDSegmentationLib.core.model_io import load_model
    from EPDSegmentationLib.core.resources import bundled_model_path

    v = read_volume(data / "ct_t11_l2.nii.gz")
    ref = {k: read_itk(data / f).array > 0 for k, f in [
        ("MUS", "tissue_skeletal_muscle.nii.gz"), ("SAT", "tissue_subcutaneous_fat.nii.gz"),
        ("VAT", "tissue_torso_fat.nii.gz")]}
    model, card = load_model(bundled_model_path(), device="cpu")
    si, sj, _ = v.spacing
    p = inference.predict_volume(v.array, (sj, si), model, card, device="cpu",
                                 ijk_to_ras=v.ijk_to_ras).probabilities
    prot = protocol_masks(p, v.array)
    soft = {"MUS": p[1], "SAT": p[3], "VAT": p[4]}
    px = si * sj / 100.0
    print("tissue  ref cm2  soft cm2  protocol cm2 | mean |area - ref| / ref per slice: "
          "soft, protocol")
    for k in ("MUS", "SAT", "VAT"):
        r, s, q = (a.sum(axis=(1, 2)) * px for a in (ref[k], soft[k], prot[k]))
        ok = r > 1
        es, eq = (np.mean(np.abs(x[ok] - r[ok]) / r[ok]) * 100 for x in (s, q))
        print(f"{k:6} {r.mean():8.1f} {s.mean():9.1f} {q.mean():13.1f} | {es:5.1f} % "
              f"{eq:5.1f} %")
    # the hard outputs: the network's labels (<case>.seg.nrrd) against the protocol's
    # (<case>_protocol.seg.nrrd, core.indices.protocol_labels), Dice with each mask
    labels = p.argmax(axis=0)
    plab = protocol_labels(labels, v.array)

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())

    print("Dice with the mask: network labels, protocol labels")
    for name, classes, key in (("MUS+IMAT", (1, 2), "MUS"), ("MUS only", (1,), "MUS"),
                               ("SAT", (3,), "SAT"), ("VAT", (4,), "VAT")):
        print(f"{name:8} {dice(np.isin(labels, classes), ref[key]):.3f} "
              f"{dice(np.isin(plab, classes), ref[key]):.3f}")


if __name__ == "__main__":
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else DATA
    if not data.is_dir():
        sys.exit(f"no shared data at {data}")
    levels(data)
    soft_or_protocol(data)
