"""core.heap: freed memory kept for reuse in a process of our own (epdseg), given back after
each slab otherwise. Each case runs in a fresh interpreter: the settings hold for the rest of
a process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from EPDSegmentationLib.core import heap
kept = heap.keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
block = 64 * 2**20 // 8          # 64 MiB: above glibc's largest default mmap threshold
a = np.ones(block); held = rss(); del a; heap.trim_heap()
given_back = held - rss()
before = faults()
for _ in range(3):                # a slab's buffer made and freed again, three times
    a = np.ones(block); del a; heap.trim_heap()
print(json.dumps({"kept": kept, "given_back": given_back, "faults": faults() - before}))
"""


def _faults(mode: str, repo_root) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode,
                           str(repo_root / "EPDSegmentation")],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_kept_memory_is_reused_without_faulting_it_in_again(repo_root):
    """By default a freed 64 MiB buffer goes back to the system (and the next one is mapped
    and faulted in afresh); with keep_freed_memory it stays resident and the next buffers
    reuse it, faulting in almost nothing (with 4 KiB pages, 16384 faults a buffer)."""
    trim = _faults("trim", repo_root)
    keep = _faults("keep", repo_root)
    if keep["kept"] is False:
        pytest.skip("not glibc: mallopt is not there")
    mib = 2**20
    assert trim["given_back"] > 48 * mib
    assert keep["kept"] is True and keep["given_back"] < 8 * mib
    assert keep["faults"] < 3 * 64 * mib // 4096 // 20


GROWTH = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from EPDSegmentationLib.core import heap
if not heap.keep_freed_memory():
    print(json.dumps(None)); sys.exit()
heap.start_stream()
early = [heap.trim_heap() for _ in range(heap.REFERENCE_SLABS)]   # the reference slabs
small = heap.trim_heap()                    # nothing has grown: kept
peak = heap._STATE["peak"]
a = np.ones(int(peak * (heap.GROWTH_LIMIT - 1) / 8) + 32 * 2**20)   # grown past the limit
del a
before = heap.resident_bytes()
grown = heap.trim_heap()
print(json.dumps({"early": early, "small": small, "grown": grown,
                  "given_back": before - heap.resident_bytes()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_kept_memory_is_given_back_once_the_process_has_grown(repo_root):
    """Under keep_freed_memory the first slabs set the reference; a slab that leaves the
    resident size above GROWTH_LIMIT times it is trimmed, and the memory goes back."""
    done = subprocess.run([sys.executable, "-c", GROWTH, str(repo_root / "EPDSegmentation")],
                          capture_output=True, text=True, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    if got is None:
        pytest.skip("not glibc: mallopt is not there")
    assert got["early"] == [False] * 4 and got["small"] is False
    assert got["grown"] is True and got["given_back"] > 32 * 2**20
