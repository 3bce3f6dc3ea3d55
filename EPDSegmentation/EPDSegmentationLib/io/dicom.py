"""CT DICOM: reading a series (folder or single file) into HU with geometry, and writing one.

Reading: every file in the folder (and below) is tried as DICOM; files that are not DICOM are
skipped, DICOM files that are damaged are an error. Files are grouped by SeriesInstanceUID;
several series need ``series_uid``. A series must be CT (modality), carry a rescale slope and
intercept, share one orientation, size and pixel spacing, and have evenly spaced slices
(gaps that are a multiple of the spacing are reported as missing slices). Slices are
sorted by position along the slice normal. Compressed transfer syntaxes decode through
pydicom's plugins (pylibjpeg-openjpeg for JPEG 2000, pylibjpeg-libjpeg for JPEG lossless,
pyjpegls for JPEG-LS, RLE natively).

Writing: a valid CT Image Storage series (one file per slice) with rescale, pixel spacing,
image position and orientation and fresh UIDs, uncompressed or losslessly compressed.
"""

from __future__ import annotations

import datetime
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from ..core.volume import Volume
from ..core.atomic import atomic_folder
from .errors import InputError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
DICOMDIR_SOP = "1.2.840.10008.1.3.10"
#: image storage classes that must carry pixel data (CT, enhanced CT, MR, PET, CR/DX, US, SC)
IMAGE_SOP_CLASSES = {CT_IMAGE_STORAGE, ENHANCED_CT_STORAGE, "1.2.840.10008.5.1.4.1.1.4",
                     "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.1",
                     "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.6.1",
                     "1.2.840.10008.5.1.4.1.1.7"}
FLIP = np.diag([-1.0, -1.0, 1.0])

#: transfer syntaxes the writer can produce
TRANSFER_SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",       # Explicit VR Little Endian
    "jpeg2000": "1.2.840.10008.1.2.4.90",    # JPEG 2000 Image Compression (Lossless Only)
    "jpeg-lossless": "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (SV1)
    "jpegls": "1.2.840.10008.1.2.4.80",      # JPEG-LS Lossless
    "rle": "1.2.840.10008.1.2.5",            # RLE Lossless
}


# ----------------------------------------------------------------------------- reading


def _sop_uid(ds, name: str) -> str:
    """SOPInstanceUID / SOPClassUID, falling back on the file meta (anonymisers blank them)."""
    value = str(getattr(ds, name, "") or "")
    if not value and hasattr(ds, "file_meta"):
        value = str(getattr(ds.file_meta, "MediaStorage" + name, "") or "")
    return value


