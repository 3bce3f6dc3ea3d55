"""MRML volume nodes and the scene: arrays and geometry, input checks, new nodes placed beside
their source, and undoing a run that fails or is cancelled.

Only MRML/VTK classes (the ``slicer`` package): the module's Logic passes slicer.mrmlScene,
the tests pass their own vtkMRMLScene built with the slicer-core wheel. Arrays are (K, J, I)
as slicer.util.arrayFromVolume gives them; geometry is the 4 x 4 IJK-to-RAS matrix in mm.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import slicer
import vtk

from ..core.classes import CLASSES
from ..io.outputs import safe_stem
from ..core.volume import HU_CEILING_OF_MINIMUM, hu_range_problem  # noqa: F401  (the one CT rule)

#: The slice axis (K) must be this close to superior-inferior (|cosine|) for axial slices.
AXIAL_COSINE = 0.7
#: Smallest in-plane size the network can take (it pads to multiples of 32 itself).
MIN_SLICE_PIXELS = 16
COLOR_TABLE_NAME = "EPD tissue classes"
#: Slicer's colour map for probabilities (loaded by the Colors module; grey without it).
PROBABILITY_COLORS = "vtkMRMLColorTableNodeFileViridis.txt"
#: Node attribute marking nodes this module created (value: what the node holds).
ROLE_ATTRIBUTE = "EPDSegmentation.Role"


class InputProblem(ValueError):
    """An input node that cannot be used; the message says which node and why."""


# ----------------------------------------------------------------------------- geometry


def vtk_matrix(m) -> vtk.vtkMatrix4x4:
    """A vtkMatrix4x4 from a 4 x 4 array."""
    m = np.asarray(m, np.float64)
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def numpy_matrix(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], np.float64)


def ijk_to_ras(node) -> np.ndarray:
    """The node's IJK-to-RAS matrix (4 x 4, mm), without parent transforms."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return numpy_matrix(m)


def spacing_ijk(m: np.ndarray) -> Tuple[float, float, float]:
    """Voxel size (I, J, K) in mm of an IJK-to-RAS matrix."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(m)[:3, :3], axis=0))


def slice_pixel_mm(m: np.ndarray) -> Tuple[float, float]:
    """(row mm, column mm) = (J, I) spacing, as inference.predict_volume takes it."""
    si, sj, _ = spacing_ijk(m)
    return sj, si


def world_to_node_ras(node, ras_world: Sequence[float]) -> np.ndarray:
    """A world RAS point in the node's own coordinates (through its parent transforms)."""
    p = np.asarray(ras_world, np.float64)[:3]
    parent = node.GetParentTransformNode()
    if parent is None:
        return p
    t = vtk.vtkGeneralTransform()
    parent.GetTransformFromWorld(t)
    return np.asarray(t.TransformPoint(*p), np.float64)


def slice_index_at(volume_node, ras_world: Sequence[float]) -> int:
    """Index K of the volume slice nearest a world RAS point (e.g. the red view's centre).

    InputProblem when the point lies outside the volume's slice range."""
    local = world_to_node_ras(volume_node, ras_world)
    m = ijk_to_ras(volume_node)
    ijk = np.linalg.solve(m, np.append(local, 1.0))[:3]
    k = int(np.floor(ijk[2] + 0.5))
    n = volume_node.GetImageData().GetDimensions()[2]
    if not 0 <= k < n:
        raise InputProblem(f"The red slice view (S = {ras_world[2]:.1f} mm) is outside "
                           f"'{volume_node.GetName()}' (slices 0..{n - 1}); move the red view "
                           f"into the volume or choose another slice option.")
    return k


# ----------------------------------------------------------------------------- inputs


def check_ct_volume(node) -> None:
    """InputProblem unless ``node`` is a 3D single-component scalar volume with axial slices
    and values in Hounsfield units (volume.hu_range_problem, the rule the command line
    uses too)."""
    if node is None:
        raise InputProblem("No input volume: select a CT volume (or load the sample CT).")
    name = node.GetName()
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputProblem(f"'{name}' is a label map, not a CT image: select the CT volume.")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputProblem(f"'{name}' is a {node.GetClassName()}, not a scalar CT volume.")
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputProblem(f"'{name}' holds no image data.")
    comps = image.GetNumberOfScalarComponents()
    if comps != 1:
        raise InputProblem(f"'{name}' has {comps} values per voxel (a 4D, multi-volume or "
                           f"colour image); select a single 3D CT volume.")
    i, j, k = image.GetDimensions()
    if min(i, j) < MIN_SLICE_PIXELS or k < 1:
        raise InputProblem(f"'{name}' is {i} x {j} x {k} voxels; axial slices of at least "
                           f"{MIN_SLICE_PIXELS} x {MIN_SLICE_PIXELS} are needed.")
    m = ijk_to_ras(node)
    k_axis = m[:3, 2] / np.linalg.norm(m[:3, 2])
    if abs(k_axis[2]) < AXIAL_COSINE:
        raise InputProblem(f"'{name}' is not an axial series (its slice axis points "
                           f"({k_axis[0]:.2f}, {k_axis[1]:.2f}, {k_axis[2]:.2f}) in RAS); "
                           f"resample it to axial slices first.")
    problem = hu_range_problem(*image.GetScalarRange())
    if problem:
        raise InputProblem(f"'{name}' {problem}")


