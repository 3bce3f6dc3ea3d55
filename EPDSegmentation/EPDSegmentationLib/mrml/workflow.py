"""The module's main workflow on MRML nodes: CT volume in; tissue segmentation, soft labels
and measures table out; and export of the results to a folder.

    predict = model_predictor(model, card, volume_array(ct), slice_pixel_mm(ijk_to_ras(ct)))
    out = segment_volume(scene, ct, predict, slices=[40, 41, 42], soft_segmentation=True)

``predict(slices, progress, should_cancel)`` returns class probabilities float32
(C, n, J, I) (NumPy, or torch on the device) for the listed slices (C = 6, background
first), plus the device it ran on and
notes; the Slicer module wraps inference.slab_predictor (``model_predictor``), the tests
give soft maps of known label maps. The volume is processed in chunks of slices with a
progress report and a cancel check between chunks (and between the network's batches);
nothing touches the scene until every chunk is done, and a failure while the outputs are
built removes what was added, so a cancelled or failed run leaves the scene as it was.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import slicer

from ..core import stream
from ..core.classes import CLASSES, NUM_CLASSES, TISSUES
from ..core.indices import protocol_labels
from ..core.inference import Cancelled
from .dicom import (check_dicom_seg_possible, dicom_seg_paths, record_model,
                         recorded_model, result_arrays, write_dicom_segs)
from .nodes import (InputProblem, add_volume, check_ct_volume, ijk_to_ras, place_beside,
                         safe_file_stem, spacing_ijk, undo_on_failure, unique_name,
                         volume_array, ROLE_ATTRIBUTE)
from .segmentation import (FRACTIONAL_MIN, fill_fractional_segmentation,
                                fill_tissue_segmentation, save_segmentation)
from .tables import fill_measures_table, index_rows, new_table, table_to_csv
from ..io.outputs import output_path, probability_volume_path
from ..core.inference import select_device, slab_predictor
from ..core.levels import BELOW_L5
from ..core.model_card import ModelFileError, read_card
from ..core.resources import bundled_model_path

#: Slices per chunk between progress reports and cancel checks.
CHUNK_SLICES = 16
#: Attribute on a run's companion nodes (table, soft outputs): the ID of its segmentation.
RESULT_OF = "EPDSegmentation.ResultOf"
#: ROLE_ATTRIBUTE of the segmentation of the HU protocol's labels (segment_volume(protocol=))
PROTOCOL_ROLE = "protocol-tissues"
SLICE_MODES = ("all", "current", "range")

Progress = Callable[[int, int, str], None]
Predict = Callable[..., Tuple[np.ndarray, str, List[str]]]


class OutputExists(ValueError):
    """A picked output node holds data and replacing it was not allowed."""


@dataclass
class SegmentationResult:
    """What segment_volume made (nodes are in the scene) and measured."""

    segmentation: Any
    table: Any
    soft_segmentation: Any = None
    probability_volumes: List[Any] = field(default_factory=list)
    #: with protocol=True: the HU protocol's labels (core.indices.protocol_labels)
    protocol_segmentation: Any = None
    rows: List[Dict[str, object]] = field(default_factory=list)
    slices: List[int] = field(default_factory=list)
    device: str = ""
    notes: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- slices


def resolve_slices(mode: str, n_slices: int, *, current: Optional[int] = None,
                   first: Optional[int] = None, last: Optional[int] = None) -> List[int]:
    """Slice indices K for the panel's choice: "all", "current" (the slice under the red
    view, ``current``) or "range" (``first``..``last`` inclusive, 0-based)."""
    if mode not in SLICE_MODES:
        raise ValueError(f"slice mode must be one of {SLICE_MODES}; got {mode!r}")
    if n_slices < 1:
        raise InputProblem("the volume has no slices")
    if mode == "all":
        return list(range(n_slices))
    if mode == "current":
        if current is None or not 0 <= int(current) < n_slices:
            raise InputProblem(f"the red view's slice ({current}) is not one of the volume's "
                               f"slices 0..{n_slices - 1}")
        return [int(current)]
    if first is None or last is None:
        raise InputProblem("a slice range needs a first and a last slice")
    first, last = int(first), int(last)
    if first > last:
        raise InputProblem(f"first slice {first} is after last slice {last}")
    if first < 0 or last >= n_slices:
        raise InputProblem(f"slices {first}..{last} are outside the volume's 0..{n_slices - 1}")
    return list(range(first, last + 1))


# ----------------------------------------------------------------------------- prediction


def model_predictor(model, card: Mapping[str, Any], hu: np.ndarray, pixel_mm, *,
                    device: Any = "auto", batch_size: int = 8, ijk_to_ras=None,
                    mirror: bool = True) -> Predict:
    """A predict(slices, progress, should_cancel) callable: inference.slab_predictor, whose
    probabilities stay on the device for core.stream (upsampling and argmax there).

    An out-of-memory fallback (smaller batch, then the CPU) found in one chunk is kept for
    the next chunks, so the panel does not retry the failing setting every chunk.
    ijk_to_ras: the volume node's geometry, so its slices reach the network in the
    orientation it was trained in (core.orientation). mirror: mirror averaging
    (inference.forward), as ``epdseg segment`` does unless --no-mirror."""
    return slab_predictor(hu, pixel_mm, model, card, device=device, batch_size=batch_size,
                          ijk_to_ras=ijk_to_ras, mirror=mirror)


# ----------------------------------------------------------------------------- outputs


def _check_output(node, replace_existing: bool, what: str) -> None:
    if node is None:
        return
    if node.IsA("vtkMRMLSegmentationNode"):
        n = node.GetSegmentation().GetNumberOfSegments()
        if n and not replace_existing:
            raise OutputExists(f"The output segmentation '{node.GetName()}' already holds {n} "
                               f"segment(s). Allow replacing them, or choose 'Create new "
                               f"segmentation'.")
    elif node.IsA("vtkMRMLTableNode"):
        if node.GetNumberOfRows() and not replace_existing:
            raise OutputExists(f"The output table '{node.GetName()}' already holds data. Allow "
                               f"replacing it, or choose 'Create new table'.")
    else:
        raise InputProblem(f"{what} '{node.GetName()}' is a {node.GetClassName()}")


def segment_volume(scene, volume_node, predict: Predict, *,
                   slices: Optional[Sequence[int]] = None,
                   segmentation_node=None, table_node=None, replace_existing: bool = False,
                   soft_segmentation: bool = False, soft_volumes: bool = False,
                   chunk_slices: int = CHUNK_SLICES,
                   progress: Optional[Progress] = None,
                   should_cancel: Optional[Callable[[], bool]] = None,
                   model_card: Optional[Mapping[str, Any]] = None,
                   height_m: Optional[float] = None,
                   protocol: bool = False) -> SegmentationResult:
    """Segment a CT volume node into the tissue classes and measure them.

    slices: indices K (default all); segmentation_node / table_node: nodes the user picked
    to receive the results (None: new nodes named after the volume); a picked node that
    holds data is replaced only with replace_existing=True (else OutputExists).
    soft_segmentation: also a segmentation with Fractional labelmap segments;
    soft_volumes: also one probability volume (0..1, float32) per tissue, covering only the
    slab of slices from the first to the last segmented one (placed there in RAS).
    progress(done, total, message) after each chunk and batch; should_cancel() is checked
    between them and raises inference.Cancelled, leaving the scene untouched.
    The segmentations have the input as reference geometry; slices that were
    not processed are empty (probability 0). model_card: the model's card (or
    mrml.dicom.model_summary of it), kept on the segmentation for DICOM SEG export.
    height_m: the patient's height in metres (checked by core.indices.height_m): the table
    also gets SMI, IMATI, SATI, VATI (cm2/m2). protocol: the table also gets the HU-protocol
    area and mean HU of each tissue (bodycomp.PROTOCOL_COLUMNS, summed from the same slabs
    as ``epdseg segment --protocol``), and with height_m their indices; and a segmentation
    of the protocol's labels (core.indices.protocol_labels: what the protocol counts as each
    tissue, by the hard labels), hidden at first like the soft outputs.
    """
    check_ct_volume(volume_node)
    _check_output(segmentation_node, replace_existing, "output segmentation")
    _check_output(table_node, replace_existing, "output table")
    if not isinstance(chunk_slices, int) or chunk_slices < 1:
        raise ValueError(f"chunk_slices must be a positive int; got {chunk_slices!r}")
    hu = volume_array(volume_node)
    m = ijk_to_ras(volume_node)
    K, J, I = hu.shape
    slices = sorted(set(int(k) for k in (range(K) if slices is None else slices)))
    if not slices:
        raise InputProblem("no slices selected")
    if slices[0] < 0 or slices[-1] >= K:
        raise InputProblem(f"slices {slices[0]}..{slices[-1]} are outside the volume's "
                           f"0..{K - 1}")
    k0, k1 = slices[0], slices[-1]
    slab = k1 - k0 + 1
    labels = np.zeros((slab, J, I), np.uint8)
    # soft outputs are kept as compactly as they will be stored
    codes = np.full((NUM_CLASSES - 1, slab, J, I), FRACTIONAL_MIN, np.int8) \
        if soft_segmentation else None
    # only the slab of segmented slices: one slice of a 600-slice CT needs one plane
    prob_volumes = {c.key: np.zeros((slab, J, I), np.float32) for c in TISSUES} \
        if soft_volumes else None
    acc = stream.Accumulator()
    total = len(slices)

    def report(n_done: int, message: str) -> None:
        if progress is not None:
            progress(n_done, total, message)

    report(0, f"segmenting {total} slice(s)")
    # the one streaming path of the CLI too (core.stream): argmax, 8-bit fractions and sums
    # per chunk, so only the compact outputs are kept
    try:
        for part in stream.stream_slabs(
                hu, slices, predict, slab_slices=chunk_slices, codes=soft_segmentation,
                probabilities=soft_volumes, protocol=protocol, accumulator=acc,
                should_cancel=should_cancel,
                progress=lambda d, t: report(d, f"segmenting: {d} of {t} slices")):
            rel = [k - k0 for k in part.slices]
            labels[rel] = part.labels
            if codes is not None:
                codes[:, rel] = part.codes
            if prob_volumes is not None:
                for c in TISSUES:
                    prob_volumes[c.key][rel] = part.probabilities[c.index]
    except Cancelled as exc:
        raise Cancelled(f"{exc}; nothing was changed") from None
    if should_cancel is not None and should_cancel():
        raise Cancelled(f"cancelled after {total} of {total} slices; nothing was changed")

    rows = acc.rows(spacing_ijk(m))
    if height_m:
        rows = index_rows(rows, height_m)
    notes, device = acc.notes, acc.device
    name = volume_node.GetName()
    result = SegmentationResult(None, None, rows=rows, slices=slices, device=device,
                                notes=notes)
    report(total, "creating the outputs: tissue segmentation")
    with undo_on_failure(scene):
        seg = segmentation_node or scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", unique_name(scene, f"{name} tissues"))
        fill_tissue_segmentation(seg, labels, m, k0=k0, reference_volume=volume_node)
        seg.SetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole(),
                               volume_node.GetID())
        seg.SetAttribute(ROLE_ATTRIBUTE, "tissues")
        if model_card is not None:
            record_model(seg, model_card)
        place_beside(seg, volume_node)
        result.segmentation = seg
        report(total, "creating the outputs: measures table")
        table = table_node or new_table(scene, f"{name} body composition", "measures")
        fill_measures_table(table, rows, height_m)
        place_beside(table, volume_node)
        result.table = table
        if soft_segmentation:
            report(total, "creating the outputs: fractional segmentation")
            soft_seg = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", unique_name(scene, f"{name} tissue probabilities"))
            fill_fractional_segmentation(soft_seg, codes, m, k0=k0, encoded=True)
            soft_seg.SetAttribute(ROLE_ATTRIBUTE, "soft-tissues")
            place_beside(soft_seg, volume_node)
            result.soft_segmentation = soft_seg
        if protocol:
            report(total, "creating the outputs: HU-protocol segmentation")
            prot_seg = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", unique_name(scene, f"{name} HU protocol"))
            fill_tissue_segmentation(prot_seg, protocol_labels(labels, hu[k0:k1 + 1]), m,
                                     k0=k0, reference_volume=volume_node)
            prot_seg.SetAttribute(ROLE_ATTRIBUTE, PROTOCOL_ROLE)
            place_beside(prot_seg, volume_node)
            result.protocol_segmentation = prot_seg
        if soft_volumes:
            report(total, "creating the outputs: probability volumes")
            for c in TISSUES:
                vol = add_volume(scene, prob_volumes[c.key], slab_matrix(m, k0),
                                 f"{name} {c.key} probability",
                                 probability=True, role=f"probability-{c.key}")
                place_beside(vol, volume_node)
                result.probability_volumes.append(vol)
        _link_results(scene, result)
    return result


def slab_matrix(ijk_to_ras_matrix, k0: int) -> np.ndarray:
    """IJK-to-RAS (4, 4) of the slab starting at slice k0 of a grid (its origin moved k0
    slices along K)."""
    m = np.array(ijk_to_ras_matrix, dtype=float)
    m[:3, 3] = m[:3, 3] + k0 * m[:3, 2]
    return m


def _link_results(scene, result: SegmentationResult) -> None:
    """Tag the run's companions with the segmentation's ID (older companions of a reused
    segmentation lose the tag), so Export finds them, also after the scene is reloaded."""
    seg_id = result.segmentation.GetID()
    current = [result.table, result.soft_segmentation, result.protocol_segmentation] \
        + list(result.probability_volumes)
    keep = {n.GetID() for n in current if n is not None}
    nodes = scene.GetNodesByClass("vtkMRMLNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(RESULT_OF) == seg_id and node.GetID() not in keep:
            node.RemoveAttribute(RESULT_OF)
    for node in current:
        if node is not None:
            node.SetAttribute(RESULT_OF, seg_id)


def result_nodes(scene, segmentation_node) -> Dict[str, Any]:
    """The companions of a run's segmentation: table, soft_segmentation and
    protocol_segmentation (or None) and probability_volumes (in tissue order)."""
    out: Dict[str, Any] = {"table": None, "soft_segmentation": None,
                           "protocol_segmentation": None, "probability_volumes": []}
    if segmentation_node is None:
        return out
    seg_id = segmentation_node.GetID()
    volumes = {}
    nodes = scene.GetNodesByClass("vtkMRMLNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(RESULT_OF) != seg_id:
            continue
        role = node.GetAttribute(ROLE_ATTRIBUTE) or ""
        if node.IsA("vtkMRMLTableNode"):
            out["table"] = node
        elif node.IsA("vtkMRMLSegmentationNode"):
            out["protocol_segmentation" if role == PROTOCOL_ROLE else "soft_segmentation"] = node
        elif role.startswith("probability-"):
            volumes[role.split("-", 1)[1]] = node
    out["probability_volumes"] = [volumes[c.key] for c in TISSUES if c.key in volumes]
    return out


# ----------------------------------------------------------------------------- export


def export_paths(folder: Union[str, os.PathLike], base: str, *, segmentation: bool = True,
                 soft_segmentation: bool = False, probability_keys: Sequence[str] = (),
                 table: bool = True, protocol_segmentation: bool = False) -> Dict[str, Path]:
    """The files an export writes: role -> path in ``folder`` (names from outputs.py, the
    same as the command line's)."""
    out: Dict[str, Path] = {}
    if segmentation:
        out["segmentation"] = output_path(folder, base, "segmentation")
    if soft_segmentation:
        out["soft_segmentation"] = output_path(folder, base, "soft_segmentation")
    if protocol_segmentation:
        out["protocol_segmentation"] = output_path(folder, base, "protocol_segmentation")
    for key in probability_keys:
        out[f"probability-{key}"] = probability_volume_path(folder, base, key)
    if table:
        out["table"] = output_path(folder, base, "table")
    return out


def _save_volume(node, path: Path) -> None:
    tmp = path.parent / f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.nrrd"
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(tmp))
    storage.SetUseCompression(True)
    try:
        if not storage.WriteData(node) or not tmp.is_file():
            raise OSError(f"could not write {path}: "
                          f"{storage.GetUserMessages().GetAllMessagesAsString()}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def export_results(folder: Union[str, os.PathLike], *, segmentation=None,
                   soft_segmentation=None, probability_volumes: Sequence[Any] = (),
                   table=None, base: Optional[str] = None, overwrite: bool = False,
                   dicom_source=None, model_card: Optional[Mapping[str, Any]] = None,
                   protocol_segmentation=None) -> List[Path]:
    """Save the results to ``folder``: <base>.seg.nrrd (tissues), <base>_soft.seg.nrrd
    (fractional), <base>_protocol.seg.nrrd (the HU protocol's labels),
    <base>_probability_<KEY>.nrrd, <base>_bodycomp.csv. base defaults to the
    segmentation's name.

    dicom_source: an mrml.dicom.DicomSource (the CT's DICOM series) to also write DICOM SEG:
    <base>_seg.dcm (binary, the segmentation as it is now) and, when soft outputs exist,
    <base>_prob_seg.dcm (fractional); model_card names the algorithm (default: the
    model recorded on the segmentation by segment_volume).

    Everything that can be checked is checked before the first file is written; every file
    is written atomically; if any target exists and not overwrite, nothing is written
    (FileExistsError naming them); if a write fails, the files this call created are
    removed again."""
    folder = Path(folder)
    if not str(folder) or not folder.is_dir():
        raise InputProblem(f"export folder '{folder}' does not exist; choose a folder")
    if all(x is None for x in (segmentation, soft_segmentation, table)) and \
            not probability_volumes:
        raise InputProblem("nothing to export: run the segmentation first")
    base = base or (segmentation or soft_segmentation or table).GetName()
    keys = []
    for vol in probability_volumes:
        role = vol.GetAttribute(ROLE_ATTRIBUTE) or ""
        keys.append(role.split("-", 1)[1] if role.startswith("probability-")
                    else safe_file_stem(vol.GetName()))
    paths = export_paths(folder, base, segmentation=segmentation is not None,
                         soft_segmentation=soft_segmentation is not None,
                         probability_keys=keys, table=table is not None,
                         protocol_segmentation=protocol_segmentation is not None)
    seg_arrays = None
    if dicom_source is not None:
        if segmentation is None:
            raise InputProblem("DICOM SEG export needs the run's tissue segmentation")
        check_dicom_seg_possible(dicom_source)
        seg_arrays = result_arrays(dicom_source.volume, segmentation, soft_segmentation,
                                   probability_volumes)
        paths.update(dicom_seg_paths(folder, base, fractional=seg_arrays[1] is not None))
        if model_card is None:
            model_card = recorded_model(segmentation)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError("already exist: " + ", ".join(existing)
                              + "; allow replacing them or choose another folder")
    written: List[Path] = []
    try:
        if segmentation is not None:
            written.append(save_segmentation(segmentation, paths["segmentation"],
                                             overwrite=overwrite))
        if soft_segmentation is not None:
            written.append(save_segmentation(soft_segmentation, paths["soft_segmentation"],
                                             overwrite=overwrite))
        if protocol_segmentation is not None:
            written.append(save_segmentation(protocol_segmentation,
                                             paths["protocol_segmentation"],
                                             overwrite=overwrite))
        for vol, key in zip(probability_volumes, keys):
            path = paths[f"probability-{key}"]
            _save_volume(vol, path)
            written.append(path)
        if table is not None:
            written.append(table_to_csv(table, paths["table"], overwrite=overwrite))
        if seg_arrays is not None:
            written += write_dicom_segs(paths, dicom_source, seg_arrays[0], seg_arrays[1],
                                        model_card=model_card, overwrite=overwrite)
    except BaseException:
        for path in written:            # files that were there before stay (replaced)
            if str(path) not in existing and path.exists():
                path.unlink()
        raise
    return written