def _headers(path: Path):
    """(file, dataset with deferred pixel data) for every DICOM image at path; files that are
    not DICOM, DICOMDIRs and non-image objects are skipped (and counted)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        raise InputError(path, "no such file or folder")
    found, skipped = [], []
    for f in files:
        try:
            # read every element but defer large values (pixel data) until they are used
            ds = pydicom.dcmread(f, defer_size=4096)
        except InvalidDicomError:
            if path.is_file():
                raise InputError(f, "is not a DICOM file (no DICM preamble)") from None
            skipped.append(f)
            continue
        except OSError as exc:     # the file system said no: not the file's content
            raise InputError(f, f"cannot be read ({exc.strerror or type(exc).__name__}); "
                                f"check its permissions") from None
        except Exception as exc:   # truncated or malformed element data
            raise InputError(f, f"corrupt DICOM file: {type(exc).__name__}: {exc}") from None
        sop_class = _sop_uid(ds, "SOPClassUID")
        if sop_class == DICOMDIR_SOP:
            skipped.append(f)
            continue
        if "PixelData" not in ds:
            if sop_class in IMAGE_SOP_CLASSES or not sop_class:
                raise InputError(f, "corrupt DICOM file: an image without pixel data "
                                    "(truncated?)")
            skipped.append(f)          # a non-image object (report, presentation state)
            continue
        found.append((f, ds))
    if not found:
        raise InputError(path, f"no DICOM files found ({len(skipped)} other files skipped)")
    return found, skipped


def list_series(path: Union[str, Path]) -> List[Dict[str, object]]:
    """The series at path: dicts with series_uid, modality, description, n_files."""
    found, _ = _headers(Path(path))
    return [_series_summary(uid, items) for uid, items in _group(found).items()]


def _group(found) -> "OrderedDict[str, list]":
    groups: "OrderedDict[str, list]" = OrderedDict()
    for f, ds in found:
        groups.setdefault(str(getattr(ds, "SeriesInstanceUID", "") or ""), []).append((f, ds))
    return groups


def _series_summary(uid: str, items) -> Dict[str, object]:
    ds = items[0][1]
    return {"series_uid": uid, "modality": str(getattr(ds, "Modality", "") or ""),
            "description": str(getattr(ds, "SeriesDescription", "") or ""),
            "n_files": len(items)}


def _describe(summaries) -> str:
    return "; ".join(f"{s['series_uid'] or '(no SeriesInstanceUID)'} ({s['modality'] or '?'}, "
                     f"{s['n_files']} files, {s['description']!r})" for s in summaries)


def _require(ds, f: Path, name: str, why: str):
    value = getattr(ds, name, None)
    if value is None or (hasattr(value, "__len__") and len(value) == 0):
        raise InputError(f, f"has no {name}: {why}")
    return value


def _check_ct(f: Path, ds) -> None:
    modality = str(getattr(ds, "Modality", "") or "")
    sop_class = _sop_uid(ds, "SOPClassUID")
    if modality != "CT" and sop_class not in (CT_IMAGE_STORAGE, ENHANCED_CT_STORAGE):
        raise InputError(f, f"is not a CT image (Modality {modality or 'missing'!r}, SOP class "
                            f"{sop_class or 'missing'}); only CT can be converted to HU")
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise InputError(f, "is a multi-frame (enhanced) image; only single-frame CT slices "
                            "are supported")
    for name in ("RescaleSlope", "RescaleIntercept"):
        if getattr(ds, name, None) in (None, ""):
            raise InputError(f, f"has no {name}: the stored values cannot be converted to HU "
                                f"(not a CT image, or the rescale was stripped)")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME2", "MONOCHROME1") or int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise InputError(f, f"is a colour image ({photometric}); CT slices are greyscale")


def _geometry(items, folder: Path):
    """Sort slices along the normal and check they form one regular grid.

    Returns (items sorted, iop (6,), pixel spacing (row, col), slice spacing, positions)."""
    iops, sizes, spacings = [], set(), set()
    for f, ds in items:
        iops.append(np.array(_require(ds, f, "ImageOrientationPatient",
                                      "the slice orientation is unknown"), np.float64))
        _require(ds, f, "ImagePositionPatient", "the slice cannot be placed in space")
        sizes.add((int(ds.Rows), int(ds.Columns)))
        spacings.add(tuple(round(float(v), 6) for v in
                           _require(ds, f, "PixelSpacing", "the pixel size is unknown")))
    iops = np.array(iops)
    if np.abs(iops - iops[0]).max() > 1e-3:
        bad = int(np.argmax(np.abs(iops - iops[0]).max(axis=1)))
        raise InputError(items[bad][0], f"orientation {iops[bad].round(4).tolist()} differs "
                                        f"from {iops[0].round(4).tolist()} of "
                                        f"{items[0][0].name}: mixed orientations in one series")
    if len(sizes) > 1:
        raise InputError(folder, f"slices of different sizes in one series: {sorted(sizes)}")
    if len(spacings) > 1:
        raise InputError(folder, f"slices with different pixel spacing in one series: "
                                 f"{sorted(spacings)} mm")
    iop = iops[0]
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([np.asarray(ds.ImagePositionPatient, np.float64) for _, ds in items])
    d = pos @ normal
    order = np.argsort(d, kind="stable")
    items = [items[i] for i in order]
    pos, d = pos[order], d[order]
    spacing_k = None
    if len(items) > 1:
        gaps = np.diff(d)
        dup = np.nonzero(gaps < 1e-3)[0]
        if len(dup):
            i = int(dup[0])
            raise InputError(folder, f"two slices at the same position ({d[i]:.3f} mm along the "
                                     f"normal): {items[i][0].name} and {items[i + 1][0].name} "
                                     f"(several acquisitions or duplicates in one series?)")
        step = float(np.median(gaps))
        tol = max(0.01, 0.01 * step)
        if np.abs(gaps - step).max() > tol:
            ratio = gaps / gaps.min()
            i = int(np.argmax(gaps))
            if np.all(np.abs(ratio - np.round(ratio)) < 0.05) and ratio.max() > 1.5:
                step = float(gaps.min())
                n_missing = int(round(gaps[i] / step)) - 1
                raise InputError(folder, f"missing slices: a gap of {gaps[i]:.2f} mm between "
                                         f"{items[i][0].name} ({d[i]:.2f} mm) and "
                                         f"{items[i + 1][0].name} ({d[i + 1]:.2f} mm) where the "
                                         f"spacing is {step:.2f} mm ({n_missing} slice(s) "
                                         f"missing)")
            uniq = sorted(set(np.round(gaps, 2).tolist()))
            raise InputError(folder, f"mixed slice spacing: gaps of {uniq} mm between "
                                     f"consecutive slices; a volume needs even spacing")
        spacing_k = float(np.mean(gaps))
        # the slices must stack along the normal (no gantry tilt / shear)
        along = (pos[-1] - pos[0]) / np.linalg.norm(pos[-1] - pos[0])
        tilt = np.degrees(np.arccos(np.clip(abs(along @ normal), -1, 1)))
        if tilt > 0.5:
            raise InputError(folder, f"slices are offset sideways along the series ({tilt:.1f} "
                                     f"deg from the slice normal: gantry tilt); resample to an "
                                     f"orthogonal grid first")
    else:
        ds = items[0][1]
        spacing_k = float(getattr(ds, "SpacingBetweenSlices", None)
                          or getattr(ds, "SliceThickness", None) or 1.0)
    pixel = tuple(float(v) for v in items[0][1].PixelSpacing)
    return items, iop, pixel, spacing_k, pos


#: HU given to pixels the header marks as padding (outside the scan field): air
PADDING_HU = -1024.0


def _padding_mask(ds, stored: np.ndarray) -> Optional[np.ndarray]:
    """Pixels marked as padding by PixelPaddingValue (and PixelPaddingRangeLimit: the
    range between the two, inclusive), compared on the stored values before rescaling;
    None when the header marks none."""
    pad = ds.get("PixelPaddingValue")
    if pad is None or pad == "" or stored.dtype.kind not in "iu":
        return None
    if isinstance(pad, bytes):         # VR left ambiguous (US or SS): decode by the data
        pad = int.from_bytes(pad[:2], "little", signed=stored.dtype.kind == "i")
    # the stored type decides how the value reads (0xFFFF of an unsigned image is 65535)
    lo = int(np.array(int(pad)).astype(stored.dtype))
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None or limit == "" or isinstance(limit, bytes):
        return stored == lo
    hi = int(np.array(int(limit)).astype(stored.dtype))
    lo, hi = min(lo, hi), max(lo, hi)
    return (stored >= lo) & (stored <= hi)


def dicom_series(path: Union[str, Path], series_uid: Optional[str] = None):
    """The headers of a CT series, checked and sorted, without decoding any pixel data.

    Returns (items [(file, dataset with deferred pixel data)] in K order, (rows, columns),
    ijk_to_ras (4, 4) RAS mm, meta as read_dicom's less transfer_syntaxes and
    padding_voxels, which come with the pixels). InputError as read_dicom."""
    path = Path(path)
    found, skipped = _headers(path)
    groups = _group(found)
    if series_uid is not None:
        if series_uid not in groups:
            raise InputError(path, f"has no series {series_uid!r}; it holds: "
                                   f"{_describe([_series_summary(u, i) for u, i in groups.items()])}")
        items = groups[series_uid]
    elif len(groups) > 1:
        raise InputError(path, f"holds {len(groups)} series; choose one (epdseg segment "
                               f"--series-uid, or series_uid in Python): "
                               f"{_describe([_series_summary(u, i) for u, i in groups.items()])}")
    else:
        series_uid, items = next(iter(groups.items()))
    for f, ds in items:
        _check_ct(f, ds)
    items, iop, pixel, spacing_k, pos = _geometry(items, path)
    rows, cols = int(items[0][1].Rows), int(items[0][1].Columns)
    r, c = iop[:3], iop[3:]
    normal = np.cross(r, c)
    m = np.eye(4)
    lps = np.stack([r * pixel[1], c * pixel[0], normal * spacing_k], axis=1)
    m[:3, :3] = FLIP @ lps
    m[:3, 3] = FLIP @ pos[0]
    first = items[0][1]
    meta = {
        "source": str(path), "format": "dicom",
        "modality": str(getattr(first, "Modality", "") or "CT"),
        "series_uid": series_uid,
        "study_uid": str(getattr(first, "StudyInstanceUID", "") or ""),
        "frame_of_reference_uid": str(getattr(first, "FrameOfReferenceUID", "") or ""),
        "series_description": str(getattr(first, "SeriesDescription", "") or ""),
        "sop_class_uid": _sop_uid(first, "SOPClassUID"),
        "files": [str(f) for f, _ in items],
        "sop_instance_uids": [_sop_uid(ds, "SOPInstanceUID") for _, ds in items],
        "skipped": len(skipped),
    }
    return items, (rows, cols), m, meta


def slice_hu(f: Path, ds, rows: int, cols: int):
    """One slice's pixels in HU: (float32 (rows, cols), number of padding pixels set to
    PADDING_HU, transfer syntax UID). InputError when they cannot be decoded or do not
    have the series' size."""
    try:
        syntax = ds.file_meta.TransferSyntaxUID
        arr = ds.pixel_array
    except Exception as exc:
        name = getattr(locals().get("syntax"), "name", "unknown transfer syntax")
        raise InputError(f, f"pixel data cannot be decoded ({name}): "
                            f"{type(exc).__name__}: {exc}") from None
    if arr.shape != (rows, cols):
        raise InputError(f, f"pixel data is {arr.shape}, header says {(rows, cols)}")
    padding = _padding_mask(ds, arr)
    arr = arr.astype(np.float32)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = arr.max() - arr
    hu = arr * np.float32(ds.RescaleSlope) + np.float32(ds.RescaleIntercept)
    padded = 0
    if padding is not None:
        hu[padding] = PADDING_HU
        padded = int(padding.sum())
    return hu, padded, str(syntax)


