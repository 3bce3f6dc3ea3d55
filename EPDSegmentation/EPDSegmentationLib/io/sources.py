"""CT volumes read a slab of slices at a time, so that ``epdseg segment`` never holds a whole
scan: ``open_volume`` is read_volume's streaming twin.

A source has the volume's ``shape`` (K, J, I), ``ijk_to_ras`` (4, 4, RAS mm), ``meta`` (as
read_volume's), ``hu_range`` (min, max HU over every voxel) and ``source[slices]``: the
float32 HU (n, J, I) of the listed slices. Opening reads the whole file once, a slab at a
time, to make every check read_volume makes (sheared axes, NaN or infinity in a NIfTI, a
mask or label map, DICOM decoding, padding), with the same messages, and to find the HU
range for the CT check; nothing the size of the scan is kept. With ``defer_checks`` the
checks ride along with the slices read instead and ``complete_checks()`` concludes them, so
a forward pass reads each slice once (``segment``). Reading slices in ascending
order (as core.stream does) moves forward through the file: raw data is read at its offset,
gzip data is decompressed sequentially (a step back restarts the decompression). The last
slab read is kept, so the stream's predictor and its statistics read each slab once.

Where each format's data lies:
- NIfTI-1/-2 (.nii, .nii.gz): after the header at vox_offset, scaled by scl_slope and
  scl_inter as ITK does;
- NRRD (.nrrd, .nhdr with one data file): raw or gzip encoding after the header (line skip
  0, byte skip >= 0, or -1 for raw);
- DICOM: one file per slice, decoded as read_dicom decodes it (io.dicom.slice_hu).
The geometry of NIfTI and NRRD comes from SimpleITK's header reading (no pixels), through
the conversion read_itk uses (images.itk_geometry), so both readers place a volume alike.
Any other layout (ASCII or bzip2 NRRD, several data files, vector images, unusual NIfTI
types) is read whole through read_volume (``WholeSource``): correct, not bounded.
"""

from __future__ import annotations

import gzip
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.atomic import extension
from ..core.volume import Volume
from . import deflate
from .dicom import dicom_series, slice_hu
from .errors import InputError
from .images import itk_error, itk_geometry
from .readers import (_check_axes, input_kind, looks_like_mask, mask_error, nifti_header,
                      nonfinite_error, read_volume)

#: slices per read while checking a file at open (float32: 16 x 512 x 512 x 4 = 16 MiB)
CHECK_SLICES = 16