# ----------------------------------------------------------------------------- model card


def describe_training_data(card: Mapping[str, Any]) -> str:
    """The card's training data in a few words, e.g. "60 phantom subjects x 6 slices (L3),
    factor 2" (the whole recipe stays in the card)."""
    training = card.get("training", {}) or {}
    data = training.get("data", "?") if isinstance(training, Mapping) else "?"
    k = card.get("factor")
    at = f", factor {k}" if k is not None else ""
    if not isinstance(data, Mapping):
        return f"{data}{at}" if data not in ("", None) else f"?{at}"
    source = data.get("source")
    if source == "phantom" and "subjects" in data:
        slices = data.get("slices_per_subject")
        per = f" x {slices} slices" if slices is not None else ""
        levels = data.get("levels")
        where = "-".join(str(x) for x in levels) if levels else "L3"
        tuned = ", fine-tuned from an earlier model" if data.get("init") else ""
        return f"{data['subjects']} phantom subjects{per} ({where}){at}{tuned}"
    if source == "manifest":
        name = Path(str(data.get("manifest", "manifest"))).name
        n = data.get("train_slices")
        return f"manifest {name}" + (f", {n} training slices" if n is not None else "") + at
    short = [f"{key} {value}" for key, value in data.items()
             if isinstance(value, (int, float, str)) and len(str(value)) <= 24]
    text = ", ".join(short[:4]) + (", ..." if len(short) > 4 else "")
    return (text or "?") + at