def read_dicom(path: Union[str, Path], series_uid: Optional[str] = None) -> Volume:
    """Read a CT series from a folder (or one slice from a file) into a Volume.

    array: float32 HU (K, J, I), K sorted along the slice normal; ijk_to_ras in RAS mm.
    meta: source, format 'dicom', modality, series_uid, study_uid, frame_of_reference_uid,
    series_description, files (sorted), sop_instance_uids, sop_class_uid, transfer_syntaxes,
    skipped (number of non-DICOM files ignored), padding_voxels (pixels the header marks as
    padding, PixelPaddingValue / PixelPaddingRangeLimit: set to PADDING_HU, air).
    io.sources.open_volume reads the same series slice by slice.
    """
    items, (rows, cols), m, meta = dicom_series(path, series_uid)
    hu = np.empty((len(items), rows, cols), np.float32)
    syntaxes = set()
    padded = 0
    for k, (f, ds) in enumerate(items):
        hu[k], n_pad, syntax = slice_hu(f, ds, rows, cols)
        syntaxes.add(syntax)
        padded += n_pad
    meta.update(transfer_syntaxes=sorted(syntaxes), padding_voxels=padded)
    return Volume(hu, m, meta)


# ----------------------------------------------------------------------------- writing


def _base_dataset(info: Dict[str, object]):
    from pydicom.dataset import Dataset

    ds = Dataset()
    now = datetime.datetime(2024, 1, 1, 12, 0, 0)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "EPD Segmentation phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = str(info.get("study_description", "Phantom abdomen"))
    ds.SeriesDescription = str(info.get("series_description", "Phantom CT"))
    ds.PatientName = str(info.get("patient_name", "Phantom^Subject"))
    ds.PatientID = str(info.get("patient_id", "PHANTOM"))
    ds.PatientBirthDate = ""
    ds.PatientSex = str(info.get("patient_sex", "O"))
    ds.BodyPartExamined = "ABDOMEN"
    ds.KVP = str(info.get("kvp", 120))
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = info["study_uid"]
    ds.SeriesInstanceUID = info["series_uid"]
    ds.FrameOfReferenceUID = info["frame_uid"]
    ds.PositionReferenceIndicator = ""
    ds.StudyID = "1"
    ds.SeriesNumber = int(info.get("series_number", 1))
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    return ds


