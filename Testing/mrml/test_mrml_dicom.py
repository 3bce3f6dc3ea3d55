"""DICOM SEG export from the module's MRML workflow: a CT volume node loaded from a DICOM series
(DICOM.instanceUIDs set as Slicer's DICOM plugin sets it), segmented, exported, and the SEG
files read back with highdicom and pydicom: segment labels and SNOMED CT codes, binary frames
equal to the label map per source instance, fractional frames within one quantisation step,
frames on their source slices. Phantom series (uncompressed and JPEG 2000) and, when
../shared is present, the real JPEG 2000 series."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import vtk

slicer = pytest.importorskip("slicer")
highdicom = pytest.importorskip("highdicom")

from scene import node_ids, one_hot, predictor  # noqa: E402

from EPDSegmentationLib.core.classes import TISSUES  # noqa: E402
from EPDSegmentationLib.io import read_volume, write_dicom_series  # noqa: E402
from EPDSegmentationLib.mrml.dicom import (INSTANCE_UIDS_ATTRIBUTE, MODEL_ATTRIBUTE,  # noqa: E402
                                           dicom_source, dicom_source_problem, frame_layout,
                                           model_summary, recorded_model, result_arrays)
from EPDSegmentationLib.mrml.nodes import InputProblem, ijk_to_ras, vtk_matrix  # noqa: E402
from EPDSegmentationLib.mrml.segmentation import fractional_probabilities  # noqa: E402
from EPDSegmentationLib.mrml.workflow import export_results, segment_volume  # noqa: E402
from training.phantom import subject_slices  # noqa: E402
from training.phantom.dataset import stack  # noqa: E402

#: highdicom stores fractions as 0..255: one quantisation step
STEP = 1 / 255
CARD = {"name": "EPDBodyComp_test", "factor": 2, "label_mode": "epd", "image_mode": "average",
        "pixel_mm": [1.6, 1.6], "training": {"data": "not kept"}}


@pytest.fixture(scope="module")
def phantom():
    """A phantom CT (4 slices of 64 x 64, 2.5 mm apart) and its exact EPD-style fractions
    (6, K, J, I): real soft maps with thin tissue at the edges."""
    hu, _, fractions = stack(subject_slices(6, n_slices=4, slice_gap_mm=2.5, size=64), 2.5)
    return hu, fractions.astype(np.float32)


@pytest.fixture(scope="module", params=["explicit", "jpeg2000"])
def series(request, phantom, tmp_path_factory):
    """The phantom written as a DICOM series and read back: (Volume, files by UID)."""
    hu, _ = phantom
    folder = tmp_path_factory.mktemp("dicom") / request.param
    write_dicom_series(hu, folder, transfer_syntax=request.param)
    vol = read_volume(folder)
    assert vol.meta["transfer_syntaxes"] == [pydicom.uid.JPEG2000Lossless] \
        if request.param == "jpeg2000" else True
    return vol, dict(zip(vol.meta["sop_instance_uids"], vol.meta["files"]))


def load_like_slicer(scene, vol, name="CT"):
    """A scalar volume node as Slicer's DICOM module leaves it: int16 voxels (K, J, I) in the
    series' sorted order, IJK-to-RAS from the headers, and DICOM.instanceUIDs (one SOP
    Instance UID per slice K, space separated)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.rint(vol.array).astype(np.int16))
    node.SetIJKToRASMatrix(vtk_matrix(vol.ijk_to_ras))
    node.SetAttribute(INSTANCE_UIDS_ATTRIBUTE, " ".join(vol.meta["sop_instance_uids"]))
    return node


def reverse_slices(node):
    """Slicer's own vtkMRMLVolumeNode.ReverseSliceOrder, with the UID list reversed as
    DICOMScalarVolumePlugin.setVolumeNodeProperties reverses it: same voxels in space, K
    running the other way (the handedness flips)."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    slicer.vtkMRMLVolumeNode.ReverseSliceOrder(node.GetImageData(), m)
    node.SetIJKToRASMatrix(m)
    uids = node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE).split()
    node.SetAttribute(INSTANCE_UIDS_ATTRIBUTE, " ".join(reversed(uids)))


def in_plane(node, how: str) -> None:
    """Re-lay the node's voxels in-plane without moving them in space: 'flip' reverses I,
    'transpose' swaps I and J (as another reader's pixel order would)."""
    a = slicer.util.arrayFromVolume(node).copy()
    m = ijk_to_ras(node)
    if how == "flip":
        a = a[:, :, ::-1]
        m[:3, 3] = m[:3, 3] + m[:3, 0] * (a.shape[2] - 1)
        m[:3, 0] = -m[:3, 0]
    else:
        a = np.swapaxes(a, 1, 2)
        m[:3, [0, 1]] = m[:3, [1, 0]]
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(a))
    node.SetIJKToRASMatrix(vtk_matrix(m))