#: Between a name and its value in the panel's lines, so a wrapped line never parts them.
NBSP = "\u00a0"


def _dice_line(label: str, dice: Mapping[str, Any], slices=None) -> Optional[str]:
    values = [f"{k}{NBSP}{float(v):.2f}" for k, v in dice.items()     # the card's order
              if k != CLASSES[0].key and isinstance(v, (int, float))]
    if not values:
        return None
    where = f" ({slices}{NBSP}slices)" if slices else ""
    return f"Dice, {label}{where}: " + ", ".join(values)


def _result_dice(results: Mapping[str, Any]) -> Dict[str, float]:
    """evaluate-real's results ({"MUS+IMAT vs file": {"dice": ...}}) -> {"MUS+IMAT": dice}."""
    return {str(name).split(" vs ")[0]: r["dice"] for name, r in results.items()
            if isinstance(r, Mapping) and isinstance(r.get("dice"), (int, float))}


def _level_lines(levels: Any) -> List[str]:
    """Per-level shares of a real CT's psoas and paraspinal muscles called muscle (the
    card's ``evaluation.real_ct_levels``), a line per muscle, and the VAT called behind the
    back muscles where recorded; [] when not recorded."""
    shares = levels.get("shares") if isinstance(levels, Mapping) else None
    if not isinstance(shares, Mapping):
        return []
    shares = dict(shares)
    # the slices past L5: a line of its own, said to be outside the range trained on
    below = shares.pop(BELOW_L5, None)
    lines = []
    for group in ("psoas", "paraspinal"):
        values = [f"{level}{NBSP}{float(e[group]['muscle_share']):.2f}"
                  for level, e in shares.items()
                  if isinstance(e, Mapping) and isinstance(e.get(group), Mapping)
                  and isinstance(e[group].get("muscle_share"), (int, float))]
        if values:
            lines.append(f"Real CT, {group} called muscle, by level: "
                         + ", ".join(values))
    behind = [f"{level}{NBSP}{float(e['vat_behind_back_cm2']):.1f}"
              for level, e in shares.items() if isinstance(e, Mapping)
              and isinstance(e.get("vat_behind_back_cm2"), (int, float))]
    if behind:
        # no visceral fat lies there: the goal is 0
        lines.append("Real CT, VAT behind back muscles (cm²): " + ", ".join(behind))
    psoas = below.get("psoas") if isinstance(below, Mapping) else None
    if isinstance(psoas, Mapping) and isinstance(psoas.get("muscle_share"), (int, float)):
        lines.append(f"Real CT, below L5 (not trained there): iliopsoas called muscle "
                     f"{float(psoas['muscle_share']):.2f}")
    return lines


