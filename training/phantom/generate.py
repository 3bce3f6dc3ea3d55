"""Phantom slices: the anatomy painted at supersampled resolution, then labels, exact class
fractions and a CT image with partial volume, texture, scanner blur and noise.

The true per-class area fraction of an output pixel is the share of its s x s subpixels
(s = ``supersample``) whose centres fall in that class: the physical truth that EPD of a hard
label map approximates. The hard label of a pixel is its majority class (the argmax of its
fractions; ties go to the lower class index). The image is the window mean of the
supersampled CT numbers (partial volume), plus smooth per-tissue texture, a Gaussian point
spread and correlated noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from EPDSegmentationLib.core.classes import NUM_CLASSES
from EPDSegmentationLib.core.epd import epd_labels
from EPDSegmentationLib.core.windowing import AIR_HU

from .anatomy import draw, has_back_sat, has_flank_sat, subject_from_seed
from .raster import Canvas
from .tissues import CLASS_OF, CODE, TEXTURE_HU, mean_hu
from .torso import level_centre, levels_span

#: CT number outside the reconstruction circle (as scanners pad it): air
OUTSIDE_HU = AIR_HU
#: "lumbar": the abdomen around mid-L3 (the default; lumbar levels repeat above and below);
#: "torso": T11 to S1 with the upper abdomen and lower chest (torso.py), the iliac wings
#: below L4 and the top of the sacrum (pelvis.py)
ANATOMIES = ("lumbar", "torso")


@dataclass
class PhantomSlice:
    """One axial slice. Arrays are (H, W), row 0 anterior, column 0 the patient's right."""

    hu: np.ndarray           # float32 (H, W) HU
    labels: np.ndarray       # uint8 (H, W) classes 0..5
    fractions: np.ndarray    # float32 (6, H, W), true area fraction of each class, sum 1
    pixel_mm: float          # square pixels, mm
    meta: Dict[str, object] = field(default_factory=dict)
    #: uint8 (H, W) tissue code (tissues.TISSUES) at each pixel's centre subpixel: which
    #: organ a pixel belongs to, for appearance randomisation (training/randomize.py)
    tissues: Optional[np.ndarray] = None

    @property
    def z_mm(self) -> float:
        return float(self.meta.get("z_mm", 0.0))


def _check(seed, size, pixel_mm, supersample) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an integer >= 16 (pixels); got {size!r}")
    if not isinstance(supersample, (int, np.integer)) or not 1 <= supersample <= 16:
        raise ValueError(f"supersample must be an integer in 1..16; got {supersample!r}")
    if pixel_mm is not None and not (np.isfinite(pixel_mm) and 0 < pixel_mm <= 20):
        raise ValueError(f"pixel_mm must be in (0, 20] mm or None; got {pixel_mm!r}")


def _smooth_field(rng, shape, sigma_px: float) -> np.ndarray:
    """A Gaussian random field with unit SD and correlation length ``sigma_px``."""
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px, mode="wrap")
    return f / max(float(f.std()), 1e-6)


def _box_mean(a: np.ndarray, k: int) -> np.ndarray:
    h, w = a.shape[0] // k, a.shape[1] // k
    return a.reshape(h, k, w, k).mean(axis=(1, 3), dtype=np.float32)


def render_image(codes: np.ndarray, k: int, subject, pixel_mm: float, rng) -> np.ndarray:
    """CT image float32 (H, W) in HU from a supersampled tissue-code map (H*k, W*k)."""
    from scipy.ndimage import gaussian_filter

    s = subject
    hu = _box_mean(mean_hu(s)[codes], k)
    amp = _box_mean(TEXTURE_HU[codes], k)
    shape = hu.shape
    fine = _smooth_field(rng, shape, max(0.6, 0.9 / pixel_mm))
    coarse = _smooth_field(rng, shape, max(1.0, 4.0 / pixel_mm))
    hu += amp * (0.8 * fine + 0.6 * coarse)
    hu = gaussian_filter(hu, s.psf_fwhm_mm / 2.355 / pixel_mm, mode="nearest")
    # CT noise is correlated over about a pixel; its SD grows as pixels shrink
    noise_sd = s.noise_sd_hu * (s.fov_mm / 512.0) / pixel_mm
    noise = _smooth_field(rng, shape, 0.7) * noise_sd
    return (hu + noise).astype(np.float32)


