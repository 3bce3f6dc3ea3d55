"""Phantom datasets on disk (manifest, NRRD / NIfTI / DICOM) and the bundled sample."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest

from EPDSegmentationLib.io import read_labels, read_manifest, read_volume
from training.phantom import make_slice, write_dataset
from training.phantom.__main__ import main
from training.phantom.dataset import (SAMPLE_GAP_MM, SAMPLE_SEED, SAMPLE_SLICES,
                                                split_subjects, subject_seeds)
from training.phantom.generate import slice_positions
from EPDSegmentationLib.core.resources import sample_ct_path, sample_labels_path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    manifest = write_dataset(out, n_subjects=3, slices_per_subject=2, seed=7, size=64,
                             formats=("nrrd", "dicom", "nifti"), progress=False,
                             dicom_syntax="jpeg-lossless")
    return out, manifest


def test_manifest_lists_every_subject_split_by_subject(dataset):
    out, manifest = dataset
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "label", "split", "subject"]
    assert [r["subject"] for r in rows] == ["subject_0000", "subject_0001", "subject_0002"]
    assert rows[0]["image"] == "images/subject_0000.nrrd"
    assert sorted(r["split"] for r in rows) == ["train", "train", "val"]
    cases = read_manifest(manifest)
    assert all(c["image"].is_file() and c["label"].is_file() for c in cases)
    meta = json.loads((out / "subjects.json").read_text())
    assert set(meta) == {r["subject"] for r in rows}
    assert meta["subject_0000"]["z_mm"] == [-2.5, 2.5]


def test_default_dataset_is_bit_identical_to_before_the_torso_anatomy(dataset):
    """write_dataset with its old arguments writes what it wrote before levels= existed
    (digests computed from the code at commit c6067b8)."""
    out, manifest = dataset
    h = hashlib.sha256()
    for case in read_manifest(manifest):
        vol = read_volume(case["image"])
        lab = read_labels(case["label"], like=vol)
        h.update(np.ascontiguousarray(vol.array).tobytes())
        h.update(np.ascontiguousarray(lab.array).tobytes())
        h.update(np.asarray(vol.ijk_to_ras).round(6).tobytes())
    assert h.hexdigest()[:16] == "51e462fccaeeb243"
    assert hashlib.sha256((out / "subjects.json").read_bytes()).hexdigest()[:16] == \
        "2a431a550be32f67"
    assert hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] == "24750d75eab4c59b"


def test_dataset_of_the_torso_between_two_levels(tmp_path):
    from training.phantom.generate import levels_z_range

    manifest = write_dataset(tmp_path / "up", n_subjects=2, slices_per_subject=3, seed=4,
                             size=48, formats=("nrrd", "dicom"), progress=False,
                             levels=("T11", "L4"))
    meta = json.loads((tmp_path / "up" / "subjects.json").read_text())
    seeds = subject_seeds(4, 2)
    for i, case in enumerate(read_manifest(manifest)):
        m = meta[case["subject"]]
        lo, hi = levels_z_range(seeds[i], ("T11", "L4"))
        assert m["anatomy"] == "torso" and m["level_range"] == ["T11", "L4"]
        assert lo <= m["z_mm"][0] < m["z_mm"][-1] <= hi and len(m["levels"]) == 3
        vol = read_volume(case["image"])
        assert vol.array.shape == (3, 48, 48)
        assert vol.spacing[2] == pytest.approx(5.0) and vol.origin[2] == pytest.approx(m["z_mm"][0])
        first = make_slice(seeds[i], size=48, z_mm=m["z_mm"][0], anatomy="torso")
        assert np.array_equal(read_labels(case["label"], like=vol).array[0], first.labels)
        dcm = read_volume(tmp_path / "up" / "dicom" / case["subject"])
        assert np.array_equal(dcm.array, vol.array)
    # spread over the whole span: slices_per_subject evenly from the bottom of L4 to the top
    # of T11, the volume's spacing that gap
    write_dataset(tmp_path / "spread", n_subjects=1, slices_per_subject=4, seed=4, size=32,
                  progress=False, levels=("L4", "T11"), slice_gap_mm=None)
    m = json.loads((tmp_path / "spread" / "subjects.json").read_text())["subject_0000"]
    lo, hi = levels_z_range(seeds[0], ("T11", "L4"))
    assert m["z_mm"] == pytest.approx(list(np.linspace(lo, hi, 4)))
    vol = read_volume(tmp_path / "spread" / "images" / "subject_0000.nrrd")
    assert vol.spacing[2] == pytest.approx((hi - lo) / 3, abs=1e-3)
    with pytest.raises(ValueError, match="level"):
        write_dataset(tmp_path / "bad", n_subjects=1, size=32, progress=False,
                      levels=("T11", "L9"))
    with pytest.raises(ValueError, match="levels"):
        write_dataset(tmp_path / "bad2", n_subjects=1, size=32, progress=False,
                      slice_gap_mm=None)


def test_every_format_holds_the_same_volume(dataset):
    out, manifest = dataset
    for case in read_manifest(manifest):
        name = case["subject"]
        nrrd = read_volume(case["image"])
        assert nrrd.array.shape == (2, 64, 64)
        labels = read_labels(case["label"], like=nrrd)
        assert labels.array.max() == 5
        for other in (out / "images" / f"{name}.nii.gz", out / "dicom" / name):
            vol = read_volume(other)
            assert np.array_equal(vol.array, nrrd.array), other
            assert np.allclose(vol.ijk_to_ras, nrrd.ijk_to_ras, atol=1e-4), other
        assert np.array_equal(read_labels(out / "labels" / f"{name}-label.nii.gz",
                                          like=nrrd).array, labels.array)


def test_dataset_is_fixed_by_seed_and_not_overwritten(dataset, tmp_path):
    out, manifest = dataset
    assert subject_seeds(7, 2) == subject_seeds(7, 5)[:2]
    assert subject_seeds(7, 3) != subject_seeds(8, 3)
    assert split_subjects(10, 0.2, 7) == split_subjects(10, 0.2, 7)
    assert split_subjects(10, 0.2, 7).count("val") == 2
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_dataset(out, n_subjects=1, size=64, progress=False)
    with pytest.raises(ValueError, match="formats"):
        write_dataset(tmp_path, n_subjects=1, size=64, formats=("png",), progress=False)


def test_bundled_sample_is_the_phantom_it_says_it_is():
    ct = read_volume(sample_ct_path())
    labels = read_labels(sample_labels_path(), like=ct)
    assert ct.array.shape == (SAMPLE_SLICES, 512, 512)
    assert ct.spacing[2] == pytest.approx(SAMPLE_GAP_MM)
    assert ct.meta["dtype"] == "int16"
    assert sample_ct_path().stat().st_size + sample_labels_path().stat().st_size < 8e6
    z0 = slice_positions(SAMPLE_SLICES, SAMPLE_GAP_MM)[0]
    first = make_slice(SAMPLE_SEED, z_mm=z0)
    assert np.array_equal(ct.array[0], np.clip(np.round(first.hu), -32768, 32767))
    assert np.array_equal(labels.array[0], first.labels)
    assert ct.origin[2] == pytest.approx(z0)


def test_command_line_renders_a_slice(tmp_path):
    out = tmp_path / "slice.png"
    assert main(["slice", "--seed", "2", "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["dataset", "--output", str(tmp_path / "d"), "--subjects", "1", "--slices", "1",
                 "--size", "32", "--formats", "nifti"]) == 0
    assert (tmp_path / "d" / "images" / "subject_0000.nii.gz").is_file()
    assert main(["dataset", "--output", str(tmp_path / "d"), "--subjects", "1",
                 "--size", "32"]) == 2
    # the torso anatomy: one slice at a level, a dataset between two levels
    assert main(["slice", "--seed", "2", "--level", "T12", "--output", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["dataset", "--output", str(tmp_path / "u"), "--subjects", "1", "--slices", "3",
                 "--size", "32", "--levels", "T11", "L4", "--spread"]) == 0
    m = json.loads((tmp_path / "u" / "subjects.json").read_text())["subject_0000"]
    assert m["anatomy"] == "torso" and m["level_range"] == ["T11", "L4"]
    assert main(["dataset", "--output", str(tmp_path / "v"), "--subjects", "1", "--size", "32",
                 "--levels", "T11", "X9"]) == 2
    assert main(["dataset", "--output", str(tmp_path / "w"), "--subjects", "1", "--size", "32",
                 "--spread"]) == 2
