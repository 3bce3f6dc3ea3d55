"""DICOM: phantom series written in every supported transfer syntax read back exactly (and
agree with ITK/GDCM's own reading), several series in a folder, and every kind of bad input
with a specific message."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest

from EPDSegmentationLib.io import InputError, read_volume, write_dicom_series
from EPDSegmentationLib.io.dicom import TRANSFER_SYNTAXES, list_series


@pytest.fixture(scope="module")
def phantom_volume(phantom_ct):
    """A small phantom CT: 4 slices of 64 x 64, 2.5 mm apart, HU."""
    return phantom_ct(6, 4, 64, 2.5)[0]


@pytest.fixture
def series(tmp_path, phantom_volume):
    folder = tmp_path / "ct"
    write_dicom_series(phantom_volume, folder)
    return folder


def _itk_read(folder):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    flip = np.diag([-1.0, -1.0, 1.0])
    m = np.eye(4)
    m[:3, :3] = flip @ np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    m[:3, 3] = flip @ np.array(img.GetOrigin())
    return sitk.GetArrayFromImage(img), m


@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
def test_round_trip_in_every_transfer_syntax(tmp_path, phantom_volume, syntax):
    folder = tmp_path / syntax
    files = write_dicom_series(phantom_volume, folder, transfer_syntax=syntax)
    assert len(files) == 4
    ds = pydicom.dcmread(files[0])
    assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
    assert ds.RescaleSlope == 1 and ds.RescaleIntercept == -1024
    vol = read_volume(folder)
    expected = np.clip(np.round(phantom_volume.array), -1024, 3071)
    assert np.array_equal(vol.array, expected)
    assert np.allclose(vol.ijk_to_ras, phantom_volume.ijk_to_ras, atol=1e-4)
    assert vol.meta["transfer_syntaxes"] == [TRANSFER_SYNTAXES[syntax]]
    assert len(set(vol.meta["sop_instance_uids"])) == 4
    # an independent reader (ITK through GDCM) sees the same voxels at the same places
    arr, m = _itk_read(folder)
    assert np.array_equal(arr.astype(np.float32), vol.array)
    assert np.allclose(m, vol.ijk_to_ras, atol=1e-4)


def test_written_files_carry_the_required_ct_attributes(series):
    required = ["PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                "FrameOfReferenceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
                "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                "SliceThickness", "RescaleIntercept", "RescaleSlope", "KVP", "ImageType",
                "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
                "HighBit", "PixelRepresentation", "InstanceNumber", "PixelData"]
    uids = set()
    for f in sorted(series.iterdir()):
        ds = pydicom.dcmread(f)
        missing = [name for name in required if name not in ds]
        assert not missing, (f.name, missing)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        uids.add(ds.SeriesInstanceUID)
    assert len(uids) == 1


def test_slices_are_sorted_by_position_not_by_file_name(series, phantom_volume):
    files = sorted(series.iterdir())
    # swap the names of the first and last slice
    files[0].rename(series / "tmp.dcm")
    files[-1].rename(files[0])
    (series / "tmp.dcm").rename(files[-1])
    vol = read_volume(series)
    assert np.array_equal(vol.array, np.round(phantom_volume.array))
    assert vol.meta["files"][0].endswith(files[-1].name)


def test_single_file_gives_one_slice(series, phantom_volume):
    f = sorted(series.iterdir())[2]
    vol = read_volume(f)
    assert vol.array.shape == (1, 64, 64)
    assert np.array_equal(vol.array[0], np.round(phantom_volume.array[2]))
    assert np.allclose(vol.origin, np.asarray(phantom_volume.ijk_to_ras @ [0, 0, 2, 1])[:3],
                       atol=1e-4)


def test_several_series_in_one_folder(tmp_path, phantom_volume):
    both = tmp_path / "both"
    both.mkdir()
    uids = []
    for name, offset in (("a", 0.0), ("b", 100.0)):
        vol = phantom_volume.with_array(phantom_volume.array + offset)
        files = write_dicom_series(vol, tmp_path / name, series_description=f"series {name}")
        uids.append(str(pydicom.dcmread(files[0]).SeriesInstanceUID))
        for f in files:
            shutil.copy(f, both / f"{name}_{f.name}")
    (both / "notes.txt").write_text("not DICOM")
    with pytest.raises(InputError, match="holds 2 series") as err:
        read_volume(both)
    assert uids[0] in str(err.value) and uids[1] in str(err.value)
    assert "series b" in str(err.value) and "--series-uid" in str(err.value)
    picked = read_volume(both, series_uid=uids[1])
    assert picked.meta["series_uid"] == uids[1]
    assert picked.meta["skipped"] == 1
    assert np.array_equal(picked.array, np.round(phantom_volume.array) + 100)
    assert {s["series_uid"] for s in list_series(both)} == set(uids)
    with pytest.raises(InputError, match="has no series '1.2.3'"):
        read_volume(both, series_uid="1.2.3")


def _edit(folder, index, **changes):
    f = sorted(folder.iterdir())[index]
    ds = pydicom.dcmread(f)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(f)
    return f


def test_not_ct_is_refused(series):
    f = _edit(series, 1, Modality="MR", SOPClassUID="1.2.840.10008.5.1.4.1.1.4")
    with pytest.raises(InputError, match="is not a CT image.*'MR'") as err:
        read_volume(series)
    assert f.name in str(err.value)


def test_missing_rescale_is_refused(series):
    f = _edit(series, 0, RescaleSlope=None)
    with pytest.raises(InputError, match="has no RescaleSlope.*HU") as err:
        read_volume(series)
    assert f.name in str(err.value)


def test_mixed_slice_spacing_is_refused(series):
    ds = pydicom.dcmread(sorted(series.iterdir())[3])
    pos = [float(v) for v in ds.ImagePositionPatient]
    _edit(series, 3, ImagePositionPatient=[pos[0], pos[1], pos[2] + 1.3])
    with pytest.raises(InputError, match="mixed slice spacing"):
        read_volume(series)


def test_missing_slices_are_reported(tmp_path, phantom_volume):
    folder = tmp_path / "gap"
    files = write_dicom_series(phantom_volume, folder)
    files[1].unlink()
    with pytest.raises(InputError, match=r"missing slices.*1 slice\(s\) missing"):
        read_volume(folder)


def test_duplicate_positions_are_refused(series):
    f = sorted(series.iterdir())[1]
    ds = pydicom.dcmread(f)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(series / "copy.dcm")
    with pytest.raises(InputError, match="same position"):
        read_volume(series)


def test_mixed_orientation_is_refused(series):
    _edit(series, 2, ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    with pytest.raises(InputError, match="mixed orientations"):
        read_volume(series)


def test_corrupt_files_are_named(series):
    files = sorted(series.iterdir())
    data = files[1].read_bytes()
    files[1].write_bytes(data[:300])          # cut inside the header
    with pytest.raises(InputError) as err:
        read_volume(series)
    assert files[1].name in str(err.value) and "corrupt" in str(err.value)


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_truncated_pixel_data_is_named(tmp_path, phantom_volume):
    folder = tmp_path / "j2k"
    files = write_dicom_series(phantom_volume, folder, transfer_syntax="jpeg2000")
    data = files[2].read_bytes()
    files[2].write_bytes(data[:-400])
    with pytest.raises(InputError) as err:
        read_volume(folder)
    assert files[2].name in str(err.value)


def test_empty_or_missing_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM files found"):
        read_volume(tmp_path / "empty")
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "nowhere")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 50)
    with pytest.raises(InputError, match="not a DICOM file"):
        read_volume(junk)


def test_writer_refuses_to_replace_a_series(series, phantom_volume):
    before = sorted(p.name for p in series.iterdir())
    with pytest.raises(FileExistsError):
        write_dicom_series(phantom_volume, series)
    assert sorted(p.name for p in series.iterdir()) == before
    write_dicom_series(phantom_volume, series, overwrite=True, transfer_syntax="rle")
    assert read_volume(series).meta["transfer_syntaxes"] == [TRANSFER_SYNTAXES["rle"]]
    assert not [p for p in series.parent.iterdir() if p.name.startswith(".")]


def _unsigned_with_padding(folder, pad_value, mark=True):
    """Turn every slice into what some scanners write: unsigned 16-bit stored values with
    the area outside the scan field filled with ``pad_value`` (marked or not)."""
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array.astype(np.uint16)
        arr[:, :6] = pad_value                     # a band outside the field of view
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelData = arr.tobytes()
        if mark:
            ds.add_new(0x00280120, "US", pad_value)        # PixelPaddingValue
        ds.save_as(f)


def test_pixel_padding_value_reads_as_air_not_as_bright_tissue(series, phantom_volume):
    _unsigned_with_padding(series, 65535)
    vol = read_volume(series)
    assert vol.meta["padding_voxels"] == 4 * 64 * 6
    assert (vol.array[:, :, :6] == -1024).all()
    np.testing.assert_array_equal(vol.array[:, :, 6:],
                                  np.clip(np.round(phantom_volume.array[:, :, 6:]), -1024, 3071))


def test_padding_range_limit_marks_the_whole_range(series):
    _unsigned_with_padding(series, 65000)
    for f in sorted(series.iterdir()):
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array.copy()
        arr[:, 6:8] = 65500
        ds.PixelData = arr.tobytes()
        ds.add_new(0x00280121, "US", 65535)              # PixelPaddingRangeLimit
        ds.save_as(f)
    assert (read_volume(series).array[:, :, :8] == -1024).all()


def test_unmarked_padding_is_refused_not_read_as_62512_hu(series, tmp_path):
    """Without PixelPaddingValue the padding would read as 64511 HU and change every area:
    the CT rule refuses values above any scanner's range, naming the file."""
    from EPDSegmentationLib.cli.segment import ct_problem

    _unsigned_with_padding(series, 65535, mark=False)
    problem = ct_problem(read_volume(series))
    assert problem is not None and "64511 HU" in problem and "PixelPaddingValue" in problem


def test_an_unreadable_file_is_said_to_be_unreadable_not_corrupt(series, monkeypatch):
    real = pydicom.dcmread
    victim = sorted(series.iterdir())[1]

    def dcmread(f, *args, **kwargs):
        if str(f) == str(victim):
            raise PermissionError(13, "Permission denied", str(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", dcmread)
    with pytest.raises(InputError, match="cannot be read \\(Permission denied\\)") as err:
        read_volume(series)
    assert victim.name in str(err.value) and "corrupt" not in str(err.value)
