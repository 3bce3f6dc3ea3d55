"""NRRD files written slice by slice: the header first, then the gzip data as it comes, so a
volume output is never held whole in memory.

NRRD stores its first axis fastest; our arrays are C order (K, J, I[, C]), K slowest, so
slice K of the file is one contiguous run of bytes and slices can be appended in K order.
The file is written to a temporary name in the target's folder and moved into place on
success (core.atomic.atomic_file); on an error nothing is left behind.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Deque, Dict, Iterator, Optional, Sequence, Union

import numpy as np

from ..core.atomic import atomic_file
from . import deflate

_TYPES = {np.dtype(np.uint8): "unsigned char", np.dtype(np.int8): "signed char",
          np.dtype(np.float32): "float", np.dtype(np.int16): "short"}


def _vector(v) -> str:
    return "(" + ",".join(repr(float(x)) for x in v) + ")"    # shortest exact form


def _directions(rows) -> str:
    """'space directions' value: one (x,y,z) per axis, 'none' for a non-spatial axis."""
    return " ".join("none" if np.isnan(np.asarray(r, float)).any() else _vector(r) for r in rows)


def nrrd_header(shape_c: Sequence[int], dtype, fields: Dict[str, object], *,
                encoding: str = "gzip") -> bytes:
    """A NRRD0005 header for a C-order array of ``shape_c`` and ``dtype``.

    fields: 'space' (str), 'space origin' (3), 'space directions' (one row per NRRD axis,
    NaN rows for list/vector axes), 'kinds' (list), and any other key: value pairs
    (written as ``key:=value``, NRRD's key/value syntax)."""
    dt = np.dtype(dtype)
    if dt not in _TYPES:
        raise ValueError(f"no NRRD type for {dt}")
    lines = ["NRRD0005", "# written by EPDSegmentation (streamed)", f"type: {_TYPES[dt]}",
             f"dimension: {len(shape_c)}", "space: " + str(fields["space"]),
             "sizes: " + " ".join(str(int(n)) for n in reversed(tuple(shape_c))),
             "space directions: " + _directions(fields["space directions"]),
             "kinds: " + " ".join(fields["kinds"])]
    if dt.itemsize > 1:
        lines.append("endian: little")
    lines += [f"encoding: {encoding}", "space origin: " + _vector(fields["space origin"])]
    standard = {"space", "space origin", "space directions", "kinds", "type", "encoding",
                "dimension", "sizes", "endian"}
    for key, value in fields.items():
        if key not in standard:
            text = str(value)
            if "\n" in text or ":=" in key:
                raise ValueError(f"NRRD key/value {key!r} cannot hold a newline or ':='")
            lines.append(f"{key}:={text}")
    return ("\n".join(lines) + "\n\n").encode("latin-1")


class SliceWriter:
    """Appends slices (the trailing shape given at open) of one dtype to an open NRRD file.

    The gzip compression (io.deflate: ISA-L when installed, else zlib; at the level it
    chooses unless ``level``) runs in a thread of its own, in order, while the caller goes
    on (both release the GIL): on two cores it measured as the largest single step of a
    streamed ``segment`` at factor 4 (docs/benchmarks.md). At most MAX_PENDING slices wait
    to be compressed; an error in the thread comes back from the next write or finish."""

    #: slices queued for compression at most (bounds the memory held: one slab's worth)
    MAX_PENDING = 16

    def __init__(self, fh, slice_shape: Sequence[int], dtype, n_slices: int,
                 level: Optional[int] = None, gzip_backend: Optional[str] = None):
        self._fh = fh
        self._shape = tuple(int(n) for n in slice_shape)
        self._dtype = np.dtype(dtype).newbyteorder("<")
        self._left = int(n_slices)
        self._zip = deflate.compressor(gzip_backend, level)
        self._blank: Optional[bytes] = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nrrd-gzip")
        self._pending: Deque = deque()

    def _compress(self, data: bytes) -> None:
        self._pending.append(self._pool.submit(self._zip.compress, data))
        while len(self._pending) > self.MAX_PENDING:
            self._fh.write(self._pending.popleft().result())

    def _drain(self) -> None:
        while self._pending:
            self._fh.write(self._pending.popleft().result())

    def write(self, slices: np.ndarray, *, frozen: bool = False) -> None:
        """Append (n,) + slice_shape values, in K order. Copied, since the caller may change
        the array after, unless ``frozen``: the caller will not, and the thread compresses
        the array itself when it is in order already (a slab's outputs: no copy, no
        allocation per slice)."""
        a = np.asarray(slices)
        if a.shape[1:] != self._shape or a.shape[0] > self._left:
            raise ValueError(f"slices {a.shape} do not fit: (n <= {self._left},) + "
                             f"{self._shape} expected")
        if not (frozen and a.dtype == self._dtype and a.flags.c_contiguous):
            # one copy, reordered on the way
            a = np.array(a, self._dtype, order="C", copy=True)
        self._compress(memoryview(a).cast("B"))     # any contiguous buffer; keeps ``a``
        self._left -= a.shape[0]

    def fill(self, n: int, value=0) -> None:
        """Append n slices holding ``value`` (slices not segmented)."""
        if n <= 0:
            return
        if self._blank is None or self._blank_value != value:
            self._blank = np.full(self._shape, value, self._dtype).tobytes()
            self._blank_value = value
        for _ in range(n):
            if self._left <= 0:
                raise ValueError("more slices than the file holds")
            self._compress(self._blank)
            self._left -= 1

    def finish(self) -> None:
        if self._left:
            raise ValueError(f"{self._left} slice(s) were never written")
        self._drain()
        self._fh.write(self._zip.flush())

    def close(self) -> None:
        """Stop the compression thread (after finish, or on an error: what is queued is
        dropped with the temporary file)."""
        for job in self._pending:
            job.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()


@contextmanager
def nrrd_slices(path: Union[str, Path], shape_c: Sequence[int], dtype, fields: Dict[str, object],
                *, overwrite: bool = False, level: Optional[int] = None,
                gzip_backend: Optional[str] = None) -> Iterator[SliceWriter]:
    """Open ``path`` for a NRRD of C-order ``shape_c`` (K first) written slice by slice::

        with nrrd_slices(path, (K, J, I), np.uint8, fields) as out:
            out.write(labels_of_some_slices); out.fill(3)   # ... K slices in all

    Atomic: the file appears at ``path`` only when every slice was written. level,
    gzip_backend: io.deflate's (default: ISA-L when installed, at its chosen level)."""
    with atomic_file(path, overwrite) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(nrrd_header(shape_c, dtype, fields))
            writer = SliceWriter(fh, shape_c[1:], dtype, shape_c[0], level, gzip_backend)
            try:
                yield writer
                writer.finish()
            finally:
                writer.close()