def relay(array, from_matrix, to_matrix, to_shape):
    """An array (..., K, J, I) on the grid ``from_matrix`` re-laid on the grid ``to_matrix``
    of shape (K, J, I) holding the same voxel centres (a permutation: no interpolation)."""
    k, j, i = to_shape
    kk, jj, ii = np.meshgrid(np.arange(k), np.arange(j), np.arange(i), indexing="ij")
    ras = np.asarray(to_matrix) @ np.stack([ii.ravel(), jj.ravel(), kk.ravel(),
                                            np.ones(ii.size)])
    src = np.linalg.solve(np.asarray(from_matrix), ras)[:3]
    assert np.abs(src - np.rint(src)).max() < 1e-6
    src = np.rint(src).astype(int)
    out = np.asarray(array)[..., src[2], src[1], src[0]]
    return out.reshape(out.shape[:-1] + (k, j, i))


def read_seg(path, uids):
    """(highdicom Segmentation, raw pydicom dataset) of a SEG file that references exactly
    the instances ``uids``."""
    seg = highdicom.seg.segread(path)
    raw = pydicom.dcmread(path)
    referenced = {r.ReferencedSOPInstanceUID
                  for r in raw.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(uids)
    return seg, raw


def check_segments(seg, card_name):
    assert [d.SegmentLabel for d in seg.SegmentSequence] == [c.name for c in TISSUES]
    for d, c in zip(seg.SegmentSequence, TISSUES):
        assert d.SegmentNumber == c.index
        assert d.SegmentedPropertyCategoryCodeSequence[0].CodeValue == c.category.value
        assert d.SegmentedPropertyTypeCodeSequence[0].CodeValue == c.type.value
        assert d.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert d.SegmentAlgorithmName == "EPD Segmentation"
        assert card_name in d.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion
    assert seg.ManufacturerModelName == card_name


def check_frames_on_sources(raw, files_by_uid):
    """Every frame lies on the plane of the instance it references."""
    positions = {uid: [float(v) for v in pydicom.dcmread(f, stop_before_pixels=True)
                       .ImagePositionPatient] for uid, f in files_by_uid.items()}
    for frame in raw.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            positions[ref], atol=1e-3)


