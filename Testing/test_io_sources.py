"""Volumes read slab by slab (io.sources.open_volume, what ``epdseg segment`` reads through):
the same values, geometry and errors as the whole-volume read_volume, in memory that does
not grow with the slices."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from EPDSegmentationLib.core.volume import Volume, ijk_to_ras_matrix
from EPDSegmentationLib.io import InputError, read_volume, write_dicom_series, write_volume
from EPDSegmentationLib.io.sources import (CHECK_SLICES, DicomSource, FileSource, WholeSource,
                                           open_volume)


@pytest.fixture(scope="module")
def ct():
    """37 slices (more than two check slabs), an oblique flipped grid, HU in -1024..1500."""
    a = np.radians(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    m = ijk_to_ras_matrix((0.71, 0.82, 2.5), (12.5, -40.0, 88.0), rot @ np.diag([-1.0, 1, 1]))
    arr = np.random.default_rng(0).integers(-1024, 1500, (37, 24, 30)).astype(np.float32)
    return Volume(arr, m)


def _nrrd(path, arr, **header):
    import nrrd

    fields = {"space": "left-posterior-superior", "space directions": np.diag([0.7, 0.8, 2.0]),
              "space origin": [1.0, 2.0, 3.0]}
    fields.update(header)
    nrrd.write(str(path), np.ascontiguousarray(np.transpose(arr, (2, 1, 0))), fields,
               detached_header=str(path).endswith(".nhdr"))
    return path


def _write(kind, ct, folder):
    int16 = ct.array.astype(np.int16)
    if kind == "nrrd gzip float32":
        return write_volume(ct, folder / "ct.nrrd")
    if kind == "nrrd gzip int16":
        return write_volume(ct, folder / "ct.nrrd", dtype="int16")
    if kind == "nrrd raw big-endian":
        return _nrrd(folder / "ct.nrrd", int16.astype(">i2"), encoding="raw")
    if kind == "nhdr detached gzip":
        return _nrrd(folder / "ct.nhdr", int16, encoding="gzip")
    if kind == "nii float32":
        return write_volume(ct, folder / "ct.nii")
    if kind == "nii.gz int16":
        return write_volume(ct, folder / "ct.nii.gz", dtype="int16")
    if kind == "dicom":
        write_dicom_series(ct, folder / "ct")
        return folder / "ct"
    raise AssertionError(kind)


KINDS = ["nrrd gzip float32", "nrrd gzip int16", "nrrd raw big-endian", "nhdr detached gzip",
         "nii float32", "nii.gz int16", "dicom"]


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_reading_equals_whole_reading(tmp_path, ct, kind):
    path = _write(kind, ct, tmp_path)
    whole = read_volume(path)
    with open_volume(path) as src:
        assert isinstance(src, DicomSource if kind == "dicom" else FileSource)
        assert src.shape == whole.array.shape
        np.testing.assert_array_equal(src.ijk_to_ras, whole.ijk_to_ras)
        assert src.spacing == whole.spacing and src.origin == whole.origin
        for key in ("source", "format", "modality", "series_uid", "dtype", "files",
                    "sop_instance_uids", "transfer_syntaxes", "padding_voxels"):
            assert src.meta.get(key) == whole.meta.get(key), key
        assert src.hu_range == (whole.array.min(), whole.array.max())
        # slabs in order, a step back, a run with gaps and an unsorted list
        for ks in ([0, 1, 2], [20, 21, 22, 23], [3], [5, 30, 31, 36], [9, 2, 33]):
            got = src[ks]
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, whole.array[ks])
        np.testing.assert_array_equal(src[4], whole.array[4])
        whole_again = src.read_all()
    np.testing.assert_array_equal(whole_again.array, whole.array)


def test_nifti_scaling_is_applied_as_itk_applies_it(tmp_path, ct):
    """A NIfTI storing unsigned values with scl_slope/scl_inter (HU = 1 x stored - 1024)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray((ct.array + 1024).astype(np.uint16))
    path = tmp_path / "scaled.nii.gz"
    sitk.WriteImage(img, str(path))
    with gzip.open(path, "rb") as f:
        data = bytearray(f.read())
    data[112:120] = np.array([1.0, -1024.0], "<f4").tobytes()     # scl_slope, scl_inter
    with gzip.open(path, "wb") as f:
        f.write(bytes(data))
    whole = read_volume(path)
    with open_volume(path) as src:
        assert src.meta["dtype"] == whole.meta["dtype"] == "float32"
        np.testing.assert_array_equal(src.read_all().array, whole.array)
    np.testing.assert_array_equal(whole.array, ct.array)


