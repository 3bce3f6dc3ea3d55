"""Training data: axial slices from a manifest or from the phantom generator, augmentation at
full resolution, and the network's inputs and targets.

Pipeline of one training slice:
1. load: HU (H, W) and labels (H, W) at the slice's own spacing (``SliceRecord``);
2. resample to the source spacing (``source_mm``: the same for every slice, the spacing the
   model card records divided by the factor; inference.resample_planes, bilinear for HU and
   nearest for labels) and centre crop / pad to ``size`` (padding is air, -1024 HU, label 0);
3. augment at full resolution (``Augment``: horizontal flip, random crop resized back,
   Gaussian blur of the HU), with randomness drawn from (seed, epoch, slice index) only, so
   any number of ranks or workers, and a resumed run, see the same slices;
4. on the training device: window the HU into channels (windowing.window_channels) and
   downsample channels and labels together (epd_torch.downsample_pair_torch with the label
   and image mode): network input (B, channels, h, w) and soft target (B, C, h, w).

Slices are held in memory (float32 HU + uint8 labels, about 1.3 MB per 512 x 512 slice).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from EPDSegmentationLib.core.classes import NUM_CLASSES, class_by_key
from EPDSegmentationLib.core.epd_torch import downsample_pair_torch, epd_labels_torch
from EPDSegmentationLib.core.field import CONTENT_HU
from EPDSegmentationLib.core.inference import resample_planes, resampled_shape
from EPDSegmentationLib.core.orientation import network_flips
from EPDSegmentationLib.core.windowing import AIR_HU, window_channels
from EPDSegmentationLib.io import read_labels, read_manifest, read_volume

from training.phantom import subject_slices
from training.phantom.dataset import split_subjects, subject_seeds
from training.phantom.options import checked_anatomy

from .metal import add_metal
from .randomize import (KIDNEY_UNENHANCED_HU, MUSCLE_MEAN_HU, PLANE_OFFSETS_MM,
                        SLICE_THICKNESS_MM, OrganLook, add_kernel_noise, close_fat_planes,
                        grow_sat, randomize_appearance, slice_profile, thin_sat, through_plane,
                        wall_gas)

MUS, MSC = class_by_key("MUS").index, class_by_key("MSC").index
SPLITS = ("train", "val", "test")


@dataclass
class SliceRecord:
    """One axial slice as read: hu float32 (H, W) HU, labels uint8 (H, W) classes,
    pixel_mm (row, col) mm, subject id, and a name saying where it came from; tissues: the
    phantom's uint8 (H, W) tissue codes (phantom.tissues), None for real scans."""

    hu: np.ndarray
    labels: np.ndarray
    pixel_mm: Tuple[float, float]
    subject: str
    name: str
    tissues: Optional[np.ndarray] = None
    #: the phantom rendered above and below the slice, for thick slices (``SlicePlanes``)
    planes: Optional["SlicePlanes"] = None


@dataclass
class SlicePlanes:
    """A phantom slice's neighbouring planes, at the slice's pixels: offsets_mm (P,) mm from
    the slice (+ cranial), hu float32 (P, H, W) HU, labels and tissues uint8 (P, H, W)."""

    offsets_mm: Tuple[float, ...]
    hu: np.ndarray
    labels: np.ndarray
    tissues: np.ndarray


# ----------------------------------------------------------------------------- sources


