"""Phantom subjects as volumes on disk: training datasets with a manifest, and the bundled
sample CT.

Volume geometry (RAS, Slicer's convention): column i runs to the patient's left, row j to
the back, slice k up the body; the field of view is centred on x = y = 0 and slice k lies
at z = its height relative to mid-L3 (mm).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from EPDSegmentationLib.core.atomic import atomic_file
from EPDSegmentationLib.core.resources import SAMPLE_CT, SAMPLE_LABELS
from EPDSegmentationLib.core.volume import Volume
from EPDSegmentationLib.io import write_dicom_series, write_manifest, write_volume

from .generate import PhantomSlice, make_slice, slice_positions, subject_slices
from .options import checked_anatomy

FORMATS = ("nrrd", "nifti", "dicom")
#: the bundled sample: subject, slice count and spacing (see Resources/Sample/README.md)
SAMPLE_SEED = 11
SAMPLE_SLICES = 16
SAMPLE_GAP_MM = 5.0


def slices_geometry(pixel_mm: float, size: int, z0_mm: float, gap_mm: float) -> np.ndarray:
    """IJK-to-RAS of a stack of phantom slices (size x size pixels of pixel_mm, first slice
    at z0_mm, gap_mm apart)."""
    fov = pixel_mm * size
    m = np.eye(4)
    m[:3, :3] = np.diag([-pixel_mm, -pixel_mm, gap_mm])
    m[:3, 3] = [fov / 2 - pixel_mm / 2, fov / 2 - pixel_mm / 2, z0_mm]
    return m


def stack(slices: Sequence[PhantomSlice], gap_mm: float) -> Tuple[Volume, Volume, np.ndarray]:
    """(HU volume float32, label volume uint8, fractions float32 (6, K, J, I)) of slices."""
    first = slices[0]
    m = slices_geometry(first.pixel_mm, first.hu.shape[0], first.z_mm, gap_mm)
    meta = {"source": "phantom", "modality": "CT", "series_uid": None,
            "phantom": dict(first.meta, z_mm=[s.z_mm for s in slices])}
    hu = Volume(np.stack([s.hu for s in slices]), m, meta)
    labels = Volume(np.stack([s.labels for s in slices]), m.copy(), dict(meta))
    fractions = np.stack([s.fractions for s in slices], axis=1)
    return hu, labels, fractions


def subject_seeds(seed: int, n_subjects: int) -> List[int]:
    """n distinct subject seeds drawn from ``seed`` (the first k are the same for any n)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2024]))
    out: List[int] = []
    while len(out) < n_subjects:
        s = int(rng.integers(0, 2 ** 31 - 1))
        if s not in out:
            out.append(s)
    return out


