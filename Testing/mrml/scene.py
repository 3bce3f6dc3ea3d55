"""Helpers of the MRML tests (their fixtures are in conftest.py): a real vtkMRMLScene with the segmentation converter rules
(slicer-core wheel), CT volumes made from known label maps, and predict callables that return
real soft maps (EPD fractions of those label maps, upsampled) instead of a network."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from EPDSegmentationLib.core.classes import NUM_CLASSES  # noqa: E402
from EPDSegmentationLib.core.epd import epd_labels, upsample_soft  # noqa: E402
from EPDSegmentationLib.core.example import example_labels  # noqa: E402
from EPDSegmentationLib.mrml.nodes import vtk_matrix  # noqa: E402
from EPDSegmentationLib.mrml.views import slice_node  # noqa: E402

#: Mean HU per class for the synthetic CT (BG is air).
CLASS_HU = np.array([-1000.0, 40.0, -80.0, -100.0, -90.0, 60.0])
SPACING = (0.8, 0.7, 2.5)            # I, J, K in mm
ORIGIN = (-25.0, 30.0, -120.0)


class Scene:
    """A vtkMRMLScene plus the logics that Slicer's application would hold."""

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        self.segmentations_logic.SetMRMLScene(self.scene)
        self.segmentations_logic.SetMRMLApplicationLogic(self.app_logic)

    def close(self):
        for logic in getattr(self, "slice_logics", []) + [getattr(self, "layout_logic", None)]:
            if logic is not None:
                logic.SetMRMLScene(None)
        self.segmentations_logic.SetMRMLScene(None)
        self.app_logic.SetMRMLScene(None)

    def add_views(self):
        """Layout, slice and table view nodes and slice composite nodes, as Slicer's layout
        manager and slice logics would create them."""
        self.layout_logic = slicer.vtkMRMLLayoutLogic()
        self.layout_logic.SetMRMLScene(self.scene)
        self.slice_logics = []
        for view in ("Red", "Yellow", "Green"):
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLScene(self.scene)
            logic.SetSliceNode(slice_node(self.scene, view))
            self.slice_logics.append(logic)
        self.scene.AddNewNodeByClass("vtkMRMLTableViewNode").SetSingletonTag("TableView1")


def label_stack(n_slices: int = 4, size: int = 64) -> np.ndarray:
    """uint8 (K, J, I): the example label map, shifted a little from slice to slice."""
    base = example_labels((size, size))
    return np.stack([np.roll(base, (k, -k), axis=(0, 1)) for k in range(n_slices)])


def ijk_to_ras_for(spacing=SPACING, origin=ORIGIN, flip_lps: bool = True) -> np.ndarray:
    """An IJK-to-RAS like a DICOM series' (I to the left, J to the back: -x, -y in RAS)."""
    m = np.eye(4)
    d = np.diag([-1.0, -1.0, 1.0]) if flip_lps else np.eye(3)
    m[:3, :3] = d * np.asarray(spacing)[None, :]
    m[:3, 3] = origin
    return m


def add_ct(scene, labels: np.ndarray, *, seed: int = 0, name: str = "CT",
           matrix=None, noise_hu: float = 10.0):
    """A scalar volume node of int16 HU made from class labels (K, J, I) plus noise."""
    rng = np.random.default_rng(seed)
    hu = CLASS_HU[labels] + rng.normal(0.0, noise_hu, labels.shape)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.rint(hu).astype(np.int16))
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras_for() if matrix is None else matrix))
    return node


def soft_maps(labels: np.ndarray, factor: int = 2) -> np.ndarray:
    """float32 (C, K, J, I): EPD fractions at 1/factor upsampled back (bilinear), as a
    network trained on EPD targets would output them; every voxel sums to 1."""
    shape = labels.shape[-2:]
    soft = upsample_soft(epd_labels(labels, NUM_CLASSES, factor), shape, factor)
    return np.moveaxis(soft, 1, 0).astype(np.float32)


def one_hot(labels: np.ndarray) -> np.ndarray:
    return (np.arange(NUM_CLASSES)[:, None, None, None] == labels[None]).astype(np.float32)


def predictor(probabilities: np.ndarray, calls=None, cancel_after=None):
    """predict(slices, progress, should_cancel) serving planes of a fixed (C, K, J, I) array."""

    def predict(slices, progress=None, should_cancel=None):
        if calls is not None:
            calls.append(list(slices))
        if progress is not None:
            progress(len(slices), len(slices))
        return probabilities[:, list(slices)], "cpu", ["served from a fixed array"]

    return predict


def node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))