def phantom_records(n_subjects: int, slices_per_subject: int = 6, size: int = 512,
                    seed: int = 0, val_fraction: float = 0.2, slice_gap_mm: float = 5.0,
                    progress: bool = False,
                    levels: Optional[Sequence[str]] = None,
                    kidney_contact: float = 0.0,
                    kidney_rise: float = 0.0,
                    kidney_tilt: float = 0.0,
                    costal_diaphragm: float = 0.0,
                    flank_sat: float = 0.0,
                    psoas_apart: float = 0.0,
                    back_sat: float = 0.0,
                    crura_front: float = 0.0,
                    plane_offsets_mm: Sequence[float] = ()) -> Dict[str, List[SliceRecord]]:
    """Phantom slices by split ('train', 'val'): the same subjects, slices and split as
    ``phantom.write_dataset(out, n_subjects, slices_per_subject, seed, size, val_fraction=...,
    levels=levels)`` writes to disk, generated in memory. levels: None, the slices around
    mid-L3; two vertebral levels such as ("T11", "L4"), the torso anatomy with each subject's
    stack within them. kidney_contact: with levels, the share of subjects whose kidneys lie
    on their muscles (phantom.torso.kidney_contact_shift); kidney_rise: with levels, mm
    the kidneys lie higher (phantom.torso.draw_torso); kidney_tilt: with levels, degrees the
    kidneys' long axes lean towards the midline going up (phantom.torso.tilted_kidney_shift);
    costal_diaphragm: with levels, the share of subjects with the diaphragm lining their
    lower ribs (phantom.torso.draw_ribcage); flank_sat: the share of subjects whose fat
    beside the back muscles is subcutaneous (phantom.anatomy.close_flank); psoas_apart: with
    levels, the share of subjects whose psoas at L5 lies apart from the vertebral body and
    the iliacus (phantom.pelvis.part_psoas); back_sat: the share of subjects whose fat
    behind the back muscles is subcutaneous (phantom.anatomy.close_back); crura_front: with
    levels, the share of subjects whose crura arise from the front of the vertebral bodies
    (phantom.torso.draw_aorta_and_crura).
    plane_offsets_mm: the training slices also
    rendered at these heights (mm from each slice) as ``SlicePlanes`` for thick slices
    (Augment.thick; 2 subpixels a side, as only their HU are averaged in), validation
    slices not."""
    from tqdm import tqdm

    if n_subjects < 1 or slices_per_subject < 1:
        raise ValueError(f"phantom needs >= 1 subject and >= 1 slice per subject; got "
                         f"{n_subjects} and {slices_per_subject}")
    seeds = subject_seeds(seed, n_subjects)
    splits = split_subjects(n_subjects, val_fraction, seed)
    where = {} if levels is None else {"levels": tuple(levels)}
    where.update(checked_anatomy(dict(kidney_contact=kidney_contact, kidney_rise=kidney_rise,
                                      kidney_tilt=kidney_tilt,
                                      costal_diaphragm=costal_diaphragm,
                                      flank_sat=flank_sat, psoas_apart=psoas_apart,
                                      back_sat=back_sat, crura_front=crura_front),
                                 torso=levels is not None))
    offsets = tuple(float(o) for o in plane_offsets_mm)
    out: Dict[str, List[SliceRecord]] = {"train": [], "val": []}
    for i in tqdm(range(n_subjects), desc="phantom subjects", unit="subject", disable=not progress):
        name = f"subject_{i:04d}"
        for k, s in enumerate(subject_slices(seeds[i], slices_per_subject, slice_gap_mm,
                                             size=size, **where)):
            planes = None
            if offsets and splits[i] == "train":
                planes = phantom_planes(seeds[i], s.z_mm, offsets, size, where)
            out[splits[i]].append(SliceRecord(s.hu, s.labels, (s.pixel_mm, s.pixel_mm), name,
                                              f"phantom {name} (seed {seeds[i]}) slice {k}",
                                              s.tissues, planes))
    return out


def phantom_planes(seed: int, z_mm: float, offsets_mm: Sequence[float], size: int,
                   where: dict) -> SlicePlanes:
    """Subject ``seed`` rendered at ``z_mm`` + each offset (mm), as subject_slices renders
    it at z_mm (``where``: its levels and anatomy keywords), 2 subpixels a side."""
    from training.phantom.generate import make_slice

    kw = {k: v for k, v in where.items() if k != "levels"}
    if "levels" in where:
        kw["anatomy"] = "torso"
    ps = [make_slice(seed, z_mm=z_mm + o, size=size, supersample=2, **kw) for o in offsets_mm]
    return SlicePlanes(tuple(offsets_mm), np.stack([p.hu for p in ps]),
                       np.stack([p.labels for p in ps]), np.stack([p.tissues for p in ps]))