def describe_dice(card: Mapping[str, Any]) -> List[str]:
    """Lines of measured Dice per class from the card: the ``evaluation`` that ``python -m
    training bundle`` records (held-out phantoms at full resolution, and agreement with
    another source's masks on a real CT when measured); else the validation Dice of
    ``metrics`` (full resolution) or an older ``metrics.dice``. [] when none is recorded."""
    lines: List[str] = []
    evaluation = card.get("evaluation")
    if isinstance(evaluation, Mapping):
        phantom = evaluation.get("phantom_held_out")
        if isinstance(phantom, Mapping) and isinstance(phantom.get("full_resolution_dice"),
                                                       Mapping):
            line = _dice_line("held-out phantoms", phantom["full_resolution_dice"],
                              phantom.get("slices"))
            if line:
                lines.append(line)
        real = evaluation.get("real_ct")
        results = real.get("results") if isinstance(real, Mapping) else None
        if isinstance(results, Mapping):
            dice = _result_dice(results)
            slices = {r.get("slices") for r in results.values() if isinstance(r, Mapping)}
            words = str(real.get("reference", "")).split()
            against = (f"{words[0]} masks" if len(words) > 1 and "masks" in words[:3]
                       else "reference masks")
            line = _dice_line(f"real CT vs {against}", dice,
                              slices.pop() if len(slices) == 1 else None)
            if line:
                lines.append(line)
            simulated = evaluation.get("real_ct_simulated")
            for what, label in (("metal", "the same CT with spinal screws drawn in"),
                                ("myosteatosis", "the same CT with its muscle made fattier "
                                                 "(myosteatosis)")):
                sim = simulated.get(what) if isinstance(simulated, Mapping) else None
                if isinstance(sim, Mapping) and isinstance(sim.get("results"), Mapping):
                    line = _dice_line(label, _result_dice(sim["results"]))
                    if line:
                        lines.append(line)
        lines += _level_lines(evaluation.get("real_ct_levels"))
    if lines:
        return lines
    metrics = card.get("metrics") or {}
    if not isinstance(metrics, Mapping):
        return []
    full = metrics.get("full_resolution")
    per_class = full.get("per_class") if isinstance(full, Mapping) else None
    if isinstance(per_class, Mapping):
        dice = {k: v["Dice"] for k, v in per_class.items()
                if isinstance(v, Mapping) and isinstance(v.get("Dice"), (int, float))}
        split = str(metrics.get("split", "val"))
        line = _dice_line(f"{'validation' if split == 'val' else split} set", dice,
                          metrics.get("slices"))
        return [line] if line else []
    if isinstance(metrics.get("dice"), Mapping):
        line = _dice_line("recorded", metrics["dice"])
        return [line] if line else []
    return []