class VolumeSource:
    """A volume read by slices: ``shape`` (K, J, I), ``ijk_to_ras``, ``meta``, ``hu_range``;
    ``source[slices]`` -> float32 HU (n, J, I), the last one kept (the same array comes
    back for the same list: read it, do not write into it). Subclasses define
    ``_read(k0, n)``: slices k0..k0+n-1 as float32 HU."""

    dtype = np.dtype(np.float32)

    def __init__(self, shape: Tuple[int, int, int], ijk_to_ras, meta: dict):
        self.shape = tuple(int(n) for n in shape)
        self.ijk_to_ras = np.asarray(ijk_to_ras, np.float64)
        self.meta = meta
        self.hu_range: Tuple[float, float] = (float("nan"), float("nan"))
        self._last: Optional[Tuple[Tuple[int, ...], np.ndarray]] = None
        self._ahead: Optional[Tuple[Tuple[int, ...], Future]] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        # the checks opening makes, while they are still to be completed (open_volume's
        # defer_checks): a _Checks, the slices not yet seen, and the final verdict
        self._checks: Optional["_Checks"] = None
        self._unchecked: Optional[np.ndarray] = None
        self._verdict = None

    # the geometry read as Volume gives it
    spacing = Volume.spacing
    origin = Volume.origin
    directions = Volume.directions
    pixel_area_mm2 = Volume.pixel_area_mm2

    @property
    def ndim(self) -> int:
        return 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, slices) -> np.ndarray:
        """float32 HU (n, J, I) of the slices listed (a list, range or one int)."""
        ks = [int(slices)] if np.ndim(slices) == 0 else [int(k) for k in slices]
        key = tuple(ks)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        out = self._wait_ahead(key)
        if out is None:
            out = self._gather(ks)
        if np.ndim(slices) == 0:
            return out[0]
        self._last = (key, out)
        return out

    def prefetch(self, slices) -> None:
        """Start reading the slices listed in a thread of its own, so that decompressing
        the next slab overlaps the network's work on this one (core.stream calls it);
        ``source[slices]`` then takes what it read. One read at a time: any access waits
        for it first."""
        ks = [int(k) for k in slices]
        if not ks:
            return
        self._wait_ahead(None)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epd-read")
        self._ahead = (tuple(ks), self._pool.submit(self._gather, ks))

    def _wait_ahead(self, key):
        """The slices read ahead if they are the ones listed in ``key``, else None; either
        way the read has ended (one read of the file at a time). Its error comes back only
        with the slices it was reading."""
        if self._ahead is None:
            return None
        ahead, job = self._ahead
        self._ahead = None
        if ahead == key:
            return job.result()
        try:
            job.result()
        except Exception:               # noqa: BLE001 - nobody asked for those slices
            pass
        return None

    def _gather(self, ks: List[int]) -> np.ndarray:
        bad = [k for k in ks if not 0 <= k < self.shape[0]]
        if bad:
            raise IndexError(f"slice {bad[0]} outside 0..{self.shape[0] - 1}")
        out = np.empty((len(ks),) + self.shape[1:], np.float32)
        order = np.argsort(ks, kind="stable")
        i = 0
        while i < len(ks):      # runs of consecutive slices, in file order
            j = i + 1
            while j < len(ks) and ks[order[j]] == ks[order[j - 1]] + 1:
                j += 1
            out[order[i:j]] = self._read(ks[order[i]], j - i)
            i = j
        return out

    def _read(self, k0: int, n: int) -> np.ndarray:
        raise NotImplementedError

    def _check_read(self, k0: int, n: int) -> None:
        """Read slices k0..k0+n-1 only to check them (complete_checks)."""
        self._read(k0, n)

    def _new_slices(self, k0: int, n: int) -> Optional[slice]:
        """The part of k0..k0+n-1 (relative to k0) not yet checked, marking it checked; None
        when the checks are complete. Slices are read forward, so that part is a run."""
        if self._unchecked is None:
            return None
        new = np.flatnonzero(self._unchecked[k0:k0 + n])
        if not new.size:
            return None
        self._unchecked[k0 + new] = False
        return slice(int(new[0]), int(new[-1]) + 1)

    def complete_checks(self) -> None:
        """Make the checks opening makes (read_volume's: NaN or infinity in a NIfTI, a mask,
        DICOM decoding and padding) on the slices not read yet, and their verdict on the
        whole volume: InputError with read_volume's message, else ``hu_range`` (and the
        DICOM meta that come with the pixels) are set. A no-op once done; open_volume makes
        them at once unless told to defer them, so that ``segment`` reads each slice once
        (the checks ride along with the stream) and completes them at the end."""
        if self._verdict is None and self._unchecked is not None:
            self._wait_ahead(None)          # one read of the file at a time
            todo = np.flatnonzero(self._unchecked)
            # runs of unchecked slices, CHECK_SLICES at most each
            starts = todo[np.r_[True, np.diff(todo) > 1]] if todo.size else todo
            for k in starts:
                end = int(k)
                while end < self.shape[0] and self._unchecked[end]:
                    end += 1
                for k0 in range(int(k), end, CHECK_SLICES):
                    self._check_read(k0, min(CHECK_SLICES, end - k0))
            self._verdict = self._conclude()
            self._unchecked = None
        if isinstance(self._verdict, Exception):
            raise self._verdict

    def _conclude(self):
        """The checks' verdict once every slice was seen: an InputError, or None (sets
        hu_range and meta)."""
        return None

    def read_all(self) -> Volume:
        """The whole volume in memory, as read_volume returns it."""
        return Volume(self._gather(list(range(self.shape[0]))), self.ijk_to_ras.copy(),
                      dict(self.meta))

    def close(self) -> None:
        self._wait_ahead(None)              # a read in flight ends before the file closes
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._last = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WholeSource(VolumeSource):
    """A Volume already in memory, seen as a source (the cohort's volume; layouts the
    streamed readers do not cover)."""

    def __init__(self, volume: Volume):
        super().__init__(volume.array.shape, volume.ijk_to_ras, volume.meta)
        self.volume = volume
        arr = np.asarray(volume.array)
        if arr.size:
            self.hu_range = (float(np.min(arr)), float(np.max(arr)))

    def _read(self, k0: int, n: int) -> np.ndarray:
        return self.volume.array[k0:k0 + n]

    def prefetch(self, slices) -> None:
        """Nothing to read ahead: the volume is in memory."""

    def __getitem__(self, slices) -> np.ndarray:
        arr = self.volume.array
        return np.asarray(arr[slices] if np.ndim(slices) == 0 else arr[list(slices)],
                          np.float32)