def _check_anatomy(anatomy: Optional[str], level: Optional[str]) -> str:
    if anatomy is None:
        return "torso" if level is not None else "lumbar"
    if anatomy not in ANATOMIES:
        raise ValueError(f"anatomy must be one of {ANATOMIES}; got {anatomy!r}")
    if level is not None and anatomy != "torso":
        raise ValueError("level= places a slice in the torso anatomy; it cannot be used with "
                         f"anatomy={anatomy!r}")
    return anatomy


def level_z(seed: int, level: str) -> float:
    """Height z (mm) of the middle of vertebral body ``level`` ('T11' .. 'L5') of subject
    ``seed`` in the torso anatomy (mid-L3 is near 0; each subject's column is shifted a
    little)."""
    return level_centre(subject_from_seed(int(seed)), level)


def levels_z_range(seed: int, levels: Sequence[Union[str, float]]):
    """(z_low, z_high) mm of subject ``seed`` covered by ``levels``: two level names (e.g.
    ("T11", "L4"): from the disc below the lower to the disc above the upper) or heights."""
    return levels_span(subject_from_seed(int(seed)), levels)


def make_slice(seed: int, *, size: int = 512, pixel_mm: Optional[float] = None,
               z_mm: float = 0.0, supersample: int = 4, anatomy: Optional[str] = None,
               level: Optional[str] = None, kidney_contact: float = 0.0,
               kidney_rise: float = 0.0, kidney_tilt: float = 0.0,
               costal_diaphragm: float = 0.0, flank_sat: float = 0.0,
               psoas_apart: float = 0.0, back_sat: float = 0.0,
               crura_front: float = 0.0) -> PhantomSlice:
    """One phantom slice of subject ``seed`` at height ``z_mm`` (mm from mid-L3, + = cranial).

    size: pixels per side. pixel_mm: None keeps the subject's field of view (0.6..0.9 mm
    pixels at 512; size 64 gives the same field of view at 8 times coarser pixels).
    supersample: subpixels per pixel side for the exact fractions.
    anatomy: "lumbar" (default: the abdomen around L3) or "torso" (T11 to S1, with liver,
    spleen, stomach, lung bases, ribs; iliac wings below L4, the sacrum at S1; torso.py,
    pelvis.py). level: a vertebra ('T11' .. 'S1'); the slice is then ``z_mm`` above the
    middle of its body, in the torso anatomy.
    kidney_contact: torso anatomy only, the share of subjects whose kidneys lie on the
    quadratus lumborum and psoas with no fat between (torso.kidney_contact_shift; 0: as
    before). kidney_rise: torso anatomy only, mm the kidneys lie higher (torso.draw_torso;
    0: as before). kidney_tilt: torso anatomy only, degrees the kidneys' long axes lean
    towards the midline going up (torso.tilted_kidney_shift; 0: as before).
    costal_diaphragm: torso anatomy only, the share of subjects whose lower ribs the
    diaphragm lines on the inside (torso.draw_ribcage; 0: as before).
    flank_sat: the share of subjects whose visceral compartment is closed at the back, the
    fat beside the back muscles subcutaneous (anatomy.close_flank; 0: as before).
    psoas_apart: torso anatomy only, the share of subjects whose psoas at L5 lies apart from
    the vertebral body and the iliacus (pelvis.part_psoas; 0: as before).
    back_sat: the share of subjects whose fat behind the back muscles is subcutaneous
    (anatomy.close_back; 0: as before).
    crura_front: torso anatomy only, the share of subjects whose diaphragm crura arise from
    the front of the vertebral bodies (torso.draw_aorta_and_crura; 0: as before).
    """
    _check(seed, size, pixel_mm, supersample)
    anatomy = _check_anatomy(anatomy, level)
    s = subject_from_seed(int(seed))
    if level is not None:
        z_mm = level_z(seed, level) + float(z_mm)
    pixel_mm = float(s.fov_mm / size if pixel_mm is None else pixel_mm)
    fov = pixel_mm * size
    n = size * supersample
    cv = Canvas(n, fov)
    if anatomy == "torso":
        from .torso import draw_torso

        g = draw_torso(cv, s, float(z_mm), kidney_contact=float(kidney_contact),
                       kidney_rise=float(kidney_rise), kidney_tilt=float(kidney_tilt),
                       costal_diaphragm=float(costal_diaphragm),
                       flank_sat=float(flank_sat), psoas_apart=float(psoas_apart),
                       back_sat=float(back_sat), crura_front=float(crura_front))
    else:
        g = draw(cv, s, float(z_mm), flank=has_flank_sat(s, flank_sat),
                 back=has_back_sat(s, back_sat))
    # outside the reconstruction circle there is no image
    c = (np.arange(n) + 0.5) / n - 0.5
    outside = c[:, None] ** 2 + c[None, :] ** 2 > 0.25
    cv.codes[outside] = CODE["air"]
    fractions = epd_labels(CLASS_OF[cv.codes], NUM_CLASSES, supersample, workers=1)
    labels = np.argmax(fractions, axis=0).astype(np.uint8)
    zkey = int(round(float(z_mm) * 1000)) % (2 ** 32)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 777, zkey, int(size)]))
    hu = render_image(cv.codes, supersample, s, pixel_mm, rng)
    hu[_box_mean(outside.astype(np.float32), supersample) > 0.5] = OUTSIDE_HU
    meta = s.meta()
    meta.update(z_mm=float(z_mm), level=g.level_name(), pixel_mm=pixel_mm, size=int(size),
                supersample=int(supersample), fov_mm=fov)
    if anatomy == "torso":
        meta.update(anatomy="torso", torso=g.t.meta(), pelvis=g.pel.meta())
    c = supersample // 2
    tissues = np.ascontiguousarray(cv.codes[c::supersample, c::supersample], np.uint8)
    return PhantomSlice(hu=hu, labels=labels, fractions=fractions, pixel_mm=pixel_mm, meta=meta,
                        tissues=tissues)