@pytest.mark.parametrize("relayout", ["as loaded", "reversed K", "flipped I", "transposed"])
def test_seg_frames_equal_the_results_per_source_instance(mrml, phantom, series, relayout,
                                                          tmp_path):
    """Whatever order the node holds the voxels in, frame n of the SEG is the result on
    source instance n: binary pixel for pixel, fractional within one step of 1/255."""
    scene = mrml.scene
    vol, files = series
    _, fractions = phantom
    ct = load_like_slicer(scene, vol)
    if relayout == "reversed K":
        reverse_slices(ct)
        m = vtk.vtkMatrix4x4()
        ct.GetIJKToRASMatrix(m)
        assert not slicer.vtkMRMLVolumeNode.IsIJKCoordinateSystemRightHanded(m)
    elif relayout != "as loaded":
        in_plane(ct, "flip" if relayout == "flipped I" else "transpose")
    node_shape = slicer.util.arrayFromVolume(ct).shape
    probs = relay(fractions, vol.ijk_to_ras, ijk_to_ras(ct), node_shape)  # on the node's grid
    slices = [0, 1]
    out = segment_volume(scene, ct, predictor(probs), slices=slices, soft_segmentation=True,
                         soft_volumes=relayout == "as loaded",
                         model_card=model_summary(CARD))
    source = dicom_source(ct, files.get)
    assert source.reordered is False
    paths = export_results(tmp_path, segmentation=out.segmentation,
                           soft_segmentation=out.soft_segmentation,
                           probability_volumes=out.probability_volumes, table=out.table,
                           dicom_source=source)
    assert {"CT_tissues_seg.dcm", "CT_tissues_prob_seg.dcm"} <= {p.name for p in paths}

    # what the node holds, laid out as the series (slice n = instance n)
    to_series = (lambda a: relay(a, ijk_to_ras(ct), vol.ijk_to_ras, vol.array.shape))
    labels_node = np.zeros(node_shape, np.uint8)
    labels_node[slices] = np.argmax(probs[:, slices], axis=0)
    expected = to_series(labels_node)
    assert expected.any() and not expected.all()
    uids = vol.meta["sop_instance_uids"]
    seg, raw = read_seg(tmp_path / "CT_tissues_seg.dcm", uids)
    assert seg.SegmentationType == "BINARY"
    check_segments(seg, CARD["name"])
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    np.testing.assert_array_equal(back, expected)
    check_frames_on_sources(raw, files)

    fseg, _ = read_seg(tmp_path / "CT_tissues_prob_seg.dcm", uids)
    assert fseg.SegmentationType == "FRACTIONAL"
    assert fseg.SegmentationFractionalType == "PROBABILITY"
    check_segments(fseg, CARD["name"])
    soft = np.moveaxis(fseg.get_pixels_by_source_instance(uids, rescale_fractional=True), -1, 0)
    held = np.zeros(probs.shape, np.float32)           # the probabilities the module holds
    if out.probability_volumes:                       # float volumes: the network's output
        held[:, slices] = probs[:, slices]
    else:                                             # the fractional segmentation, 1/216 steps
        decoded, _, k0 = fractional_probabilities(out.soft_segmentation)
        held[:, k0:k0 + decoded.shape[1]] = decoded
    held = to_series(held)[1:]
    assert np.abs(soft - held).max() <= STEP / 2 + 1e-6
    truth = np.zeros(probs.shape, np.float32)
    truth[:, slices] = probs[:, slices]
    quantised = 0.0 if out.probability_volumes else 0.5 / 216
    assert np.abs(soft - to_series(truth)[1:]).max() <= STEP / 2 + quantised + 1e-6


def test_instances_are_placed_by_their_position_not_by_the_uid_list(mrml, phantom, series,
                                                                    tmp_path):
    """A UID list out of order (not what Slicer writes, but possible after edits) cannot put
    a frame on the wrong slice: each instance goes to the slice its position lies on."""
    scene = mrml.scene
    vol, files = series
    _, fractions = phantom
    ct = load_like_slicer(scene, vol)
    uids = vol.meta["sop_instance_uids"]
    ct.SetAttribute(INSTANCE_UIDS_ATTRIBUTE, " ".join(uids[::-1]))
    source = dicom_source(ct, files.get)
    assert source.reordered is True
    assert [str(ds.SOPInstanceUID) for ds in source.datasets] == uids
    out = segment_volume(scene, ct, predictor(fractions), slices=[0])
    export_results(tmp_path, segmentation=out.segmentation, dicom_source=source,
                   model_card=CARD)
    seg = highdicom.seg.segread(tmp_path / "CT_tissues_seg.dcm")
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    np.testing.assert_array_equal(back[0], np.argmax(fractions[:, 0], axis=0))
    assert not back[1:].any()


def test_network_run_exports_dicom_seg(mrml, series, tiny_model_path, tmp_path):
    """The module's path end to end: a saved model on the CPU, its card recorded on the
    segmentation, SEG frames equal to the segmentation read back from the scene."""
    from EPDSegmentationLib.core.model_io import load_model
    from EPDSegmentationLib.mrml.nodes import slice_pixel_mm, volume_array
    from EPDSegmentationLib.mrml.segmentation import labels_from_segmentation
    from EPDSegmentationLib.mrml.workflow import model_predictor

    pytest.importorskip("torch")
    scene = mrml.scene
    vol, files = series
    ct = load_like_slicer(scene, vol)
    model, card = load_model(tiny_model_path)
    predict = model_predictor(model, card, volume_array(ct), slice_pixel_mm(ijk_to_ras(ct)),
                              device="cpu")
    out = segment_volume(scene, ct, predict, slices=[2, 3], soft_volumes=True,
                         model_card=model_summary(card, str(tiny_model_path) + ".safetensors"))
    assert recorded_model(out.segmentation) == {
        "name": "tiny", "factor": 2, "label_mode": "epd", "image_mode": "average",
        "pixel_mm": [1.6, 1.6]}
    assert json.loads(out.segmentation.GetAttribute(MODEL_ATTRIBUTE))["name"] == "tiny"
    paths = export_results(tmp_path, segmentation=out.segmentation,
                           probability_volumes=out.probability_volumes,
                           dicom_source=dicom_source(ct, files.get))
    assert sorted(p.name for p in paths if p.suffix == ".dcm") == [
        "CT_tissues_prob_seg.dcm", "CT_tissues_seg.dcm"]
    labels, _ = labels_from_segmentation(out.segmentation)
    uids = vol.meta["sop_instance_uids"]
    seg, _ = read_seg(tmp_path / "CT_tissues_seg.dcm", uids)
    check_segments(seg, "tiny")
    np.testing.assert_array_equal(seg.get_pixels_by_source_instance(uids, combine_segments=True),
                                  labels)
    _, probs = result_arrays(ct, out.segmentation, None, out.probability_volumes)
    fseg = highdicom.seg.segread(tmp_path / "CT_tissues_prob_seg.dcm")
    soft = fseg.get_pixels_by_source_instance(uids, rescale_fractional=True)
    assert np.abs(np.moveaxis(soft, -1, 0) - probs[1:]).max() <= STEP / 2 + 1e-6
    assert probs[1:, 2:].min() > 0 and not probs[1:, :2].any()   # the run's slices only