class _Checks:
    """What opening a file learns slab by slab: non-finite count, HU range, and the stored
    values' range and distinct values (only while they could still be a mask)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.nonfinite = 0
        self.lo: List[float] = []
        self.hi: List[float] = []
        self.stored_lo = self.stored_hi = None
        self.values: Optional[np.ndarray] = np.array([], np.int64) if kind in "iu" else None

    def add(self, stored: Optional[np.ndarray], hu: Optional[np.ndarray]) -> None:
        """One slab: the stored values (None for DICOM) and their HU (None for integers
        stored unscaled: their HU range is their own range, converted once)."""
        if hu is not None and hu.size:
            self.nonfinite += int(hu.size - np.count_nonzero(np.isfinite(hu)))
            self.lo.append(np.min(hu))
            self.hi.append(np.max(hu))
        if stored is None or self.kind not in "iu" or stored.size == 0:
            return
        lo, hi = stored.min(), stored.max()
        if hu is None:      # float32 is monotonic: min(float32(x)) == float32(min(x))
            self.lo.append(np.float32(lo))
            self.hi.append(np.float32(hi))
        self.stored_lo = lo if self.stored_lo is None else min(self.stored_lo, lo)
        self.stored_hi = hi if self.stored_hi is None else max(self.stored_hi, hi)
        if self.values is not None:
            if looks_like_mask(self.kind, self.stored_lo, self.stored_hi, 0):
                self.values = np.union1d(self.values, np.unique(stored))
                if len(self.values) > 64:
                    self.values = None
            else:
                self.values = None

    def hu_range(self) -> Tuple[float, float]:
        # np.min/max propagate NaN, as they do over a whole volume
        return (float(np.min(self.lo)), float(np.max(self.hi))) if self.lo else \
            (float("nan"), float("nan"))


# ----------------------------------------------------------------------------- NIfTI, NRRD

_NIFTI_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2",
                768: "u4", 1024: "i8", 1280: "u8"}
#: NRRD's type names (with the spec's aliases) -> NumPy
_NRRD_TYPES = {name: code for code, names in {
    "i1": ("signed char", "int8", "int8_t"),
    "u1": ("uchar", "unsigned char", "uint8", "uint8_t"),
    "i2": ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    "u2": ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    "i4": ("int", "signed int", "int32", "int32_t"),
    "u4": ("uint", "unsigned int", "uint32", "uint32_t"),
    "i8": ("longlong", "long long", "long long int", "signed long long",
           "signed long long int", "int64", "int64_t"),
    "u8": ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    "f4": ("float",), "f8": ("double",)}.items() for name in names}


def _nifti_layout(path: Path):
    """(data file, offset of the data stream in it, gzip?, offset of the voxels in the
    (decompressed) stream, stored dtype, (slope, intercept) or None, voxel count) of a
    NIfTI file, or None for what the streamed reader does not cover."""
    is_gz = path.name.lower().endswith(".gz")
    with (gzip.open if is_gz else open)(path, "rb") as fh:
        header = nifti_header(fh.read(540))
    if header is None:
        return None
    end, size, dims, code, offset, slope, inter = header
    if code not in _NIFTI_TYPES or not 1 <= dims[0] <= 7:
        return None
    count = int(np.prod(dims[1:dims[0] + 1]))
    # ITK applies the scaling unless the slope is 0 (unset) or it is the identity
    scale = (slope, inter) if slope != 0 and (slope != 1 or inter != 0) else None
    return path, 0, is_gz, max(offset, size), np.dtype(end + _NIFTI_TYPES[code]), scale, count


def _nrrd_layout(path: Path):
    """_nifti_layout's tuple for a NRRD file (no scaling), or None for what the streamed
    reader does not cover."""
    import nrrd

    try:
        with open(path, "rb") as fh:
            header = nrrd.read_header(fh)
            offset = fh.tell()
    except Exception:       # let read_volume say what is wrong
        return None
    encoding = header.get("encoding", "")
    kinds = header.get("kinds", ["domain"] * int(header.get("dimension", 0)))
    if encoding not in ("raw", "gzip", "gz") or int(header.get("line skip", 0)) != 0 \
            or header.get("type") not in _NRRD_TYPES \
            or any(k not in ("domain", "space") for k in kinds):
        return None
    dtype = np.dtype(_NRRD_TYPES[header["type"]])
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<" if header.get("endian", "little") == "little" else ">")
    data_file = header.get("data file")
    if data_file is not None:
        if not isinstance(data_file, str) or " " in data_file.strip() \
                or data_file.strip().upper() == "LIST":
            return None
        target = Path(data_file.strip())
        path = target if target.is_absolute() else Path(path).parent / target
        offset = 0
    skip = int(header.get("byte skip", 0))
    n = int(np.prod(header["sizes"])) * dtype.itemsize
    gz = encoding != "raw"
    if skip == -1 and not gz:
        offset, skip = path.stat().st_size - n, 0
    elif skip < 0:
        return None
    # byte skip counts in the decompressed data for gzip (the NRRD format's rule)
    return path, offset, gz, skip, dtype, None, n // dtype.itemsize


class FileSource(VolumeSource):
    """A NIfTI or NRRD file read slab by slab at its data offset (raw or gzip)."""

    def __init__(self, path: Path, shape, ijk_to_ras, meta: dict, layout):
        super().__init__(shape, ijk_to_ras, meta)
        self.path = path
        (self._data, self._file_offset, self._gz, self._offset, self._stored,
         self._scale) = layout
        self._fh = self._raw = None
        self._slice_bytes = int(np.prod(self.shape[1:])) * self._stored.itemsize

    def _seek(self, pos: int):
        """The data stream positioned at ``pos`` bytes into it. gzip data starts after the
        header (NRRD) or at the file's start (.nii.gz) and is read forward; a step back
        opens it again rather than letting GzipFile rewind to the file's start."""
        if self._fh is not None and self._gz and pos < self._fh.tell():
            self._close_files()
        if self._fh is None:
            raw = open(self._data, "rb")
            if self._gz:
                raw.seek(self._file_offset)
                self._fh = deflate.reader(raw)
                self._raw = raw
            else:
                self._fh = raw
        self._fh.seek(pos if self._gz else self._file_offset + pos)
        return self._fh

    def read_stored(self, k0: int, n: int) -> np.ndarray:
        """Slices k0..k0+n-1 as stored in the file (n, J, I); InputError if the data ends
        early or does not decompress."""
        want = n * self._slice_bytes
        try:
            buf = self._seek(self._offset + k0 * self._slice_bytes).read(want)
        except (OSError, EOFError) + deflate.ERRORS as exc:
            raise InputError(self.path, f"cannot be read as a {extension(self.path)} image "
                                        f"(corrupt or not that format): {exc}") from None
        if len(buf) != want:
            raise InputError(self.path, f"cannot be read as a {extension(self.path)} image "
                                        f"(corrupt or not that format): the data ends "
                                        f"within slice {k0 + len(buf) // self._slice_bytes}"
                                        f" of {self.shape[0]}")
        return np.frombuffer(buf, self._stored).reshape((n,) + self.shape[1:])

    def to_hu(self, stored: np.ndarray) -> np.ndarray:
        """Stored values -> float32 HU, as read_volume converts them (ITK's NIfTI scaling)."""
        if self._scale is None:
            return stored.astype(np.float32)
        slope, inter = self._scale
        return (stored.astype(np.float64) * slope + inter).astype(np.float32)

    def _read(self, k0: int, n: int) -> np.ndarray:
        stored = self.read_stored(k0, n)
        hu = self.to_hu(stored)
        self._check(stored, hu, k0, n)
        return hu

    def _check_read(self, k0: int, n: int) -> None:
        stored = self.read_stored(k0, n)
        self._check(stored, None, k0, n)

    def _check(self, stored: np.ndarray, hu: Optional[np.ndarray], k0: int, n: int) -> None:
        """Add the slices not checked yet to the checks (integers unscaled: their own range;
        else their HU, converted here unless given)."""
        new = self._new_slices(k0, n)
        if new is None:
            return
        if self._checks.kind in "iu":
            self._checks.add(stored[new], None)
        else:
            self._checks.add(stored[new], (self.to_hu(stored) if hu is None else hu)[new])

    def _conclude(self):
        checks = self._checks
        if self.meta["format"] == "nifti" and checks.nonfinite:
            return nonfinite_error(self.path, checks.nonfinite)
        if checks.values is not None and checks.stored_lo is not None and \
                looks_like_mask(checks.kind, checks.stored_lo, checks.stored_hi,
                                len(checks.values)):
            return mask_error(self.path, len(checks.values), checks.stored_lo,
                              checks.stored_hi)
        self.hu_range = checks.hu_range()
        return None

    def close(self) -> None:
        super().close()
        self._close_files()

    def _close_files(self) -> None:
        for fh in (self._fh, self._raw):
            if fh is not None:
                fh.close()
        self._fh = self._raw = None


