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
                           model_card={"name": "test", "factor": 2})
    seg = highdicom.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
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