def test_layouts_it_does_not_stream_are_read_whole(tmp_path, ct):
    path = _nrrd(tmp_path / "ascii.nrrd", ct.array[:3].astype(np.int16), encoding="ascii")
    with open_volume(path) as src:
        assert isinstance(src, WholeSource)
        np.testing.assert_array_equal(src[[0, 2]], read_volume(path).array[[0, 2]])


def _error(fn, path):
    with pytest.raises(InputError) as err:
        fn(path)
    return str(err.value)


def test_bad_files_fail_with_the_same_message(tmp_path, ct):
    bad = ct.array.copy()
    bad[30, 0, :3] = [np.nan, np.inf, -np.inf]           # in the third check slab
    cases = [write_volume(ct.with_array(bad), tmp_path / "nan.nii"),
             write_volume(ct.with_array(bad), tmp_path / "nan.nii.gz")]
    sheared = np.array([[0.8, 0.0, 0.0], [0.24, 0.8, 0.0], [0.0, 0.0, 2.5]])
    cases.append(_nrrd(tmp_path / "sheared.nrrd", np.zeros((5, 24, 30), np.int16) - 500,
                       **{"space directions": sheared}))
    labels = np.random.default_rng(2).integers(0, 6, ct.array.shape).astype(np.uint8)
    labels[CHECK_SLICES + 3] = 7                          # a value first seen in slab 2
    cases.append(write_volume(Volume(labels, ct.ijk_to_ras), tmp_path / "labels.nrrd"))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 20)
    cases += [broken, tmp_path / "missing.nrrd", tmp_path / "scan.mha"]
    (tmp_path / "scan.mha").write_bytes(b"xx")
    for path in cases:
        assert _error(open_volume, path) == _error(read_volume, path), path
    assert "3 voxel(s) that are not finite" in _error(open_volume, cases[0])
    assert "7 distinct values in 0..7: a mask" in _error(open_volume, cases[3])


def test_truncated_data_is_named(tmp_path, ct):
    """A file cut short is refused when opened (for .nii.gz SimpleITK's whole read does not
    notice and returns the volume)."""
    for name in ("ct.nii.gz", "ct.nrrd", "ct.nii"):
        path = write_volume(ct, tmp_path / name, dtype="int16")
        path.write_bytes(path.read_bytes()[:-2000])
        prefix = f"{path}: cannot be read as a {name[2:]} image (corrupt or not that format)"
        assert _error(open_volume, path).startswith(prefix)
        if name == "ct.nrrd":
            assert _error(read_volume, path).startswith(prefix)


def test_dicom_checks_apply_slice_by_slice(tmp_path, ct):
    import pydicom

    folder = tmp_path / "ct"
    files = write_dicom_series(ct, folder)
    ds = pydicom.dcmread(files[20])                     # padding marked on one slice
    arr = ds.pixel_array.copy()
    arr[:, :4] = 4095
    ds.PixelData = arr.tobytes()
    ds.add_new(0x00280120, "US", 4095)
    ds.save_as(files[20])
    with open_volume(folder) as src:
        whole = read_volume(folder)
        assert src.meta["padding_voxels"] == whole.meta["padding_voxels"] == 24 * 4
        np.testing.assert_array_equal(src[[19, 20, 21]], whole.array[19:22])
    ds.Modality = "MR"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(files[20])
    assert "is not a CT image" in _error(open_volume, folder)
    assert _error(open_volume, folder) == _error(read_volume, folder)


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_undecodable_dicom_pixels_fail_at_open_with_the_same_message(tmp_path, phantom_ct):
    files = write_dicom_series(phantom_ct(6, 3, 64, 2.5)[0], tmp_path / "j2k",
                               transfer_syntax="jpeg2000")
    files[2].write_bytes(files[2].read_bytes()[:-400])
    assert _error(open_volume, tmp_path / "j2k") == _error(read_volume, tmp_path / "j2k")
    assert files[2].name in _error(open_volume, tmp_path / "j2k")


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nrrd"])
def test_memory_does_not_grow_with_the_slices(tmp_path, name):
    """Opening (checking every slab) and reading a volume slab by slab: the same traced
    peak for 128 slices as for 32 (the whole float32 volume would be 1.5 MiB more)."""
    import tracemalloc

    rng = np.random.default_rng(3)
    peaks = {}
    for n in (32, 128):
        arr = rng.integers(-1024, 1500, (n, 64, 64)).astype(np.int16)
        path = write_volume(Volume(arr, np.eye(4)), tmp_path / f"{n}{name}")
        tracemalloc.start()
        with open_volume(path) as src:
            for k0 in range(0, n, 8):
                src[list(range(k0, k0 + 8))]
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[128] - peaks[32] < 0.1 * 2**20, peaks


