"""Edge-preserving Probabilistic Downsampling (EPD) and the conventional baselines, in NumPy.

Windows. ``factor`` is an int k (k x k windows over the last two axes), or a tuple of ints:
(kh, kw) over the last two axes, (kd, kh, kw) over the last three. Along an axis of n pixels,
window i covers pixels [i*k, min((i+1)*k, n)): there are ceil(n / k) windows and the last one
is partial when k does not divide n. A partial window counts only the pixels that exist.

Geometry. Low-resolution sample i stands for the centre of its full window, at input index
i*k + (k-1)/2 (spacing times k, origin moved by (k-1)/2 input pixels; see ``volume.downsampled_ijk_to_ras``). The
baselines and the upsampling below sample at exactly those positions.

- ``epd_labels``: per window, the fraction of each class among its labelled pixels.
- ``epd_image``: the plain window mean.
- ``nearest_labels``: the pixel nearest each window centre (torch 'nearest-exact').
- ``bilinear_image``: bilinear interpolation at the window centres (torch 'bilinear',
  align_corners=False, no antialiasing).
- ``upsample_soft`` / ``soft_to_labels`` / ``upsample_labels``: back to the input grid.

No function here materialises a one-hot array of its input: labels are counted class by class
in cache-sized blocks (see ``_epd_counts``), so the extra memory is the output plus scratch
kept under half the output (at least a few hundred KB per thread).
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
#: Input bytes per work block of ``epd_image``.
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


def _allowed(num_classes: int, ignore_index: Optional[int]) -> str:
    allowed = f"[0, {num_classes})"
    if ignore_index is not None:
        allowed += f" or ignore_index={ignore_index}"
    return allowed


def _chunks(arr: np.ndarray, limit: int, prefix: Tuple[int, ...] = ()):
    """Yield (prefix, start, sub) covering ``arr`` in C order with sub.size <= limit (or one
    element row): sub = arr[prefix][start:start + len(sub)]. No copies."""
    if arr.size <= limit:
        yield prefix, 0, arr
    elif arr[0].size > limit:
        for i in range(arr.shape[0]):
            yield from _chunks(arr[i], limit, prefix + (i,))
    else:
        step = max(1, limit // max(1, arr[0].size))
        for i0 in range(0, arr.shape[0], step):
            yield prefix, i0, arr[i0:i0 + step]


def _bad_mask(sub: np.ndarray, num_classes: int, ignore_index: Optional[int]) -> np.ndarray:
    """Labels outside [0, C) other than the ignore value (bool, shape of sub; two temporaries
    of that size at most)."""
    bad = sub >= num_classes
    if sub.dtype.kind == "i":
        np.logical_or(bad, sub < 0, out=bad)
    if ignore_index is not None:
        np.logical_and(bad, sub != ignore_index, out=bad)
    return bad


def _check_range_chunked(labels: np.ndarray, num_classes: int,
                         ignore_index: Optional[int]) -> None:
    """Raise the range error naming the first bad label in C order, if there is one. Scans in
    chunks, so the temporaries stay small whatever the input size."""
    for prefix, start, sub in _chunks(labels, 1 << 20):
        bad = _bad_mask(sub, num_classes, ignore_index)
        if bad.any():
            j = np.unravel_index(int(np.argmax(bad)), sub.shape)
            where = prefix + (start + int(j[0]),) + tuple(int(i) for i in j[1:])
            raise ValueError(f"labels must lie in {_allowed(num_classes, ignore_index)}; "
                             f"found {labels[where]} at index {where}")


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


# Summing k adjacent narrow integers with one multiply: the top field of x * 0x0101..01 is
# their sum (no carries, since every window count fits the field).
_HSUM = {
    (1, 2): (np.uint16, 0x0101, 8),
    (1, 4): (np.uint32, 0x01010101, 24),
    (1, 8): (np.uint64, 0x0101010101010101, 56),
    (2, 2): (np.uint32, 0x00010001, 16),
    (2, 4): (np.uint64, 0x0001000100010001, 48),
}

#: Bounds on the uint8 codes per work block, in bytes. Blocks are also kept small against the
#: output (see ``_label_block_bytes``) so that scratch is a fraction of the output.
_BLOCK_MIN = 1 << 16
_BLOCK_MAX = 1 << 21


def _hsum_into(a: np.ndarray, kw: int, out: np.ndarray) -> None:
    """out (..., n // kw) = sums of kw adjacent elements along the last axis of a (..., n).

    ``a`` is scratch: with the multiply trick it is overwritten (C-contiguous ``a`` only)."""
    if kw == 1:
        np.copyto(out, a, casting="unsafe")
        return
    trick = _HSUM.get((a.dtype.itemsize, kw))
    if trick is not None and a.flags.c_contiguous:
        wide, mul, shift = trick
        v = a.view(wide)
        np.multiply(v, wide(mul), out=v)
        np.right_shift(v, wide(shift), out=v)  # in place, then narrow: faster than one
        np.copyto(out, v, casting="unsafe")    # shift with a narrower out
    else:
        a.reshape(a.shape[:-1] + (a.shape[-1] // kw, kw)).sum(axis=-1, dtype=out.dtype, out=out)


def _sum_planes(e: np.ndarray, out: np.ndarray) -> None:
    """out (n,) = sum of the planes of e (R, n), R >= 2, by folding halves in place (faster than
    np.add.reduce over axis 0: fewer, longer passes). e is scratch; the sum must fit e's dtype."""
    h = e.shape[0]
    while h > 2:
        half = h // 2
        np.add(e[:half], e[h - half:h], out=e[:half])
        h -= half
    np.add(e[0], e[1], out=out)


def _merge_lead(arr: np.ndarray, nlead: int) -> Optional[np.ndarray]:
    """``arr`` (L1, ..., Ln, *rest) as a view (L1*...*Ln, *rest), or None if that needs a copy."""
    if nlead == 1:
        return arr
    shape, strides = arr.shape[:nlead], arr.strides[:nlead]
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if any(s0 != s1 * n1 for (_, s0), (n1, s1) in zip(dims, dims[1:])):
        return None
    b = int(np.prod(shape, dtype=np.int64)) if shape else 1
    stride = dims[-1][1] if dims else 0
    return np.lib.stride_tricks.as_strided(arr, (b,) + arr.shape[nlead:],
                                           (stride,) + arr.strides[nlead:], writeable=False)


def _label_block_bytes(out_bytes: int, scratch_per_code: float, workers: int) -> int:
    """uint8 codes per block: the scratch of all threads stays under half the output, within
    [_BLOCK_MIN, _BLOCK_MAX] (large enough to amortise NumPy's per-call cost)."""
    fit = int(out_bytes / (2.0 * workers * scratch_per_code))
    return max(_BLOCK_MIN, min(_BLOCK_MAX, fit))


def epd_labels(labels, num_classes: int, factor: Factor, ignore_index: Optional[int] = None,
               *, workers: Optional[int] = None) -> np.ndarray:
    """Soft labels: the fraction of each class in every window.

    labels: integer array (..., H, W), or (..., D, H, W) with a 3-tuple factor; values in
        [0, num_classes) or equal to ``ignore_index``.
    num_classes: C, 1..254.
    factor: window size, see the module docstring.
    ignore_index: label of unlabelled pixels; they count towards no class and not towards the
        window size, so fractions are taken over the labelled pixels of each window. A window
        with no labelled pixel gets all-zero fractions.
    workers: threads (default: up to 4, as many as there are cores).

    Returns float32 (..., C, ceil(H/kh), ceil(W/kw)) (or (..., C, D', H', W')). Each value is
    count / labelled pixels of the window, one correctly rounded float32 division, so the
    fractions of a window sum to 1 (within float32 rounding) and every class's area is
    preserved: sum(fractions * labelled pixels) equals its pixel count.

    Memory: the output plus per-thread scratch kept under half the output (at least a few
    hundred KB); the input is never copied whole, not even to check its range.
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
    ignore = None if ignore_index is None else int(ignore_index)
    if labels.dtype == np.bool_:
        labels = labels.view(np.uint8)

    nlead = labels.ndim - (3 if len(fac) == 3 else 2)
    merged = _merge_lead(labels, nlead) if nlead else labels[None]
    if merged is None:
        # Leading axes that no view can merge: one call per leading index (its output is a
        # temporary of the size of one slice of the output).
        _check_range_chunked(labels, num_classes, ignore)
        low = downsampled_shape(labels.shape[1:], fac)
        out = np.empty((labels.shape[0],) + low[: nlead - 1] + (num_classes,) + low[nlead - 1:],
                       np.float32)
        for i in range(labels.shape[0]):
            out[i] = epd_labels(labels[i], num_classes, fac, ignore, workers=workers)
        return out
    return _epd_counts(labels, merged, num_classes, fac, ignore, workers)


def _epd_counts(labels: np.ndarray, merged: np.ndarray, num_classes: int, fac: Tuple[int, ...],
                ignore: Optional[int], workers: Optional[int]) -> np.ndarray:
    """EPD of ``merged`` (B, H, W) for 2D windows or (B, D, H, W) for 3D; ``labels`` is the
    caller's array, for error messages. Returns the output in the caller's layout.

    Scheme. Each work block is copied once into uint8 codes laid out as R = kd * kh planes:
    plane (z, r) holds row i * kh + r of slice u * kd + z for every depth window u and window
    row i of the block, so the pixels of one window are kw adjacent bytes at the same place in
    each of the R contiguous planes. Per class: one comparison over the block, a sum of the R
    planes (whole-plane adds: long contiguous inner loops, unlike adding rows in the input's
    own layout), then kw adjacent bytes summed with one multiply. Partial windows at the far
    edges are padded with a code that never equals a class. With no ignore value the last class
    is the window size minus the others, so C - 1 classes are compared.

    Why not a lookup table of packed per-class codes (one pass, all classes at once)? NumPy has
    no vectorised byte gather: np.take of a 256-entry table costs 35 to 60 times a comparison
    per pixel (0.9 to 1.4 ns against 0.024 ns), more than the C - 1 comparisons and plane sums
    it would replace.
    """
    C = num_classes
    if len(fac) == 2:
        (kh, kw), kd = fac, 1
        lab4 = merged[None]                 # (1, B, H, W): each slice is a depth window of 1
    else:
        (kd, kh, kw) = fac
        lab4 = merged
    nb, d, h, w = lab4.shape
    do, ho, wo = -(-d // kd), -(-h // kh), -(-w // kw)
    wp = wo * kw
    R = kd * kh
    volume = kd * kh * kw

    if len(fac) == 2:
        out_arr = np.empty((d, C, ho, wo), np.float32)

        def target(bi, u0, u1, i0, i1):    # (C, g, ni, wo) view of the output
            return out_arr[u0:u1, :, i0:i1].transpose(1, 0, 2, 3)
    else:
        out_arr = np.empty((nb, C, do, ho, wo), np.float32)

        def target(bi, u0, u1, i0, i1):
            return out_arr[bi, :, u0:u1, i0:i1]

    # Codes: label + offset, FILL for padding and ignored pixels. uint8 labels with ignore 255
    # use offset 1, so 255 wraps to the fill 0 and the range check is one max over the codes;
    # otherwise offset 0 and fill 255 (never a class, since C <= 254).
    u8 = labels.dtype == np.uint8
    offset = 1 if (u8 and ignore == 255) else 0
    fill = 0 if offset else _SENTINEL
    info = np.iinfo(labels.dtype)
    ignore_here = ignore is not None and info.min <= ignore <= info.max
    # values congruent to 255 mod 256 land on the fill by themselves when cast to uint8
    mask_ignore = ignore_here and not offset and ignore % 256 != _SENTINEL
    counted = C if ignore is not None else C - 1
    acc_dtype = np.uint8 if volume < 256 else (np.uint16 if volume < 65536 else np.uint32)
    cnt_dtype = np.uint16 if volume < 65536 else np.uint32
    acc_item = np.dtype(acc_dtype).itemsize
    cnt_item = np.dtype(cnt_dtype).itemsize

    ext_d, ext_h, ext_w = _extents(d, kd), _extents(h, kh), _extents(w, kw)
    plane_total = np.multiply.outer(ext_h, ext_w)  # (ho, wo) pixels per window, ignoring depth
    pow2 = volume & (volume - 1) == 0
    recip = np.float32(1.0 / volume)

    # Block plan: groups of whole depth windows (slices, for 2D windows), or rows of windows of
    # one depth window when that is too big. Scratch per code byte: codes, comparisons, the
    # plane sums of every counted class and the counts.
    nw = max(1, int(workers) if workers is not None else min(4, os.cpu_count() or 1))
    per_code = 2.0 + (counted * acc_item / R if R > 1 else 0.0) + C * cnt_item / (R * kw)
    if ignore is not None and not offset:
        per_code += 2.0  # masks of the range check and of the ignored pixels
    block_bytes = _label_block_bytes(out_arr.nbytes, per_code, nw)
    unit = R * ho * wp
    if unit <= block_bytes:
        g_max, ni_max = max(1, min(do, block_bytes // unit)), ho
    else:
        g_max, ni_max = 1, max(1, min(ho, block_bytes // (R * wp)))
    plan = [(bi, u0, min(do, u0 + g_max), i0, min(ho, i0 + ni_max))
            for bi in range(nb) for u0 in range(0, do, g_max) for i0 in range(0, ho, ni_max)]
    n_max = g_max * ni_max * wp
    local = threading.local()
    bad_blocks = []

    def scratch():
        s = getattr(local, "s", None)
        if s is None:
            s = local.s = {
                "codes": np.empty(R * n_max, np.uint8),
                "eq": np.empty(R * n_max, np.bool_),
                "acc": np.empty(counted * n_max if R > 1 else 0, acc_dtype),
                "cnt": np.empty(C * g_max * ni_max * wo, cnt_dtype),
            }
        return s

    def put(dst: np.ndarray, src: np.ndarray) -> None:
        if offset:
            np.add(src, 1, out=dst, casting="unsafe")
        else:
            np.copyto(dst, src, casting="unsafe")
        if mask_ignore:
            np.copyto(dst, fill, where=src == ignore)

    def in_range(src: np.ndarray) -> bool:
        lo = 0 if labels.dtype.kind in "ub" else src.min()
        if lo >= 0 and src.max() < C:
            return True
        return ignore is not None and not _bad_mask(src, C, ignore).any()

    def block(bi: int, u0: int, u1: int, i0: int, i1: int) -> None:
        g, ni = u1 - u0, i1 - i0
        z0, z1 = u0 * kd, min(d, u1 * kd)
        r0, r1 = i0 * kh, min(h, i1 * kh)
        src = lab4[bi, z0:z1, r0:r1]  # (nz, nr, w)
        # The range check reads the block first: a streaming max brings it into the cache
        # faster than the strided copy below would.
        if offset:
            clean = src.max() < C
        elif not in_range(src):
            bad_blocks.append(bi)
            return
        s = scratch()
        n = g * ni * wp
        codes = s["codes"][: R * n].reshape(kd, kh, g, ni, wp)
        view = codes.transpose(2, 0, 3, 1, 4)  # (g, kd, ni, kh, wp): input order of the block
        nz, nr = z1 - z0, r1 - r0
        gf, pz = divmod(nz, kd)
        nf, pr = divmod(nr, kh)
        if gf and nf:
            put(view[:gf, :, :nf, :, :w], src[: gf * kd, : nf * kh].reshape(gf, kd, nf, kh, w))
        if pr:  # last window row is partial
            if gf:
                put(view[:gf, :, nf, :pr, :w], src[: gf * kd, nf * kh:].reshape(gf, kd, pr, w))
            view[:, :, nf, pr:] = fill
        if pz:  # last depth window is partial
            if nf:
                put(view[gf, :pz, :nf, :, :w], src[gf * kd:, : nf * kh].reshape(pz, nf, kh, w))
            if pr:
                put(view[gf, :pz, nf, :pr, :w], src[gf * kd:, nf * kh:])
            view[gf, pz:] = fill
        if wp != w:
            codes[..., w:] = fill
        if offset and not clean and codes.max() > C:  # codes: label + 1, 255 wrapped to 0
            bad_blocks.append(bi)
            return

        planes = codes.reshape(R, n)
        eq = s["eq"][: R * n].reshape(R, n)
        cnt = s["cnt"][: C * g * ni * wo].reshape(C, g, ni, wo)
        acc = s["acc"][: counted * n].reshape(counted, g, ni, wp) if R > 1 else None
        for c in range(counted):
            np.equal(planes, c + offset, out=eq)
            if R == 1:
                _hsum_into(eq.view(np.uint8).reshape(g, ni, wp), kw, cnt[c])
            elif R < 256:
                _sum_planes(eq.view(np.uint8), acc[c].reshape(n))
            else:
                np.add.reduce(eq.view(np.uint8), axis=0, out=acc[c].reshape(n))
        if R > 1 and counted:
            _hsum_into(acc, kw, cnt[:counted])

        partial = bool(pz or pr or wp != w)
        if ignore is None:
            # the last class: window size minus the counted ones
            total = plane_total[i0:i1] * ext_d[u0:u1, None, None] if partial else volume
            last = cnt[C - 1]
            np.add.reduce(cnt[: C - 1], axis=0, out=last)
            np.subtract(total, last, out=last, casting="unsafe")
            tgt = target(bi, u0, u1, i0, i1)
            np.copyto(tgt, cnt, casting="unsafe")  # counts are exact in float32
            if not partial and pow2:
                np.multiply(tgt, recip, out=tgt)  # exact: count / 2^n
            else:
                np.divide(tgt, np.asarray(total, np.float32), out=tgt)
        else:
            # fractions over labelled pixels; a window without one keeps all-zero fractions
            total = np.add.reduce(cnt, axis=0, dtype=np.float32)
            total[total == 0] = 1.0
            tgt = target(bi, u0, u1, i0, i1)
            np.copyto(tgt, cnt, casting="unsafe")
            np.divide(tgt, total, out=tgt)

    _run_blocks(block, plan, workers)
    if bad_blocks:
        _check_range_chunked(labels, C, ignore)
    lead = labels.shape[: labels.ndim - len(fac)]
    return out_arr.reshape(lead + out_arr.shape[1:]) if len(fac) == 3 else \
        out_arr.reshape(lead + (C, ho, wo))


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


def down_positions(n: int, k: int) -> np.ndarray:
    return np.arange(-(-n // k), dtype=np.float64) * k + (k - 1) / 2.0


def up_positions(n_out: int, k: int) -> np.ndarray:
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
        out = _interp_axis(out, out.ndim + axis, *linear_taps(down_positions(n, k), n))
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


def check_up_shape(low_shape, shape, fac) -> Tuple[int, ...]:
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
    shape = check_up_shape(soft.shape, shape, fac)
    out = soft
    for axis, k, n in zip(range(-len(fac), 0), fac, shape):
        out = _interp_axis(out, out.ndim + axis,
                           *linear_taps(up_positions(n, k), soft.shape[axis]))
    return out


def soft_to_labels(soft, class_axis: int = -3) -> np.ndarray:
    """Hard labels from soft maps: argmax over the class axis, as uint8."""
    return np.argmax(np.asarray(soft), axis=class_axis).astype(np.uint8)


def upsample_labels(labels, shape: Sequence[int], factor: Factor) -> np.ndarray:
    """Hard maps (..., h, w) back to the input grid by nearest: pixel j takes window j // k."""
    fac = normalize_factor(factor)
    labels = np.asarray(labels)
    shape = check_up_shape(labels.shape, shape, fac)
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
    shape = check_up_shape(soft.shape, shape, fac)
    sizes = np.ones(1, np.float64)
    for n, k in zip(shape, fac):
        sizes = np.multiply.outer(sizes, _extents(n, k).astype(np.float64))
    sizes = sizes.reshape(sizes.shape[1:])
    class_axis = soft.ndim - len(fac) - 1
    weighted = np.tensordot(soft.astype(np.float64), sizes, axes=len(fac))
    return np.moveaxis(weighted, class_axis, -1).reshape(-1, soft.shape[class_axis]).sum(axis=0)
