"""DICOM SEG export: written with highdicom, read back with highdicom and pydicom."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest

highdicom = pytest.importorskip("highdicom")

from EPDSegmentationLib.core.classes import TISSUES  # noqa: E402
from EPDSegmentationLib.io.dicom_seg import DicomSegError, write_dicom_seg  # noqa: E402


def _sorted_series(folder):
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]
    normal = np.cross(np.array(sources[0].ImageOrientationPatient[:3], float),
                      np.array(sources[0].ImageOrientationPatient[3:], float))
    sources.sort(key=lambda d: float(normal @ np.array(d.ImagePositionPatient, float)))
    return sources


@pytest.fixture(scope="module")
def real_series(totalseg_dir):
    """The shared JPEG 2000 series, its HU, and copies with study/series UIDs filled in.

    The sample was de-identified by blanking its study and series UIDs; a SEG cannot reference
    such a series, so the geometry checks give the copies UIDs of their own."""
    sources = _sorted_series(totalseg_dir / "ct_dicom")
    hu = np.stack([pydicom.dcmread(s.filename).pixel_array * float(s.RescaleSlope)
                   + float(s.RescaleIntercept) for s in sources]).astype(np.float32)
    study, series = highdicom.UID(), highdicom.UID()
    repaired = []
    for s in sources:
        s = copy.deepcopy(s)
        s.StudyInstanceUID, s.SeriesInstanceUID = study, series
        repaired.append(s)
    return sources, repaired, hu


def _labels_from_hu(hu):
    lab = np.zeros(hu.shape, np.uint8)
    lab[(hu >= -190) & (hu <= -30)] = 3
    lab[(hu > -30) & (hu < 150)] = 1
    lab[hu >= 150] = 5
    lab[:, 200:210, 200:260] = 2  # a thin streak
    lab[:, 300:340, 250:300] = 4
    return lab


def _uids(sources):
    return [s.get("SOPInstanceUID") or s.file_meta.MediaStorageSOPInstanceUID for s in sources]


def test_binary_seg_equals_label_map_frame_by_frame(real_series, tmp_path):
    _, sources, hu = real_series
    labels = _labels_from_hu(hu)
    path = write_dicom_seg(tmp_path / "seg.dcm", sources, labels=labels,
                           model_card={"name": "test", "factor": 2, "pixel_mm": [1.7, 1.7]})
    seg = highdicom.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    # the model's parameters read back with highdicom's own parser (key=value,key=value)
    params = seg.get_segment_description(1).algorithm_identification.parameters
    assert params["pixel_mm"] == "1.7 1.7" and params["factor"] == "2"
    assert [d.SegmentLabel for d in seg.SegmentSequence] == [c.name for c in TISSUES]
    for d, c in zip(seg.SegmentSequence, TISSUES):
        assert d.SegmentNumber == c.index
        assert d.SegmentedPropertyTypeCodeSequence[0].CodeValue == c.type.value
        assert d.SegmentedPropertyCategoryCodeSequence[0].CodeValue == c.category.value
        assert d.SegmentAlgorithmName == "EPD Segmentation"
    # frames map to the right source instances, pixel for pixel
    back = seg.get_pixels_by_source_instance(_uids(sources), combine_segments=True)
    np.testing.assert_array_equal(back, labels)
    # and each frame lies on its source slice's plane
    raw = pydicom.dcmread(path)
    by_uid = dict(zip(_uids(sources), sources))
    assert len(raw.PerFrameFunctionalGroupsSequence) == len(sources) * len(TISSUES)
    for frame in raw.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        src = by_uid[ref]
        pos = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in pos],
                                   [float(v) for v in src.ImagePositionPatient], atol=1e-3)
    assert raw.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID


def test_fractional_seg_decodes_to_probabilities_within_one_step(real_series, tmp_path):
    _, sources, hu = real_series
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6,) + hu.shape).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0)
    path = write_dicom_seg(tmp_path / "prob.dcm", sources, probabilities=probs)
    seg = highdicom.seg.segread(path)
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
    back = seg.get_pixels_by_source_instance(_uids(sources), rescale_fractional=True)
    # (frames, rows, columns, segments) in class order 1..5
    np.testing.assert_allclose(np.moveaxis(back, -1, 0), probs[1:], atol=1 / 255 + 1e-6)


def test_deidentified_series_without_uids_is_refused(real_series, tmp_path):
    originals, _, hu = real_series
    with pytest.raises(DicomSegError, match="StudyInstanceUID"):
        write_dicom_seg(tmp_path / "x.dcm", originals, labels=_labels_from_hu(hu))
    assert not (tmp_path / "x.dcm").exists()


def test_bad_inputs(real_series, tmp_path):
    _, sources, hu = real_series
    labels = _labels_from_hu(hu)
    with pytest.raises(DicomSegError, match="needs the source DICOM series"):
        write_dicom_seg(tmp_path / "a.dcm", [], labels=labels)
    with pytest.raises(DicomSegError, match="must match one to one"):
        write_dicom_seg(tmp_path / "a.dcm", sources[:-1], labels=labels)
    with pytest.raises(DicomSegError, match="exactly one"):
        write_dicom_seg(tmp_path / "a.dcm", sources)
    with pytest.raises(DicomSegError, match="within 0..1"):
        write_dicom_seg(tmp_path / "a.dcm", sources,
                        probabilities=np.full((6,) + hu.shape, 2.0, np.float32))
    (tmp_path / "keep.dcm").write_bytes(b"user file")
    with pytest.raises(FileExistsError):
        write_dicom_seg(tmp_path / "keep.dcm", sources, labels=labels)
    assert (tmp_path / "keep.dcm").read_bytes() == b"user file"


# ------------------------------------------------- de-identified and real-scanner headers


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory, phantom_ct):
    """A small phantom CT written as DICOM (explicit VR) and its label map."""
    from EPDSegmentationLib.io import write_dicom_series

    hu, labels = phantom_ct(5, 3, 64, 5.0)
    folder = tmp_path_factory.mktemp("phantom_dicom") / "ct"
    write_dicom_series(hu, folder)
    return folder, labels.array


def _edited(folder, edit):
    sources = _sorted_series(folder)
    for ds in sources:
        edit(ds)
    return sources


def _drop(*keys):
    def edit(ds):
        for key in keys:
            if key in ds:
                delattr(ds, key)
    return edit


def _set(key, value):
    return lambda ds: setattr(ds, key, value)


@pytest.mark.parametrize("edit", [
    _drop("PatientBirthDate"), _drop("AccessionNumber"), _drop("PatientID"),
    _drop("PatientName", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "ReferringPhysicianName", "PatientBirthDate", "AccessionNumber", "PatientID"),
    _set("SpecificCharacterSet", ""), _set("SpecificCharacterSet", "ISO 2022 IR 100"),
    _set("SpecificCharacterSet", ["", "ISO 2022 IR 87"]), _drop("SpecificCharacterSet"),
    _drop("SliceThickness"),
], ids=["no-birth-date", "no-accession", "no-patient-id", "no-type2-at-all",
        "charset-empty", "charset-iso2022-ir100", "charset-extensions", "charset-absent",
        "no-slice-thickness"])
def test_seg_of_real_world_headers_is_valid_and_reads_back(edit, phantom_series, tmp_path):
    """Headers as de-identifiers and scanners leave them: both SEG kinds are written,
    read back by pydicom and highdicom, and decode to the labels on the right instances."""
    folder, labels = phantom_series
    sources = _edited(folder, edit)
    path = write_dicom_seg(tmp_path / "seg.dcm", sources, labels=labels)
    raw = pydicom.dcmread(path)
    for key in ("PatientBirthDate", "AccessionNumber", "PatientID"):
        assert key in raw                     # type 2: present, empty if the source had none
    assert float(raw.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
                 .SliceThickness) == pytest.approx(5.0)
    seg = highdicom.seg.segread(path)
    back = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources],
                                             combine_segments=True)
    np.testing.assert_array_equal(back, labels)
    probs = np.stack([(labels == c).astype(np.float32) for c in range(len(TISSUES) + 1)])
    prob = highdicom.seg.segread(write_dicom_seg(tmp_path / "prob.dcm", sources,
                                                 probabilities=probs))
    assert prob.number_of_segments == len(TISSUES)


def test_headers_a_seg_cannot_use_are_refused_naming_file_and_attribute(phantom_series,
                                                                        tmp_path):
    folder, labels = phantom_series
    sources = _edited(folder, _set("SpecificCharacterSet", "ISO_IR 999"))
    with pytest.raises(DicomSegError, match="SpecificCharacterSet") as info:
        write_dicom_seg(tmp_path / "seg.dcm", sources, labels=labels)
    assert sources[0].filename in str(info.value)
    lone = _edited(folder, _drop("SliceThickness"))[:1]
    with pytest.raises(DicomSegError, match="no SliceThickness") as info:
        write_dicom_seg(tmp_path / "seg.dcm", lone, labels=labels[:1])
    assert lone[0].filename in str(info.value)
    assert not (tmp_path / "seg.dcm").exists()


def test_a_seg_that_does_not_read_back_fails_and_is_not_kept(phantom_series, tmp_path,
                                                            monkeypatch):
    """Every SEG is read back before it is kept: one that highdicom cannot read is an
    error naming the file, and no file is left."""
    folder, labels = phantom_series
    sources = _sorted_series(folder)

    def unreadable(path, *args, **kwargs):
        raise AttributeError("'FileDataset' object has no attribute 'SliceThickness'")

    monkeypatch.setattr(highdicom.seg, "segread", unreadable)
    with pytest.raises(DicomSegError, match="cannot be read back"):
        write_dicom_seg(tmp_path / "seg.dcm", sources, labels=labels)
    assert list(tmp_path.iterdir()) == []