def slice_positions(n_slices: int, slice_gap_mm: float, centre_mm: float = 0.0) -> List[float]:
    """z (mm) of n slices ``slice_gap_mm`` apart, centred on ``centre_mm``, increasing."""
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1; got {n_slices}")
    if not slice_gap_mm > 0:
        raise ValueError(f"slice_gap_mm must be > 0; got {slice_gap_mm}")
    return [float(centre_mm + (i - (n_slices - 1) / 2) * slice_gap_mm) for i in range(n_slices)]


def torso_positions(seed: int, n_slices: int, slice_gap_mm: Optional[float],
                    levels: Sequence[Union[str, float]],
                    centre_mm: Optional[float] = None) -> List[float]:
    """z (mm) of a stack of n slices within ``levels`` of subject ``seed`` (see
    subject_slices), increasing."""
    lo, hi = levels_z_range(seed, levels)
    if slice_gap_mm is None:
        if n_slices < 1:
            raise ValueError(f"n_slices must be >= 1; got {n_slices}")
        if n_slices == 1:
            return [float((lo + hi) / 2)]
        return [float(v) for v in np.linspace(lo, hi, n_slices)]
    half = (n_slices - 1) / 2 * float(slice_gap_mm)
    if centre_mm is None:
        u = np.random.default_rng(np.random.SeedSequence([int(seed), 6011])).random()
        room = (hi - lo) - 2 * half
        centre_mm = (lo + hi) / 2 if room <= 0 else lo + half + u * room
    return slice_positions(n_slices, slice_gap_mm, float(centre_mm))


def subject_slices(seed: int, n_slices: int = 6, slice_gap_mm: Optional[float] = 5.0, *,
                   levels: Optional[Sequence[Union[str, float]]] = None,
                   **kw) -> List[PhantomSlice]:
    """n_slices slices of one body, ``slice_gap_mm`` apart, centred on mid-L3 (or on
    ``z_mm`` if given), ordered by increasing z (caudal to cranial). Other keywords go to
    make_slice.

    levels: two vertebral levels, e.g. ("T11", "L4") (or two heights in mm), switch to the
    torso anatomy: the stack then lies within those levels, centred at a height drawn from
    the seed (the same for every n and gap; centred in the range when it does not fit), or
    centred on ``z_mm`` if given; slice_gap_mm=None spreads the n slices evenly from the
    bottom of the lower level to the top of the upper one.
    """
    if levels is None:
        if slice_gap_mm is None:
            raise ValueError("slice_gap_mm=None (spread over the levels) needs levels=")
        centre = float(kw.pop("z_mm", 0.0))
        return [make_slice(seed, z_mm=z, **kw)
                for z in slice_positions(n_slices, slice_gap_mm, centre)]
    if kw.get("anatomy", "torso") != "torso" or kw.get("level") is not None:
        raise ValueError("levels= draws the torso anatomy; leave out anatomy= and level=")
    kw.pop("anatomy", None)
    centre = kw.pop("z_mm", None)
    zs = torso_positions(seed, n_slices, slice_gap_mm, levels,
                         None if centre is None else float(centre))
    return [make_slice(seed, z_mm=z, anatomy="torso", **kw) for z in zs]
