"""Domain randomisation of a labelled CT slice's appearance (``--randomize``), as SynthSeg
does for MRI: the labels stay exactly as they are (except where the field of view cuts the
body off), and what a real scanner and a real patient vary is drawn anew per slice, so that
the network learns tissue by shape and context rather than by the phantom's fixed CT numbers.

Per slice (all HU, pixels of the training grid, about 0.87 mm):
- muscle (MUS) mean -10..+60 HU, with patchy fatty infiltration (smooth blobs of a random
  size, down to -60 HU below the new mean) and a fine speckle: myosteatosis; each
  connected muscle with its own offset (SD 12 HU), as infiltration differs between muscles;
- fat (SAT, VAT, IMAT) mean -130..-60 HU;
- organs (MSC soft tissue between 25 and 200 HU: liver, spleen, kidneys, bowel wall,
  vessels) moved to a median drawn from their own range, 30..70 HU unenhanced (40 % of
  slices) or 70..130 HU enhanced (portal venous liver), independent of the muscle draw, each connected organ region with its own
  offset (SD 12 HU): real organs do not go as dark as fatty muscle, and muscle is sometimes
  brighter, sometimes darker than them, so HU alone cannot tell them apart (the previous
  single organ shift of -30..+60 HU moved organs down to fatty-muscle HU, and the network
  learnt to call organs muscle); water-like contents (bile, urine, bowel fluid, below
  25 HU) are kept; on 40 % of slices each organ's inner contrast (kidney cortex against
  medulla, liver against its vessels) fades to 0..50 % of the phantom's;
- organ texture (``organ_texture``, a generator of its own, on a share of slices): the
  organs, kidneys and diaphragm get a fine speckle (0..12 HU, as the muscle's) and smooth
  patches (+-0..20 HU) of their own: without it only muscle carries texture beyond the
  scanner's noise, and the network read a real kidney's texture at 3 mm as muscle
  (docs/model.md, twenty-fourth round);
- gas inside the body (MSC below -300 HU) kept, or filled with fluid or oral contrast;
- arms beside the body (skin, fat, muscle, humerus), label background: body-composition
  protocols leave the arms out;
- the table and its pad below the body, label background;
- field-of-view truncation: outside a circle, or beyond a straight image edge that cuts
  into the flank or the front of the body (a tight reconstruction field of view), everything
  is air and background; tissue inside the field of view keeps its label up to the cut;
- streaks through the densest bone;
- correlated noise (``add_kernel_noise``): white noise through a soft (Gaussian) or sharp
  (high-pass boosted) reconstruction kernel, SD 5..30 HU.

``grow_sat`` (applied before the above on a share of the randomised slices) makes the body
obese where the phantom's is not: the subcutaneous fat grows outward by up to 80 mm, most
over the flanks and the back, as real obese patients carry it (the phantom's SAT reaches
about 60 mm at most); the new pixels are SAT, the old skin becomes a faint fibrous septum
inside the fat (label SAT, as the superficial fascia is) and a new skin is drawn at the new
surface. The fat between the organs may be brighter or darker than the subcutaneous fat by
its own amount (-8..+15 HU), so the network cannot tell SAT from VAT by HU.

``thin_sat`` (``--cachectic``, on a share of the randomised slices not made obese) makes the
body cachectic: the subcutaneous fat over the front and flanks cut down to 1..6 mm under a
new skin. Metal and its streaks (``--metal``) are in ``metal.py``.

``OrganLook`` (``--diaphragm-muscle``, ``--kidney-unenhanced``, ``--canal-hu``; phantom tissue
codes needed) draws the diaphragm with the muscle's HU, the kidneys unenhanced and
homogeneous, and the spinal canal's contents anew, each on a share of the randomised slices
of its own.

``close_fat_planes`` (``--organ-contact``, applied before the appearance on a share of the
randomised slices) closes the fat planes the phantom always draws between an organ and a
muscle: in thin patients, and at 3 to 5 mm slice thickness, the kidneys, liver and spleen
touch the psoas, quadratus lumborum and diaphragm with no fat visible between them.

Every draw comes from the generator passed in, so a slice's randomisation is reproducible
from (seed, epoch, slice index) like the rest of the augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np

from EPDSegmentationLib.core.windowing import AIR_HU

from .phantom.tissues import CODE

BG, MUS, IMAT, SAT, VAT, MSC = range(6)

MUSCLE_MEAN_HU = (-10.0, 60.0)
MUSCLE_REGION_SD_HU = 12.0
FAT_MEAN_HU = (-130.0, -60.0)
ORGAN_MEDIAN_HU = (30.0, 130.0)
ORGAN_REGION_SD_HU = 12.0
ORGAN_MIN_HU = 25.0  # below: fluid (bile, urine, bowel contents), kept
#: share of slices on which each organ's inner contrast fades (to 0..50 % of it)
ORGAN_FLATTEN_SHARE = 0.4
NOISE_SD_HU = (5.0, 30.0)
VAT_MINUS_SAT_HU = (-8.0, 15.0)
#: extra subcutaneous fat grown by grow_sat: the largest thickness over the flanks, mm
SAT_GROWTH_MM = (10.0, 80.0)
#: the training grid's pixel (mm): the phantom's slices are resampled to about this
GRID_MM = 0.87
#: OrganLook: the diaphragm's median against the muscle's new mean (before infiltration)
DIAPHRAGM_MINUS_MUSCLE_HU = (-5.0, 20.0)
#: OrganLook: unenhanced kidney parenchyma (about 30 HU; lower at 3 to 5 mm slices, where
#: the sinus fat and perirenal fat average in), and how much inner contrast it keeps
KIDNEY_UNENHANCED_HU = (15.0, 40.0)
KIDNEY_CONTRAST_KEPT = (0.0, 0.2)
#: OrganLook: the spinal canal's contents (CSF 0..15 HU around a cord of 30..40 HU, which
#: the phantom does not draw: the canal's mean on a real scan lies between)
CANAL_HU = (0.0, 40.0)
#: organ texture: the fine speckle's SD (as the muscle's) and the smooth patches' amplitude
ORGAN_SPECKLE_HU = (0.0, 12.0)
ORGAN_PATCH_HU = (0.0, 20.0)
#: the phantom tissue codes these look at
DIAPHRAGM_CODE = CODE["diaphragm"]
KIDNEY_CODES = (CODE["kidney_cortex"], CODE["kidney_medulla"])
CANAL_CODE = CODE["csf"]


@dataclass
class OrganLook:
    """Per-organ appearance for randomize_appearance, from the phantom's tissue codes
    (uint8 (H, W), phantom.tissues), where HU and class alone cannot find the organ:
    - diaphragm: the diaphragm and its crura (class MSC: not scored as skeletal muscle) take
      the muscle's new HU (its mean plus -5..+20 HU, without the fatty infiltration) instead
      of the organs': it is muscle tissue, and on real CT it is as dark as the abdominal wall
      muscles beside it; moved with the organs (up to 130 HU in an enhanced phase) it showed
      the network a diaphragm that no real scan has;
    - kidneys: drawn unenhanced and homogeneous (kidney_hu, 15..40 HU by default; 0..20 %
      of their inner contrast) whatever the other organs' phase: on real unenhanced CT
      (PET-CT, many body-composition cohorts) the kidneys are a homogeneous blob at
      fatty-muscle HU resting on the psoas and quadratus lumborum, and the phantom's
      subjects are unenhanced only 15 % of the time. Found by the codes, not by HU: an enhanced phantom kidney
      (up to about 330 HU) is redrawn whole, keeping a share of its own inner contrast;
    - canal: the spinal canal's contents at 0..40 HU instead of the phantom's fixed 10 HU
      CSF (kept as fluid by the organs' draw): cord and CSF average to 15 to 35 HU at
      clinical slice thickness, and a homogeneous canal at muscle HU between the
      paraspinal muscles is called muscle by a network that never saw one.
    rng: the draws of the diaphragm and kidneys; canal: the canal's, or None (off); streams
    of their own, so that turning any of them off changes no other draw."""

    tissues: np.ndarray
    diaphragm: bool
    kidneys: bool
    rng: np.random.Generator
    canal: Optional[np.random.Generator] = None
    #: the unenhanced kidneys' level range, HU (``--kidney-hu``)
    kidney_hu: Tuple[float, float] = KIDNEY_UNENHANCED_HU


def _smooth_field(shape, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise (H, W), rescaled to mean 0 and SD 1."""
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (f - f.mean()) / max(float(f.std()), 1e-6)


def organ_texture_field(shape, rng: np.random.Generator) -> np.ndarray:
    """float32 (H, W) HU to add to the organs: a fine speckle (smooth field of sigma
    0.5..1.2 px, SD 0..12 HU, the muscle's speckle) and smooth patches (sigma 2..8 px, up
    to +-0..20 HU), brighter and darker alike: vessels, sinus fat, partial volume."""
    speckle = _smooth_field(shape, rng.uniform(0.5, 1.2), rng) * rng.uniform(*ORGAN_SPECKLE_HU)
    patches = np.clip(_smooth_field(shape, rng.uniform(2.0, 8.0), rng), -2.0, 2.0) / 2.0
    return (speckle + patches * rng.uniform(*ORGAN_PATCH_HU)).astype(np.float32)


def _disk(rr, cc, r0, c0, a, b):
    return ((rr - r0) / a) ** 2 + ((cc - c0) / b) ** 2 <= 1.0


def randomize_appearance(hu: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                         muscle_region_sd: float = MUSCLE_REGION_SD_HU,
                         organ_flatten: float = ORGAN_FLATTEN_SHARE,
                         organs: Optional[OrganLook] = None,
                         organ_texture: Optional[np.random.Generator] = None,
                         muscle_mean_hu: Tuple[float, float] = MUSCLE_MEAN_HU):
    """hu float32 (H, W) HU, labels uint8 (H, W) -> (hu, labels) copies with a new appearance;
    labels change only where field-of-view truncation removes the body (set to background).
    Or (P, H, W) stacks: the P planes of one thick slice (``through_plane``), which get one
    appearance (each connected muscle or organ found in 3D, the same fields, table, arms,
    streaks and field of view in every plane); (H, W) draws exactly as a stack of one.
    muscle_region_sd: SD (HU) of each connected muscle's own offset; organ_flatten: share of
    slices whose organs lose most of their inner contrast (0 turns either off); organs:
    the diaphragm, kidneys and spinal canal drawn on their own (OrganLook), None as
    before; organ_texture: the draws of the organs' speckle and patches (organ_texture_field),
    None for none; muscle_mean_hu: the range (HU) of the muscle's new mean, before the
    fatty infiltration (the arms' muscle too)."""
    flat = np.ndim(hu) == 2
    source = np.asarray(hu, np.float32)
    hu = np.array(hu, np.float32)
    labels = np.array(labels, np.uint8)
    if flat:
        source, hu, labels = source[None], hu[None], labels[None]
        if organs is not None:
            organs = replace(organs, tissues=organs.tissues[None])
    if hu.shape != labels.shape or hu.ndim != 3:
        raise ValueError(f"hu and labels must be (H, W) or (P, H, W) alike; got {hu.shape} "
                         f"and {labels.shape}")
    h, w = hu.shape[-2:]
    mus = labels == MUS
    muscle_mean = None
    # muscle: new mean, then patchy and speckled fatty infiltration
    if mus.any():
        muscle_mean = rng.uniform(*muscle_mean_hu)
        hu[mus] += muscle_mean - float(np.median(hu[mus]))
        depth = rng.uniform(0.0, 60.0) * rng.random() ** 0.5
        blobs = np.maximum(_smooth_field((h, w), rng.uniform(2.0, 8.0), rng)
                           - rng.uniform(-0.5, 1.0), 0.0)
        speckle = _smooth_field((h, w), rng.uniform(0.5, 1.2), rng) * rng.uniform(0.0, 12.0)
        field = -depth * np.minimum(blobs, 2.0) / 2.0 + speckle
        hu[mus] += np.broadcast_to(field, hu.shape)[mus]
        # each muscle its own offset: fatty infiltration differs between muscles (the
        # paraspinals far darker than the psoas in older patients)
        from scipy.ndimage import label as connected

        regions, n = connected(mus)
        offsets = np.concatenate(([0.0], rng.normal(0.0, 1.0, n) * muscle_region_sd))
        hu[mus] += offsets.astype(np.float32)[regions[mus]]
    # fat: one new mean for subcutaneous, visceral and intermuscular fat
    fat = (labels == SAT) | (labels == VAT) | (labels == IMAT)
    if fat.any():
        sat = labels == SAT
        hu[fat] += rng.uniform(*FAT_MEAN_HU) - float(np.median(hu[sat] if sat.any() else hu[fat]))
        vat = labels == VAT
        if vat.any() and sat.any():
            hu[vat] += (float(np.median(hu[sat])) + rng.uniform(*VAT_MINUS_SAT_HU)
                        - float(np.median(hu[vat])))
    # organs: contrast phase; gas kept or filled
    msc = labels == MSC
    organ = msc & (hu > ORGAN_MIN_HU) & (hu < 200.0)
    # the diaphragm and kidneys of OrganLook are drawn after the organs, over what these
    # give them, so that every other draw stays as it was
    diaphragm = kidney = None
    if organs is not None:
        # with the tissue codes a kidney is a kidney whatever its HU: enhanced cortex passes
        # 200 HU (portal venous at 80 kVp: about 235), and an HU window split such kidneys
        # into drawn and undrawn pixels, a speckle no scan shows
        kidneys = msc & np.isin(organs.tissues, KIDNEY_CODES)
        organ |= kidneys
        if organs.diaphragm:
            diaphragm = msc & (organs.tissues == DIAPHRAGM_CODE)
        if organs.kidneys:
            kidney = kidneys
    if organ.any():
        from scipy.ndimage import label as connected

        # unenhanced (30..70 HU, fatty liver included) on 40 % of slices, else enhanced
        lo, hi = ORGAN_MEDIAN_HU
        target = rng.uniform(lo, 70.0) if rng.random() < 0.4 else rng.uniform(70.0, hi)
        hu[organ] += target - float(np.median(hu[organ]))
        regions, n = connected(organ)
        jitter = np.concatenate(([0.0], rng.normal(0.0, ORGAN_REGION_SD_HU, n))).astype(np.float32)
        hu[organ] += jitter[regions[organ]]
        # on some slices each organ's inner contrast (kidney cortex against medulla, liver
        # against its vessels) fades, as it does without contrast or in a late phase: the
        # network must not need the phantom's corticomedullary pattern to find a kidney
        if rng.random() < organ_flatten:
            keep = rng.uniform(0.0, 0.5)
            idx = regions[organ]
            sums = np.bincount(idx, weights=hu[organ], minlength=n + 1)
            means = sums / np.maximum(np.bincount(idx, minlength=n + 1), 1)
            hu[organ] = means[idx] + (hu[organ] - means[idx]) * keep
    if diaphragm is not None and diaphragm.any():
        base = muscle_mean if muscle_mean is not None else organs.rng.uniform(*muscle_mean_hu)
        hu[diaphragm] += (base + organs.rng.uniform(*DIAPHRAGM_MINUS_MUSCLE_HU)
                          - float(np.median(hu[diaphragm])))
    if kidney is not None and kidney.any():
        from scipy.ndimage import label as connected

        regions, n = connected(kidney)
        idx = regions[kidney]
        # the inner contrast kept is the phantom's own (cortex, medulla, its texture),
        # not what the organs' draw and fading made of it
        inner = source[kidney]
        means = (np.bincount(idx, weights=inner, minlength=n + 1)
                 / np.maximum(np.bincount(idx, minlength=n + 1), 1))
        # each kidney its own level around one draw (the two kidneys of a patient match)
        level = organs.rng.uniform(*organs.kidney_hu)
        targets = level + np.concatenate(([0.0], organs.rng.normal(0.0, 3.0, n)))
        keep = organs.rng.uniform(*KIDNEY_CONTRAST_KEPT)
        hu[kidney] = (targets[idx] + (inner - means[idx]) * keep).astype(np.float32)
    if organs is not None and organs.canal is not None:
        canal = msc & (organs.tissues == CANAL_CODE)
        if canal.any():
            hu[canal] += organs.canal.uniform(*CANAL_HU) - float(np.median(hu[canal]))
    if organ_texture is not None:
        textured = organ if diaphragm is None else organ | diaphragm
        if textured.any():
            field = organ_texture_field((h, w), organ_texture)
            hu[textured] += np.broadcast_to(field, hu.shape)[textured]
    gas = msc & (hu < -300.0)
    fill = rng.random()
    if fill < 0.3 and gas.any():
        hu[gas] = rng.uniform(0.0, 40.0) if fill < 0.15 else rng.uniform(150.0, 400.0)
    body = labels > 0
    if not body.any():
        return (hu[0], labels[0]) if flat else (hu, labels)
    rows, cols = np.nonzero(body.any(axis=0))
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    bw = right - left + 1
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
    # the table and its pad below the body
    if rng.random() < 0.5:
        pad = rng.uniform(4, 20)
        table = rng.uniform(6, 25)
        r0 = bottom + rng.uniform(0, 6)
        curve = rng.uniform(0.0, 0.0004) * (cc - (left + right) / 2) ** 2
        y = rr - r0 + curve
        # (H, W): the table is the same in every plane of a thick slice
        anywhere = body.any(axis=0)
        pad_m = (y > 0) & (y <= pad) & ~anywhere
        table_m = (y > pad) & (y <= pad + table) & ~anywhere
        hu[:, pad_m] = rng.uniform(-900.0, -100.0) + 10 * rng.standard_normal(pad_m.sum())
        hu[:, table_m] = rng.uniform(-600.0, 300.0) + 20 * rng.standard_normal(table_m.sum())
    # arms beside the body: skin, fat, muscle, humerus; background for the tissue classes
    if rng.random() < 0.5:
        r_mid = (top + bottom) / 2 + rng.uniform(-0.25, 0.25) * (bottom - top)
        for side in (-1.0, 1.0):
            a = bw * rng.uniform(0.12, 0.18)
            b = a * rng.uniform(0.75, 1.15)
            gap = rng.uniform(-0.1, 0.6) * b
            c0 = (left - gap - b) if side < 0 else (right + gap + b)
            outer = _disk(rr, cc, r_mid, c0, a, b) & ~body
            fat_t = rng.uniform(0.1, 0.45)
            core = _disk(rr, cc, r_mid, c0, a * (1 - fat_t), b * (1 - fat_t)) & outer
            bone = _disk(rr, cc, r_mid + rng.uniform(-0.2, 0.2) * a,
                         c0 + rng.uniform(-0.2, 0.2) * b, a * 0.22, a * 0.22) & outer
            marrow = _disk(rr, cc, r_mid, c0, a * 0.12, a * 0.12) & bone
            hu[outer] = rng.uniform(*FAT_MEAN_HU)
            hu[core] = rng.uniform(*muscle_mean_hu)
            hu[bone] = rng.uniform(600.0, 1300.0)
            hu[marrow] = rng.uniform(-50.0, 200.0)
            labels[outer] = BG
    # streaks through the densest bone (beam hardening, photon starvation)
    if rng.random() < 0.4:
        dense = hu > 500.0
        if dense.any():
            dr, dc = np.nonzero(dense.any(axis=0))
            r0, c0 = float(dr.mean()), float(dc.mean())
            for _ in range(rng.integers(1, 5)):
                t = rng.uniform(0, np.pi)
                d = (rr - r0) * np.cos(t) - (cc - c0) * np.sin(t)
                hu += (rng.choice((-1.0, 1.0)) * rng.uniform(20.0, 100.0)
                       * np.exp(-(d / rng.uniform(1.0, 4.0)) ** 2)
                       * (hu > -900.0))
    # field-of-view truncation: a circle that may cut off the flanks, or straight image
    # edges through the flank(s) or the front (at inference the image border is padded
    # with air, so a cut to air here is what a tight field of view looks like there)
    u_fov = rng.random()
    out = np.zeros((h, w), bool)
    if u_fov < 0.2:
        rad = rng.uniform(0.42, 0.6) * max(h, w)
        out = (rr - h / 2) ** 2 + (cc - w / 2) ** 2 > rad ** 2
    elif u_fov < 0.4:
        bh = bottom - top + 1
        cuts = rng.random(3) < (0.6, 0.6, 0.3)
        depth = rng.uniform(0.0, 0.12, 3)
        if cuts[0]:
            out |= cc < left + depth[0] * bw
        if cuts[1]:
            out |= cc > right - depth[1] * bw
        if cuts[2]:
            out |= rr < top + depth[2] * bh
    hu[:, out] = AIR_HU
    labels[:, out] = BG
    return (hu[0], labels[0]) if flat else (hu, labels)


def add_kernel_noise(hu: np.ndarray, rng: np.random.Generator,
                     pixel: float = 1.0) -> np.ndarray:
    """hu float32 (H, W) HU plus correlated noise of SD 5..30 HU: white noise through a soft
    kernel (Gaussian, sigma 0.6..1.5 training-grid px) or a sharp one (white noise with its
    high frequencies boosted), as reconstruction kernels shape CT noise. pixel: the image's
    pixel side in training-grid pixels (a coarse scan's shrink, ``lowres_noise``): a kernel's
    width is a length, so on pixels 3.5 times coarser it spans a 3.5th as many and the
    noise is nearly white, as on real 3 mm scans (the same draws whatever ``pixel``)."""
    from scipy.ndimage import gaussian_filter

    n = rng.standard_normal(hu.shape).astype(np.float32)
    sd = rng.uniform(*NOISE_SD_HU)
    if rng.random() < 0.5:
        n = gaussian_filter(n, rng.uniform(0.6, 1.5) / pixel, mode="wrap")
    else:
        n = n + rng.uniform(0.3, 1.0) * (n - gaussian_filter(n, 1.0 / pixel, mode="wrap"))
    n *= sd / max(float(n.std()), 1e-6)
    return (hu + n * (hu > -950.0)).astype(np.float32)


#: thick slices (``--thick-slices``): the nominal slice thickness drawn per slice, mm, and
#: the heights of the phantom planes averaged into it (mm from the slice's centre, 1 mm
#: apart; the centre plane is the slice itself)
SLICE_THICKNESS_MM = (0.6, 5.0)
PLANE_OFFSETS_MM = (-2.0, -1.0, 1.0, 2.0)
PLANE_SPACING_MM = 1.0


def slice_profile(thickness_mm: float, offsets_mm=(-2.0, -1.0, 0.0, 1.0, 2.0),
                  spacing_mm: float = PLANE_SPACING_MM) -> np.ndarray:
    """Weights float64 (P,), summing to 1, of planes at ``offsets_mm`` (mm from the slice's
    centre, ``spacing_mm`` apart, one at 0) in a slice ``thickness_mm`` thick: each plane
    stands for the ``spacing_mm`` of tissue around it, weighted by how much of that lies in
    the slice (a box slice profile, as a scanner's nominal thickness approximates it).
    0.6 mm is the centre plane alone; 5 mm all five planes alike."""
    if not thickness_mm > 0:
        raise ValueError(f"slice thickness must be > 0 mm; got {thickness_mm}")
    o = np.asarray(offsets_mm, np.float64)
    half = thickness_mm / 2.0
    w = np.clip(np.minimum(o + spacing_mm / 2, half) - np.maximum(o - spacing_mm / 2, -half),
                0.0, None)
    if not w.sum() > 0:
        raise ValueError(f"no plane within {thickness_mm} mm of the centre: {list(o)}")
    return w / w.sum()


def through_plane(hu: np.ndarray, labels: np.ndarray, weights: np.ndarray, centre: int):
    """A thick slice from its planes: hu float32 (P, H, W) HU averaged with ``weights``
    (P,) (slice_profile) into (H, W), the partial volume across the slice; the labels
    those of the centre plane (uint8 (H, W)), the anatomy at the slice's nominal height."""
    out = np.tensordot(np.asarray(weights, np.float32), hu.astype(np.float32), axes=1)
    return out.astype(np.float32), np.array(labels[centre], np.uint8)


#: close_fat_planes: the widest fat plane between an organ and a muscle that closes, mm
#: (drawn per slice)
CONTACT_MM = (3.0, 10.0)


def close_fat_planes(hu: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                     pixel_mm: float = GRID_MM):
    """hu float32 (H, W) HU, labels uint8 (H, W) -> (hu, labels) copies in which every plane
    of visceral fat (VAT) narrower than w mm between an organ (MSC of ORGAN_MIN_HU..200 HU,
    at least 5 pixels across, not inside bone) and a muscle (MUS), w drawn from CONTACT_MM, becomes that organ: label MSC and the HU
    of its nearest organ pixel. A fat pixel is in such a plane when its distances to the
    organ and to the muscle add up to at most the plane's width (plus one pixel: a plane
    one pixel wide has both at 1). Everything else is kept; a slice without all three
    comes back as is."""
    from scipy.ndimage import (binary_dilation, binary_fill_holes, binary_opening,
                               distance_transform_edt)

    hu = np.array(hu, np.float32)
    labels = np.array(labels, np.uint8)
    # the opening keeps organs and drops thin soft-tissue HU rims (bone edges, vessel walls);
    # bone and what its cortex encloses (cancellous bone can be below 200 HU) is no organ
    rr, cc = np.mgrid[-2:3, -2:3]
    bone = binary_dilation(binary_fill_holes(hu > 300.0), iterations=2)
    organ = binary_opening((labels == MSC) & (hu > ORGAN_MIN_HU) & (hu < 200.0) & ~bone,
                           structure=rr * rr + cc * cc <= 4)
    mus = labels == MUS
    vat = labels == VAT
    if not (organ.any() and mus.any() and vat.any()):
        return hu, labels
    width = rng.uniform(*CONTACT_MM) / pixel_mm + 1.0
    d_organ, (ri, ci) = distance_transform_edt(~organ, return_indices=True)
    fill = vat & (d_organ < width)
    if fill.any():
        fill &= d_organ + distance_transform_edt(~mus) <= width
    labels[fill] = MSC
    hu[fill] = hu[ri[fill], ci[fill]]
    return hu, labels


def grow_sat(hu: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
             pixel_mm: float = GRID_MM):
    """hu float32 (H, W) HU, labels uint8 (H, W) -> (hu, labels) copies of an obese version of
    the body: subcutaneous fat grown outward into the air around it (never into the table or
    anything else denser than air), thickest over one or both flanks and the back (up to
    SAT_GROWTH_MM), the old skin turned into a faint septum (SAT) and a new skin (the
    phantom's skin class and HU) at the new surface. A slice without SAT comes back as is."""
    from scipy.ndimage import distance_transform_edt

    hu = np.array(hu, np.float32)
    labels = np.array(labels, np.uint8)
    body = labels > 0
    sat = labels == SAT
    if not sat.any():
        return hu, labels
    h, w = hu.shape
    rows = np.nonzero(body)[0]
    rr = np.mgrid[0:h, 0:w][0].astype(np.float32)
    phi = _angle_from_front(body)
    top = rng.uniform(*SAT_GROWTH_MM) / pixel_mm
    # thickness around the body: a floor everywhere, bulges over the flanks (each its own
    # size: obese bodies are rarely symmetric) and the back, less in front
    flank_l, flank_r = rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)
    back, front = rng.uniform(0.3, 1.0), rng.uniform(0.1, 0.6)
    width = rng.uniform(0.5, 0.9)
    shape = (rng.uniform(0.05, 0.2)
             + flank_r * np.exp(-((phi - np.pi / 2) / width) ** 2)
             + flank_l * np.exp(-((phi + np.pi / 2) / width) ** 2)
             + back * np.exp(-((np.abs(phi) - np.pi) / width) ** 2)
             + front * np.exp(-(phi / width) ** 2))
    thickness = top * shape / max(float(shape.max()), 1e-6)
    outside_d = distance_transform_edt(~body)
    # not below the body's lowest row: the body lies on the table (whose foam core may be
    # as dark as air), and an obese body spreads sideways on it, not underneath it
    grow = ~body & (outside_d <= thickness) & (hu < -800.0) & (rr <= rows.max())
    if not grow.any():
        return hu, labels
    fat_hu = float(np.median(hu[sat]))
    texture = _skin_texture((h, w), rng)
    # the old skin (MSC within 4 pixels of the old surface) becomes a faint septum in the fat
    inside_d = distance_transform_edt(body)
    skin = (labels == MSC) & (inside_d <= 4.0) & grow_neighbour(grow)
    skin_hu = float(np.median(hu[skin])) if skin.any() else fat_hu + 120.0
    hu[skin] = fat_hu + (hu[skin] - fat_hu) * rng.uniform(0.15, 0.5)
    labels[skin] = SAT
    hu[grow] = fat_hu + texture[grow]
    labels[grow] = SAT
    # a new skin at the new surface, where the body now meets air
    new_body = labels > 0
    new_skin = grow & (distance_transform_edt(new_body) <= rng.uniform(1.5, 2.6) / pixel_mm)
    hu[new_skin] = skin_hu + texture[new_skin]
    labels[new_skin] = MSC
    return hu, labels