def split_subjects(n_subjects: int, val_fraction: float, seed: int) -> List[str]:
    """'train' or 'val' per subject: round(n * val_fraction) validation subjects (at least
    one when val_fraction > 0 and n >= 2), chosen by seed."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    n_val = int(round(n_subjects * val_fraction))
    if val_fraction > 0 and n_subjects >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n_subjects - 1) if n_subjects > 1 else 0
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 99])).permutation(n_subjects)
    split = ["train"] * n_subjects
    for i in order[:n_val]:
        split[int(i)] = "val"
    return split


def write_dataset(out_dir: Union[str, Path], n_subjects: int, slices_per_subject: int = 6,
                  seed: int = 0, size: int = 512, formats: Sequence[str] = ("nrrd",),
                  val_fraction: float = 0.2, *, slice_gap_mm: float = 5.0,
                  dicom_syntax: str = "explicit", overwrite: bool = False,
                  progress: bool = True,
                  levels: Optional[Sequence[Union[str, float]]] = None,
                  kidney_contact: float = 0.0, kidney_rise: float = 0.0,
                  kidney_tilt: float = 0.0, costal_diaphragm: float = 0.0,
                  flank_sat: float = 0.0, psoas_apart: float = 0.0,
                  back_sat: float = 0.0, crura_front: float = 0.0) -> Path:
    """Write n_subjects phantom volumes (K = slices_per_subject slices, slice_gap_mm apart)
    with their label maps, and manifest.csv (image,label,split,subject; paths relative to
    it). Returns the manifest path.

    levels: None (default) centres every stack on mid-L3 in the lumbar anatomy; two vertebral
    levels such as ("T11", "L4") draw the torso anatomy with each subject's stack placed
    within them (``generate.subject_slices``; slice_gap_mm=None spreads the K slices over
    the whole span). kidney_contact: with levels, the share of subjects whose kidneys lie on
    their muscles (torso.kidney_contact_shift); kidney_rise: with levels, mm the kidneys
    lie higher (torso.draw_torso); kidney_tilt: with levels, degrees the kidneys' long axes
    lean towards the midline going up (torso.tilted_kidney_shift); costal_diaphragm: with
    levels, the share of subjects with the diaphragm lining their lower ribs
    (torso.draw_ribcage); flank_sat: the share of subjects whose fat beside the back
    muscles is subcutaneous (anatomy.close_flank); psoas_apart: with levels, the share of
    subjects whose psoas at L5 lies apart from the vertebral body and the iliacus
    (pelvis.part_psoas); back_sat: the share of subjects whose fat behind the back muscles
    is subcutaneous (anatomy.close_back); crura_front: with levels, the share of subjects
    whose crura arise from the front of the vertebral bodies (torso.draw_aorta_and_crura).

    formats: any of 'nrrd' (images/<subject>.nrrd), 'nifti' (images/<subject>.nii.gz) and
    'dicom' (dicom/<subject>/IM0001.dcm ..., transfer syntax ``dicom_syntax``); the first
    one is what the manifest lists. Label maps go to labels/<subject>-label.nrrd (and
    .nii.gz when NIfTI is written). subjects.json records every subject's parameters.
    The split is by subject, fixed by seed.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    formats = tuple(formats)
    if not formats or any(f not in FORMATS for f in formats):
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}; got {formats}")
    if n_subjects < 1 or slices_per_subject < 1:
        raise ValueError("n_subjects and slices_per_subject must be >= 1")
    if levels is not None:
        from .generate import levels_z_range

        levels = tuple(levels)
        levels_z_range(subject_seeds(seed, 1)[0], levels)    # refuse bad levels up front
    elif slice_gap_mm is None:
        raise ValueError("slice_gap_mm=None (spread over the levels) needs levels=")
    # every option checked alike (shares in 0..1, torso-only ones need levels)
    checked_anatomy(dict(kidney_contact=kidney_contact, kidney_rise=kidney_rise,
                         kidney_tilt=kidney_tilt, costal_diaphragm=costal_diaphragm,
                         flank_sat=flank_sat, psoas_apart=psoas_apart, back_sat=back_sat,
                         crura_front=crura_front), torso=levels is not None)
    manifest = out / "manifest.csv"
    if manifest.exists() and not overwrite:
        raise FileExistsError(f"{manifest} already exists; pass overwrite=True to replace "
                              f"the dataset")
    for sub in ("images", "labels") + (("dicom",) if "dicom" in formats else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    seeds = subject_seeds(seed, n_subjects)
    splits = split_subjects(n_subjects, val_fraction, seed)
    rows, subjects = [], {}
    for i in tqdm(range(n_subjects), desc="phantom subjects", unit="subject",
                  disable=not progress):
        name = f"subject_{i:04d}"
        if levels is None:
            slices = subject_slices(seeds[i], slices_per_subject, slice_gap_mm, size=size,
                                    flank_sat=flank_sat, back_sat=back_sat)
            gap = slice_gap_mm
        else:
            slices = subject_slices(seeds[i], slices_per_subject, slice_gap_mm, size=size,
                                    levels=levels, kidney_contact=kidney_contact,
                                    kidney_rise=kidney_rise, kidney_tilt=kidney_tilt,
                                    costal_diaphragm=costal_diaphragm,
                                    flank_sat=flank_sat, psoas_apart=psoas_apart,
                                    back_sat=back_sat, crura_front=crura_front)
            gap = _stack_gap(slices, slice_gap_mm)
        hu, labels, _ = stack(slices, gap)
        paths: Dict[str, Path] = {}
        label_paths = {"nrrd": out / "labels" / f"{name}-label.nrrd"}
        write_volume(labels, label_paths["nrrd"], overwrite=overwrite)
        for fmt in formats:
            if fmt == "nrrd":
                paths[fmt] = write_volume(hu, out / "images" / f"{name}.nrrd", dtype="int16",
                                          overwrite=overwrite)
            elif fmt == "nifti":
                paths[fmt] = write_volume(hu, out / "images" / f"{name}.nii.gz", dtype="int16",
                                          overwrite=overwrite)
                label_paths["nifti"] = write_volume(
                    labels, out / "labels" / f"{name}-label.nii.gz", overwrite=overwrite)
            else:
                meta = slices[0].meta
                region = "L3" if levels is None else "-".join(str(v) for v in levels)
                write_dicom_series(hu, out / "dicom" / name, transfer_syntax=dicom_syntax,
                                   overwrite=overwrite, patient_id=name,
                                   patient_name=f"Phantom^{name}", patient_sex=meta["sex"],
                                   kvp=meta["kvp"],
                                   series_description=f"Phantom {region} {name}")
                paths[fmt] = out / "dicom" / name
        first = formats[0]
        rows.append({"image": paths[first], "label": label_paths.get(first, label_paths["nrrd"]),
                     "split": splits[i], "subject": name})
        subjects[name] = dict(slices[0].meta, split=splits[i], z_mm=[s.z_mm for s in slices])
        if levels is not None:
            subjects[name].update(levels=[s.meta["level"] for s in slices],
                                  level_range=[str(v) for v in levels])
    (out / "subjects.json").write_text(json.dumps(subjects, indent=1))
    return write_manifest(rows, manifest, overwrite=overwrite)


def _stack_gap(slices: Sequence[PhantomSlice], gap: Optional[float]) -> float:
    """The slice spacing of a stack (the gap, or the even spacing that gap=None gave)."""
    if gap is not None:
        return float(gap)
    if len(slices) < 2:
        return 5.0
    return float((slices[-1].z_mm - slices[0].z_mm) / (len(slices) - 1))


SAMPLE_README = """# Bundled sample CT: a phantom abdomen around L3

Made by the project's phantom generator, not from a patient.

- `EPDPhantomCT.nrrd`: CT in HU, int16, gzip NRRD (LPS space, as Slicer writes it).
- `EPDPhantomCT-label.nrrd`: its label map, uint8: 0 background, 1 skeletal muscle, 2 IMAT,
  3 SAT, 4 VAT, 5 other body tissue (EPDSegmentationLib/classes.py). These are the hard
  (majority) labels of the phantom's exact per-pixel class fractions.

Phantom subject seed {seed}: {sex}, age {age:.0f}, adiposity {adiposity:.2f}, muscle factor
{muscle:.2f}, myosteatosis {myo:.2f}; {kvp} kVp, {phase} phase. {n} axial slices of
{size} x {size} pixels ({pixel:.4f} mm), {gap:g} mm apart, from z = {z0:g} to {z1:g} mm
around mid-L3; levels: {levels}.

Regenerate the two volumes and this README (repository root, after `make setup`):

    .venv/bin/python -m training.phantom sample --output Resources/Sample --overwrite
"""


def write_sample(out_dir: Union[str, Path], *, seed: int = SAMPLE_SEED,
                 n_slices: int = SAMPLE_SLICES, gap_mm: float = SAMPLE_GAP_MM,
                 overwrite: bool = False, progress: bool = True) -> List[Path]:
    """Write the bundled sample (EPDPhantomCT.nrrd, EPDPhantomCT-label.nrrd, README.md)."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    zs = slice_positions(n_slices, gap_mm)
    slices = [make_slice(seed, z_mm=z) for z in tqdm(zs, desc="sample slices", unit="slice",
                                                      disable=not progress)]
    hu, labels, _ = stack(slices, gap_mm)
    ct_path = write_volume(hu, out / SAMPLE_CT[1], dtype="int16", overwrite=overwrite)
    lab_path = write_volume(labels, out / SAMPLE_LABELS[1], overwrite=overwrite)
    m = slices[0].meta
    levels = sorted({s.meta["level"] for s in slices}, key=lambda v: [s.meta["level"] for s in slices].index(v))
    text = SAMPLE_README.format(seed=seed, n=n_slices, gap=gap_mm, z0=zs[0], z1=zs[-1],
                                levels=", ".join(levels), size=hu.array.shape[-1],
                                pixel=slices[0].pixel_mm, sex=m["sex"], age=m["age"],
                                adiposity=m["adiposity"], muscle=m["muscle"],
                                myo=m["myosteatosis"], kvp=m["kvp"],
                                phase=m["phase"].replace("_", " "))
    readme = out / "README.md"
    with atomic_file(readme, overwrite=True) as tmp:
        tmp.write_text(text)
    return [ct_path, lab_path, readme]