def describe_model(card: Mapping[str, Any]) -> str:
    """A few lines about a model for the panel: classes, factor, spacing, training data in
    short, whether its weights are a mix (training interpolate) or calibrated (training
    calibrate), whether its maps are upsampled guided by the HU (training guide), whether its
    normalisation statistics are fixed (training fix-norms), the Dice per class the card
    records and its area error on phantoms at 3 mm (training area-bias). Values stay
    with their names when the panel wraps a line (no-break spaces)."""
    classes = ", ".join(str(c.get("key", c)) if isinstance(c, Mapping) else str(c)
                        for c in card.get("classes", [])[1:])
    k = card.get("factor")
    label_mode = card.get("label_mode", "?")
    px = card.get("pixel_mm", [0, 0])
    lines = [f"Classes: {classes}",
             f"Factor 1/{k} ({label_mode} labels), network pixel "
             + NBSP.join(f"{px[0]:.2f} x {px[1]:.2f} mm".split()),
             f"Trained on: {describe_training_data(card)}"]
    mix = (card.get("training") or {}).get("interpolated")
    if isinstance(mix, Mapping) and isinstance(mix.get("weight_a"), (int, float)):
        # training interpolate: the weights are a mix, not what the recipe trained alone
        w = float(mix["weight_a"])
        lines.append(f"Weights: {w:g} of this training mixed with {1 - w:g} of another model")
    if (card.get("architecture") or {}).get("norm") == "fixed":
        # training fix-norms: a pixel's label no longer depends on the rest of the image
        lines.append("Normalisation: fixed statistics, measured on training phantoms")
    cal = card.get("calibration")
    if isinstance(cal, Mapping) and isinstance(cal.get("pixel_mm"), list):
        # training calibrate: the probabilities are reweighted per class (core/calibration)
        sizes = ", ".join(f"{float(v):g}" for v in cal["pixel_mm"])
        where = ", at class edges" if isinstance(cal.get("edge_cells"), int) else ""
        lines.append(f"Calibrated: class weights fitted on phantoms at {sizes}{NBSP}mm pixels"
                     + where)
    up = card.get("upsampling")
    if isinstance(up, Mapping) and isinstance(up.get("sigma_hu"), (int, float)):
        # training guide: the maps reach the input grid along the CT's edges
        lines.append(f"Upsampled guided by the HU (sigma{NBSP}{float(up['sigma_hu']):g}{NBSP}HU)")
    fov = card.get("field")
    if isinstance(fov, Mapping) and isinstance(fov.get("content_share"), (int, float)):
        # training field: a scan cropped close to the body is padded with air for the network
        lines.append(f"Field of view: slices whose content spans more than "
                     f"{float(fov['content_share']):g} of the rows padded with air")
    lines += describe_dice(card) or ["Dice: not recorded in the model card"]
    mirror = (card.get("evaluation") or {}).get("mirror")
    if isinstance(mirror, bool):      # training bundle: how its numbers were measured
        lines.append(f"Measured {'with' if mirror else 'without'} mirror averaging "
                     f"(segmentation uses it)")
    bias = (card.get("evaluation") or {}).get("phantom_area_bias")
    errors = bias.get("error_cm2") if isinstance(bias, Mapping) else None
    if isinstance(errors, Mapping):
        # training area-bias: what a user of coarse scans should expect of the areas
        parts = [f"{k}{NBSP}{v:+.1f}" for k, v in errors.items()
                 if k != "BG" and isinstance(v, (int, float))]
        if parts:
            lines.append(f"Area error, 3{NBSP}mm phantoms (cm²/slice): " + ", ".join(parts))
    return "\n".join(lines)


