"""NIfTI / NRRD volumes and label maps, grid checks, manifests, and safe writing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from EPDSegmentationLib.io import (InputError, read_labels, read_manifest, read_volume,
                                   write_manifest, write_volume)
from EPDSegmentationLib.core.volume import Volume, ijk_to_ras_matrix


def _rotation(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


@pytest.fixture
def ct():
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1500, (5, 24, 30)).astype(np.float32)
    # an oblique, flipped grid: directions other than identity must survive LPS <-> RAS
    m = ijk_to_ras_matrix((0.71, 0.82, 2.5), (12.5, -40.0, 88.0),
                          _rotation(20) @ np.diag([-1.0, 1.0, 1.0]))
    return Volume(arr, m, {"source": "test"})


@pytest.mark.parametrize("name", ["ct.nrrd", "ct.nii.gz", "ct.nii"])
def test_volume_round_trip_keeps_values_and_geometry(tmp_path, ct, name):
    path = write_volume(ct, tmp_path / name)
    back = read_volume(path)
    assert back.array.dtype == np.float32
    assert np.array_equal(back.array, ct.array)
    assert np.allclose(back.ijk_to_ras, ct.ijk_to_ras, atol=1e-4)
    assert back.meta["format"] == ("nrrd" if name.endswith("nrrd") else "nifti")


def test_nrrd_is_lps_gzip_and_int16_when_asked(tmp_path, ct):
    import nrrd

    path = write_volume(ct, tmp_path / "ct.nrrd", dtype="int16")
    data, header = nrrd.read(str(path))
    assert header["space"] == "left-posterior-superior"
    assert header["encoding"] == "gzip"
    assert data.dtype == np.int16
    # LPS origin = RAS origin with x and y negated
    assert np.allclose(header["space origin"], [-12.5, 40.0, 88.0], atol=1e-4)


def test_write_refuses_to_overwrite_and_leaves_no_temp_files(tmp_path, ct):
    path = write_volume(ct, tmp_path / "ct.nrrd")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_volume(ct.with_array(ct.array + 1), path)
    assert path.read_bytes() == before
    write_volume(ct.with_array(ct.array + 1), path, overwrite=True)
    assert np.array_equal(read_volume(path).array, ct.array + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]
    with pytest.raises(ValueError, match="writes .nrrd, .nii or .nii.gz"):
        write_volume(ct, tmp_path / "ct.mha")


def test_labels_with_matching_grid(tmp_path, ct):
    lab = Volume(np.random.default_rng(1).integers(0, 6, ct.array.shape).astype(np.uint8),
                 ct.ijk_to_ras)
    img = write_volume(ct, tmp_path / "ct.nii.gz")
    lp = write_volume(lab, tmp_path / "ct-label.nii.gz")
    back = read_labels(lp, like=read_volume(img))
    assert back.array.dtype == np.uint8
    assert np.array_equal(back.array, lab.array)


def test_label_grid_that_does_not_match_the_image(tmp_path, ct):
    shifted = ct.ijk_to_ras.copy()
    shifted[:3, 3] += [0.0, 0.0, 2.5]
    lp = write_volume(Volume(np.zeros(ct.array.shape, np.uint8), shifted), tmp_path / "l.nrrd")
    with pytest.raises(InputError, match="label grid does not match the image.*origin") as err:
        read_labels(lp, like=ct)
    assert "l.nrrd" in str(err.value)
    small = write_volume(Volume(np.zeros((5, 24, 29), np.uint8), ct.ijk_to_ras),
                         tmp_path / "s.nrrd")
    with pytest.raises(InputError, match=r"grid \(5, 24, 29\).*differs"):
        read_labels(small, like=ct)


def test_label_values_outside_the_classes_or_not_integers(tmp_path, ct):
    bad = np.zeros(ct.array.shape, np.int16)
    bad[0, 0, :3] = [7, 9, -1]
    lp = write_volume(Volume(bad, ct.ijk_to_ras), tmp_path / "bad.nrrd")
    with pytest.raises(InputError, match="label values -1, 7, 9 outside the classes 0..5"):
        read_labels(lp)
    frac = write_volume(Volume(np.full(ct.array.shape, 0.5, np.float32), ct.ijk_to_ras),
                        tmp_path / "f.nii.gz")
    with pytest.raises(InputError, match="non-integer values"):
        read_labels(frac)


def test_corrupt_and_unknown_files(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 20)
    with pytest.raises(InputError, match="broken.nii.gz: cannot be read"):
        read_volume(broken)
    other = tmp_path / "scan.mha"
    other.write_bytes(b"xx")
    with pytest.raises(InputError, match="unknown file type '.mha'"):
        read_volume(other)
    with pytest.raises(InputError, match="label file not found"):
        read_labels(tmp_path / "nope.nrrd")


def test_a_mask_is_not_ct(tmp_path, ct):
    p = write_volume(Volume(np.ones(ct.array.shape, np.uint8), ct.ijk_to_ras), tmp_path / "m.nrrd")
    with pytest.raises(InputError, match="1 distinct values in 1..1: a mask or label map"):
        read_volume(p)
    lab = np.random.default_rng(2).integers(0, 6, ct.array.shape).astype(np.uint8)
    p = write_volume(Volume(lab, ct.ijk_to_ras), tmp_path / "l.nrrd")
    with pytest.raises(InputError, match="6 distinct values in 0..5: a mask or label map"):
        read_volume(p)


def test_manifest_csv_and_json(tmp_path, ct):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    img = write_volume(ct, tmp_path / "images" / "a.nrrd")
    lab = write_volume(ct.with_array(np.zeros(ct.array.shape, np.uint8)),
                       tmp_path / "labels" / "a-label.nrrd")
    m = write_manifest([{"image": img, "label": lab, "split": "train", "subject": "a"}],
                       tmp_path / "manifest.csv")
    assert m.read_text().splitlines() == ["image,label,split,subject",
                                          "images/a.nrrd,labels/a-label.nrrd,train,a"]
    rows = read_manifest(m)
    assert rows == [{"image": img.resolve(), "label": lab.resolve(), "split": "train",
                     "subject": "a"}]
    j = tmp_path / "manifest.json"
    j.write_text(json.dumps({"cases": [{"image": "images/a.nrrd", "label": "labels/a-label.nrrd",
                                        "split": "VAL"}]}))
    rows = read_manifest(j)
    assert rows[0]["split"] == "val" and rows[0]["subject"] == "a.nrrd"


@pytest.mark.parametrize("text, message", [
    ("image,split\nimages/a.nrrd,train\n", r"lacks column\(s\) \['label'\]"),
    ("image,label,split\nimages/b.nrrd,labels/a-label.nrrd,train\n", "row 2: image .*b.nrrd does not exist"),
    ("image,label,split\nimages/a.nrrd,labels/a-label.nrrd,holdout\n", "split 'holdout' is not one of"),
    ("image,label,split\n", "lists no cases"),
])
def test_manifest_errors_name_the_row_and_problem(tmp_path, ct, text, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    write_volume(ct, tmp_path / "images" / "a.nrrd")
    write_volume(ct.with_array(np.zeros(ct.array.shape, np.uint8)), tmp_path / "labels" / "a-label.nrrd")
    m = tmp_path / "m.csv"
    m.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        read_manifest(m)
    assert "m.csv" in str(err.value)


@pytest.mark.parametrize("name", ["ct.nii", "ct.nii.gz"])
def test_nan_and_inf_in_nifti_are_refused_not_read_as_0_hu(tmp_path, ct, name):
    """SimpleITK's NIfTI reader turns NaN and inf into 0: the file itself is checked."""
    bad = ct.array.copy()
    bad[0, 0, :3] = [np.nan, np.inf, -np.inf]
    path = write_volume(ct.with_array(bad), tmp_path / name)
    with pytest.raises(InputError, match="3 voxel\\(s\\) that are not finite") as err:
        read_volume(path)
    assert str(path) in str(err.value)
    all_nan = write_volume(ct.with_array(np.full_like(bad, np.nan)), tmp_path / ("n" + name))
    with pytest.raises(InputError, match="not finite") as err:
        read_volume(all_nan)
    assert "every voxel is 0" not in str(err.value)
    assert read_volume(write_volume(ct, tmp_path / ("ok" + name))).array.shape == ct.array.shape


def test_sheared_grid_is_refused(tmp_path, ct):
    """Non-orthogonal axes (a sheared NRRD): areas from the spacing alone would be wrong."""
    import nrrd

    dirs = np.array([[0.8, 0.0, 0.0], [0.24, 0.8, 0.0], [0.0, 0.0, 2.5]])  # rows: i, j, k
    path = tmp_path / "sheared.nrrd"
    nrrd.write(str(path), np.zeros((30, 24, 5), np.int16) - 500,
               {"space": "left-posterior-superior", "space directions": dirs,
                "space origin": [0.0, 0.0, 0.0]})
    with pytest.raises(InputError, match="not at right angles \\(sheared by 16.70 degrees"):
        read_volume(path)
    ok = tmp_path / "ok.nrrd"
    dirs[1, 0] = 0.0
    nrrd.write(str(ok), np.zeros((30, 24, 5), np.int16) - 500,
               {"space": "left-posterior-superior", "space directions": dirs,
                "space origin": [0.0, 0.0, 0.0]})
    assert read_volume(ok).array.shape == (5, 24, 30)
