"""A JPEG lossless encoder (ITU-T T.81 process 14, first-order prediction: DICOM transfer
syntax 1.2.840.10008.1.2.4.70, "JPEG Lossless, SV1").

pydicom can decode this syntax (through pylibjpeg-libjpeg) but has no encoder for it; the
phantom writes it so that the reader is tested on real JPEG lossless files. Written from the
standard: predictor 1 (left neighbour; the first row predicts from the left, the first column
from above, the first pixel from 2^(P-1)), differences modulo 2^16 coded as a Huffman
category (SSSS) plus SSSS extra bits, one optimised Huffman table per image.
"""

from __future__ import annotations

import heapq
import struct
from typing import Dict, List, Tuple

import numpy as np


def _differences(img: np.ndarray, precision: int) -> np.ndarray:
    x = img.astype(np.int64)
    pred = np.empty_like(x)
    pred[:, 1:] = x[:, :-1]                  # left neighbour
    pred[1:, 0] = x[:-1, 0]                  # first column: the pixel above
    pred[0, 0] = 1 << (precision - 1)
    d = (x - pred) % 65536
    return np.where(d >= 32768, d - 65536, d)


def _categories(diff: np.ndarray) -> np.ndarray:
    mag = np.abs(diff)
    ssss = np.zeros(diff.shape, np.int64)
    nz = mag > 0
    ssss[nz] = np.floor(np.log2(mag[nz])).astype(np.int64) + 1
    return ssss


def _code_lengths(freq: Dict[int, int]) -> Dict[int, int]:
    """Huffman code lengths (<= 16) for symbols with the given counts. A reserved dummy
    symbol (-1) takes the longest code, so no real symbol gets the all-ones code."""
    counts = dict(freq)
    while True:
        items = [(c, i, (s,)) for i, (s, c) in enumerate(sorted(counts.items()))]
        items.append((0, len(items), (-1,)))
        heapq.heapify(items)
        depth = {s: 0 for _, _, group in items for s in group}
        if len(items) == 1:
            depth[items[0][2][0]] = 1
        tie = len(items)
        while len(items) > 1:
            c1, _, g1 = heapq.heappop(items)
            c2, _, g2 = heapq.heappop(items)
            for s in g1 + g2:
                depth[s] += 1
            heapq.heappush(items, (c1 + c2, tie, g1 + g2))
            tie += 1
        if max(depth.values()) <= 16:
            return depth
        counts = {s: c // 2 + 1 for s, c in counts.items()}   # flatten and try again


def _canonical(lengths: Dict[int, int]) -> Tuple[List[int], List[int], Dict[int, Tuple[int, int]]]:
    """BITS (16 counts), HUFFVAL and {symbol: (code, length)}; the dummy is last and unused."""
    order = sorted(lengths, key=lambda s: (lengths[s], s == -1, s))
    codes: Dict[int, Tuple[int, int]] = {}
    code, prev_len = 0, lengths[order[0]]
    for s in order:
        code <<= lengths[s] - prev_len
        prev_len = lengths[s]
        codes[s] = (code, lengths[s])
        code += 1
    real = [s for s in order if s != -1]
    bits = [sum(1 for s in real if lengths[s] == n) for n in range(1, 17)]
    return bits, real, codes


def _pack(values: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate the low ``lengths`` bits of each value (MSB first), pad with 1 bits,
    and stuff a 0x00 after every 0xFF byte."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    start = np.cumsum(lengths) - lengths
    owner = np.repeat(np.arange(len(values)), lengths)
    shift = lengths[owner] - 1 - (np.arange(total) - start[owner])
    bits = ((values[owner] >> shift) & 1).astype(np.uint8)
    pad = (-total) % 8
    bits = np.concatenate([bits, np.ones(pad, np.uint8)])
    data = np.packbits(bits)
    ff = np.nonzero(data == 0xFF)[0]
    if len(ff):
        data = np.insert(data, ff + 1, 0)
    return data.tobytes()


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", marker, len(payload) + 2) + payload


def encode(image: np.ndarray, precision: int = 16) -> bytes:
    """Encode a 2D unsigned integer image (values < 2**precision) as a lossless JPEG.

    image: (rows, cols) uint8/uint16; precision: sample precision P in bits (2..16).
    Returns the JPEG bytes (SOI ... EOI).
    """
    img = np.asarray(image)
    if img.ndim != 2 or img.dtype.kind not in "ui":
        raise ValueError(f"need a 2D unsigned integer image; got {img.dtype} {img.shape}")
    if not 2 <= precision <= 16:
        raise ValueError(f"precision must be 2..16 bits; got {precision}")
    if img.size and (img.min() < 0 or int(img.max()) >= (1 << precision)):
        raise ValueError(f"values must lie in 0..{(1 << precision) - 1} for {precision}-bit "
                         f"precision; got {img.min()}..{img.max()}")
    rows, cols = img.shape
    diff = _differences(img, precision).ravel()
    ssss = _categories(diff).ravel()
    freq = {int(s): int(c) for s, c in enumerate(np.bincount(ssss, minlength=17)) if c}
    bits, huffval, codes = _canonical(_code_lengths(freq))
    code_of = np.zeros(17, np.int64)
    len_of = np.zeros(17, np.int64)
    for s in huffval:
        code_of[s], len_of[s] = codes[s]
    # extra bits: the low SSSS bits of the difference, or of difference - 1 when negative;
    # category 16 (a difference of 32768) has none
    extra_len = np.where(ssss == 16, 0, ssss)
    extra = np.where(diff < 0, diff - 1, diff) & ((np.int64(1) << extra_len) - 1)
    values = (code_of[ssss] << extra_len) | extra
    scan = _pack(values, len_of[ssss] + extra_len)
    out = bytearray(b"\xff\xd8")
    out += _segment(0xFFC3, struct.pack(">BHHB", precision, rows, cols, 1) + bytes([1, 0x11, 0]))
    out += _segment(0xFFC4, bytes([0x00]) + bytes(bits) + bytes(huffval))
    out += _segment(0xFFDA, bytes([1, 1, 0x00, 1, 0, 0]))   # Ns, Cs, Td/Ta, Ss=1, Se, Ah/Al
    out += scan
    out += b"\xff\xd9"
    return bytes(out)
