"""What the slice and table views show: the results over the CT, and the EPD preview side
by side in three linked axial views. MRML only (layout, slice, composite, table view and
display nodes); Slicer's layout manager builds the views the layout node describes.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import slicer

from .nodes import numpy_matrix

#: Custom layout: original | nearest 1/k | EPD 1/k, axial, above a table view.
PREVIEW_LAYOUT_ID = 51701
PREVIEW_VIEWS = ("Red", "Yellow", "Green")
_VIEW_COLORS = {"Red": "#F34A33", "Yellow": "#EDD54C", "Green": "#6EB04B"}
#: Opacity of a probability volume over the CT.
PROBABILITY_OPACITY = 0.7


def preview_layout_xml(views: Sequence[str] = PREVIEW_VIEWS) -> str:
    items = "".join(
        f'<item><view class="vtkMRMLSliceNode" singletontag="{v}">'
        f'<property name="orientation" action="default">Axial</property>'
        f'<property name="viewlabel" action="default">{v[0]}</property>'
        f'<property name="viewcolor" action="default">{_VIEW_COLORS[v]}</property>'
        f'</view></item>' for v in views)
    table = ('<item splitSize="300"><view class="vtkMRMLTableViewNode" '
             'singletontag="TableView1"><property name="viewlabel" action="default">T'
             '</property></view></item>')
    return (f'<layout type="vertical" split="true"><item splitSize="600">'
            f'<layout type="horizontal">{items}</layout></item>{table}</layout>')


def layout_node(scene):
    nodes = scene.GetNodesByClass("vtkMRMLLayoutNode")
    return nodes.GetItemAsObject(0) if nodes.GetNumberOfItems() else None


def set_layout(scene, arrangement: int, description: Optional[str] = None) -> bool:
    """Switch the scene's layout (registering ``description`` under ``arrangement`` first);
    False when the scene has no layout node (no views, e.g. a headless scene)."""
    node = layout_node(scene)
    if node is None:
        return False
    if description is not None:
        if node.IsLayoutDescription(arrangement):
            node.SetLayoutDescription(arrangement, description)
        else:
            node.AddLayoutDescription(arrangement, description)
    node.SetViewArrangement(arrangement)
    return True


def _by_layout_name(scene, cls: str, view: str):
    nodes = scene.GetNodesByClass(cls)
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetLayoutName() == view:
            return node
    return None


def slice_node(scene, view: str):
    """The slice node of a view ("Red", ...), or None."""
    return _by_layout_name(scene, "vtkMRMLSliceNode", view)


def composite_node(scene, view: str):
    """The slice composite node of a view (what it shows), or None."""
    return _by_layout_name(scene, "vtkMRMLSliceCompositeNode", view)


def red_slice_ras(scene) -> np.ndarray:
    """RAS (mm) of the centre of the red slice view."""
    node = slice_node(scene, "Red")
    if node is None:
        raise RuntimeError("the scene has no red slice view")
    return numpy_matrix(node.GetSliceToRAS())[:3, 3]


def _show_table(scene, table) -> None:
    nodes = scene.GetNodesByClass("vtkMRMLTableViewNode")
    for i in range(nodes.GetNumberOfItems()):
        nodes.GetItemAsObject(i).SetTableNodeID(table.GetID() if table else None)
    selection = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    if selection is not None and table is not None:
        selection.SetActiveTableID(table.GetID())


def _only_in_views(node, views: Sequence[str]) -> None:
    """Show a displayable node in the given slice views only."""
    display = node.GetDisplayNode()
    if display is None:
        return
    display.RemoveAllViewNodeIDs()
    for v in views:
        s = slice_node(node.GetScene(), v)
        if s is not None:
            display.AddViewNodeID(s.GetID())


def show_results(scene, volume, result) -> None:
    """CT in every slice view with the tissue segmentation over it, the measures table in
    the table view (four-up table layout); soft outputs start hidden."""
    set_layout(scene, slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(composites.GetNumberOfItems()):
        comp = composites.GetItemAsObject(i)
        comp.SetBackgroundVolumeID(volume.GetID())
        comp.SetForegroundVolumeID(None)
        comp.SetLabelVolumeID(None)
    if result.segmentation.GetDisplayNode() is not None:
        result.segmentation.GetDisplayNode().SetVisibility(True)
    if result.soft_segmentation is not None and result.soft_segmentation.GetDisplayNode():
        result.soft_segmentation.GetDisplayNode().SetVisibility(False)
    for vol in result.probability_volumes:
        if vol.GetDisplayNode() is not None:
            vol.GetDisplayNode().SetVisibility(False)
    _show_table(scene, result.table)


def show_preview(scene, background_volume, preview) -> None:
    """Original | nearest | EPD side by side in three linked axial views over the CT, the
    area table below. A segmentation source is shown in the first view only (its display
    node's view list is set; its data is untouched)."""
    set_layout(scene, PREVIEW_LAYOUT_ID, preview_layout_xml())
    background = background_volume.GetID() if background_volume is not None else None
    source = preview.original
    for view in PREVIEW_VIEWS:
        node = slice_node(scene, view)
        if node is not None:
            node.SetOrientationToAxial()
        comp = composite_node(scene, view)
        if comp is None:
            continue
        comp.SetBackgroundVolumeID(background)
        comp.SetForegroundVolumeID(None)
        comp.SetLabelVolumeID(None)
        comp.SetLinkedControl(True)
        comp.SetHotLinkedControl(True)
    red, yellow, green = (composite_node(scene, v) for v in PREVIEW_VIEWS)
    if source.IsA("vtkMRMLLabelMapVolumeNode"):
        if red is not None:
            red.SetLabelVolumeID(source.GetID())
            if background is None:
                red.SetBackgroundVolumeID(source.GetID())
    else:
        _only_in_views(source, ["Red"])
    if yellow is not None:
        yellow.SetLabelVolumeID(preview.nearest.GetID())
        yellow.SetLabelOpacity(1.0)
    soft = preview.soft
    if soft.IsA("vtkMRMLSegmentationNode"):
        _only_in_views(soft, ["Green"])
    elif green is not None:
        green.SetForegroundVolumeID(soft.GetID())
        green.SetForegroundOpacity(PROBABILITY_OPACITY)
    _show_table(scene, preview.table)
