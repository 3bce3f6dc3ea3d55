"""The panel's "Improve model from corrected slices": MRML around core/adapt.py.

    snapshot_result(scene, seg, ct)               # right after segmenting: remember the result
    ... the user corrects some slices in the Segment Editor ...
    outcome = improve_from_corrections(scene, ct, seg, model, card, "bundled", "site_model",
                                       table_node=table)
    # outcome.slices: the slices the user changed; the other slices are re-segmented with
    # outcome.model, saved at outcome.paths (never over the bundled model); the measures
    # table is filled again for the segmentation as it now stands (outcome.rows)

The corrected slices are found by comparing the segmentation's labels with the stored
original result (a hidden label map node tagged with the segmentation's ID), or given.
uncertainty_volume adds the normalised entropy of a result's probabilities as an overlay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..core.adapt import (AdaptCase, AdaptSettings, adapt_model, adapted_card, changed_slices,
                          check_destination,
                          describe, entropy_map, save_adapted, slice_uncertainty, suggest_slices)
from .nodes import (ROLE_ATTRIBUTE, InputProblem, add_volume, check_ct_volume, ijk_to_ras,
                    slice_pixel_mm, spacing_ijk, volume_array)
from .segmentation import fill_tissue_segmentation, labels_from_segmentation
from .tables import fill_measures_table, index_rows
from .workflow import result_nodes
from ..core.bodycomp import concatenate_sums, measures_from_sums, slice_sums
from ..core.classes import NUM_CLASSES
from ..core.indices import protocol_labels, protocol_slice_sums, with_protocol
from ..core.inference import predict_volume

ORIGINAL_ROLE = "original-result"
ORIGINAL_OF = "EPDSegmentation.OriginalOf"


@dataclass
class AdaptOutcome:
    """model, card: the adapted model; paths: (weights, card) written; slices: the corrected
    slices it learned from; resegmented: the slices segmented again with it; summary: one
    line (loss before / after, time); notes: what happened; rows: the measures of the
    segmentation as it now stands (measures_after; empty without re-segmenting)."""

    model: Any
    card: dict
    paths: Tuple[Any, Any]
    slices: List[int]
    resegmented: List[int]
    summary: str
    notes: List[str] = field(default_factory=list)
    rows: List[Dict[str, object]] = field(default_factory=list)


def _grid(volume_node):
    hu = volume_array(volume_node)
    return ijk_to_ras(volume_node), hu.shape


def original_node(scene, seg_node):
    """The stored original result of ``seg_node`` (a hidden label map node), or None."""
    nodes = scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(ORIGINAL_OF) == seg_node.GetID():
            return node
    return None


def snapshot_result(scene, seg_node, volume_node):
    """Store the segmentation's current labels on the CT's grid as its original result (a
    hidden label map node, replaced when it exists). Returns the node."""
    import slicer

    m, shape = _grid(volume_node)
    labels, _ = labels_from_segmentation(seg_node, (m, shape))
    node = original_node(scene, seg_node)
    if node is None:
        node = add_volume(scene, labels, m, f"{seg_node.GetName()} original", labelmap=True,
                          role=ORIGINAL_ROLE)
        node.SetAttribute(ORIGINAL_OF, seg_node.GetID())
        node.SetHideFromEditors(True)
        node.SetSelectable(False)
    else:
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(labels))
    return node


def corrected_slices(scene, seg_node, volume_node) -> Tuple[np.ndarray, List[int]]:
    """(labels (K, J, I) of the segmentation on the CT's grid, the slices that differ from
    the stored original result). InputProblem without a stored original or without changes."""
    import slicer

    m, shape = _grid(volume_node)
    labels, _ = labels_from_segmentation(seg_node, (m, shape))
    node = original_node(scene, seg_node)
    if node is None:
        raise InputProblem(f"'{seg_node.GetName()}' has no stored original result to compare "
                           f"with; mark the corrected slices instead")
    slices = changed_slices(slicer.util.arrayFromVolume(node), labels)
    if not slices:
        raise InputProblem(f"no slice of '{seg_node.GetName()}' differs from the result as "
                           f"segmented: correct some slices in the Segment Editor first")
    return labels, slices


def measures_after(hu: np.ndarray, labels: np.ndarray, probabilities: Optional[np.ndarray],
                   predicted: Sequence[int], corrected: Sequence[int], m,
                   height_m: Optional[float] = None, protocol: bool = False):
    """The measures-table rows (bodycomp, as Apply makes them) of the segmentation after
    Improve: the ``predicted`` slices from the adapted model's probabilities (C, n, J, I),
    one plane per predicted slice (soft and hard areas, HU), the ``corrected`` slices from
    the user's labels (K, J, I) (soft = hard there: a correction is certain). hu: (K, J, I)
    HU; m: IJK-to-RAS; with height_m (metres) the indices as well (tables.index_rows);
    protocol: the HU-protocol measures too (indices.with_protocol), as Apply's table has."""
    where = {int(k): i for i, k in enumerate(predicted)}
    slices = sorted(set(where) | {int(k) for k in corrected})
    parts, protocol_parts = [], []
    for k in slices:
        if k in where:
            p = probabilities[:, where[k]:where[k] + 1]
        else:
            p = (labels[k][None, None] == np.arange(NUM_CLASSES).reshape(-1, 1, 1, 1))
            p = p.astype(np.float32)
        parts.append(slice_sums(p, hu[k:k + 1]))
        if protocol:
            protocol_parts.append(protocol_slice_sums(p, hu[k:k + 1]))
    rows = measures_from_sums(concatenate_sums(parts), spacing_ijk(m), slices)
    if protocol:
        rows = with_protocol(rows, slices, protocol_parts, spacing_ijk(m))
    return index_rows(rows, height_m) if height_m else rows


