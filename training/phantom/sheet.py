"""The contact sheet: phantom slices with label overlays beside real CT at the same window.

    python -m training.phantom contact-sheet --output docs/phantom_contact_sheet.png
    python -m training.phantom contact-sheet --seeds --torso 3:L5:19 3:L5 3:S1 11:L5 \
        11:S1:-6 7:L5:19 7:S1 8:S1:6 --output docs/phantom_pelvis_sheet.png

Rows 1-2: six mid-L3 phantom subjects (lumbar anatomy) and three upper-abdominal ones
(torso anatomy at T11, T12 and L1) with their labels. Real slices come from
../shared/data/totalseg-example (read at generation time; only the rendered PNG is kept): a
slice of the clinical DICOM series (T12, 0.98 mm pixels), T12, L1 and L2 of the T11-L2 NIfTI
(3 mm voxels) with TotalSegmentator's tissue masks, the L3 level of the abdomen NIfTI. With
``--torso`` the torso columns are chosen (seed:level[:mm above its middle]); when they all
lie at L4 to S1, row 3 shows the L4-L5 junction, mid-L5 and the L5 slice in the middle of
those beside the sacrum of the abdomen NIfTI with TotalSegmentator's iliopsoas and hip bones
(and sacrum) marked. All
panels use the abdominal window W400/L40 and are shown in radiological orientation (anterior
up, patient's right on the image left).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from EPDSegmentationLib.core.atomic import atomic_file
from EPDSegmentationLib.io import read_labels, read_volume
from EPDSegmentationLib.io.overlay import display_slice, overlay_rgb

from .generate import make_slice
from .stats import body_mask

WINDOW = (-160.0, 240.0)   # W400 / L40
#: phantom subjects shown: a spread of habitus, muscle quality, phase and tube voltage
SHEET_SEEDS = (3, 11, 7, 8, 1, 9)
#: upper-abdominal phantom slices shown (torso anatomy): (seed, vertebral level)
UPPER_SHEET = ((2, "T11"), (1, "T12"), (0, "L1"))
#: TotalSegmentator "total" vertebra labels
_TS_VERTEBRAE = {27: "L5", 28: "L4", 29: "L3", 30: "L2", 31: "L1", 32: "T12", 33: "T11"}
_REPO = Path(__file__).resolve().parents[2]
#: where ../shared may be: beside this checkout, or beside the folder of worktrees
SHARED_CANDIDATES = (_REPO.parent / "shared" / "data" / "totalseg-example",
                     _REPO.parent.parent / "shared" / "data" / "totalseg-example")


def shared_sample_dir() -> Optional[Path]:
    """The shared real CT sample (../shared/data/totalseg-example), or None if absent."""
    return next((p for p in SHARED_CANDIDATES if p.is_dir()), None)


def gray(hu: np.ndarray) -> np.ndarray:
    lo, hi = WINDOW
    return np.clip((hu - lo) / (hi - lo), 0, 1)


def body_box(hu: np.ndarray, pixel_mm: float, margin_mm: float = 12.0,
             below_mm: float = 45.0):
    """Slices (rows, cols) framing the body with a margin, and the table below it."""
    rows, cols = np.nonzero(body_mask(hu, pixel_mm))
    if len(rows) == 0:
        return slice(None), slice(None)
    m, b = int(margin_mm / pixel_mm), int(below_mm / pixel_mm)
    return (slice(max(0, rows.min() - m), rows.max() + b),
            slice(max(0, cols.min() - m), cols.max() + m))


def vertebra_centre(hu: np.ndarray) -> tuple:
    """(row, col) of the centroid of bone (> 250 HU) in the middle fifth of the columns."""
    w = hu.shape[1]
    band = hu[:, 2 * w // 5: 3 * w // 5] > 250
    rows, cols = np.nonzero(band)
    if len(rows) == 0:
        return hu.shape[0] // 2, w // 2
    return float(np.median(rows)), float(np.median(cols) + 2 * w // 5)


def _crop(img: np.ndarray, pixel_mm: float, centre_rc, size_mm: float) -> np.ndarray:
    half = int(round(size_mm / pixel_mm / 2))
    r, c = (int(v) for v in centre_rc)
    r = min(max(r, half), img.shape[0] - half)
    c = min(max(c, half), img.shape[1] - half)
    return img[r - half:r + half, c - half:c + half]


def make_contact_sheet(output: Path, seeds: Sequence[int] = SHEET_SEEDS,
                       shared: Optional[Path] = None, dpi: int = 100,
                       upper: Sequence = UPPER_SHEET) -> Path:
    """Render the sheet to ``output`` (PNG): L3 phantom slices of ``seeds``, torso ones of
    ``upper`` ((seed, level) or (seed, level, mm above its middle)), real CT below. Real panels are left out (with a
    note) when the shared data is absent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shared = (shared_sample_dir() or SHARED_CANDIDATES[0]) if shared is None else Path(shared)
    columns = [(seed, None, 0.0) for seed in seeds] + [_torso_column(v) for v in upper]
    n = len(columns)
    fig, axes = plt.subplots(3, n, figsize=(3.3 * n, 9.4), facecolor="black")
    for ax in axes.ravel():
        ax.set_facecolor("black")
        ax.set_xticks([])
        ax.set_yticks([])
    style = dict(color="white", fontsize=8.5)
    crop_ph = None
    hist_ph = []
    for i, (seed, level, dz) in enumerate(columns):
        s = make_slice(seed) if level is None else make_slice(seed, level=level, z_mm=dz)
        m = s.meta
        box = body_box(s.hu, s.pixel_mm)
        axes[0, i].imshow(gray(s.hu[box]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        where = m["level"] + ("" if level is None else ", torso")
        if level is not None and dz:
            where += f" ({level} {dz:+.0f} mm)"
        axes[0, i].set_title(f"phantom seed {seed}: {m['sex']} {m['age']:.0f} y, {where}\n"
                             f"fat {m['adiposity']:.2f}, muscle {m['muscle']:.2f}, "
                             f"myosteat. {m['myosteatosis']:.2f}\n"
                             f"{m['phase'].replace('_', ' ')}, {m['kvp']} kVp, "
                             f"{s.pixel_mm:.2f} mm", **style)
        axes[1, i].imshow(overlay_rgb(s.hu[box], s.labels[box]), interpolation="nearest")
        if i == 0:
            axes[1, i].set_ylabel("labels: MUS red, IMAT green, SAT yellow,\nVAT blue, "
                                  "other tissue purple", **style)
        if crop_ph is None and level is None:
            crop_ph = (_crop(s.hu, s.pixel_mm, vertebra_centre(s.hu), 90), seed)
        body = body_mask(s.hu, s.pixel_mm)
        hist_ph.append(s.hu[body])
    real = _real_panels(shared)
    crop = None if crop_ph is None else (
        crop_ph[0], f"phantom seed {crop_ph[1]}, 90 mm crop at native pixels", None)
    # under the L3 columns: real L3 and L2, the crops, the histogram, the clinical T12 slice;
    # under the upper-abdominal columns: real slices from the top of the T11-L2 volume down
    lower = [real.get("l3"), real.get("l2"), crop, real.get("crop"), "hist", real.get("dicom")]
    # under the torso columns: real slices of the upper abdomen, or of L4-L5 and L5 (with
    # TotalSegmentator's psoas and iliacus outlined) when the columns are that low
    low = bool(upper) and all(level in ("L4", "L5", "S1")
                              for _, level, _ in columns[len(seeds):])
    top = [real.get(k) for k in (("l45", "l5", "s1", "l3") if low
                                 else ("upper0", "upper1", "upper2"))]
    n_low = n - len(upper)
    row = lower[:n_low] + [None] * (n_low - len(lower)) + top[:len(upper)]
    if "hist" not in row:
        if len(row) < n:
            row.append("hist")
        else:
            row[min(len(row) - 1, 4)] = "hist"
    for j, panel in enumerate(row[:n]):
        ax = axes[2, j]
        if panel == "hist":
            _histograms(ax, np.concatenate(hist_ph), shared)
        elif panel is not None:
            img, title, rgb = panel
            ax.imshow(rgb if rgb is not None else gray(img), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_title(title, **style)
        else:
            ax.axis("off")
    if not real:
        axes[2, 0].set_title(f"real CT not found at {shared}", **style)
    fig.suptitle("EPD phantom (rows 1-2) beside real CT (row 3), window W400/L40. "
                 f"Regenerate: {_command(output, seeds, columns[len(seeds):])}",
                 color="white", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    output = Path(output)
    with atomic_file(output, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=dpi, facecolor="black", format="png")
    plt.close(fig)
    return output


def _command(output, seeds, torso) -> str:
    """The command line that makes this sheet."""
    cmd = "python -m training.phantom contact-sheet"
    if tuple(seeds) != SHEET_SEEDS:
        cmd += " --seeds" + "".join(f" {v}" for v in seeds)
    if tuple(torso) != tuple(_torso_column(v) for v in UPPER_SHEET):
        cmd += " --torso" + "".join(f" {s}:{lv}" + (f":{dz:g}" if dz else "")
                                    for s, lv, dz in torso)
    return f"{cmd} --output {Path(output).as_posix()}"


def _torso_column(v) -> tuple:
    """(seed, level, dz mm) of a torso column given as (seed, level[, dz])."""
    v = tuple(v)
    if len(v) not in (2, 3):
        raise ValueError(f"a torso panel is (seed, level) or (seed, level, mm); got {v!r}")
    return int(v[0]), str(v[1]), float(v[2]) if len(v) == 3 else 0.0


def parse_torso_panel(text: str) -> tuple:
    """'SEED:LEVEL' or 'SEED:LEVEL:MM' (MM above the middle of the body of LEVEL, negative
    below; e.g. 3:L5:19 is about the L4-L5 disc) -> (seed, level, mm)."""
    from .torso import check_level

    parts = str(text).split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        seed, dz = int(parts[0]), float(parts[2]) if len(parts) == 3 else 0.0
    except ValueError:
        raise ValueError(f"--torso {text!r}: use SEED:LEVEL or SEED:LEVEL:MM, e.g. 3:L5 or "
                         f"3:L5:19") from None
    return seed, check_level(parts[1]), dz


def _histograms(ax, phantom_hu: np.ndarray, shared: Path) -> None:
    """HU histograms inside the body: the phantom slices against the real DICOM series."""
    bins = np.linspace(-250, 250, 101)
    ax.hist(phantom_hu, bins=bins, density=True, histtype="step", color="#f5d24b",
            label="phantom, slices above")
    dcm = shared / "ct_dicom"
    if dcm.is_dir():
        v = read_volume(dcm)
        real = np.concatenate([a[body_mask(a, v.spacing[0])] for a in v.array[::4]])
        ax.hist(real, bins=bins, density=True, histtype="step", color="#6fb7ff",
                label="real DICOM series")
    ax.set_title("HU inside the body (fat peak left,\nsoft tissue right)", color="white",
                 fontsize=8.5)
    ax.tick_params(colors="white", labelsize=7)
    ax.set_xticks([-200, -100, 0, 100, 200])
    ax.legend(fontsize=7, facecolor="black", labelcolor="white", frameon=False)


def _real_panels(shared: Path):
    """{name: (image, title, rgb or None)} from the shared TotalSegmentator sample, if
    present: dicom (T12), crop (of it), l3, l2, upper0..2 (top of the T11-L2 volume, T12, L1)."""
    out = {}
    if not shared.is_dir():
        return out
    dcm = shared / "ct_dicom"
    if dcm.is_dir():
        v = read_volume(dcm)
        k = v.array.shape[0] // 2
        img = display_slice(v, k)
        out["dicom"] = (img[body_box(img, v.spacing[0])],
                        f"real: clinical DICOM (T12), {v.spacing[0]:.2f} mm, JPEG 2000", None)
    abd, struct = shared / "ct_abdomen_pelvis.nii.gz", shared / "ct_abdomen_pelvis_structures.nii.gz"
    if abd.is_file() and struct.is_file():
        from EPDSegmentationLib.io.images import read_itk

        v = read_volume(abd)
        lab = read_itk(struct).array        # TotalSegmentator "total" classes, not ours
        ks = np.nonzero((lab == 29).any(axis=(1, 2)))[0]        # 29 = L3 in TotalSegmentator
        k = int(ks.mean()) if len(ks) else v.array.shape[0] // 2
        img = display_slice(v, k)
        out["l3"] = (img[body_box(img, v.spacing[0])],
                     f"real: mid-L3 (NIfTI, {v.spacing[0]:.0f} mm voxels)", None)
        # L5 and the L4-L5 junction, with TotalSegmentator's iliopsoas (88, 89) as "muscle"
        # and the hip bones (77, 78) as "other tissue" to show where they are
        l5 = np.nonzero((lab == 27).any(axis=(1, 2)))[0]
        l4 = np.nonzero((lab == 28).any(axis=(1, 2)))[0]
        # the L5 slices that also hold the sacrum (25): below the L5-S1 disc
        s1 = np.nonzero((lab == 27).any(axis=(1, 2)) & (lab == 25).any(axis=(1, 2)))[0]
        for key, k, name in (("l5", int(l5.mean()) if len(l5) else None, "mid-L5"),
                             ("l45", int(round((l5.max() + l4.min()) / 2))
                              if len(l5) and len(l4) else None, "L4-L5 junction"),
                             ("s1", int(np.median(s1)) if len(s1) else None,
                              "L5 beside the sacrum")):
            if k is None:
                continue
            img = display_slice(v, k)
            marks = np.zeros(lab.shape[1:], np.uint8)
            marks[np.isin(lab[k], (88, 89))] = 1
            marks[np.isin(lab[k], (77, 78, 25))] = 5
            box = body_box(img, v.spacing[0])
            out[key] = (None, f"real: {name} (NIfTI), TotalSegmentator\niliopsoas red, hip "
                              f"bones and sacrum purple", overlay_rgb(img[box], display_slice(
                                  v, 0, marks[None])[box]))
    ct = shared / "ct_t11_l2.nii.gz"
    masks = [(shared / f"tissue_{n}.nii.gz", c) for n, c in
             (("skeletal_muscle", 1), ("subcutaneous_fat", 3), ("torso_fat", 4))]
    if ct.is_file() and all(p.is_file() for p, _ in masks):
        v = read_volume(ct)
        lab = np.zeros(v.array.shape, np.uint8)
        for p, c in masks:
            m = read_labels(p, like=v).array
            lab[m > 0] = c
        # ct_t11_l2 is slices 82.. of the abdomen NIfTI, whose structures name the vertebrae
        names = {}
        if struct.is_file():
            from EPDSegmentationLib.io.images import read_itk

            vert = read_itk(struct).array[82:82 + v.array.shape[0]]
            for k in range(vert.shape[0]):
                ids, counts = np.unique(vert[k][np.isin(vert[k], list(_TS_VERTEBRAE))],
                                        return_counts=True)
                if len(ids):
                    names[k] = _TS_VERTEBRAE[int(ids[np.argmax(counts)])]
        top = v.array.shape[0] - 1
        for key, k, note in (("upper0", top, "top slice, "), ("upper1", top - 6, ""),
                             ("upper2", top - 16, ""), ("l2", 0, "")):
            k = max(0, min(k, top))
            img = display_slice(v, k)
            box = body_box(img, v.spacing[0])
            out[key] = (None, f"real: {note}{names.get(k, f'slice {k}')} with TotalSegmentator"
                              f"\ntissue masks ({v.spacing[0]:.0f} mm)",
                        overlay_rgb(img[box], display_slice(v, k, lab)[box]))
    if dcm.is_dir():
        v = read_volume(dcm)
        k = v.array.shape[0] // 2
        img = display_slice(v, k)
        out["crop"] = (_crop(img, v.spacing[0], vertebra_centre(img), 90),
                       "real DICOM, 90 mm crop at native pixels", None)
    return out
