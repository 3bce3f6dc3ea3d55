"""``epdseg segment`` end to end on CPU: real files in, every output written and read back.

The network is a small random-weight model in the real file format (conftest.tiny_model_path):
these tests check the pipeline and the files, not segmentation accuracy.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from EPDSegmentationLib.cli import main
from EPDSegmentationLib.io import read_seg_nrrd, read_volume, write_dicom_series, write_volume
from EPDSegmentationLib.phantom import subject_slices
from EPDSegmentationLib.phantom.dataset import stack
from EPDSegmentationLib.segment import find_cases, parse_slices

OUTPUTS = (".seg.nrrd", "_soft.seg.nrrd", "_probabilities.nrrd", "_bodycomp.csv",
           "_overlay.png")


@pytest.fixture(scope="module")
def phantom_volume():
    hu, labels, _ = stack(subject_slices(5, n_slices=3, size=96), gap_mm=5.0)
    return hu, labels


@pytest.fixture(scope="module")
def cases(tmp_path_factory, phantom_volume):
    """A NIfTI case, a DICOM series case (JPEG 2000), and a label map posing as a CT."""
    hu, labels = phantom_volume
    root = tmp_path_factory.mktemp("cases")
    write_volume(hu, root / "ct_a.nii.gz")
    write_dicom_series(hu, root / "ct_dicom", transfer_syntax="jpeg2000")
    write_volume(labels, root / "not_ct.nrrd")
    return root


def _run(*args):
    return main(["segment", *map(str, args)])


def test_nifti_case_writes_every_output(cases, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(cases / "ct_a.nii.gz", "-o", out, "--model", tiny_model_path,
                "--slices", "0-1") == 0
    text = capsys.readouterr().out
    assert "ct_a" in text and "ok" in text and "device cpu" in text
    for suffix in OUTPUTS:
        assert (out / f"ct_a{suffix}").is_file(), suffix
    ct = read_volume(cases / "ct_a.nii.gz")
    # hard labels on the input grid; the slice not asked for stays empty
    labels = read_seg_nrrd(out / "ct_a.seg.nrrd").array
    assert labels.shape == ct.array.shape
    assert labels[2].max() == 0 and labels[:2].max() > 0
    # the probability volume: 6 components summing to one where segmented
    import SimpleITK as sitk

    probs = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ct_a_probabilities.nrrd")))
    assert probs.shape == ct.array.shape + (6,)
    np.testing.assert_allclose(probs[:2].sum(-1), 1.0, atol=1e-4)
    assert probs[2].max() == 0
    np.testing.assert_array_equal(probs[:2].argmax(-1), labels[:2])
    # the table: five tissues for each of the two slices, then the whole range
    rows = list(csv.DictReader(open(out / "ct_a_bodycomp.csv")))
    assert [r["slice"] for r in rows].count("0") == 5
    assert {r["tissue"] for r in rows} == {"MUS", "IMAT", "SAT", "VAT", "MSC"}
    px_cm2 = ct.pixel_area_mm2 / 100
    hard0 = {r["tissue"]: float(r["hard_area_cm2"]) for r in rows if r["slice"] == "0"}
    assert hard0["MUS"] == pytest.approx((labels[0] == 1).sum() * px_cm2, rel=1e-6)


def test_existing_outputs_are_kept_unless_overwrite(cases, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out"
    args = (cases / "ct_a.nii.gz", "-o", out, "--model", tiny_model_path, "--slices", "1")
    assert _run(*args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _run(*args) == 1
    assert "use --overwrite" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert _run(*args, "--overwrite") == 0


def test_batch_reports_bad_cases_and_finishes_the_others(cases, tiny_model_path, tmp_path,
                                                         capsys):
    (cases / "broken.nrrd").write_bytes(b"NRRD0004\nthis is not a volume\n")
    try:
        out = tmp_path / "out"
        assert _run(cases, "-o", out, "--model", tiny_model_path, "--slices", "1") == 1
        captured = capsys.readouterr()
        assert "broken" in captured.err and "not_ct" in captured.err
        assert "mask or label map" in captured.err
        assert (out / "ct_a.seg.nrrd").is_file() and (out / "ct_dicom.seg.nrrd").is_file()
        assert not (out / "not_ct.seg.nrrd").exists()
    finally:
        (cases / "broken.nrrd").unlink()


def test_dicom_input_writes_dicom_seg_that_matches(cases, tiny_model_path, tmp_path):
    highdicom = pytest.importorskip("highdicom")
    out = tmp_path / "out"
    assert _run(cases / "ct_dicom", "-o", out, "--model", tiny_model_path, "--dicom-seg") == 0
    ct = read_volume(cases / "ct_dicom")
    seg = highdicom.seg.segread(out / "ct_dicom_seg.dcm")
    back = seg.get_pixels_by_source_instance(ct.meta["sop_instance_uids"],
                                             combine_segments=True)
    labels = read_seg_nrrd(out / "ct_dicom.seg.nrrd").array
    np.testing.assert_array_equal(back, labels)
    prob = highdicom.seg.segread(out / "ct_dicom_prob_seg.dcm")
    assert prob.SegmentationType == "FRACTIONAL"


def test_dicom_seg_needs_a_dicom_source(cases, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(cases / "ct_a.nii.gz", "-o", out, "--model", tiny_model_path,
                "--dicom-seg") == 1
    assert "DICOM SEG needs a DICOM source" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_bad_model_and_bad_arguments_exit_2(cases, tmp_path, capsys):
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"not a model")
    assert _run(cases / "ct_a.nii.gz", "-o", tmp_path / "o", "--model", fake) == 2
    assert "fake" in capsys.readouterr().err
    assert _run(tmp_path / "missing.nii.gz", "-o", tmp_path / "o") == 2
    assert "no such file" in capsys.readouterr().err


def test_manifest_of_images(cases, tmp_path):
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"image\n{cases / 'ct_a.nii.gz'}\n{cases / 'ct_dicom'}\n")
    assert [c.name for c in find_cases([manifest])] == ["ct_a", "ct_dicom"]


@pytest.mark.parametrize("spec,n,want", [
    ("all", 4, [0, 1, 2, 3]), (None, 2, [0, 1]), ("1-2", 4, [1, 2]),
    ("3,0-1,1", 5, [0, 1, 3]),
])
def test_parse_slices(spec, n, want):
    assert parse_slices(spec, n) == want


@pytest.mark.parametrize("spec,message", [("5", "outside"), ("3-1", "backwards"),
                                          ("a-b", "cannot read")])
def test_parse_slices_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_slices(spec, 4)