def test_not_dicom_and_broken_sources_give_clear_messages(mrml, series, tmp_path):
    scene = mrml.scene
    vol, files = series
    uids = vol.meta["sop_instance_uids"]
    nrrd_like = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "from NRRD")
    slicer.util.updateVolumeFromArray(nrrd_like, vol.array.astype(np.int16))
    for node in (nrrd_like, None):
        assert dicom_source_problem(node).startswith("DICOM SEG needs a DICOM source")
    with pytest.raises(InputProblem, match="DICOM SEG needs a DICOM source: 'from NRRD' was "
                                           "not loaded from DICOM"):
        dicom_source(nrrd_like, files.get)

    def broken(attribute=None, matrix=None, array=None):
        node = load_like_slicer(scene, vol, "broken")
        if attribute is not None:
            node.SetAttribute(INSTANCE_UIDS_ATTRIBUTE, attribute)
        if matrix is not None:
            node.SetIJKToRASMatrix(vtk_matrix(matrix))
        if array is not None:
            slicer.util.updateVolumeFromArray(node, array)
        return node

    ok = broken()
    assert dicom_source_problem(ok) is None
    with pytest.raises(InputProblem, match="has 4 slices but its DICOM.instanceUIDs attribute "
                                           "lists 3"):
        dicom_source(broken(" ".join(uids[:3])), files.get)
    with pytest.raises(InputProblem, match="slice 1 has no SOP Instance UID"):
        dicom_source(broken(" ".join([uids[0], "Unknown"] + uids[2:])), files.get)
    with pytest.raises(InputProblem, match=f"slice 2: instance {uids[2]} is not in the DICOM "
                                           f"database"):
        dicom_source(ok, {u: f for u, f in files.items() if u != uids[2]}.get)
    gone = dict(files, **{uids[1]: str(tmp_path / "deleted.dcm")})
    with pytest.raises(InputProblem, match="the file of instance .* is missing"):
        dicom_source(ok, gone.get)
    swapped = dict(files, **{uids[0]: files[uids[1]]})
    with pytest.raises(InputProblem, match=f"holds instance {uids[1]}, not {uids[0]}"):
        dicom_source(ok, swapped.get)
    moved = vol.ijk_to_ras.copy()
    moved[2, 3] += 0.4 * moved[2, 2]                 # shifted by 0.4 slice
    with pytest.raises(InputProblem, match="not on one of its slices"):
        dicom_source(broken(matrix=moved), files.get)
    shifted = vol.ijk_to_ras.copy()
    shifted[:3, 3] += 3 * shifted[:3, 0]              # moved by 3 columns in-plane
    with pytest.raises(InputProblem, match="not on a corner of the slice"):
        dicom_source(broken(matrix=shifted), files.get)
    cropped = np.ascontiguousarray(vol.array[:, 2:, :].astype(np.int16))
    with pytest.raises(InputProblem, match="64 x 64 pixels; 'broken' has 62 x 64"):
        dicom_source(broken(array=cropped), files.get)
    tilted = vol.ijk_to_ras.copy()
    c, s = np.cos(0.2), np.sin(0.2)
    tilted[:3, :3] = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ tilted[:3, :3]
    with pytest.raises(InputProblem, match="do not run along the voxel axes"):
        dicom_source(broken(matrix=tilted), files.get)


