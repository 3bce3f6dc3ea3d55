"""Edge-preserving Probabilistic Downsampling (EPD) and the conventional baselines, in NumPy.

Windows. ``factor`` is an int k (k x k windows over the last two axes), or a tuple of ints:
(kh, kw) over the last two axes, (kd, kh, kw) over the last three. Along an axis of n pixels,
window i covers pixels [i*k, min((i+1)*k, n)): there are ceil(n / k) windows and the last one
is partial when k does not divide n. A partial window counts only the pixels that exist.

Geometry. Low-resolution sample i stands for the centre of its full window, at input index
i*k + (k-1)/2 (spacing times k, origin moved by (k-1)/2 input pixels; see ``grid.py``). The
baselines and the upsampling below sample at exactly those positions.

- ``epd_labels``: per window, the fraction of each class among its labelled pixels.
- ``epd_image``: the plain window mean.
- ``nearest_labels``: the pixel nearest each window centre (torch 'nearest-exact').
- ``bilinear_image``: bilinear interpolation at the window centres (torch 'bilinear',
  align_corners=False, no antialiasing).
- ``upsample_soft`` / ``soft_to_labels`` / ``upsample_labels``: back to the input grid.

No function here materialises a one-hot array of its input: labels are counted class by class
in cache-sized blocks, so the extra memory is the output plus a few MB of scratch.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence, Tuple, Union

import numpy as np

Factor = Union[int, Sequence[int]]

#: Code of padding and ignored pixels inside the uint8 work buffers (never a class index).
_SENTINEL = 255
#: Input bytes per work block: big enough to amortise NumPy's per-call cost, small enough
#: to stay in the L2 cache.
_BLOCK_BYTES = 1 << 21

__all__ = [
    "normalize_factor",
    "downsampled_shape",
    "epd_labels",
    "epd_image",
    "nearest_labels",
    "bilinear_image",
    "downsample_pair",
    "upsample_soft",
    "upsample_labels",
    "soft_to_labels",
    "soft_pixel_counts",
    "window_centres",
    "linear_taps",
]


# ----------------------------------------------------------------------------- validation


def normalize_factor(factor: Factor) -> Tuple[int, ...]:
    """Return the window as a tuple over the trailing axes: k -> (k, k); tuples unchanged."""
    if isinstance(factor, (int, np.integer)) and not isinstance(factor, (bool, np.bool_)):
        factors: Tuple[int, ...] = (int(factor), int(factor))
    elif isinstance(factor, (tuple, list)) and len(factor) in (2, 3):
        if not all(isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_))
                   for k in factor):
            raise ValueError(f"factor must hold integers; got {factor!r}")
        factors = tuple(int(k) for k in factor)
    else:
        raise ValueError(
            f"factor must be an int k or a tuple (kh, kw) or (kd, kh, kw); got {factor!r}")
    if any(k < 1 for k in factors):
        raise ValueError(f"factor must be >= 1 along every axis; got {factor!r}")
    return factors


def downsampled_shape(shape: Sequence[int], factor: Factor) -> Tuple[int, ...]:
    """Shape after downsampling the trailing axes of ``shape``: ceil(n / k) per axis."""
    fac = normalize_factor(factor)
    if len(shape) < len(fac):
        raise ValueError(f"shape {tuple(shape)} has fewer than {len(fac)} axes for factor {fac}")
    lead = tuple(shape[: len(shape) - len(fac)])
    return lead + tuple(-(-n // k) for n, k in zip(shape[len(shape) - len(fac):], fac))


def _check_spatial(arr: np.ndarray, fac: Tuple[int, ...], what: str) -> None:
    if arr.ndim < len(fac):
        raise ValueError(
            f"{what} needs at least {len(fac)} axes for factor {fac}; got shape {arr.shape}")
    if any(n == 0 for n in arr.shape):
        raise ValueError(f"{what} is empty (shape {arr.shape})")


def _check_integer(labels: np.ndarray, what: str = "labels") -> None:
    if labels.dtype.kind not in "iub":
        raise ValueError(
            f"{what} must be an integer array; got dtype {labels.dtype}. Round and cast "
            f"(for example labels.astype(np.uint8)) if the values are whole numbers.")


def _check_label_range(labels: np.ndarray, num_classes: int, ignore_index: Optional[int]) -> None:
    lo, hi = labels.min(), labels.max()
    if lo >= 0 and hi < num_classes:
        return
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bad.any():
        where = np.unravel_index(int(np.argmax(bad)), labels.shape)
        allowed = f"[0, {num_classes})"
        if ignore_index is not None:
            allowed += f" or ignore_index={ignore_index}"
        raise ValueError(
            f"labels must lie in {allowed}; found {labels[where]} at index {tuple(map(int, where))}")


def _check_image(image: np.ndarray) -> None:
    if image.dtype.kind not in "iufb":
        raise ValueError(f"image must be a real numeric array; got dtype {image.dtype}")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        bad = ~np.isfinite(image)
        where = np.unravel_index(int(np.argmax(bad)), image.shape)
        raise ValueError(
            f"image holds a non-finite value ({image[where]}) at index {tuple(map(int, where))}")


# ----------------------------------------------------------------------------- blocks


def _as_blocks(shape: Tuple[int, ...], fac: Tuple[int, ...]):
    """Describe ``shape`` as (B, D, H, W) with windows (kd, kh, kw); 2D windows get kd = D = 1."""
    if len(fac) == 2:
        kd, (kh, kw) = 1, fac
        d, (h, w) = 1, shape[-2:]
        lead = shape[:-2]
    else:
        kd, kh, kw = fac
        d, h, w = shape[-3:]
        lead = shape[:-3]
    b = int(np.prod(lead, dtype=np.int64)) if lead else 1
    return lead, (b, d, h, w), (kd, kh, kw)


def _extents(n: int, k: int) -> np.ndarray:
    """Number of input pixels in each window along an axis of length n (last may be short)."""
    ext = np.full(-(-n // k), k, dtype=np.int64)
    ext[-1] = n - k * (len(ext) - 1)
    return ext


def _block_plan(b: int, d: int, h: int, w: int, kd: int, itemsize: int):
    """Yield (b0, b1, dz): work on input [b0:b1, dz*kd:(dz+1)*kd] per block."""
    do = -(-d // kd)
    if kd == 1 and d == 1:
        per = max(1, _BLOCK_BYTES // max(1, h * w * itemsize))
        for b0 in range(0, b, per):
            yield b0, min(b, b0 + per), 0
    else:
        for bi in range(b):
            for dz in range(do):
                yield bi, bi + 1, dz


def _workers(n_blocks: int, workers: Optional[int]) -> int:
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    return max(1, min(int(workers), n_blocks))


def _run_blocks(fn, plan, workers: Optional[int]) -> None:
    plan = list(plan)
    n = _workers(len(plan), workers)
    if n == 1:
        for item in plan:
            fn(*item)
        return
    # NumPy releases the GIL inside its loops, so blocks run in parallel on threads.
    with ThreadPoolExecutor(max_workers=n) as pool:
        for _ in pool.map(lambda item: fn(*item), plan):
            pass


_scratch = threading.local()


def _buffer(name: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
    """A per-thread scratch array, reused across blocks of the same shape."""
    key = (name, shape, np.dtype(dtype).str)
    cache = getattr(_scratch, "cache", None)
    if cache is None:
        cache = _scratch.cache = {}
    buf = cache.get(key)
    if buf is None:
        if len(cache) > 16:
            cache.clear()
        buf = cache[key] = np.empty(shape, dtype)
    return buf


# Summing k adjacent bytes with one multiply: the top byte of x * 0x0101..01 is the byte sum
# (no carries, since every window count is < 256).
_HSUM = {
    (1, 2): (np.uint16, 0x0101, 8),
    (1, 4): (np.uint32, 0x01010101, 24),
    (1, 8): (np.uint64, 0x0101010101010101, 56),
    (2, 2): (np.uint32, 0x00010001, 16),
    (2, 4): (np.uint64, 0x0001000100010001, 48),
}


def _hsum(a: np.ndarray, kw: int) -> np.ndarray:
    """Sum groups of kw adjacent elements along the last axis of a C-contiguous array."""
    if kw == 1:
        return a
    trick = _HSUM.get((a.dtype.itemsize, kw))
    if trick is not None and a.flags.c_contiguous:
        wide, mul, shift = trick
        return (a.view(wide) * wide(mul)) >> wide(shift)
    return a.reshape(a.shape[:-1] + (a.shape[-1] // kw, kw)).sum(axis=-1, dtype=a.dtype)


# ----------------------------------------------------------------------------- EPD


def epd_labels(labels, num_classes: int, factor: Factor, ignore_index: Optional[int] = None,
               *, workers: Optional[int] = None) -> np.ndarray:
    """Soft labels: the fraction of each class in every window.

    labels: integer array (..., H, W), or (..., D, H, W) with a 3-tuple factor; values in
        [0, num_classes) or equal to ``ignore_index``.
    num_classes: C, 1..255.
    factor: window size, see the module docstring.
    ignore_index: label of unlabelled pixels; they count towards no class and not towards the
        window size, so fractions are taken over the labelled pixels of each window. A window
        with no labelled pixel gets all-zero fractions.
    workers: threads (default: up to 4, as many as there are cores).

    Returns float32 (..., C, ceil(H/kh), ceil(W/kw)) (or (..., C, D', H', W')). Each value is
    count / labelled pixels of the window, one correctly rounded float32 division, so the
    fractions of a window sum to 1 (within float32 rounding) and every class's area is
    preserved: sum(fractions * labelled pixels) equals its pixel count.
    """
    fac = normalize_factor(factor)
    labels = np.asarray(labels)
    _check_integer(labels)
    _check_spatial(labels, fac, "labels")
    if not isinstance(num_classes, (int, np.integer)) or not 1 <= num_classes < _SENTINEL:
        raise ValueError(f"num_classes must be an int in 1..{_SENTINEL - 1}; got {num_classes!r}")
    if ignore_index is not None and not isinstance(ignore_index, (int, np.integer)):
        raise ValueError(f"ignore_index must be an int or None; got {ignore_index!r}")
    num_classes = int(num_classes)
    _check_label_range(labels, num_classes, ignore_index)
    if labels.dtype == np.bool_:
        labels = labels.view(np.uint8)

    lead, (b, d, h, w), (kd, kh, kw) = _as_blocks(labels.shape, fac)
    do, ho, wo = -(-d // kd), -(-h // kh), -(-w // kw)
    lab4 = labels.reshape(b, d, h, w)
    out = np.empty((b, num_classes, do, ho, wo), np.float32)

    ext_d, ext_h, ext_w = _extents(d, kd), _extents(h, kh), _extents(w, kw)
    plane_total = np.multiply.outer(ext_h, ext_w)  # (ho, wo) pixels per window, ignoring depth
    hp, wp = ho * kh, wo * kw
    volume = kd * kh * kw
    acc_dtype = np.uint8 if volume < 256 else (np.uint16 if volume < 65536 else np.uint32)
    count_dtype = np.uint16 if volume < 65536 else np.uint32
    padded = hp != h or wp != w
    # uint8 input with ignore 255 (or none) is used in place; anything else is copied into a
    # padded uint8 buffer where padding and ignored pixels carry the sentinel.
    in_place = lab4.dtype == np.uint8 and not padded and ignore_index in (None, _SENTINEL)
    explicit_total = ignore_index is not None
    counted = range(num_classes) if explicit_total else range(num_classes - 1)

    def block(b0: int, b1: int, dz: int) -> None:
        g = b1 - b0
        z0, z1 = dz * kd, min(d, (dz + 1) * kd)
        src = lab4[b0:b1, z0:z1]
        if in_place and z1 - z0 == kd:
            codes = src
        else:
            codes = _buffer("codes", (g, kd, hp, wp), np.uint8)
            codes.fill(_SENTINEL)
            region = codes[:, : z1 - z0, :h, :w]
            np.copyto(region, src, casting="unsafe")
            if ignore_index is not None and not (src.dtype == np.uint8 and ignore_index == _SENTINEL):
                np.putmask(region, src == ignore_index, _SENTINEL)
        eq = _buffer("eq", codes.shape, np.bool_)
        acc = _buffer("acc", (g, ho, wp), acc_dtype)
        target = out[b0:b1, :, dz]  # (g, C, ho, wo); every value is written once, below
        if explicit_total:
            kept = _buffer("kept", (num_classes, g, ho, wo), count_dtype)
        else:
            totals = plane_total * ext_d[dz]
            totals_f = totals.astype(np.float32)
            counted_sum = np.zeros((g, ho, wo), count_dtype)
        for c in counted:
            np.equal(codes, c, out=eq)
            e = eq.view(np.uint8).reshape(g, kd, ho, kh, wp)
            if kd == 1 and kh == 1:
                np.copyto(acc, e[:, 0, :, 0, :], casting="unsafe")
            else:
                np.add.reduce(e, axis=(1, 3), dtype=acc_dtype, out=acc)
            counts = _hsum(acc, kw)
            if explicit_total:
                np.copyto(kept[c], counts, casting="unsafe")
            else:
                np.add(counted_sum, counts, out=counted_sum, casting="unsafe")
                # float32 division: count / total correctly rounded (counts are exact in float32)
                np.divide(counts, totals_f, out=target[:, c], dtype=np.float32, casting="unsafe")
        if explicit_total:
            # Fractions over labelled pixels; a window without one keeps all-zero fractions.
            totals_f = kept.sum(axis=0, dtype=np.float32)
            totals_f[totals_f == 0] = 1.0
            for c in counted:
                np.divide(kept[c], totals_f, out=target[:, c], dtype=np.float32, casting="unsafe")
        else:
            np.divide(totals - counted_sum, totals_f, out=target[:, num_classes - 1],
                      dtype=np.float32, casting="unsafe")

    _run_blocks(block, _block_plan(b, d, h, w, kd, 1), workers)
    if len(fac) == 2:
        return out.reshape(lead + (num_classes, ho, wo))
    return out.reshape(lead + (num_classes, do, ho, wo))


def epd_image(image, factor: Factor) -> np.ndarray:
    """The plain window mean of ``image`` (..., H, W) or (..., D, H, W), as float32.

    Sums are taken in float64, so the mean is the exact mean rounded once to float32.
    Partial windows at the far edges average the pixels that exist.
    """
    fac = normalize_factor(factor)
    image = np.asarray(image)
    _check_image(image)
    _check_spatial(image, fac, "image")
    lead, (b, d, h, w), (kd, kh, kw) = _as_blocks(image.shape, fac)
    do, ho, wo = -(-d // kd), -(-h // kh), -(-w // kw)
    img4 = image.reshape(b, d, h, w)
    out = np.empty((b, do, ho, wo), np.float32)
    plane_total = np.multiply.outer(_extents(h, kh), _extents(w, kw)).astype(np.float64)
    ext_d = _extents(d, kd)

    def block(b0: int, b1: int, dz: int) -> None:
        z0, z1 = dz * kd, min(d, (dz + 1) * kd)
        buf = np.zeros((b1 - b0, kd, ho * kh, wo * kw), np.float64)
        buf[:, : z1 - z0, :h, :w] = img4[b0:b1, z0:z1]
        sums = buf.reshape(b1 - b0, kd, ho, kh, wo, kw).sum(axis=(1, 3, 5))
        out[b0:b1, dz] = sums / (plane_total * ext_d[dz])

    _run_blocks(block, _block_plan(b, d, h, w, kd, 8), workers=None)
    if len(fac) == 2:
        return out.reshape(lead + (ho, wo))
    return out.reshape(lead + (do, ho, wo))


# ----------------------------------------------------------------------------- baselines


def window_centres(n: int, k: int) -> np.ndarray:
    """Index of the input pixel nearest each window centre: i*k + k//2, clipped to n - 1.

    For full windows this is torch's 'nearest-exact' (ties round up)."""
    return np.minimum(np.arange(-(-n // k), dtype=np.int64) * k + k // 2, n - 1)


def linear_taps(positions: np.ndarray, n: int):
    """Linear interpolation taps for sample positions on an axis of n pixels.

    Positions are clipped to [0, n-1]; returns (i0, i1, weight of i1)."""
    p = np.clip(np.asarray(positions, np.float64), 0.0, n - 1)
    i0 = np.floor(p).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, p - i0


def _down_positions(n: int, k: int) -> np.ndarray:
    return np.arange(-(-n // k), dtype=np.float64) * k + (k - 1) / 2.0


def _up_positions(n_out: int, k: int) -> np.ndarray:
    # Inverse of the above: input pixel j lies at low-resolution coordinate (j - (k-1)/2) / k.
    return (np.arange(n_out, dtype=np.float64) - (k - 1) / 2.0) / k


def _interp_axis(x: np.ndarray, axis: int, i0, i1, wt) -> np.ndarray:
    shape = [1] * x.ndim
    shape[axis] = len(wt)
    wt = wt.astype(x.dtype).reshape(shape)
    a = np.take(x, i0, axis=axis)
    return a + (np.take(x, i1, axis=axis) - a) * wt


def nearest_labels(labels, factor: Factor) -> np.ndarray:
    """The conventional baseline: the label nearest each window centre. Same dtype."""
    fac = normalize_factor(factor)
    labels = np.asarray(labels)
    _check_integer(labels)
    _check_spatial(labels, fac, "labels")
    out = labels
    for axis, k in zip(range(-len(fac), 0), fac):
        out = np.take(out, window_centres(labels.shape[axis], k), axis=axis)
    return out


def bilinear_image(image, factor: Factor) -> np.ndarray:
    """The conventional image baseline: (tri)linear interpolation at the window centres.

    Equals torch.nn.functional.interpolate(mode='bilinear', align_corners=False,
    antialias=False, scale_factor=1/k) wherever torch defines the output. float32."""
    fac = normalize_factor(factor)
    image = np.asarray(image)
    _check_image(image)
    _check_spatial(image, fac, "image")
    out = image.astype(np.float32)
    for axis, k in zip(range(-len(fac), 0), fac):
        n = image.shape[axis]
        out = _interp_axis(out, out.ndim + axis, *linear_taps(_down_positions(n, k), n))
    return out


def downsample_pair(image, labels, num_classes: int, factor: Factor, *,
                    label_mode: str = "epd", image_mode: str = "average",
                    ignore_index: Optional[int] = None):
    """Downsample an image and its label map together.

    image: (..., H, W) (HU or any channels-first stack (..., C, H, W) of the same grid).
    labels: (H, W)-trailing integer map of the same spatial shape.
    label_mode: 'epd' -> float32 soft labels (..., C, h, w); 'nearest' -> the same layout,
        one-hot of the nearest labels, so the two modes feed one training loop.
    image_mode: 'average' (EPD window mean) or 'bilinear'.
    """
    fac = normalize_factor(factor)
    image, labels = np.asarray(image), np.asarray(labels)
    if image.shape[-len(fac):] != labels.shape[-len(fac):]:
        raise ValueError(
            f"image and labels must share their grid; got image {image.shape} and labels "
            f"{labels.shape}")
    if image_mode == "average":
        small_image = epd_image(image, fac)
    elif image_mode == "bilinear":
        small_image = bilinear_image(image, fac)
    else:
        raise ValueError(f"image_mode must be 'average' or 'bilinear'; got {image_mode!r}")
    if label_mode == "epd":
        soft = epd_labels(labels, num_classes, fac, ignore_index)
    elif label_mode == "nearest":
        # EPD of the nearest labels with a window of one pixel is their one-hot encoding,
        # with ignore handling identical to EPD's.
        soft = epd_labels(nearest_labels(labels, fac), num_classes, (1,) * len(fac), ignore_index)
    else:
        raise ValueError(f"label_mode must be 'epd' or 'nearest'; got {label_mode!r}")
    return small_image, soft


# ----------------------------------------------------------------------------- upsampling


def _check_up_shape(low_shape, shape, fac) -> Tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    if len(shape) != len(fac):
        raise ValueError(f"shape must have {len(fac)} entries for factor {fac}; got {shape}")
    expected = tuple(-(-n // k) for n, k in zip(shape, fac))
    if tuple(low_shape[-len(fac):]) != expected:
        raise ValueError(
            f"a grid of {shape} downsampled by {fac} is {expected}, but the input is "
            f"{tuple(low_shape[-len(fac):])}")
    return shape


def upsample_soft(soft, shape: Sequence[int], factor: Factor) -> np.ndarray:
    """Soft maps (..., C, h, w) back to the input grid (..., C, *shape) by (tri)linear
    interpolation between low-resolution sample centres (edges clamped). float32.

    This is torch's bilinear with align_corners=False when k divides the shape."""
    fac = normalize_factor(factor)
    soft = np.asarray(soft, dtype=np.float32)
    shape = _check_up_shape(soft.shape, shape, fac)
    out = soft
    for axis, k, n in zip(range(-len(fac), 0), fac, shape):
        out = _interp_axis(out, out.ndim + axis,
                           *linear_taps(_up_positions(n, k), soft.shape[axis]))
    return out


def soft_to_labels(soft, class_axis: int = -3) -> np.ndarray:
    """Hard labels from soft maps: argmax over the class axis, as uint8."""
    return np.argmax(np.asarray(soft), axis=class_axis).astype(np.uint8)


def upsample_labels(labels, shape: Sequence[int], factor: Factor) -> np.ndarray:
    """Hard maps (..., h, w) back to the input grid by nearest: pixel j takes window j // k."""
    fac = normalize_factor(factor)
    labels = np.asarray(labels)
    shape = _check_up_shape(labels.shape, shape, fac)
    out = labels
    for axis, k, n in zip(range(-len(fac), 0), fac, shape):
        out = np.take(out, np.arange(n) // k, axis=axis)
    return out


def soft_pixel_counts(soft, shape: Sequence[int], factor: Factor) -> np.ndarray:
    """Per-class area carried by soft maps, in input pixels: (C,) float64.

    soft: (..., C, h, w) (or (..., C, d, h, w)) from a grid of trailing ``shape``. Each
    fraction is weighted by the number of input pixels its window covers, so for EPD of hard
    labels this equals the class pixel counts exactly (multiply by the pixel area for cm^2)."""
    fac = normalize_factor(factor)
    soft = np.asarray(soft)
    shape = _check_up_shape(soft.shape, shape, fac)
    sizes = np.ones(1, np.float64)
    for n, k in zip(shape, fac):
        sizes = np.multiply.outer(sizes, _extents(n, k).astype(np.float64))
    sizes = sizes.reshape(sizes.shape[1:])
    class_axis = soft.ndim - len(fac) - 1
    weighted = np.tensordot(soft.astype(np.float64), sizes, axes=len(fac))
    return np.moveaxis(weighted, class_axis, -1).reshape(-1, soft.shape[class_axis]).sum(axis=0)