def improve_from_corrections(scene, volume_node, seg_node, model, card: Mapping[str, Any],
                             base_model: str, output_path, *,
                             slices: Optional[Sequence[int]] = None,
                             settings: AdaptSettings = AdaptSettings(),
                             resegment: bool = True,
                             resegment_slices: Optional[Sequence[int]] = None,
                             overwrite: bool = False,
                             table_node=None, height_m: Optional[float] = None,
                             protocol: bool = False,
                             progress: Optional[Callable[[int, int, str], None]] = None,
                             should_cancel: Optional[Callable[[], bool]] = None) -> AdaptOutcome:
    """Adapt ``model`` to the slices the user corrected in ``seg_node`` (``slices``, default
    the ones that differ from the stored original), save it at ``output_path`` (a new file;
    never the bundled model), and re-segment the other slices with it (corrected slices are
    kept as the user left them); the result becomes the new original. resegment_slices:
    the slices to segment again (default every slice not corrected; corrected ones are
    skipped). table_node: the run's measures table, filled again (as Apply fills it, with the
    indices for height_m in metres and, with protocol, the HU-protocol measures) for the
    re-segmented and the corrected slices.

    progress(done, total, message); should_cancel() raises inference.Cancelled before
    anything is written or changed. Bad input: InputProblem / AdaptError, nothing changed."""
    check_ct_volume(volume_node)
    check_destination(output_path, overwrite)
    m, shape = _grid(volume_node)
    if slices is None:
        labels, slices = corrected_slices(scene, seg_node, volume_node)
    else:
        labels, _ = labels_from_segmentation(seg_node, (m, shape))
    hu = np.asarray(volume_array(volume_node), np.float32)
    pixel_mm = slice_pixel_mm(m)
    case = AdaptCase(hu, labels, pixel_mm, list(slices), volume_node.GetName(), m)
    steps = settings.steps

    def step_progress(step: int, total: int, loss: float) -> None:
        if progress is not None:
            progress(step, total + 1, f"adapting: step {step} of {total} (loss {loss:.3f})")

    result = adapt_model(model, card, [case], settings, progress=step_progress,
                         should_cancel=should_cancel)
    new_card = adapted_card(card, str(base_model), [case], settings, result,
                            command="EPD Segmentation panel: Improve model from corrected slices")
    paths = save_adapted(output_path, result.model, new_card, overwrite=overwrite)
    others: List[int] = []
    rows: List[Dict[str, object]] = []
    if resegment:
        candidates = range(shape[0]) if resegment_slices is None else sorted(
            {int(k) for k in resegment_slices if 0 <= int(k) < shape[0]})
        others = [k for k in candidates if k not in set(case.slices)]
        if progress is not None:
            progress(steps, steps + 1, f"re-segmenting {len(others)} slice(s)")
        probabilities = None
        if others:
            pred = predict_volume(hu, pixel_mm, result.model, new_card, device=settings.device,
                                  slices=others, ijk_to_ras=m)
            probabilities = pred.probabilities
            labels = labels.copy()
            labels[others] = probabilities.argmax(axis=0).astype(np.uint8)
        rows = measures_after(hu, labels, probabilities, others, case.slices, m, height_m,
                              protocol)
        fill_tissue_segmentation(seg_node, labels, m, reference_volume=volume_node)
        protocol_node = result_nodes(scene, seg_node)["protocol_segmentation"]
        if protocol_node is not None:       # the run's HU-protocol labels follow its labels
            fill_tissue_segmentation(protocol_node, protocol_labels(labels, hu), m,
                                     reference_volume=volume_node)
        snapshot_result(scene, seg_node, volume_node)
        if table_node is not None:
            fill_measures_table(table_node, rows, height_m)
    if progress is not None:
        progress(steps + 1, steps + 1, "done")
    return AdaptOutcome(result.model, new_card, paths, list(case.slices), others,
                        describe(result), result.notes, rows)


def uncertainty_volume(scene, volume_node, probabilities: np.ndarray, *, n_suggest: int = 3,
                       slices: Optional[Sequence[int]] = None):
    """(an uncertainty volume node (normalised entropy 0..1 of probabilities (C, K, J, I) on
    the CT's grid) to overlay, the n_suggest most uncertain slices to correct first).
    With ``slices``, probabilities are (C, len(slices), J, I) for those slices only: the
    other slices of the volume are 0 and never suggested."""
    m, shape = _grid(volume_node)
    probabilities = np.asarray(probabilities)
    ks = list(range(shape[0])) if slices is None else [int(k) for k in slices]
    expected = (len(ks),) + tuple(shape[1:])
    if probabilities.ndim != 4 or probabilities.shape[1:] != expected:
        raise InputProblem(f"probabilities {probabilities.shape[1:]} are not on the CT's grid "
                           f"{expected}")
    if any(not 0 <= k < shape[0] for k in ks):
        raise InputProblem(f"slices outside the volume's 0..{shape[0] - 1}: {ks}")
    entropy = np.zeros(tuple(shape), np.float32)
    entropy[ks] = entropy_map(probabilities)
    node = add_volume(scene, entropy, m,
                      f"{volume_node.GetName()} uncertainty", probability=True, role="uncertainty")
    return node, suggest_slices(slice_uncertainty(probabilities), n_suggest, slices=ks)


__all__ = ["AdaptOutcome", "ORIGINAL_ROLE", "ROLE_ATTRIBUTE", "corrected_slices",
           "improve_from_corrections", "original_node", "snapshot_result", "uncertainty_volume"]
