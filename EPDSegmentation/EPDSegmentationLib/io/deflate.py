"""gzip streams for the streamed readers and writers: Intel's ISA-L (the ``isal`` package)
when it is installed, else Python's zlib.

Both write and read the same format (RFC 1952 gzip, what NRRD's "gzip" encoding and .nii.gz
are), so a file written with one reads with the other, with Slicer's, ITK's or pynrrd's
readers. ISA-L is several times faster at the same ratio (docs/benchmarks.md, "gzip"): on
two cores the compression of the .seg.nrrd outputs was the largest step of a streamed
``segment`` beside the network. ``requirements.txt`` installs it; inside Slicer, where it
may be missing, zlib serves, slower.
"""

from __future__ import annotations

import gzip
import zlib
from typing import Any, Optional, Tuple

try:                                                    # optional: see the docstring
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal_zlib
except ImportError:                                     # pragma: no cover - depends on the install
    _igzip = _isal_zlib = None

#: The compression levels of the streamed outputs, chosen by measurement (docs/benchmarks.md,
#: "gzip"): ISA-L's level 1 (its levels are 0..3; 0 wrote a fifth more bytes, 3 took 6
#: times as long for none fewer) and zlib's level 1; zlib's 9 (pynrrd's default) took 100
#: times as long as ISA-L's 1 for a quarter fewer bytes.
LEVELS = {"isal": 1, "zlib": 1}

#: What a corrupt gzip stream raises, with either backend (besides OSError and EOFError).
ERRORS: Tuple[type, ...] = (zlib.error,) + ((_isal_zlib.error,) if _isal_zlib is not None
                                            and _isal_zlib.error is not zlib.error else ())


def backend(name: Optional[str] = None) -> str:
    """The backend to use: ``name`` ("isal" or "zlib") if given and available, else isal
    when installed, else zlib. ValueError for an unknown or missing one asked by name."""
    if name is None:
        return "isal" if _isal_zlib is not None else "zlib"
    if name not in LEVELS:
        raise ValueError(f"unknown gzip backend {name!r}; expected one of {sorted(LEVELS)}")
    if name == "isal" and _isal_zlib is None:
        raise ValueError("the gzip backend 'isal' is not installed (pip install isal)")
    return name


def compressor(name: Optional[str] = None, level: Optional[int] = None) -> Any:
    """A gzip-framed compress object (``compress(bytes)``, ``flush()``) of ``backend(name)``
    at ``level`` (default LEVELS[backend]). Both release the GIL while compressing."""
    which = backend(name)
    module = _isal_zlib if which == "isal" else zlib
    lvl = LEVELS[which] if level is None else int(level)
    return module.compressobj(lvl, module.DEFLATED, zlib.MAX_WBITS | 16)


def reader(fileobj, name: Optional[str] = None) -> Any:
    """A file object decompressing the gzip stream of the binary ``fileobj`` (positioned at
    the stream's start), read forward (seeking back rereads from the start)."""
    if backend(name) == "isal":
        return _igzip.GzipFile(fileobj=fileobj, mode="rb")
    return gzip.GzipFile(fileobj=fileobj, mode="rb")
