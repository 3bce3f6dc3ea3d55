"""Soft labels survive an ordinary scene save and re-open: the scene is written with the
segmentation's default storage node (vtkMRMLSegmentationStorageNode, as Slicer's Save does),
read back by vtkMRMLScene.Connect, and restore_soft_labels (run on EndImportEvent by the
module) makes the segments fractional again with the same values."""

from __future__ import annotations

import numpy as np

from EPDSegmentationLib.mrml.segmentation import (FRACTIONAL, fill_fractional_segmentation,
                                                  fill_tissue_segmentation,
                                                  fractional_probabilities,
                                                  restore_soft_labels)
from scene import Scene, ijk_to_ras_for, label_stack, soft_maps


def _save_scene(scene, folder):
    nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
        storage.SetFileName(str(folder / f"{node.GetName()}.seg.nrrd"))
        assert storage.WriteData(node)
    scene.SetRootDirectory(str(folder))
    scene.SetURL(str(folder / "scene.mrml"))
    assert scene.Commit()


def test_fractional_segmentation_round_trips_through_a_saved_scene(mrml, tmp_path):
    labels = label_stack(3, 32)
    soft = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "soft")
    fill_fractional_segmentation(soft, soft_maps(labels)[1:], ijk_to_ras_for(), k0=0)
    hard = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "hard")
    fill_tissue_segmentation(hard, labels, ijk_to_ras_for())
    before, _, _ = fractional_probabilities(soft)
    _save_scene(mrml.scene, tmp_path)

    again = Scene()
    try:
        again.scene.SetURL(str(tmp_path / "scene.mrml"))
        assert again.scene.Connect()
        back = again.scene.GetFirstNodeByName("soft")
        # what the storage node alone gives: binary labelmaps
        assert back.GetSegmentation().GetSourceRepresentationName() != FRACTIONAL
        restored = restore_soft_labels(again.scene)
        assert [n.GetName() for n in restored] == ["soft"]
        assert back.GetSegmentation().GetSourceRepresentationName() == FRACTIONAL
        after, _, _ = fractional_probabilities(back)
        assert after.shape == before.shape
        assert np.abs(after - before).max() == 0.0
        assert 0.0 < after[2].max() and after[2].min() < 1.0   # really fractional
        # the binary result stays binary; running again restores nothing
        assert again.scene.GetFirstNodeByName("hard").GetSegmentation() \
            .GetSourceRepresentationName() == "Binary labelmap"
        assert restore_soft_labels(again.scene) == []
    finally:
        again.close()