def _angle_from_front(body: np.ndarray) -> np.ndarray:
    """float32 (H, W): each pixel's angle (rad) about the body's centroid (bool (H, W)), 0
    anterior (image top), growing towards the image right; flanks at +-pi/2, back at +-pi."""
    rows, cols = np.nonzero(body)
    rr, cc = np.mgrid[0:body.shape[0], 0:body.shape[1]].astype(np.float32)
    return np.arctan2(cc - cols.mean(), -(rr - rows.mean()))


def _skin_texture(shape, rng: np.random.Generator) -> np.ndarray:
    """float32 (H, W): smooth texture of SD 6 HU for grown fat and new skin."""
    from scipy.ndimage import gaussian_filter

    texture = gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    return texture * (6.0 / max(float(texture.std()), 1e-6))


def grow_neighbour(grow: np.ndarray, reach: int = 6) -> np.ndarray:
    """Pixels within ``reach`` pixels of the grown region (bool (H, W))."""
    from scipy.ndimage import binary_dilation

    return binary_dilation(grow, iterations=reach)


#: thin_sat: the subcutaneous fat left where a cachectic body keeps it, mm (drawn per slice)
CACHECTIC_SAT_MM = (1.0, 6.0)


def thin_sat(hu: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
             pixel_mm: float = GRID_MM):
    """hu float32 (H, W) HU, labels uint8 (H, W) -> (hu, labels) copies of a cachectic
    version of the body: the subcutaneous fat over the front and flanks cut down to 1..6 mm
    (CACHECTIC_SAT_MM, drawn per slice and varied around the body), the skin moved inward
    onto what is left; the back, which lies on the table and carries its fat flattened, is
    left as it is. Removed pixels become air and background; every other pixel keeps its
    class and HU except the new skin (the phantom's skin HU, class MSC). The phantom's
    thinnest subjects keep about 5 mm or more all round; cancer, ICU and older patients
    often keep almost none. A slice without SAT comes back as is."""
    from scipy.ndimage import distance_transform_edt
    from scipy.ndimage import label as connected

    hu = np.array(hu, np.float32)
    labels = np.array(labels, np.uint8)
    body = labels > 0
    sat = labels == SAT
    if not sat.any():
        return hu, labels
    h, w = hu.shape
    inside_d = distance_transform_edt(body)
    skin = (labels == MSC) & (inside_d <= 3.5 / pixel_mm)
    deep = body & ~sat & ~skin
    if not deep.any():
        return hu, labels
    # the back (|phi| near pi) is kept
    phi = _angle_from_front(body)
    keep_px = rng.uniform(*CACHECTIC_SAT_MM) / pixel_mm
    skin_px = rng.uniform(1.5, 2.6) / pixel_mm
    wobble = 1.0 + 0.4 * np.sin(phi * rng.integers(1, 4) + rng.uniform(0, 2 * np.pi))
    front = np.clip((np.cos(phi) + 0.6) / 0.4, 0.0, 1.0)   # 1 up to 127 deg from the front
    d_deep = distance_transform_edt(~deep)
    remove = body & ~deep & (d_deep > keep_px * wobble + skin_px) & (front > 0.5)
    if not remove.any():
        return hu, labels
    kept = body & ~remove
    # drop islands of fat or skin the cut left outside the body
    regions, n = connected(kept)
    if n > 1:
        sizes = np.bincount(regions.ravel(), minlength=n + 1)
        sizes[0] = 0
        island = kept & (regions != int(sizes.argmax()))
        remove |= island
        kept &= ~island
    air = hu[~body]
    air_hu = float(np.median(air)) if air.size else AIR_HU
    hu[remove] = air_hu
    labels[remove] = BG
    # the skin at the new surface, over the cut
    skin_hu = float(np.median(hu[skin])) if skin.any() else 40.0
    texture = _skin_texture((h, w), rng)
    near_cut = distance_transform_edt(~remove) <= 3.0 / pixel_mm
    new_skin = (kept & ~deep & near_cut
                & (distance_transform_edt(kept) <= max(skin_px, 1.0)))   # a pixel at least
    hu[new_skin] = skin_hu + texture[new_skin]
    labels[new_skin] = MSC
    return hu, labels