@pytest.mark.parametrize("kind", ["nrrd gzip int16", "nii float32", "dicom"])
def test_prefetched_slabs_equal_direct_reads(tmp_path, ct, kind):
    """core.stream reads the next slab ahead in a thread: what comes back is what a direct
    read gives, whether the slab asked for is the one read ahead or another (a step back
    in a gzip stream included), and closing with a read in flight is safe."""
    path = _write(kind, ct, tmp_path)
    whole = read_volume(path)
    with open_volume(path) as src:
        for ks in ([0, 1, 2, 3], [4, 5, 6, 7], [30, 31]):
            src.prefetch(ks)
            np.testing.assert_array_equal(src[ks], whole.array[ks])
        src.prefetch([32, 33])              # read ahead, then another slab asked for
        np.testing.assert_array_equal(src[[1, 2]], whole.array[[1, 2]])
        np.testing.assert_array_equal(src[[32, 33]], whole.array[[32, 33]])
        src.prefetch([34, 35, 36])          # still reading when the source closes
    with open_volume(path) as src:
        src.prefetch([99])                  # a bad slice fails where it is asked for
        with pytest.raises(IndexError, match="slice 99 outside 0..36"):
            src[[99]]
        src.prefetch([98])                  # and only there
        np.testing.assert_array_equal(src[[0]], whole.array[[0]])


@pytest.mark.parametrize("kind", ["nrrd gzip int16", "nii float32", "dicom"])
def test_deferred_checks_read_each_slice_once_and_conclude_alike(tmp_path, ct, kind,
                                                                 monkeypatch):
    """open_volume(defer_checks=True) reads nothing to check; the checks ride along with the
    slices read (each read once in a forward pass, as segment streams them), and
    complete_checks reads only the rest: the same HU range and DICOM meta as checking at
    opening."""
    path = _write(kind, ct, tmp_path)
    reads = []
    if kind == "dicom":
        slice_of = DicomSource.slice
        monkeypatch.setattr(DicomSource, "slice",
                            lambda self, k: reads.append(k) or slice_of(self, k))
    else:
        stored = FileSource.read_stored
        monkeypatch.setattr(FileSource, "read_stored", lambda self, k0, n: reads.extend(
            range(k0, k0 + n)) or stored(self, k0, n))
    whole = read_volume(path)
    reads.clear()
    with open_volume(path) as src:
        want = (src.hu_range, src.meta.get("transfer_syntaxes"), src.meta.get("padding_voxels"))
    assert sorted(reads) == list(range(37))
    reads.clear()
    with open_volume(path, defer_checks=True) as src:
        assert reads == [] and np.isnan(src.hu_range[0])
        for ks in ([0, 1, 2, 3], [4, 5, 6], [20, 21]):
            src.prefetch(ks)
            np.testing.assert_array_equal(src[ks], whole.array[ks])
        src.complete_checks()
        src.complete_checks()                           # once is enough
        got = (src.hu_range, src.meta.get("transfer_syntaxes"), src.meta.get("padding_voxels"))
    assert got == want
    assert sorted(reads) == list(range(37))             # every slice read once


def test_deferred_checks_give_the_same_errors_at_the_end(tmp_path, ct):
    """A mask or a NIfTI with NaN voxels opens with defer_checks; complete_checks then fails
    with read_volume's message, every time it is asked."""
    nan = ct.array.copy()
    nan[30, 2, 3] = np.nan
    mask = (ct.array > 0).astype(np.uint8)
    cases = [write_volume(ct.with_array(nan), tmp_path / "nan.nii"),
             write_volume(ct.with_array(mask), tmp_path / "mask.nrrd")]
    for path in cases:
        with open_volume(path, defer_checks=True) as src:
            src[[0, 1]]
            for _ in range(2):
                with pytest.raises(InputError) as err:
                    src.complete_checks()
                assert str(err.value) == _error(read_volume, path)