def test_existing_files_are_kept_and_a_failed_export_leaves_nothing(mrml, phantom, series,
                                                                    tmp_path, monkeypatch):
    scene = mrml.scene
    vol, files = series
    _, fractions = phantom
    ct = load_like_slicer(scene, vol)
    out = segment_volume(scene, ct, predictor(fractions), slices=[1], soft_segmentation=True)
    source = dicom_source(ct, files.get)
    (tmp_path / "CT_tissues_seg.dcm").write_bytes(b"a user's file")
    with pytest.raises(FileExistsError, match="CT_tissues_seg.dcm"):
        export_results(tmp_path, segmentation=out.segmentation, table=out.table,
                       dicom_source=source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CT_tissues_seg.dcm"]
    assert (tmp_path / "CT_tissues_seg.dcm").read_bytes() == b"a user's file"

    import EPDSegmentationLib.io.dicom_seg as dicom_seg

    def fails(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dicom_seg, "write_dicom_seg", fails)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match="disk full"):
        export_results(empty, segmentation=out.segmentation,
                       soft_segmentation=out.soft_segmentation, table=out.table,
                       dicom_source=source)
    assert list(empty.iterdir()) == []               # the .seg.nrrd and .csv were removed


def test_frame_layout_needs_one_instance_per_slice(series):
    vol, files = series
    datasets = [pydicom.dcmread(files[u], stop_before_pixels=True)
                for u in vol.meta["sop_instance_uids"]]
    layout = frame_layout(vol.ijk_to_ras, vol.array.shape, datasets)
    assert layout.order == [0, 1, 2, 3] and not layout.transpose
    with pytest.raises(InputProblem, match=r"slices \[1\] have more than one instance"):
        frame_layout(vol.ijk_to_ras, vol.array.shape, [datasets[0], datasets[1], datasets[1],
                                                       datasets[3]])


# ----------------------------------------------------------------------------- real series


@pytest.fixture(scope="module")
def real_series(totalseg_dir, tmp_path_factory):
    """The shared JPEG 2000 series read as Slicer would load it, and copies of its files with
    study and series UIDs filled in (the sample was de-identified with blank ones)."""
    vol = read_volume(totalseg_dir / "ct_dicom")
    originals = dict(zip(vol.meta["sop_instance_uids"], vol.meta["files"]))
    folder = tmp_path_factory.mktemp("real-uids")
    study, series_uid = highdicom.UID(), highdicom.UID()
    copies = {}
    for uid, f in originals.items():
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        path = folder / f"{uid}.dcm"
        ds.save_as(path)
        copies[uid] = str(path)
    return vol, originals, copies


def test_real_series(mrml, real_series, tmp_path):
    """The blank-UID original is refused up front with the reason and nothing written; the
    UID-filled copies give a SEG whose frames equal the labels per instance and lie on
    their source slices."""
    scene = mrml.scene
    vol, originals, copies = real_series
    ct = load_like_slicer(scene, vol, "real CT")
    hu = slicer.util.arrayFromVolume(ct)
    labels = np.zeros(hu.shape, np.uint8)              # HU rules, enough for a geometry check
    labels[(hu >= -190) & (hu <= -30)] = 3
    labels[(hu > -30) & (hu < 150)] = 1
    labels[hu >= 150] = 5
    slices = [3, 12]
    out = segment_volume(scene, ct, predictor(one_hot(labels)), slices=slices)
    before = node_ids(scene)
    with pytest.raises(InputProblem, match="has no StudyInstanceUID .*de-identified"):
        export_results(tmp_path, segmentation=out.segmentation, table=out.table,
                       dicom_source=dicom_source(ct, originals.get))
    assert list(tmp_path.iterdir()) == [] and node_ids(scene) == before

    export_results(tmp_path, segmentation=out.segmentation,
                   dicom_source=dicom_source(ct, copies.get), model_card=CARD)
    uids = vol.meta["sop_instance_uids"]
    seg, raw = read_seg(tmp_path / "real_CT_tissues_seg.dcm", uids)
    check_segments(seg, CARD["name"])
    expected = np.zeros_like(labels)
    expected[slices] = labels[slices]
    np.testing.assert_array_equal(seg.get_pixels_by_source_instance(uids, combine_segments=True),
                                  expected)
    check_frames_on_sources(raw, copies)
    assert raw.ReferencedSeriesSequence[0].SeriesInstanceUID == \
        pydicom.dcmread(copies[uids[0]], stop_before_pixels=True).SeriesInstanceUID