#: wall_gas: a gas-filled bowel loop's half-depth (radial semi-axis), mm; its length along
#: the wall is 1 to 2.5 times that; the bowel wall around the gas, mm; loops per slice
WALL_GAS_DEPTH_MM = (8.0, 25.0)
WALL_GAS_LENGTH = (1.0, 2.5)
BOWEL_WALL_MM = (1.0, 3.0)
WALL_GAS_LOOPS = (1, 2)
#: wall_gas: the loops lie against the front and flanks, up to this angle from the front, deg
WALL_GAS_ANGLE_DEG = 110.0
#: phantom tissue codes a loop may take the place of: visceral fat and the bowel's own
WALL_GAS_CODES = tuple(int(CODE[k]) for k in
                       ("vat", "bowel_wall", "bowel_fluid", "oral_contrast", "gas", "stool"))


def _wall_inner_edge(labels: np.ndarray, r0: float, c0: float, phi: float):
    """(row, col, distance in pixels from (r0, c0)) of the inner edge of the wall muscle met
    along the ray from (r0, c0) at angle phi (0: anterior, the image top; +pi/2: the image
    right): where the outermost run of MUS pixels on the ray begins. None when the ray
    meets no muscle."""
    h, w = labels.shape
    t = np.arange(0.0, float(np.hypot(h, w)), 0.5)
    rr = np.rint(r0 - t * np.cos(phi)).astype(int)
    cc = np.rint(c0 + t * np.sin(phi)).astype(int)
    inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    t, rr, cc = t[inside], rr[inside], cc[inside]
    mus = labels[rr, cc] == MUS
    if not mus.any():
        return None
    i = int(np.nonzero(mus)[0][-1])
    while i > 0 and mus[i - 1]:
        i -= 1
    if i == 0:
        return None
    return float(rr[i - 1]), float(cc[i - 1]), float(t[i - 1])