def volume_array(node) -> np.ndarray:
    """The voxels (K, J, I) of a scalar volume node (a view, not a copy)."""
    return slicer.util.arrayFromVolume(node)


# ----------------------------------------------------------------------------- new nodes


def unique_name(scene, base: str) -> str:
    """``base``, or ``base`` with a number, unused by any node in the scene."""
    return scene.GenerateUniqueName(base) if scene.GetFirstNodeByName(base) else base


def safe_file_stem(name: str) -> str:
    """A node name made safe for a file name."""
    return safe_stem(name, default="segmentation")


def tissue_color_table(scene):
    """The scene's colour table of the tissue classes (created once, reused)."""
    nodes = scene.GetNodesByClass("vtkMRMLColorTableNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(ROLE_ATTRIBUTE) == "colors":
            return node
    table = slicer.vtkMRMLColorTableNode()
    table.SetName(COLOR_TABLE_NAME)
    table.SetTypeToUser()
    table.SetNumberOfColors(len(CLASSES))
    for c in CLASSES:
        r, g, b = (v / 255.0 for v in c.color)
        table.SetColor(c.index, c.key, r, g, b, 0.0 if c.index == 0 else 1.0)
    table.SetAttribute(ROLE_ATTRIBUTE, "colors")
    table.SetHideFromEditors(True)
    scene.AddNode(table)
    return table


def add_volume(scene, array: np.ndarray, ijk_to_ras_matrix, name: str, *,
               labelmap: bool = False, probability: bool = False, role: str = ""):
    """A new scalar (or label map) volume node holding a copy of ``array`` (K, J, I) on the
    given grid, with a display node: label maps use the tissue colour table, probability
    volumes a 0..1 window with Slicer's Viridis map."""
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, unique_name(scene, name))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras_matrix))
    if labelmap:
        display = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode")
        display.SetAndObserveColorNodeID(tissue_color_table(scene).GetID())
    else:
        display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        colors = PROBABILITY_COLORS if probability and scene.GetNodeByID(PROBABILITY_COLORS) \
            else "vtkMRMLColorTableNodeGrey"
        display.SetAndObserveColorNodeID(colors)
        display.AutoWindowLevelOff()
        if probability:
            lo, hi = 0.0, 1.0
        else:
            lo, hi = (float(np.min(array)), float(np.max(array))) if array.size else (0.0, 1.0)
        display.SetWindowLevelMinMax(lo, hi if hi > lo else lo + 1.0)
    node.SetAndObserveDisplayNodeID(display.GetID())
    if role:
        node.SetAttribute(ROLE_ATTRIBUTE, role)
    return node


def place_beside(node, reference) -> None:
    """Put ``node`` in the reference node's subject-hierarchy parent (its study) and under
    the same parent transform, so it lines up and exports with it."""
    if reference is None:
        return
    if node.IsA("vtkMRMLTransformableNode"):
        node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    scene = node.GetScene()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    ref_item = sh.GetItemByDataNode(reference)
    if not ref_item:
        return
    parent = sh.GetItemParent(ref_item)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:  # Slicer's plugins add an item for every node; a bare scene may not have one yet
        sh.CreateItem(parent, node)


@contextmanager
def undo_on_failure(scene) -> Iterator[List[str]]:
    """Remove every node added inside the block if the block raises (including Cancelled),
    so a failed or cancelled run leaves the scene as it was. Yields the list of added IDs."""
    added: List[str] = []

    def on_added(caller, event, node=None):
        if node is not None:
            added.append(node.GetID())

    on_added.CallDataType = vtk.VTK_OBJECT
    tag = scene.AddObserver(scene.NodeAddedEvent, on_added)
    try:
        yield added
    except BaseException:
        scene.RemoveObserver(tag)
        tag = None
        for node_id in reversed(added):
            node = scene.GetNodeByID(node_id)
            if node is not None:
                scene.RemoveNode(node)
        raise
    finally:
        if tag is not None:
            scene.RemoveObserver(tag)