def manifest_records(path, splits: Sequence[str] = ("train", "val"),
                     progress: bool = False) -> Dict[str, List[SliceRecord]]:
    """Every axial slice of the manifest's cases in ``splits``, by split."""
    from tqdm import tqdm

    rows = [r for r in read_manifest(path) if r["split"] in splits]
    out: Dict[str, List[SliceRecord]] = {s: [] for s in splits}
    for row in tqdm(rows, desc="reading cases", unit="case", disable=not progress):
        vol = read_volume(row["image"])
        lab = read_labels(row["label"], like=vol)
        si, sj, _ = vol.spacing
        # in the orientation inference gives the network (anterior up, patient's right on
        # the left), whatever order the file stores the planes in
        flip_rows, flip_cols, _ = network_flips(vol.ijk_to_ras)
        hu, labels = vol.array, lab.array
        if flip_rows:
            hu, labels = hu[:, ::-1], labels[:, ::-1]
        if flip_cols:
            hu, labels = hu[:, :, ::-1], labels[:, :, ::-1]
        for k in range(vol.array.shape[0]):
            out[row["split"]].append(SliceRecord(
                np.array(hu[k], np.float32), np.array(labels[k], np.uint8),
                (sj, si), str(row["subject"]), f"{row['image']} slice {k}"))
    return out


def median_pixel_mm(records: Sequence[SliceRecord]) -> float:
    """The median pixel spacing (mm) over rows and columns of all records."""
    if not records:
        raise ValueError("no training slices")
    return float(np.median([v for r in records for v in r.pixel_mm]))


def to_source_grid(records: Sequence[SliceRecord], source_mm: float,
                   size: Optional[Tuple[int, int]] = None):
    """Resample every record to source_mm and centre crop / pad to ``size`` (rows, cols)
    (default: the largest resampled slice). Returns (hu float32 (N, H, W), labels uint8
    (N, H, W), size)."""
    if not records:
        raise ValueError("no slices to prepare")
    if size is None:
        shapes = [resampled_shape(r.hu.shape, r.pixel_mm, (source_mm, source_mm)) for r in records]
        size = (max(s[0] for s in shapes), max(s[1] for s in shapes))
    size = (int(size[0]), int(size[1]))
    hu = _on_grid(records, lambda r: r.hu.astype(np.float32), source_mm, size, AIR_HU)
    labels = _on_grid(records, lambda r: r.labels, source_mm, size, 0, labels=True)
    return hu, labels, size


def tissues_on_grid(records: Sequence[SliceRecord], source_mm: float,
                    size: Tuple[int, int]) -> Optional[np.ndarray]:
    """The records' tissue codes placed as to_source_grid places their labels: uint8
    (N, *size) (0, air, where padded), or None unless every record has them."""
    if not records or any(r.tissues is None for r in records):
        return None
    return _on_grid(records, lambda r: r.tissues, source_mm, tuple(size), 0, labels=True)


def planes_on_grid(records: Sequence[SliceRecord], source_mm: float,
                   size: Tuple[int, int]) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The records' SlicePlanes placed as to_source_grid places the slices: (hu float32,
    labels uint8, tissues uint8), each (N, P, *size), or None unless every record has
    planes at the same offsets."""
    if not records or any(r.planes is None for r in records):
        return None
    offsets = records[0].planes.offsets_mm
    if any(r.planes.offsets_mm != offsets for r in records):
        raise ValueError("the records' planes lie at different offsets")
    size = tuple(size)
    out = []
    for field, fill, lab in (("hu", AIR_HU, False), ("labels", 0, True), ("tissues", 0, True)):
        out.append(np.stack([_on_grid(records, lambda r: getattr(r.planes, field)[p],
                                      source_mm, size, fill, labels=lab)
                             for p in range(len(offsets))], axis=1))
    return out[0], out[1], out[2]


def _on_grid(records: Sequence[SliceRecord], plane, source_mm: float, size: Tuple[int, int],
             fill: float, labels: bool = False) -> np.ndarray:
    """plane(record) (H, W) of every record resampled to source_mm (nearest for labels) and
    centred in (N, *size), ``fill`` around; the planes' dtype. One record at a time."""
    out = None
    for i, r in enumerate(records):
        a = plane(r)
        if out is None:
            out = np.full((len(records),) + tuple(size), fill, a.dtype)
        shape = resampled_shape(r.hu.shape, r.pixel_mm, (source_mm, source_mm))
        a = resample_planes(a, shape, labels=labels)
        (src_r, dst_r), (src_c, dst_c) = (_centre(shape[0], size[0]), _centre(shape[1], size[1]))
        out[i, dst_r, dst_c] = a[src_r, src_c]
    return out