def wall_gas(hu: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
             tissues: Optional[np.ndarray] = None, pixel_mm: float = GRID_MM):
    """hu float32 (H, W) HU, labels uint8 (H, W) -> (hu, labels) copies with one or two
    gas-filled bowel loops pressed against the inner surface of the abdominal wall's
    muscle, at the front or a flank: gas (about -1000 HU) inside a bowel wall of 1..3 mm
    (20..50 HU), both class MSC (inside the body). On real CT a gas-distended colon (the
    flexures, the transverse colon) often lies right under a thin wall, and the gas then
    looks like the air outside the body: the bundled networks call the wall between
    them background (the shared T11-L2 CT's splenic flexure). A loop takes the place of visceral
    fat only, or with ``tissues`` (the phantom's codes, moved with the labels) of visceral
    fat and bowel (WALL_GAS_CODES): never muscle, organs or bone. A slice without wall
    muscle, or where no loop finds room, comes back as is."""
    from scipy.ndimage import distance_transform_edt

    hu = np.array(hu, np.float32)
    labels = np.array(labels, np.uint8)
    body = labels > 0
    if not (labels == MUS).any():
        return hu, labels
    allowed = labels == VAT
    if tissues is not None:
        allowed |= np.isin(tissues, WALL_GAS_CODES) & (labels != BG)
    rows, cols = np.nonzero(body)
    r0, c0 = float(rows.mean()), float(cols.mean())
    rr, cc = np.mgrid[0:hu.shape[0], 0:hu.shape[1]].astype(np.float32)
    loops = np.zeros(hu.shape, bool)
    for _ in range(int(rng.integers(WALL_GAS_LOOPS[0], WALL_GAS_LOOPS[1] + 1))):
        phi = np.deg2rad(rng.uniform(-WALL_GAS_ANGLE_DEG, WALL_GAS_ANGLE_DEG))
        b = rng.uniform(*WALL_GAS_DEPTH_MM) / pixel_mm
        a = b * rng.uniform(*WALL_GAS_LENGTH)
        edge = _wall_inner_edge(labels, r0, c0, phi)
        if edge is None or not allowed[int(edge[0]), int(edge[1])]:
            continue
        # the loop's centre b inside the edge, on the ray; u along the ray, v across it
        cr = edge[0] + b * np.cos(phi)
        ccol = edge[1] - b * np.sin(phi)
        u = -(rr - cr) * np.cos(phi) + (cc - ccol) * np.sin(phi)
        v = (rr - cr) * np.sin(phi) + (cc - ccol) * np.cos(phi)
        loops |= ((u / b) ** 2 + (v / a) ** 2 <= 1.0) & allowed
    if not loops.any():
        return hu, labels
    # the bowel wall all round the gas, also where the loop meets the muscle
    wall_px = max(rng.uniform(*BOWEL_WALL_MM) / pixel_mm, 1.0)     # a pixel at least
    gas = distance_transform_edt(loops) > wall_px
    hu[loops] = rng.uniform(20.0, 50.0)
    hu[gas] = rng.uniform(-1010.0, -980.0)
    labels[loops] = MSC
    return hu, labels
