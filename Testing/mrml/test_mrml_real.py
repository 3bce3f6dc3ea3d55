"""The workflow on real files read the way Slicer reads them (vtkMRMLVolumeArchetypeStorageNode):
the bundled sample CT with its label map, and the shared real CT with TotalSegmentator's tissue
masks (skipped when ../shared is absent)."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
torch = pytest.importorskip("torch")

from EPDSegmentationLib.mrml.nodes import (check_ct_volume, ijk_to_ras,  # noqa: E402
                                           slice_pixel_mm, volume_array)
from EPDSegmentationLib.mrml.preview import epd_preview  # noqa: E402
from EPDSegmentationLib.mrml.tables import table_rows  # noqa: E402
from EPDSegmentationLib.mrml.workflow import model_predictor, segment_volume  # noqa: E402
from EPDSegmentationLib.core.resources import sample_ct_path, sample_labels_path  # noqa: E402


def load_volume(scene, path, labelmap: bool = False):
    """A volume node read from a file by the storage node Slicer uses for volumes."""
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, str(path).split("/")[-1].split(".")[0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetCenterImage(False)
    assert storage.ReadData(node), f"cannot read {path}"
    return node


@pytest.fixture
def sample(mrml):
    try:
        ct_path, label_path = sample_ct_path(), sample_labels_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    scene = mrml.scene
    return scene, load_volume(scene, ct_path), load_volume(scene, label_path, labelmap=True)


def test_bundled_sample_segments_with_a_saved_model(sample, tiny_model):
    scene, ct, _ = sample
    check_ct_volume(ct)                                    # HU, axial, 3D
    model, card = tiny_model
    k = ct.GetImageData().GetDimensions()[2] // 2
    predict = model_predictor(model, card, volume_array(ct), slice_pixel_mm(ijk_to_ras(ct)),
                              device="cpu")
    out = segment_volume(scene, ct, predict, slices=[k], soft_segmentation=True)
    assert out.segmentation.GetSegmentation().GetNumberOfSegments() == 5
    rows = table_rows(out.table)
    assert [r["slice"] for r in rows] == [str(k)] * 5 + ["all"] * 5
    pixel_cm2 = np.prod(ct.GetSpacing()[:2]) / 100
    slice_cm2 = 512 * 512 * pixel_cm2
    assert 0 < sum(r["area_cm2"] for r in rows[:5]) < slice_cm2


def test_bundled_sample_labels_preview(sample):
    scene, ct, labels_node = sample
    labels = slicer.util.arrayFromVolume(labels_node)
    out = epd_preview(scene, labels_node, 4, "IMAT", reference_volume=ct)
    rows = {r["tissue"]: r for r in table_rows(out.table)}
    pixel_cm2 = np.prod(labels_node.GetSpacing()[:2]) / 100
    assert rows["IMAT"]["original_cm2"] == pytest.approx((labels == 2).sum() * pixel_cm2)
    for r in rows.values():
        assert r["epd_error_pct"] == pytest.approx(0.0, abs=1e-7)
    assert abs(rows["IMAT"]["nearest_error_pct"]) > abs(rows["SAT"]["nearest_error_pct"])


def _mask_segmentation(scene, ct, masks):
    """A segmentation with one segment per mask file, named as TotalSegmentator names them."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "TotalSegmentator tissues")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    for name, path in masks.items():
        mask = load_volume(scene, path, labelmap=True)
        sid = seg.GetSegmentation().AddEmptySegment(name)
        image = logic.CreateOrientedImageDataFromVolumeNode(mask)
        assert logic.SetBinaryLabelmapToSegment(image, seg, sid)
        scene.RemoveNode(mask)
    return seg


def test_real_ct_and_totalsegmentator_masks(mrml, totalseg_dir, tiny_model):
    """Real CT (3 mm) with TotalSegmentator's tissue masks as a label source: names map to
    classes, areas equal the masks' voxel counts read independently with SimpleITK, EPD
    keeps them exactly."""
    sitk = pytest.importorskip("SimpleITK")
    scene = mrml.scene
    ct = load_volume(scene, totalseg_dir / "ct_t11_l2.nii.gz")
    check_ct_volume(ct)
    masks = {"skeletal_muscle": totalseg_dir / "tissue_skeletal_muscle.nii.gz",
             "subcutaneous_fat": totalseg_dir / "tissue_subcutaneous_fat.nii.gz",
             "torso_fat": totalseg_dir / "tissue_torso_fat.nii.gz"}
    seg = _mask_segmentation(scene, ct, masks)
    out = epd_preview(scene, seg, 2, "SAT", reference_volume=ct)
    rows = {r["tissue"]: r for r in table_rows(out.table)}
    for key, name in (("MUS", "skeletal_muscle"), ("SAT", "subcutaneous_fat"),
                      ("VAT", "torso_fat")):
        image = sitk.ReadImage(str(masks[name]))
        count = int((sitk.GetArrayFromImage(image) > 0).sum())
        sx, sy, _ = image.GetSpacing()
        assert rows[key]["original_cm2"] == pytest.approx(count * sx * sy / 100, rel=1e-9), key
        assert rows[key]["epd_cm2"] == pytest.approx(rows[key]["original_cm2"], rel=1e-9)
    assert rows["IMAT"]["original_cm2"] == 0
    # the real CT through a (random-weight) network, one slice, CPU
    model, card = tiny_model
    predict = model_predictor(model, card, volume_array(ct), slice_pixel_mm(ijk_to_ras(ct)),
                              device="cpu")
    result = segment_volume(scene, ct, predict, slices=[15])
    assert any("resampled" in n for n in result.notes)     # 3 mm pixels -> the model's 0.8 mm
    assert result.segmentation.GetSegmentation().GetNumberOfSegments() == 5