def _centre(n: int, m: int):
    """Slices (source, destination) placing an axis of n pixels centred in one of m."""
    if n >= m:
        a = (n - m) // 2
        return slice(a, a + m), slice(0, m)
    a = (m - n) // 2
    return slice(0, n), slice(a, a + n)


# ----------------------------------------------------------------------------- augmentation


@dataclass
class Augment:
    """Full-resolution augmentation. Probabilities per slice; crop_scale: side of the random
    crop relative to the slice (then resized back to the slice size); blur_sigma: Gaussian
    sigma range in pixels (HU only); lowres: the HU shrunk by a factor drawn from
    lowres_factor (antialiased) and enlarged back, as a scan of coarser pixels resampled to
    the training grid looks (labels untouched); tissue_hu: the HU of the muscle pixels (MUS)
    and of the soft-tissue pixels of other body tissue (MSC between -50 and 200 HU: organs,
    not bone, gas or contrast) shifted by offsets drawn from muscle_shift_hu and
    organ_shift_hu, as muscle attenuation (age, fatty infiltration, tube voltage) and organ
    enhancement vary between real patients more than between phantom subjects, so that the
    network cannot tell muscle from liver by HU alone; randomize: the slice's appearance drawn
    anew (training/randomize.py: muscle, fat and organ HU, fatty infiltration, arms, table,
    field-of-view truncation, streaks, correlated kernel noise), labels kept, and on a share
    ``obese`` of those slices the subcutaneous fat grown outward (randomize.grow_sat), on a
    share ``cachectic`` of the others cut down to 1..6 mm (randomize.thin_sat), and on a
    share ``metal`` spinal screws or clips drawn with their streaks (metal.add_metal), and on
    a share ``wall_gas`` gas-filled bowel pressed against the inside of the abdominal wall
    (randomize.wall_gas: a thin wall over gas looks like the body's edge); thick:
    the share of slices (with planes: the phantom's, SliceDataset) drawn as a thick slice,
    nominal thickness from ``thickness_mm``: its planes (randomize.PLANE_OFFSETS_MM) get the
    same augmentation and appearance and are averaged over the slice profile
    (randomize.slice_profile) before the noise, so partial volume runs across the slice as
    on a 3 to 5 mm scan; the labels stay the centre plane's; zoom_out: the share of slices
    shrunk by a factor drawn from zoom_out_scale into a frame of air (background), placed at
    random, instead of the crop: the crop only ever enlarges the anatomy (by 1 to 1.33), so
    without this the network sees bodies only at the phantom's size or larger (a smaller
    patient, or the phantom's body in a wider field of view). lowres, tissue_hu, randomize,
    thick, zoom_out and wall_gas are off by default."""

    flip: float = 0.5
    crop: float = 0.5
    crop_scale: Tuple[float, float] = (0.75, 1.0)
    blur: float = 0.5
    blur_sigma: Tuple[float, float] = (0.25, 1.0)
    lowres: float = 0.0
    lowres_factor: Tuple[float, float] = (1.5, 4.0)
    tissue_hu: float = 0.0
    muscle_shift_hu: Tuple[float, float] = (-30.0, 10.0)
    organ_shift_hu: Tuple[float, float] = (-20.0, 20.0)
    randomize: float = 0.0
    #: share of the randomised slices whose body is made obese (randomize.grow_sat)
    obese: float = 0.3
    #: shares of the randomised slices (not made obese) whose subcutaneous fat is cut down
    #: (randomize.thin_sat), and that get metal and its streaks (metal.add_metal)
    cachectic: float = 0.0
    metal: float = 0.0
    #: randomize_appearance's per-muscle HU offset SD and organ contrast fading share
    muscle_region_sd_hu: float = 12.0
    organ_flatten: float = 0.4
    #: share of the randomised slices whose organ-muscle fat planes close
    #: (randomize.close_fat_planes)
    organ_contact: float = 0.0
    #: shares of the randomised slices on which the diaphragm takes the muscle's HU instead
    #: of the organs', and the kidneys are drawn unenhanced and homogeneous whatever the
    #: other organs' phase (randomize.OrganLook; phantom tissue codes needed)
    diaphragm_muscle: float = 0.0
    kidney_unenhanced: float = 0.0
    #: the unenhanced kidneys' level range, HU (randomize.OrganLook.kidney_hu)
    kidney_hu: Tuple[float, float] = KIDNEY_UNENHANCED_HU
    #: share of the randomised slices whose spinal canal contents are drawn at 0..40 HU
    canal_hu: float = 0.0
    #: share of the randomised slices whose organs get a texture of their own
    #: (randomize.organ_texture_field)
    organ_texture: float = 0.0
    #: the range of the muscle's new mean under randomisation, HU (randomize_appearance)
    muscle_mean_hu: Tuple[float, float] = MUSCLE_MEAN_HU
    #: share of the randomised slices made coarse (lowres) whose scanner noise is drawn on
    #: the coarse pixels, after the shrink (randomize.add_kernel_noise's pixel): drawn on
    #: the training grid and shrunk, the organs' local SD at 3 mm is 8 to 9 HU against
    #: 10 to 14 on a real 3 mm scan (Testing/tools/texture_at_3mm.py)
    lowres_noise: float = 0.0
    #: share of the slices with planes drawn thick, and the thickness range, mm
    thick: float = 0.0
    thickness_mm: Tuple[float, float] = SLICE_THICKNESS_MM
    zoom_out: float = 0.0
    zoom_out_scale: Tuple[float, float] = (0.75, 1.0)
    #: share of the randomised slices with gas-filled bowel pressed against the inside of
    #: the abdominal wall (randomize.wall_gas)
    wall_gas: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __call__(self, hu: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                 tissues: Optional[np.ndarray] = None, planes=None):
        """hu float32 (H, W), labels uint8 (H, W) -> augmented copies of the same shape.
        tissues: the phantom's uint8 (H, W) tissue codes, moved with the labels; needed by
        diaphragm_muscle, kidney_unenhanced and canal_hu (without them these do nothing).
        planes: (hu float32, labels uint8, tissues uint8 or None), each (P, H, W), the
        phantom at randomize.PLANE_OFFSETS_MM from the slice, for ``thick`` (without them
        every slice is thin)."""
        from scipy.ndimage import gaussian_filter

        # draw every number whether or not it is used, so each choice has a fixed stream
        u = rng.random(3)
        scale = rng.uniform(*self.crop_scale)
        pos = rng.random(2)
        sigma = rng.uniform(*self.blur_sigma)
        # drawn after the others: turning lowres or tissue_hu on keeps their streams
        u_low, shrink = rng.random(), rng.uniform(*self.lowres_factor)
        u_hu = rng.random()
        shift_mus, shift_org = rng.uniform(*self.muscle_shift_hu), rng.uniform(*self.organ_shift_hu)
        # drawn last: turning randomize on keeps every other stream
        u_rand, rand_seed = rng.random(), int(rng.integers(2 ** 63))
        h, w = hu.shape
        # thick: a stream of its own from the last draw, so off keeps every draw
        thick_rng = np.random.default_rng([rand_seed, 5])
        profile = None
        if planes is not None and thick_rng.random() < self.thick:
            hu, labels, tissues, profile = _stack_planes(
                hu, labels, tissues, planes, thick_rng.uniform(*self.thickness_mm))
        if u[0] < self.flip:
            hu, labels = hu[..., ::-1], labels[..., ::-1]
            tissues = None if tissues is None else tissues[..., ::-1]
        zoom_rng = np.random.default_rng([rand_seed, 8])     # its own: off keeps every draw
        if zoom_rng.random() < self.zoom_out:
            hu, labels, tissues = _shrink_into_air(hu, labels, tissues,
                                                   zoom_rng.uniform(*self.zoom_out_scale),
                                                   zoom_rng.random(2))
        elif u[1] < self.crop:
            ch, cw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
            r0, c0 = int(pos[0] * (h - ch + 1)), int(pos[1] * (w - cw + 1))
            hu = resample_planes(np.ascontiguousarray(hu[..., r0:r0 + ch, c0:c0 + cw]), (h, w))
            labels = resample_planes(np.ascontiguousarray(labels[..., r0:r0 + ch, c0:c0 + cw]),
                                     (h, w), labels=True)
            if tissues is not None:
                tissues = resample_planes(
                    np.ascontiguousarray(tissues[..., r0:r0 + ch, c0:c0 + cw]), (h, w),
                    labels=True)
        if u_hu < self.tissue_hu:
            hu = np.array(hu, np.float32)
            hu[labels == MUS] += shift_mus
            organ = (labels == MSC) & (hu > -50.0) & (hu < 200.0)
            hu[organ] += shift_org
        rand_rng = np.random.default_rng(rand_seed)
        coarse_noise = False
        if u_rand < self.randomize:
            # its own stream, so the appearance draws are those of a body not grown
            habitus_rng = np.random.default_rng([rand_seed, 1])
            if habitus_rng.random() < self.obese:
                hu, labels = _each_plane(grow_sat, hu, labels, habitus_rng)
            elif self.cachectic > 0:        # its own stream: off keeps every draw
                thin_rng = np.random.default_rng([rand_seed, 6])
                if thin_rng.random() < self.cachectic:
                    hu, labels = _each_plane(thin_sat, hu, labels, thin_rng)
            if self.organ_contact > 0:      # its own stream too: off keeps every draw
                contact_rng = np.random.default_rng([rand_seed, 2])
                if contact_rng.random() < self.organ_contact:
                    hu, labels = _each_plane(close_fat_planes, hu, labels, contact_rng)
            organs = None
            if tissues is not None and max(self.diaphragm_muscle, self.kidney_unenhanced,
                                           self.canal_hu) > 0:
                # streams of their own: off keeps every other draw
                organ_rng = np.random.default_rng([rand_seed, 3])
                canal_rng = np.random.default_rng([rand_seed, 4])
                organs = OrganLook(tissues, organ_rng.random() < self.diaphragm_muscle,
                                   organ_rng.random() < self.kidney_unenhanced, organ_rng,
                                   canal_rng if canal_rng.random() < self.canal_hu else None,
                                   tuple(self.kidney_hu))
            texture = None
            if self.organ_texture > 0:      # its own stream: off keeps every draw
                texture_rng = np.random.default_rng([rand_seed, 10])
                if texture_rng.random() < self.organ_texture:
                    texture = texture_rng
            hu, labels = randomize_appearance(hu, labels, rand_rng, self.muscle_region_sd_hu,
                                              self.organ_flatten, organs, texture,
                                              tuple(self.muscle_mean_hu))
            if self.wall_gas > 0:
                # its own stream, after the appearance (whose draws follow the slice's
                # regions): off, or no room for a loop, keeps every draw
                gas_rng = np.random.default_rng([rand_seed, 9])
                if gas_rng.random() < self.wall_gas:
                    hu, labels = _each_plane(wall_gas, hu, labels, gas_rng, tissues=tissues)
            if profile is not None:
                hu, labels = through_plane(hu, labels, *profile)
            if self.metal > 0:              # its own stream: off keeps every draw
                metal_rng = np.random.default_rng([rand_seed, 7])
                if metal_rng.random() < self.metal:
                    hu, labels = add_metal(hu, labels, metal_rng)
            # the scanner's noise comes with its own pixels: a coarser scan (lowres below)
            # resampled to the training grid has smooth noise, not fine-grained noise.
            # Added here, the shrink averages most of it away; lowres_noise draws it on the
            # coarse pixels instead (the same generator, its last use: off keeps every draw)
            coarse_noise = (u_low < self.lowres and self.lowres_noise > 0
                            and np.random.default_rng([rand_seed, 11]).random()
                            < self.lowres_noise)
            if not coarse_noise:
                hu = add_kernel_noise(hu, rand_rng)
        elif profile is not None:
            hu, labels = through_plane(hu, labels, *profile)
        if u_low < self.lowres:
            small = (max(1, int(round(h / shrink))), max(1, int(round(w / shrink))))
            hu = resample_planes(np.ascontiguousarray(hu, np.float32), small)
            if coarse_noise:
                hu = add_kernel_noise(hu, rand_rng, pixel=shrink)
            hu = resample_planes(hu, (h, w))
        if u[2] < self.blur:
            hu = gaussian_filter(hu, sigma, mode="nearest")
        return np.ascontiguousarray(hu, np.float32), np.ascontiguousarray(labels, np.uint8)


