"""The C heap under a streamed run: give freed memory back to the system after each slab
(the default, for a process we share, such as Slicer's), or keep it for the next slab and
give it back only when the process has grown (a process of our own, ``epdseg``). glibc
only (Linux); elsewhere both do nothing.

Why it matters (docs/benchmarks.md, "The C heap"): by default glibc maps every block over
its threshold (128 KiB, rising to at most 32 MiB as blocks are freed) afresh from the
system and unmaps it when freed, so the network's activations, the window channels and
the restored planes are page-faulted and zeroed by the kernel on every batch. At factor 2
that was 1.1 to 1.2 million page faults and 2.2 s of system time for 48 slices of
512 x 512, a third of the run's CPU time; the network alone ran half as fast.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
#: Blocks below this come from the heap and are reused when freed (a slab's largest
#: buffers are about 100 MiB at 512 x 512).
KEEP_BLOCKS_BYTES = 512 * 2**20
#: Free memory at the heap's top kept rather than returned.
KEEP_TOP_BYTES = 1024 * 2**20
#: Kept memory is given back once the resident size exceeds this multiple of its peak
#: over a stream's first REFERENCE_SLABS slabs: one arena's free blocks fragment, and a
#: long scan's resident size crept up by about 50 MiB every few hundred slices.
GROWTH_LIMIT = 1.2
REFERENCE_SLABS = 4

_LIBC: List[Any] = []
_STATE: Dict[str, Any] = {"keeping": False, "slabs": 0, "peak": 0}


def _libc():
    if not _LIBC:
        libc = None
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt, libc.malloc_trim       # glibc, not musl
            except (OSError, AttributeError):
                libc = None
        _LIBC.append(libc)
    return _LIBC[0]


def resident_bytes() -> int:
    """This process's resident memory in bytes (Linux /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def keep_freed_memory() -> bool:
    """For a process of our own: one malloc arena for all threads (the network, the slab
    worker, the reader, the gzip threads), every block up to KEEP_BLOCKS_BYTES from it, and
    freed memory kept for reuse; ``trim_heap`` then gives it back only when the resident
    size has grown past GROWTH_LIMIT times the stream's early peak. Returns whether glibc
    took all three settings. Not for Slicer's process: the settings hold for the rest of
    the process and for everything else in it."""
    libc = _libc()
    if libc is None:
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, KEEP_BLOCKS_BYTES),
        (M_TRIM_THRESHOLD, KEEP_TOP_BYTES)))
    _STATE["keeping"] = ok
    return ok


def start_stream() -> None:
    """A new stream of slabs: its first slabs set the resident size trim_heap holds to."""
    _STATE.update(slabs=0, peak=0)


def trim_heap() -> bool:
    """After each slab: give the C heap's free pages back to the system (glibc's
    malloc_trim), or, under keep_freed_memory, only when the resident size exceeds
    GROWTH_LIMIT times its peak over the stream's first REFERENCE_SLABS slabs. Returns
    whether it trimmed.

    With the slab worker, the read-ahead and the gzip threads each allocating in an arena
    of its own, glibc kept the freed slab buffers resident: a 600-slice run's RSS grew by
    about 1 MiB a slice, to 800 MiB where the code without threads stayed at 250; trimmed
    after each slab it stays flat (docs/benchmarks.md)."""
    libc = _libc()
    if libc is None:
        return False
    if _STATE["keeping"]:
        _STATE["slabs"] += 1
        rss = resident_bytes()
        if _STATE["slabs"] <= REFERENCE_SLABS:
            _STATE["peak"] = max(_STATE["peak"], rss)
            return False
        if rss <= GROWTH_LIMIT * _STATE["peak"]:
            return False
    libc.malloc_trim(0)
    return True
