"""What the slice and table views show: the results over the CT, and the EPD preview side
by side in three linked axial views. MRML only (layout, slice, composite, table view and
display nodes); Slicer's layout manager builds the views the layout node describes.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np
import slicer

from .nodes import ijk_to_ras, numpy_matrix

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


def jump_red_to_slice(scene, volume_node, k: int) -> None:
    """Move the red slice view onto the centre of the volume's slice K (RAS mm)."""
    dims = volume_node.GetImageData().GetDimensions()
    if not 0 <= int(k) < dims[2]:
        raise ValueError(f"slice {k} is outside '{volume_node.GetName()}' (0..{dims[2] - 1})")
    centre = ijk_to_ras(volume_node) @ [(dims[0] - 1) / 2.0, (dims[1] - 1) / 2.0, int(k), 1.0]
    red = slice_node(scene, "Red")
    if red is None:
        raise RuntimeError("the scene has no red slice view")
    red.JumpSliceByOffsetting(float(centre[0]), float(centre[1]), float(centre[2]))


def show_overlay(scene, volume, overlay, opacity: float = 0.5) -> None:
    """``overlay`` (e.g. the uncertainty map) as the foreground over ``volume`` in every
    slice view."""
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(composites.GetNumberOfItems()):
        comp = composites.GetItemAsObject(i)
        comp.SetBackgroundVolumeID(volume.GetID())
        comp.SetForegroundVolumeID(overlay.GetID())
        comp.SetForegroundOpacity(opacity)


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
    for seg in (result.soft_segmentation, getattr(result, "protocol_segmentation", None)):
        if seg is not None and seg.GetDisplayNode() is not None:
            seg.GetDisplayNode().SetVisibility(False)
    for vol in result.probability_volumes:
        if vol.GetDisplayNode() is not None:
            vol.GetDisplayNode().SetVisibility(False)
    _show_table(scene, result.table)


def capture_views(scene, nodes: Sequence[Any] = ()) -> Dict[str, Any]:
    """What the preview changes, to put back with restore_views: the layout, each slice
    view's orientation, what each composite node shows (volumes, opacities, linking), and
    the view lists of the display nodes of ``nodes``."""
    state: Dict[str, Any] = {"layout": None, "slices": {}, "composites": {}, "displays": {}}
    layout = layout_node(scene)
    if layout is not None:
        state["layout"] = layout.GetViewArrangement()
    for view in PREVIEW_VIEWS:
        node = slice_node(scene, view)
        if node is not None:
            state["slices"][view] = node.GetOrientation()
        comp = composite_node(scene, view)
        if comp is not None:
            state["composites"][view] = (
                comp.GetBackgroundVolumeID(), comp.GetForegroundVolumeID(),
                comp.GetLabelVolumeID(), comp.GetForegroundOpacity(), comp.GetLabelOpacity(),
                comp.GetLinkedControl(), comp.GetHotLinkedControl())
    for node in nodes:
        display = node.GetDisplayNode() if node is not None else None
        if display is not None:
            state["displays"][display.GetID()] = [display.GetNthViewNodeID(i) for i in
                                                  range(display.GetNumberOfViewNodeIDs())]
    return state


def restore_views(scene, state: Dict[str, Any]) -> None:
    """Put back what capture_views recorded (nodes removed since are skipped)."""
    for view, orientation in state["slices"].items():
        node = slice_node(scene, view)
        if node is not None:
            node.SetOrientation(orientation)
    for view, values in state["composites"].items():
        comp = composite_node(scene, view)
        if comp is None:
            continue
        background, foreground, label, fg_opacity, label_opacity, linked, hot = values
        ids = {i for i in (background, foreground, label) if i}
        if any(scene.GetNodeByID(i) is None for i in ids):
            background, foreground, label = (i if i and scene.GetNodeByID(i) else None
                                             for i in (background, foreground, label))
        comp.SetBackgroundVolumeID(background)
        comp.SetForegroundVolumeID(foreground)
        comp.SetLabelVolumeID(label)
        comp.SetForegroundOpacity(fg_opacity)
        comp.SetLabelOpacity(label_opacity)
        comp.SetLinkedControl(linked)
        comp.SetHotLinkedControl(hot)
    for display_id, view_ids in state["displays"].items():
        display = scene.GetNodeByID(display_id)
        if display is not None:
            display.RemoveAllViewNodeIDs()
            for view_id in view_ids:
                display.AddViewNodeID(view_id)
    if state["layout"] is not None:
        set_layout(scene, state["layout"])


def show_preview(scene, background_volume, preview) -> Dict[str, Any]:
    """Original | nearest | EPD side by side in three linked axial views over the CT, the
    area table below. A segmentation source is shown in the first view only (its display
    node's view list is set; its data is untouched). Returns capture_views of what it
    changes, for restore_views."""
    state = capture_views(scene, [preview.original])
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
    return state