def _shrink_into_air(hu, labels, tissues, scale: float, pos):
    """(..., H, W) hu, labels and tissue codes (or None) shrunk by ``scale`` (< 1; bilinear
    and antialiased for the HU, nearest for the codes) into an (H, W) frame of air
    (AIR_HU, background, tissue code 0) at relative position ``pos`` (two numbers in 0..1)."""
    h, w = hu.shape[-2:]
    sh, sw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    r0, c0 = min(int(pos[0] * (h - sh + 1)), h - sh), min(int(pos[1] * (w - sw + 1)), w - sw)
    out = []
    for x, fill, lab in ((hu, AIR_HU, False), (labels, 0, True), (tissues, 0, True)):
        if x is None:
            out.append(None)
            continue
        frame = np.full(x.shape, fill, np.float32 if not lab else x.dtype)
        frame[..., r0:r0 + sh, c0:c0 + sw] = resample_planes(np.ascontiguousarray(x), (sh, sw),
                                                             labels=lab)
        out.append(frame)
    return tuple(out)


def _stack_planes(hu, labels, tissues, planes, thickness_mm: float):
    """The slice and those of its planes (P, H, W) that a slice ``thickness_mm`` thick takes
    in, as (P', H, W) stacks ordered by height, and (their weights, the slice's index)."""
    p_hu, p_lab, p_tis = planes
    offsets = list(PLANE_OFFSETS_MM)
    if len(offsets) != p_hu.shape[0]:
        raise ValueError(f"planes must be at {offsets} mm; got {p_hu.shape[0]} planes")
    at = int(np.searchsorted(offsets, 0.0))
    order = offsets[:at] + [0.0] + offsets[at:]
    weights = slice_profile(thickness_mm, order)
    take = np.nonzero(weights > 0)[0]

    def stack(centre, others):
        return np.stack([centre if i == at else others[i - (i > at)] for i in take])

    hu = stack(np.asarray(hu, np.float32), np.asarray(p_hu, np.float32))
    labels = stack(labels, p_lab)
    if tissues is not None:
        tissues = stack(tissues, p_tis) if p_tis is not None else None
    return hu, labels, tissues, (weights[take], int(np.searchsorted(take, at)))


