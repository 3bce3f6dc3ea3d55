"""EPD preview on MRML nodes: what a label map looks like to a network trained at 1/k.

From a label source (a segmentation with tissue-named segments, or a tissue label map) and a
factor k, build on the downsampled grid (spacing times k, each voxel centre at the centre of
its k x k window, volume.downsampled_ijk_to_ras):
- the nearest-downsampled label map (the conventional training target),
- the EPD soft map: a segmentation of fractional segments, or one probability volume for the
  chosen class,
- a table per class: area in the original, after nearest and after EPD (cm^2, summed over
  the slices), with the errors in %.
Downsampling is in-plane only (slices are kept), as the networks see axial slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

import numpy as np

from ..core.classes import NUM_CLASSES, class_by_key
from ..core.epd import epd_labels, nearest_labels, soft_pixel_counts
from .nodes import (ROLE_ATTRIBUTE, InputProblem, add_volume, ijk_to_ras, place_beside,
                         spacing_ijk, undo_on_failure, unique_name)
from .segmentation import (fill_fractional_segmentation, labels_from_labelmap,
                                labels_from_segmentation)
from .tables import area_rows, fill_area_table, new_table
from ..core.volume import downsampled_ijk_to_ras

FACTORS = (2, 4, 8)
SOFT_KINDS = ("fractional", "probability")


@dataclass
class PreviewResult:
    """The nodes a preview made (in the scene) and its numbers."""

    nearest: Any
    soft: Any
    table: Any
    original: Any                  # the label source, or the label map shown for it
    factor: int
    tissue: str
    ijk_to_ras: np.ndarray         # of the downsampled grid
    rows: List[Dict[str, object]] = field(default_factory=list)


def source_labels(source_node, reference_volume=None):
    """(uint8 classes (K, J, I), IJK-to-RAS) of a label source node. A segmentation is
    rasterised on the reference volume's grid when one is given, else on its own reference
    geometry."""
    if source_node is None:
        raise InputProblem("No label source: pick a segmentation or a label map (for example "
                           "the model's output).")
    if source_node.IsA("vtkMRMLSegmentationNode"):
        grid = None
        if reference_volume is not None and reference_volume.GetImageData() is not None:
            grid = (ijk_to_ras(reference_volume),
                    tuple(reversed(reference_volume.GetImageData().GetDimensions())))
        return labels_from_segmentation(source_node, grid)
    if source_node.IsA("vtkMRMLLabelMapVolumeNode"):
        return labels_from_labelmap(source_node)
    raise InputProblem(f"'{source_node.GetName()}' is a {source_node.GetClassName()}; the label "
                       f"source must be a segmentation or a label map volume.")


def area_comparison(labels: np.ndarray, factor: int, spacing_mm) -> Dict[str, np.ndarray]:
    """Per-class areas (C,) in cm^2 summed over slices: original, nearest, epd; plus the
    downsampled arrays 'near' (K, J', I') and 'soft' (C, K, J', I')."""
    si, sj, _ = spacing_mm
    pixel_cm2 = si * sj / 100.0
    near = nearest_labels(labels, factor)
    soft = epd_labels(labels, NUM_CLASSES, factor)                  # (K, C, J', I')
    return {
        "original": np.bincount(labels.ravel(), minlength=NUM_CLASSES) * pixel_cm2,
        # a low-resolution pixel stands for k x k input pixels
        "nearest": np.bincount(near.ravel(), minlength=NUM_CLASSES) * pixel_cm2 * factor ** 2,
        "epd": soft_pixel_counts(soft, labels.shape[-2:], factor) * pixel_cm2,
        "near": near,
        "soft": np.moveaxis(soft, 1, 0),
    }


def epd_preview(scene, source_node, factor: int, tissue: str = "IMAT", *,
                soft_kind: str = "fractional", reference_volume=None) -> PreviewResult:
    """Create the preview nodes for ``source_node`` at 1/``factor`` (see the module notes).

    tissue: class key shown (the probability volume's class; the only visible segment of
    the fractional map). reference_volume: the CT the source belongs to (rasterising grid
    for a segmentation; placement). Nodes are new each time, placed beside the source."""
    if factor not in FACTORS:
        raise InputProblem(f"factor must be one of {FACTORS}; got {factor!r}")
    if soft_kind not in SOFT_KINDS:
        raise InputProblem(f"soft map must be one of {SOFT_KINDS}; got {soft_kind!r}")
    c = class_by_key(tissue)
    if c.index == 0:
        raise InputProblem("pick a tissue class, not the background")
    labels, m = source_labels(source_node, reference_volume)
    areas = area_comparison(labels, factor, spacing_ijk(m))
    m_low = downsampled_ijk_to_ras(m, (factor, factor, 1))
    rows = area_rows(areas["original"], areas["nearest"], areas["epd"])
    name = source_node.GetName()
    with undo_on_failure(scene):
        nearest = add_volume(scene, areas["near"], m_low, f"{name} nearest 1-{factor}",
                             labelmap=True, role="preview-nearest")
        if soft_kind == "fractional":
            soft = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                           unique_name(scene, f"{name} EPD 1-{factor}"))
            fill_fractional_segmentation(soft, areas["soft"], m_low)
            display = soft.GetDisplayNode()
            segmentation = soft.GetSegmentation()
            for i in range(segmentation.GetNumberOfSegments()):
                sid = segmentation.GetNthSegmentID(i)
                display.SetSegmentVisibility(sid, sid == c.key)
            soft.SetAttribute(ROLE_ATTRIBUTE, "preview-epd")
        else:
            soft = add_volume(scene, areas["soft"][c.index].astype(np.float32), m_low,
                              f"{name} EPD 1-{factor} {c.key}", probability=True,
                              role="preview-epd")
        table = new_table(scene, f"{name} areas 1-{factor}", "preview-areas")
        fill_area_table(table, rows)
        anchor = reference_volume if source_node.IsA("vtkMRMLSegmentationNode") \
            and reference_volume is not None else source_node
        for node in (nearest, soft, table):
            place_beside(node, anchor)
    return PreviewResult(nearest, soft, table, source_node, factor, c.key, m_low, rows)