def write_dicom_series(volume: Volume, folder: Union[str, Path], *,
                       transfer_syntax: str = "explicit", overwrite: bool = False,
                       series_uid: Optional[str] = None, study_uid: Optional[str] = None,
                       frame_uid: Optional[str] = None, **info) -> List[Path]:
    """Write a HU volume as a CT Image Storage series, one file per slice (IM0001.dcm, ...).

    volume: HU (K, J, I) with RAS geometry (no shear). Stored as unsigned 12-bit values with
    RescaleIntercept -1024 (HU clipped to -1024..3071, rounded). transfer_syntax: one of
    TRANSFER_SYNTAXES. info: patient_name, patient_id, patient_sex, series_description,
    study_description, series_number, kvp. UIDs are generated unless given. The folder is
    written atomically and an existing one is replaced only with overwrite=True.
    Returns the file paths in slice order.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}; "
                         f"got {transfer_syntax!r}")
    syntax = pydicom.uid.UID(TRANSFER_SYNTAXES[transfer_syntax])
    lps = FLIP @ volume.ijk_to_ras[:3, :3]
    spacing = np.asarray(volume.spacing)
    dirs = lps / spacing[None, :]
    normal = np.cross(dirs[:, 0], dirs[:, 1])
    if abs(normal @ dirs[:, 2]) < 0.9999:
        raise ValueError("the volume's slices are not stacked along their normal (sheared "
                         "geometry); DICOM slices cannot represent it")
    stored = np.clip(np.round(np.asarray(volume.array, np.float64)) + 1024, 0, 4095).astype(np.uint16)
    info = dict(info)
    info.update(series_uid=series_uid or generate_uid(), study_uid=study_uid or generate_uid(),
                frame_uid=frame_uid or generate_uid())
    base = _base_dataset(info)
    k_count, rows, cols = stored.shape
    paths = []
    with atomic_folder(folder, overwrite) as tmp:
        for k in range(k_count):
            ds = base.copy()
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            ipp = FLIP @ (volume.ijk_to_ras @ np.array([0.0, 0.0, k, 1.0]))[:3]
            ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
            ds.ImageOrientationPatient = [f"{v:.6f}" for v in np.concatenate([dirs[:, 0], dirs[:, 1]])]
            ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
            ds.SliceThickness = f"{spacing[2]:.6f}"
            ds.SpacingBetweenSlices = f"{spacing[2]:.6f}"
            ds.SliceLocation = f"{float(ipp @ normal):.6f}"
            ds.Rows, ds.Columns = rows, cols
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            ds.file_meta = meta
            ds.PixelData = stored[k].tobytes()
            if transfer_syntax == "jpeg-lossless":
                from .jpeg_lossless import encode

                ds.PixelData = encapsulate([_even(encode(stored[k], 12))])
                ds["PixelData"].VR = "OB"
                ds.file_meta.TransferSyntaxUID = syntax
            elif transfer_syntax != "explicit":
                ds.compress(syntax, stored[k])
            name = tmp / f"IM{k + 1:04d}.dcm"
            ds.save_as(name, enforce_file_format=True)
            paths.append(Path(folder) / name.name)
    return paths


def _even(b: bytes) -> bytes:
    return b + b"\x00" if len(b) % 2 else b