def _each_plane(fn, hu, labels, rng, **kw):
    """fn(hu, labels, rng, **kw) on a slice, or on each plane of a stack with the same draws
    (array keywords with a plane axis, such as the tissue codes, taken plane by plane)."""
    if hu.ndim == 2:
        return fn(hu, labels, rng, **kw)
    import copy

    def plane(v, p):
        return v[p] if isinstance(v, np.ndarray) and v.ndim == hu.ndim else v

    outs = [fn(hu[p], labels[p], copy.deepcopy(rng), **{k: plane(v, p) for k, v in kw.items()})
            for p in range(hu.shape[0])]
    return np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs])


class SliceDataset(torch.utils.data.Dataset):
    """Slices on the source grid; item i -> (hu float32 (H, W), labels uint8 (H, W)) tensors,
    augmented with randomness from (seed, epoch, i) when ``augment`` is given (with the
    phantom's tissue codes (N, H, W), tissues_on_grid, when given: randomize uses them;
    planes, planes_on_grid's (hu, labels, tissues) (N, P, H, W): Augment.thick uses them)."""

    def __init__(self, hu: np.ndarray, labels: np.ndarray, augment: Optional[Augment] = None,
                 seed: int = 0, tissues: Optional[np.ndarray] = None, planes=None):
        if hu.shape != labels.shape or hu.ndim != 3:
            raise ValueError(f"hu and labels must both be (N, H, W); got {hu.shape} and {labels.shape}")
        if tissues is not None and tissues.shape != labels.shape:
            raise ValueError(f"tissues must be (N, H, W) as the labels; got {tissues.shape}")
        if planes is not None and any(a.shape[0] != hu.shape[0] or a.shape[2:] != hu.shape[1:]
                                      for a in planes):
            raise ValueError(f"planes must be (N, P, H, W) with N, H, W of hu {hu.shape}")
        self.hu, self.labels, self.tissues, self.planes = hu, labels, tissues, planes
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.hu.shape[0]

    def __getitem__(self, i: int):
        hu, lab = self.hu[i], self.labels[i]
        if self.augment is not None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, int(i)]))
            tissues = None if self.tissues is None else self.tissues[i]
            planes = None if self.planes is None else tuple(a[i] for a in self.planes)
            hu, lab = self.augment(hu, lab, rng, tissues, planes)
        return torch.from_numpy(np.array(hu, np.float32)), torch.from_numpy(np.array(lab, np.uint8))


