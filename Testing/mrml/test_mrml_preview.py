"""EPD preview on a real vtkMRMLScene: downsampled grid geometry, the soft map, the area
table, label sources of both kinds, and the linked side-by-side views."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from scene import add_ct, label_stack, node_ids, predictor, soft_maps  # noqa: E402

from EPDSegmentationLib.core.classes import NUM_CLASSES, TISSUES  # noqa: E402
from EPDSegmentationLib.core.epd import epd_labels, nearest_labels  # noqa: E402
from EPDSegmentationLib.mrml.nodes import (InputProblem, ijk_to_ras,  # noqa: E402
                                           slice_index_at, vtk_matrix)
from EPDSegmentationLib.mrml.preview import epd_preview  # noqa: E402
from EPDSegmentationLib.mrml.segmentation import fractional_probabilities  # noqa: E402
from EPDSegmentationLib.mrml.tables import table_rows  # noqa: E402
from EPDSegmentationLib.mrml.views import (PREVIEW_LAYOUT_ID, composite_node,  # noqa: E402
                                           red_slice_ras, show_preview, show_results,
                                           slice_node)
from EPDSegmentationLib.mrml.workflow import segment_volume  # noqa: E402


@pytest.fixture
def labelmap_case(mrml):
    labels = label_stack(3, 64)
    ct = add_ct(mrml.scene, labels)
    lab = mrml.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "truth")
    slicer.util.updateVolumeFromArray(lab, labels)
    lab.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras(ct)))
    return mrml, ct, lab, labels


def _ras(m, ijk):
    return (np.asarray(m) @ np.append(np.asarray(ijk, float), 1.0))[:3]


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_low_resolution_voxels_sit_at_the_centres_of_their_windows(labelmap_case, factor):
    mrml, ct, lab, labels = labelmap_case
    out = epd_preview(mrml.scene, lab, factor, "IMAT", reference_volume=ct)
    m_full = ijk_to_ras(lab)
    m_low = ijk_to_ras(out.nearest)
    for (i, j, k) in ((0, 0, 0), (3, 1, 2), (64 // factor - 1, 64 // factor - 1, 1)):
        window = [_ras(m_full, (i * factor + a, j * factor + b, k))
                  for a in range(factor) for b in range(factor)]
        np.testing.assert_allclose(_ras(m_low, (i, j, k)), np.mean(window, axis=0), atol=1e-9)
    np.testing.assert_allclose(out.nearest.GetSpacing(),
                               np.array(lab.GetSpacing()) * (factor, factor, 1))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(out.nearest),
                                  nearest_labels(labels, factor))


def test_epd_map_and_area_table(labelmap_case):
    mrml, ct, lab, labels = labelmap_case
    out = epd_preview(mrml.scene, lab, 4, "IMAT")
    probs, m, k0 = fractional_probabilities(out.soft)
    expected = np.moveaxis(epd_labels(labels, NUM_CLASSES, 4), 1, 0)
    assert probs.shape == expected.shape and k0 == 0
    assert np.abs(probs[1:] - expected[1:]).max() <= 0.5 / 216 + 1e-6
    np.testing.assert_allclose(m, ijk_to_ras(out.nearest))
    display = out.soft.GetDisplayNode()
    assert display.GetSegmentVisibility("IMAT") and not display.GetSegmentVisibility("SAT")
    rows = {r["tissue"]: r for r in table_rows(out.table)}
    pixel_cm2 = np.prod(lab.GetSpacing()[:2]) / 100
    for c in TISSUES:
        assert rows[c.key]["original_cm2"] == pytest.approx((labels == c.index).sum() * pixel_cm2)
        assert rows[c.key]["epd_cm2"] == pytest.approx(rows[c.key]["original_cm2"], rel=1e-9)
        assert rows[c.key]["epd_error_pct"] == pytest.approx(0.0, abs=1e-7)
        near = (nearest_labels(labels, 4) == c.index).sum() * pixel_cm2 * 16
        assert rows[c.key]["nearest_cm2"] == pytest.approx(near)
    assert abs(rows["IMAT"]["nearest_error_pct"]) > 1.0    # thin tissue: nearest misstates it


def test_probability_volume_for_the_chosen_class(labelmap_case):
    mrml, ct, lab, labels = labelmap_case
    out = epd_preview(mrml.scene, lab, 2, "SAT", soft_kind="probability")
    assert out.soft.IsA("vtkMRMLScalarVolumeNode") and not out.soft.IsA(
        "vtkMRMLLabelMapVolumeNode")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(out.soft),
                               epd_labels(labels, NUM_CLASSES, 2)[:, 3], atol=1e-6)


def test_segmentation_source_gives_the_same_preview(labelmap_case):
    mrml, ct, lab, labels = labelmap_case
    onehot = (np.arange(NUM_CLASSES)[:, None, None, None] == labels[None]).astype(np.float32)
    seg = segment_volume(mrml.scene, ct, predictor(onehot)).segmentation
    from_seg = epd_preview(mrml.scene, seg, 4, "IMAT", reference_volume=ct)
    from_lab = epd_preview(mrml.scene, lab, 4, "IMAT")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(from_seg.nearest),
                                  slicer.util.arrayFromVolume(from_lab.nearest))
    assert table_rows(from_seg.table) == table_rows(from_lab.table)


def test_segment_names_map_to_classes_and_bad_sources_are_named(labelmap_case):
    mrml, ct, lab, labels = labelmap_case
    scene = mrml.scene
    manual = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    manual.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    for name, cls in (("subcutaneous fat", 3), ("Skeletal muscle", 1)):
        sid = manual.GetSegmentation().AddEmptySegment(name)
        mask = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        slicer.util.updateVolumeFromArray(mask, (labels == cls).astype(np.uint8))
        mask.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras(ct)))
        image = logic.CreateOrientedImageDataFromVolumeNode(mask)
        assert logic.SetBinaryLabelmapToSegment(image, manual, sid)
        scene.RemoveNode(mask)
    out = epd_preview(scene, manual, 2, "SAT", reference_volume=ct)
    rows = {r["tissue"]: r for r in table_rows(out.table)}
    assert rows["SAT"]["original_cm2"] > 0 and rows["MUS"]["original_cm2"] > 0
    assert rows["VAT"]["original_cm2"] == 0
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "liver work")
    other.GetSegmentation().AddEmptySegment("liver")
    with pytest.raises(InputProblem, match="No segment of 'liver work' names a tissue class"):
        epd_preview(scene, other, 2, "SAT")
    wrong = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "totalseg")
    slicer.util.updateVolumeFromArray(wrong, (labels * 20).astype(np.uint8))
    with pytest.raises(InputProblem, match="'totalseg' holds label values 0..100"):
        epd_preview(scene, wrong, 2, "SAT")
    with pytest.raises(InputProblem, match="No label source"):
        epd_preview(scene, None, 2, "SAT")
    before = node_ids(scene)
    with pytest.raises(InputProblem, match="factor"):
        epd_preview(scene, lab, 3, "SAT")
    assert node_ids(scene) == before


def test_views_side_by_side_and_linked(labelmap_case):
    mrml, ct, lab, labels = labelmap_case
    mrml.add_views()
    scene = mrml.scene
    out = epd_preview(scene, lab, 4, "IMAT", reference_volume=ct)
    show_preview(scene, ct, out)
    layout = scene.GetNodesByClass("vtkMRMLLayoutNode").GetItemAsObject(0)
    assert layout.GetViewArrangement() == PREVIEW_LAYOUT_ID
    assert "Yellow" in layout.GetLayoutDescription(PREVIEW_LAYOUT_ID)
    red, yellow, green = (composite_node(scene, v) for v in ("Red", "Yellow", "Green"))
    for comp in (red, yellow, green):
        assert comp.GetBackgroundVolumeID() == ct.GetID()
        assert comp.GetLinkedControl() and comp.GetHotLinkedControl()
    for view in ("Red", "Yellow", "Green"):
        assert slice_node(scene, view).GetOrientation() == "Axial"
    assert red.GetLabelVolumeID() == lab.GetID()
    assert yellow.GetLabelVolumeID() == out.nearest.GetID()
    display = out.soft.GetDisplayNode()
    assert display.GetViewNodeIDs() == (slice_node(scene, "Green").GetID(),)
    table_view = scene.GetNodesByClass("vtkMRMLTableViewNode").GetItemAsObject(0)
    assert table_view.GetTableNodeID() == out.table.GetID()
    # after a segmentation run: the CT everywhere and the measures in the table view
    result = segment_volume(scene, ct, predictor(soft_maps(labels)), soft_segmentation=True)
    show_results(scene, ct, result)
    assert table_view.GetTableNodeID() == result.table.GetID()
    assert red.GetLabelVolumeID() is None
    assert not result.soft_segmentation.GetDisplayNode().GetVisibility()


def test_slice_under_the_red_view(labelmap_case):
    mrml, ct, lab, labels = labelmap_case
    mrml.add_views()
    red = slice_node(mrml.scene, "Red")
    centre = (np.asarray(ijk_to_ras(ct)) @ [10, 20, 2, 1])[:3]
    red.JumpSliceByCentering(*centre)
    assert slice_index_at(ct, red_slice_ras(mrml.scene)) == 2
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[2, 3] = 2.5                     # one slice up
    transform.SetMatrixTransformToParent(vtk_matrix(shift))
    ct.SetAndObserveTransformNodeID(transform.GetID())
    assert slice_index_at(ct, centre) == 1
    with pytest.raises(InputProblem, match="outside"):
        slice_index_at(ct, centre + [0, 0, 100])