def _open_image(path: Path) -> VolumeSource:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise itk_error(path, exc) from None
    shape, m = itk_geometry(reader.GetDimension(), reader.GetNumberOfComponents(),
                            reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(),
                            reader.GetDirection(), path)
    nifti = extension(path).startswith(".nii")
    layout = _nifti_layout(path) if nifti else _nrrd_layout(path)
    if layout is None or layout[6] != int(np.prod(shape)):
        return WholeSource(read_volume(path))
    layout = layout[:6]
    _check_axes(m, path)
    stored, scale = layout[4], layout[5]
    # the pixel type ITK reports: the stored one, or float when NIfTI scaling applies
    dtype = np.dtype(stored.str[1:]) if scale is None else \
        np.dtype(np.float64 if stored == np.float64 else np.float32)
    meta = {"source": str(path), "format": "nifti" if nifti else "nrrd",
            "dtype": dtype.name,
            "header": {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()},
            "modality": "CT", "series_uid": None}
    src = FileSource(path, shape, m, meta, layout)
    src._checks = _Checks(dtype.kind)
    src._unchecked = np.ones(shape[0], bool)
    return src


# ----------------------------------------------------------------------------- DICOM


class DicomSource(VolumeSource):
    """A DICOM series read one file per slice (the headers are kept, the pixels not)."""

    def __init__(self, path: Path, series_uid: Optional[str]):
        items, (rows, cols), m, meta = dicom_series(path, series_uid)
        super().__init__((len(items), rows, cols), m, meta)
        self._files = [f for f, _ in items]

    def slice(self, k: int):
        """(HU (J, I) float32, padding pixels, transfer syntax) of slice k, read from its
        file afresh so that no decoded pixels stay with the kept headers."""
        import pydicom

        f = self._files[k]
        try:
            ds = pydicom.dcmread(f)
        except OSError as exc:
            raise InputError(f, f"cannot be read ({exc.strerror or type(exc).__name__}); "
                                f"check its permissions") from None
        except Exception as exc:
            raise InputError(f, f"corrupt DICOM file: {type(exc).__name__}: {exc}") from None
        return slice_hu(f, ds, *self.shape[1:])

    def _read(self, k0: int, n: int) -> np.ndarray:
        out = []
        for k in range(k0, k0 + n):
            hu, n_pad, syntax = self.slice(k)
            if self._new_slices(k, 1) is not None:
                self._checks.add(None, hu)
                self._syntaxes.add(syntax)
                self._padded += n_pad
            out.append(hu)
        return np.stack(out)

    def _conclude(self):
        self.meta.update(transfer_syntaxes=sorted(self._syntaxes), padding_voxels=self._padded)
        self.hu_range = self._checks.hu_range()
        return None