def describe_device(requested: str = "auto") -> Tuple[str, str]:
    """(device that will run, why) for the panel, without failing: torch missing or a forced
    device that is absent come back as the reason, with device "" (cannot run)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "", ("PyTorch is not installed: Apply offers to install it through the "
                    "PyTorch extension")
    except OSError as exc:  # a broken CUDA install: the panel must still come up
        return "", (f"PyTorch is installed but cannot be loaded ({exc}); reinstall it with "
                    f"the PyTorch Utils module")

    try:
        dev, reason = select_device(requested)
    except (RuntimeError, ValueError) as exc:
        return "", str(exc)
    return str(dev), reason


def device_line(requested: str = "auto") -> str:
    """The panel's device line, e.g. "Runs on CPU: this torch build (2.13.0+cpu) has no CUDA
    support; MPS is not available"."""
    device, reason = describe_device(requested)
    if not device:
        return f"Cannot run: {reason}"
    prefix = device.split(":")[0].upper()
    why = reason[len("CPU: "):] if reason.startswith("CPU: ") else reason
    return f"Runs on {prefix}: {why}"


MODEL_SOURCES = ("Bundled model", "Model file")


def model_path_for(source: str, path=None) -> Path:
    """The weights file for the panel's model choice; FileNotFoundError saying what is
    missing (short enough for the panel)."""
    if source == MODEL_SOURCES[0]:
        try:
            return bundled_model_path()
        except FileNotFoundError:
            raise FileNotFoundError("The bundled model is not in this build yet: choose "
                                    "'Model file' and pick a model you trained.") from None
    if source != MODEL_SOURCES[1]:
        raise ValueError(f"model source must be one of {MODEL_SOURCES}; got {source!r}")
    if path is None or str(path) in ("", "."):
        raise FileNotFoundError("No model file chosen: pick a .safetensors file (its .json "
                                "model card must be beside it).")
    return Path(path)


def model_status(source: str, path=None) -> Tuple[str, bool]:
    """(the panel's model summary, whether the model can be used), from the model card;
    torch is not needed."""
    try:
        card = read_card(model_path_for(source, path))
    except (FileNotFoundError, ModelFileError) as exc:
        return str(exc), False
    return describe_model(card), True