# ----------------------------------------------------------------------------- batches

#: the range of the share of a tight field's side that the batch's largest body spans
TIGHT_SHARE = (0.75, 1.0)


def tight_field(hu: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator,
                multiple: int, share: Tuple[float, float] = TIGHT_SHARE):
    """A batch cropped to one frame tight around its bodies, as a scan reconstructed close to
    the body is: hu (B, H, W) HU and labels (B, H, W) -> the same cropped to (B, h, w).

    The phantom is drawn in a 460 mm field, its content (HU above field.CONTENT_HU: body,
    arms, table) spanning a median 0.62 of the rows; the shared real CTs, reconstructed
    close to the body, 0.78 to 0.96. The network normalises over the whole image, so it
    must see both. Each axis's side is the batch's largest content extent divided by a
    share drawn from ``share`` (per axis), rounded up to ``multiple`` pixels (the network's
    own padding would add air back) and at most the slice's; each slice's frame sits over
    its own content, offset at random within the slack. Real pixels only: nothing is resized or
    padded, so the labels stay exact. A batch without content is returned as it is."""
    if hu.shape != labels.shape or hu.ndim != 3:
        raise ValueError(f"hu and labels must both be (B, H, W); got {tuple(hu.shape)} and "
                         f"{tuple(labels.shape)}")
    if multiple < 1 or not 0 < share[0] <= share[1] <= 1:
        raise ValueError(f"multiple >= 1 and 0 < share LO <= HI <= 1; got {multiple}, {share}")
    content = (hu > CONTENT_HU).cpu().numpy()
    frames, boxes = [], []
    for axis in (1, 2):               # rows: any content along the columns, and vice versa
        along = content.any(axis=3 - axis)                       # (B, H) or (B, W)
        box = [(np.flatnonzero(a)[[0, -1]] if a.any() else None) for a in along]
        boxes.append(box)
        extents = [b[1] - b[0] + 1 for b in box if b is not None]
        if not extents:
            return hu, labels
        side = int(np.ceil(max(extents) / rng.uniform(*share) / multiple)) * multiple
        frames.append(min(side, hu.shape[axis]))
    out_hu, out_lab = [], []
    for i in range(hu.shape[0]):
        starts = []
        for axis, (frame, box) in enumerate(zip(frames, boxes)):
            n = hu.shape[axis + 1]
            b = box[i]
            if b is None:                 # no content: the frame at the centre
                lo = hi = (n - frame) // 2
            else:                         # over the content (never wider than the frame)
                lo, hi = max(0, b[1] + 1 - frame), min(b[0], n - frame)
            starts.append(int(lo + rng.integers(hi - lo + 1)))
        r, c = starts
        out_hu.append(hu[i, r:r + frames[0], c:c + frames[1]])
        out_lab.append(labels[i, r:r + frames[0], c:c + frames[1]])
    return torch.stack(out_hu), torch.stack(out_lab)


# ----------------------------------------------------------------------------- model inputs


def model_inputs(hu: torch.Tensor, labels: torch.Tensor, *, factor: int, label_mode: str,
                 image_mode: str, windows, num_classes: int = NUM_CLASSES):
    """(network input (B, channels, h, w), soft target (B, C, h, w)) from HU (B, H, W) and
    labels (B, H, W), on their device: windowed at full resolution, then downsampled."""
    x = window_channels(hu, windows)
    return downsample_pair_torch(x, labels, num_classes, factor, label_mode=label_mode,
                                 image_mode=image_mode)


def epd_target(labels: torch.Tensor, factor: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """The exact class fractions at the low resolution: what low-resolution metrics compare
    with, whatever the label mode the model was trained with."""
    return epd_labels_torch(labels, num_classes, factor)