def _open_dicom(path: Path, series_uid: Optional[str]) -> DicomSource:
    src = DicomSource(path, series_uid)
    src._checks = _Checks("f")
    src._syntaxes, src._padded = set(), 0
    src._unchecked = np.ones(src.shape[0], bool)
    return src


def open_volume(path: Union[str, Path], series_uid: Optional[str] = None, *,
                defer_checks: bool = False) -> VolumeSource:
    """read_volume's streaming twin: a VolumeSource for a DICOM series folder or file,
    NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .nhdr), checked as read_volume checks (the same
    InputError messages), holding one slab at a time. Close it (or use ``with``) to
    release the file.

    defer_checks: do not read the file to check it now; the checks ride along with the
    slices read, and ``complete_checks()`` reads the rest and gives the verdict (and
    ``hu_range``). ``segment`` reads each slice once this way (docs/benchmarks.md: a
    JPEG 2000 series decoded twice cost twice the network at factor 2); errors found while
    reading come as they would at opening, the whole-volume ones at the end."""
    path = Path(path)
    src = _open_dicom(path, series_uid) if input_kind(path) == "dicom" else _open_image(path)
    if not defer_checks:
        try:
            src.complete_checks()
        except BaseException:
            src.close()
            raise
    return src


def as_source(volume: Union[Volume, VolumeSource]) -> VolumeSource:
    """A Volume in memory as a source; a source as it is."""
    return volume if isinstance(volume, VolumeSource) else WholeSource(volume)


def slab_ranges(n: int, size: int) -> List[Sequence[int]]:
    """range objects of ``size`` slices covering 0..n-1."""
    return [range(k, min(k + size, n)) for k in range(0, n, size)]
