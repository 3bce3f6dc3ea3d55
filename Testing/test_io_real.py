"""Real clinical files from ../shared/data/totalseg-example (skipped when absent).

What "matching geometry" can honestly mean here: the DICOM series (T11/T12, 0.98 mm, 2 mm
spacing) and the NIfTI volumes (3 mm) are different scans, so the DICOM series is checked
against ITK/GDCM's own reading of the same files, and the NIfTI CT against its masks on the
same grid.
"""

from __future__ import annotations

import numpy as np
import pytest

from EPDSegmentationLib.io import InputError, read_labels, read_volume


@pytest.fixture(scope="module")
def real_dir(totalseg_dir):
    return totalseg_dir


@pytest.fixture(scope="module")
def dicom(real_dir):
    return read_volume(real_dir / "ct_dicom")


def test_jpeg2000_series_reads_like_itk_reads_it(real_dir, dicom):
    import SimpleITK as sitk

    assert dicom.array.shape == (20, 512, 512)
    assert np.allclose(dicom.spacing, (0.9765625, 0.9765625, 2.0))
    assert dicom.meta["transfer_syntaxes"] == ["1.2.840.10008.1.2.4.90"]
    assert dicom.meta["modality"] == "CT"
    # the anonymised files have blank SOPInstanceUIDs: the file meta supplies them
    uids = dicom.meta["sop_instance_uids"]
    assert len(set(uids)) == 20 and all(uids)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(real_dir / "ct_dicom")))
    img = reader.Execute()
    assert np.array_equal(sitk.GetArrayFromImage(img).astype(np.float32), dicom.array)
    flip = np.diag([-1.0, -1.0, 1.0])
    assert np.allclose(flip @ np.array(img.GetOrigin()), dicom.origin, atol=1e-3)
    assert np.allclose(flip @ np.array(img.GetDirection()).reshape(3, 3), dicom.directions)
    assert np.allclose(img.GetSpacing(), dicom.spacing, atol=1e-4)
    # CT numbers: air outside, fat and soft tissue inside
    assert np.median(dicom.array[:, :20, :20]) <= -1000
    mid = dicom.array[10]
    assert ((mid > -190) & (mid < -30)).sum() > 10000


def test_one_real_slice_as_a_single_file(real_dir, dicom):
    k = 7
    one = read_volume(dicom.meta["files"][k])
    assert one.array.shape == (1, 512, 512)
    assert np.array_equal(one.array[0], dicom.array[k])
    assert np.allclose(one.origin, (dicom.ijk_to_ras @ [0, 0, k, 1])[:3], atol=1e-3)


def test_nifti_ct_and_its_masks_share_the_grid(real_dir):
    ct = read_volume(real_dir / "ct_t11_l2.nii.gz")
    assert ct.array.shape == (30, 101, 122)
    assert np.allclose(ct.spacing, (3.0, 3.0, 3.0))
    means = {}
    for name in ("skeletal_muscle", "subcutaneous_fat", "torso_fat"):
        mask = read_labels(real_dir / f"tissue_{name}.nii.gz", like=ct)
        assert set(np.unique(mask.array)) == {0, 1}
        means[name] = float(ct.array[mask.array > 0].mean())
    # GUIDE section 6: muscle 18 HU, subcutaneous fat -92, torso fat -84
    assert means["skeletal_muscle"] == pytest.approx(18, abs=5)
    assert means["subcutaneous_fat"] == pytest.approx(-92, abs=5)
    assert means["torso_fat"] == pytest.approx(-84, abs=5)


def test_the_t11_l2_volume_is_a_slab_of_the_abdomen_volume(real_dir):
    """Same in-plane grid and voxels: ct_t11_l2 holds slices 82..111 of ct_abdomen_pelvis
    (its header keeps the parent's origin, so its z placement is not comparable)."""
    small = read_volume(real_dir / "ct_t11_l2.nii.gz")
    big = read_volume(real_dir / "ct_abdomen_pelvis.nii.gz")
    assert np.allclose(small.ijk_to_ras[:3, :3], big.ijk_to_ras[:3, :3])
    assert np.allclose(small.origin[:2], big.origin[:2])
    assert np.array_equal(small.array, big.array[82:112])


def test_a_label_map_with_other_classes_is_refused(real_dir):
    ct = read_volume(real_dir / "ct_abdomen_pelvis.nii.gz")
    with pytest.raises(InputError, match="ct_abdomen_pelvis_structures.nii.gz: holds label "
                                         "values .* outside the classes 0..5"):
        read_labels(real_dir / "ct_abdomen_pelvis_structures.nii.gz", like=ct)
