"""The module's workflow on a real vtkMRMLScene (slicer-core): CT volume in; segmentation,
soft labels and measures table out; cancellation, bad inputs, existing outputs, export."""

from __future__ import annotations

import csv

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from scene import SPACING, add_ct, label_stack, node_ids, one_hot, predictor, soft_maps  # noqa: E402

from EPDSegmentationLib.core import bodycomp  # noqa: E402
from EPDSegmentationLib.core.classes import NUM_CLASSES, TISSUES  # noqa: E402
from EPDSegmentationLib.core.inference import Cancelled  # noqa: E402
from EPDSegmentationLib.io.seg_nrrd import read_seg_nrrd  # noqa: E402
from EPDSegmentationLib.mrml.nodes import InputProblem, ijk_to_ras  # noqa: E402
from EPDSegmentationLib.mrml.segmentation import (  # noqa: E402
    BINARY, FRACTIONAL, decode_fractional, encode_fractional, fractional_probabilities,
    labels_from_segmentation, load_segmentation, save_segmentation, terminology_entry)
from EPDSegmentationLib.mrml.tables import table_rows  # noqa: E402
from EPDSegmentationLib.mrml.workflow import (OutputExists, export_results,  # noqa: E402
                                              model_path_for, model_status, resolve_slices,
                                              result_nodes, segment_volume)

PIXEL_CM2 = SPACING[0] * SPACING[1] / 100.0


@pytest.fixture
def case(mrml):
    labels = label_stack(5, 64)
    ct = add_ct(mrml.scene, labels)
    return mrml.scene, ct, labels, soft_maps(labels)


def test_segmentation_has_the_five_tissues_on_the_input_grid(case):
    scene, ct, labels, probs = case
    out = segment_volume(scene, ct, predictor(probs), slices=[1, 2, 3], chunk_slices=2)
    seg = out.segmentation
    segmentation = seg.GetSegmentation()
    assert segmentation.GetSourceRepresentationName() == BINARY
    assert [segmentation.GetNthSegmentID(i) for i in range(5)] == [c.key for c in TISSUES]
    tag = slicer.vtkSegment.GetTerminologyEntryTagName()
    for c in TISSUES:
        segment = segmentation.GetSegment(c.key)
        assert segment.GetName() == c.name
        np.testing.assert_allclose(segment.GetColor(), np.array(c.color) / 255.0)
        value = segment.GetTag(tag, vtk_reference := __import__("vtk").reference(""))
        assert value and str(vtk_reference) == terminology_entry(c)
        assert c.type.value in str(vtk_reference)          # the SNOMED CT code is in the tag
    # reference geometry = the input volume (needed for DICOM SEG export)
    ref = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
    assert ref is ct
    got, m = labels_from_segmentation(seg)
    np.testing.assert_allclose(m, ijk_to_ras(ct))
    assert got.shape == labels.shape
    expected = np.zeros_like(labels)
    expected[1:4] = np.argmax(probs[:, 1:4], axis=0)
    np.testing.assert_array_equal(got, expected)            # unprocessed slices stay empty
    assert out.slices == [1, 2, 3] and out.device == "cpu"


def test_table_areas_are_pixel_counts_times_pixel_area(case):
    scene, ct, labels, _ = case
    out = segment_volume(scene, ct, predictor(one_hot(labels)))
    rows = table_rows(out.table)
    assert len(rows) == 5 * len(TISSUES) + len(TISSUES)
    hu = slicer.util.arrayFromVolume(ct).astype(np.float64)
    for row in rows[:-5]:
        k, c = int(row["slice"]), [t for t in TISSUES if t.key == row["tissue"]][0]
        mask = labels[k] == c.index
        assert row["area_cm2"] == pytest.approx(mask.sum() * PIXEL_CM2, rel=1e-9)
        assert row["hard_area_cm2"] == pytest.approx(mask.sum() * PIXEL_CM2, rel=1e-9)
        assert row["volume_cm3"] == pytest.approx(mask.sum() * PIXEL_CM2 * SPACING[2] / 10)
        if mask.any():
            assert row["hu_mean"] == pytest.approx(hu[k][mask].mean(), abs=1e-6)
            assert row["hu_sd"] == pytest.approx(hu[k][mask].std(), abs=1e-6)
    total = {r["tissue"]: r for r in rows[-5:]}
    for c in TISSUES:
        count = (labels == c.index).sum()
        assert total[c.key]["slice"] == "all"
        assert total[c.key]["area_cm2"] == pytest.approx(count * PIXEL_CM2 / 5)
        assert total[c.key]["volume_cm3"] == pytest.approx(count * PIXEL_CM2 * SPACING[2] / 10)


def test_soft_areas_keep_thin_tissue_that_hard_areas_lose(case):
    scene, ct, labels, probs = case
    rows = table_rows(segment_volume(scene, ct, predictor(probs)).table)
    total = {r["tissue"]: r for r in rows if r["slice"] == "all"}
    for c in TISSUES:   # soft area = sum of probabilities x pixel area
        assert total[c.key]["area_cm2"] == pytest.approx(
            probs[c.index].sum() * PIXEL_CM2 / labels.shape[0], rel=1e-6)
    imat = total["IMAT"]
    true_imat = (labels == 2).sum() * PIXEL_CM2 / labels.shape[0]
    assert abs(imat["area_cm2"] - true_imat) < abs(imat["hard_area_cm2"] - true_imat)


def test_protocol_areas_sit_beside_the_soft_areas_when_asked_for(case, tmp_path):
    """protocol=True: the table gets the HU-protocol area and mean HU per slice and tissue
    (what indices.protocol_measures gives on the same probabilities and HU, and what the
    command line sums), titled as such, and with a height their index; without it neither."""
    from EPDSegmentationLib.core.indices import protocol_measures

    scene, ct, labels, probs = case
    plain = table_rows(segment_volume(scene, ct, predictor(probs), slices=[1, 3]).table)
    assert "protocol_area_cm2" not in plain[0]
    out = segment_volume(scene, ct, predictor(probs), slices=[1, 3], protocol=True,
                         height_m=1.6, chunk_slices=1)
    rows = table_rows(out.table)
    hu = slicer.util.arrayFromVolume(ct).astype(np.float64)
    for label, ks in (("1", [1]), ("3", [3]), ("all", [1, 3])):
        want = protocol_measures(probs[:, ks], hu[ks], SPACING)
        got = {r["tissue"]: r for r in rows if r["slice"] == label}
        for key in ("MUS", "IMAT", "SAT", "VAT"):
            assert got[key]["protocol_area_cm2"] == pytest.approx(
                want[f"protocol_area_cm2_{key}"], rel=1e-5)
            assert got[key]["protocol_hu_mean"] == pytest.approx(
                want[f"protocol_hu_mean_{key}"], rel=1e-5, abs=1e-4, nan_ok=True)
            assert got[key]["protocol_index_cm2_m2"] == pytest.approx(
                got[key]["protocol_area_cm2"] / 1.6 ** 2)
        assert np.isnan(got["MSC"]["protocol_area_cm2"])
        # the HU window takes out what the network calls muscle at fat HU: never more
        assert got["MUS"]["protocol_area_cm2"] <= got["MUS"]["area_cm2"] + got["IMAT"]["area_cm2"]
    assert out.table.GetColumnTitle("protocol_area_cm2") == "Protocol area (cm2)"
    assert "Alberta" in out.table.GetColumnDescription("protocol_area_cm2")
    # and what the protocol counted, as a segmentation beside the run's: its labels split by
    # HU, the slices not segmented empty; found as the run's companion and exported
    from EPDSegmentationLib.core.indices import protocol_labels

    got, _ = labels_from_segmentation(out.protocol_segmentation)
    tissues, _ = labels_from_segmentation(out.segmentation)
    want = np.zeros_like(tissues)
    want[[1, 3]] = protocol_labels(tissues[[1, 3]], hu[[1, 3]])
    np.testing.assert_array_equal(got, want)
    assert (got[[1, 3]] != tissues[[1, 3]]).any()
    assert result_nodes(scene, out.segmentation)["protocol_segmentation"] is \
        out.protocol_segmentation
    assert result_nodes(scene, out.segmentation)["soft_segmentation"] is None
    assert segment_volume(scene, ct, predictor(probs), slices=[1]).protocol_segmentation is None
    paths = export_results(tmp_path, segmentation=out.segmentation, table=out.table,
                           protocol_segmentation=out.protocol_segmentation, base="run")
    assert sorted(p.name for p in paths) == ["run.seg.nrrd", "run_bodycomp.csv",
                                             "run_protocol.seg.nrrd"]
    np.testing.assert_array_equal(read_seg_nrrd(tmp_path / "run_protocol.seg.nrrd").array, want)
    with open(tmp_path / "run_bodycomp.csv", newline="") as f:
        assert "protocol_area_cm2" in next(csv.reader(f))


def test_fractional_output_decodes_to_the_probabilities(case):
    scene, ct, _, probs = case
    out = segment_volume(scene, ct, predictor(probs), slices=[0, 2], soft_segmentation=True,
                         soft_volumes=True)
    soft = out.soft_segmentation
    assert soft.GetSegmentation().GetSourceRepresentationName() == FRACTIONAL
    image = soft.GetSegmentation().GetSegment("IMAT").GetRepresentation(FRACTIONAL)
    assert image.GetScalarType() == __import__("vtk").VTK_CHAR
    fd = image.GetFieldData()
    assert tuple(fd.GetArray("ScalarRange").GetTuple(i)[0] for i in range(2)) == (-108, 108)
    assert fd.GetArray("ThresholdValue").GetValue(0) == 0
    decoded, m, k0 = fractional_probabilities(soft)
    assert k0 == 0 and decoded.shape == (NUM_CLASSES, 3) + probs.shape[2:]
    np.testing.assert_allclose(m, ijk_to_ras(ct))
    for rel, k in ((0, 0), (2, 2)):
        assert np.abs(decoded[1:, rel] - probs[1:, k]).max() <= 1 / 216
    assert np.all(decoded[1:, 1] == 0)                      # slice 1 was not processed
    vols = {v.GetName().split()[-2]: v for v in out.probability_volumes}
    assert sorted(vols) == sorted(c.key for c in TISSUES)
    arr = slicer.util.arrayFromVolume(vols["SAT"])     # slices 0..2 only (the slab)
    assert arr.shape == (3,) + probs.shape[2:]
    np.testing.assert_array_equal(arr[[0, 2]], probs[3, [0, 2]])
    assert np.all(arr[1] == 0)


def test_encoding_covers_0_to_1_in_216_steps():
    p = np.linspace(0, 1, 1001, dtype=np.float32)
    q = encode_fractional(p)
    assert q.dtype == np.int8 and q.min() == -108 and q.max() == 108
    assert np.abs(decode_fractional(q) - p).max() <= 0.5 / 216 + 1e-7


def test_seg_nrrd_round_trip_keeps_binary_and_fractional(case, tmp_path):
    scene, ct, labels, probs = case
    out = segment_volume(scene, ct, predictor(probs), slices=[1, 2], soft_segmentation=True)
    hard_path = save_segmentation(out.segmentation, tmp_path / "hard.seg.nrrd")
    soft_path = save_segmentation(out.soft_segmentation, tmp_path / "soft.seg.nrrd")
    hard = load_segmentation(scene, hard_path)
    got, m = labels_from_segmentation(hard, (ijk_to_ras(ct), labels.shape))
    expected, _ = labels_from_segmentation(out.segmentation)
    np.testing.assert_array_equal(got, expected)
    soft = load_segmentation(scene, soft_path)
    assert soft.GetSegmentation().GetSourceRepresentationName() == FRACTIONAL
    before, m0, k0 = fractional_probabilities(out.soft_segmentation)
    after, m1, k1 = fractional_probabilities(soft)
    assert k1 == k0 == 1
    np.testing.assert_allclose(m1, m0)
    np.testing.assert_array_equal(after, before)
    assert soft.GetSegmentation().GetSegment("VAT").GetName() == "Visceral adipose tissue"
    # an independent reader (pynrrd) sees the same probabilities on the same grid
    vol = read_seg_nrrd(soft_path)
    assert vol.meta["representation"] == FRACTIONAL
    assert vol.meta["extent_offset"] == [0, 0, 1]
    np.testing.assert_allclose(vol.meta["fractions"][1:], before[1:], atol=1e-6)
    hard_vol = read_seg_nrrd(hard_path)
    np.testing.assert_array_equal(hard_vol.array, expected)
    np.testing.assert_allclose(hard_vol.ijk_to_ras, ijk_to_ras(ct), atol=1e-6)


def test_cancel_leaves_the_scene_as_it_was(case):
    scene, ct, _, probs = case
    before = node_ids(scene)
    calls = []
    state = {"n": 0}

    def cancel():
        state["n"] += 1
        return state["n"] > 2               # after two chunks

    with pytest.raises(Cancelled):
        segment_volume(scene, ct, predictor(probs, calls), chunk_slices=1,
                       soft_segmentation=True, should_cancel=cancel)
    assert calls == [[0], [1]]
    assert node_ids(scene) == before


def test_failure_while_building_outputs_removes_what_was_added(case, monkeypatch):
    scene, ct, _, probs = case
    before = node_ids(scene)
    import EPDSegmentationLib.mrml.workflow as workflow

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(workflow, "fill_fractional_segmentation", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        segment_volume(scene, ct, predictor(probs), soft_segmentation=True)
    assert node_ids(scene) == before


def test_progress_reports_every_chunk(case):
    scene, ct, _, probs = case
    seen = []
    segment_volume(scene, ct, predictor(probs), chunk_slices=2,
                   progress=lambda done, total, msg: seen.append((done, total)))
    done = [d for d, t in seen]
    assert done == sorted(done) and done[-1] == 5 and {t for _, t in seen} == {5}
    assert {2, 4, 5} <= set(done)


def test_bad_inputs_give_clear_messages(mrml):
    scene = mrml.scene
    labels = label_stack(2, 32)
    with pytest.raises(InputProblem, match="No input volume"):
        segment_volume(scene, None, predictor(one_hot(labels)))
    lab = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(lab, labels)
    with pytest.raises(InputProblem, match="'labels' is a label map"):
        segment_volume(scene, lab, predictor(one_hot(labels)))
    four_d = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "dynamic")
    slicer.util.updateVolumeFromArray(four_d, np.zeros((2, 32, 32, 3), np.int16) - 1000)
    with pytest.raises(InputProblem, match="3 values per voxel"):
        segment_volume(scene, four_d, predictor(one_hot(labels)))
    mr = add_ct(scene, labels, name="T1")
    slicer.util.updateVolumeFromArray(mr, (slicer.util.arrayFromVolume(mr) + 1100).astype(
        np.int16))
    with pytest.raises(InputProblem, match="'T1' does not look like CT in Hounsfield units"):
        segment_volume(scene, mr, predictor(one_hot(labels)))
    blank = add_ct(scene, labels, name="blank")
    slicer.util.updateVolumeFromArray(blank, np.full(labels.shape, -1024, np.int16))
    with pytest.raises(InputProblem, match="'blank' is an empty image: every voxel is -1024"):
        segment_volume(scene, blank, predictor(one_hot(labels)))
    sagittal = np.zeros((4, 4))
    sagittal[:3, :3] = [[0, 0, 1], [1, 0, 0], [0, 1, 0]]
    sagittal[3, 3] = 1
    sag = add_ct(scene, labels, name="sagittal", matrix=sagittal)
    with pytest.raises(InputProblem, match="not an axial series"):
        segment_volume(scene, sag, predictor(one_hot(labels)))
    ct = add_ct(scene, labels)
    with pytest.raises(InputProblem, match="outside the volume"):
        segment_volume(scene, ct, predictor(one_hot(labels)), slices=[1, 2])
    with pytest.raises(ValueError, match="probabilities of shape"):
        segment_volume(scene, ct, lambda s, p, c: (np.zeros((6, 1, 8, 8), np.float32), "", []))


def test_user_segmentation_is_replaced_only_when_allowed(case):
    scene, ct, labels, probs = case
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my work")
    mine.GetSegmentation().AddEmptySegment("tumour")
    with pytest.raises(OutputExists, match="'my work' already holds 1 segment"):
        segment_volume(scene, ct, predictor(probs), segmentation_node=mine)
    assert mine.GetSegmentation().GetSegment("tumour") is not None
    out = segment_volume(scene, ct, predictor(probs), segmentation_node=mine,
                         replace_existing=True)
    assert out.segmentation is mine
    assert mine.GetSegmentation().GetSegment("tumour") is None
    assert mine.GetSegmentation().GetNumberOfSegments() == 5
    again = segment_volume(scene, ct, predictor(probs))   # no pick: a new node
    assert again.segmentation is not mine and again.segmentation.GetName() == "CT tissues"
    third = segment_volume(scene, ct, predictor(probs))
    assert third.segmentation.GetName() != "CT tissues"     # never takes over an older run
    assert again.segmentation.GetSegmentation().GetNumberOfSegments() == 5


def test_outputs_go_into_the_input_study(case):
    scene, ct, _, probs = case
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study = sh.CreateStudyItem(patient, "Study")
    sh.CreateItem(study, ct)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    ct.SetAndObserveTransformNodeID(transform.GetID())
    out = segment_volume(scene, ct, predictor(probs), soft_segmentation=True)
    for node in (out.segmentation, out.table, out.soft_segmentation):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    assert out.segmentation.GetTransformNodeID() == transform.GetID()


def test_export_writes_every_file_and_refuses_to_overwrite(case, tmp_path):
    scene, ct, _, probs = case
    out = segment_volume(scene, ct, predictor(probs), slices=[2], soft_segmentation=True,
                         soft_volumes=True)
    paths = export_results(tmp_path, segmentation=out.segmentation,
                           soft_segmentation=out.soft_segmentation,
                           probability_volumes=out.probability_volumes, table=out.table)
    names = sorted(p.name for p in paths)
    assert names == sorted(["CT_tissues.seg.nrrd", "CT_tissues_soft.seg.nrrd",
                            "CT_tissues_bodycomp.csv"]
                           + [f"CT_tissues_probability_{c.key}.nrrd" for c in TISSUES])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp files
    with open(tmp_path / "CT_tissues_bodycomp.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(bodycomp.COLUMN_KEYS)
    assert rows[0]["slice"] == "2" and rows[-1]["slice"] == "all"
    assert float(rows[0]["area_cm2"]) == pytest.approx(out.rows[0]["area_cm2"], rel=1e-5)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="CT_tissues.seg.nrrd"):
        export_results(tmp_path, segmentation=out.segmentation, table=out.table)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    export_results(tmp_path, segmentation=out.segmentation, overwrite=True)
    with pytest.raises(InputProblem, match="does not exist"):
        export_results(tmp_path / "missing", table=out.table)


def test_resolve_slices():
    assert resolve_slices("all", 3) == [0, 1, 2]
    assert resolve_slices("current", 3, current=2) == [2]
    assert resolve_slices("range", 10, first=3, last=5) == [3, 4, 5]
    with pytest.raises(InputProblem, match="first slice 5 is after last slice 3"):
        resolve_slices("range", 10, first=5, last=3)
    with pytest.raises(InputProblem, match="outside"):
        resolve_slices("range", 10, first=5, last=10)
    with pytest.raises(InputProblem, match="red view"):
        resolve_slices("current", 3, current=7)


def test_export_finds_the_runs_companions(case):
    scene, ct, _, probs = case
    first = segment_volume(scene, ct, predictor(probs), soft_segmentation=True,
                           soft_volumes=True)
    found = result_nodes(scene, first.segmentation)
    assert found["table"] is first.table
    assert found["soft_segmentation"] is first.soft_segmentation
    assert found["probability_volumes"] == first.probability_volumes
    # a rerun into the same (picked, replaced) segmentation takes its companions over
    second = segment_volume(scene, ct, predictor(probs), segmentation_node=first.segmentation,
                            replace_existing=True)
    found = result_nodes(scene, first.segmentation)
    assert found["table"] is second.table and found["table"] is not first.table
    assert found["soft_segmentation"] is None and found["probability_volumes"] == []


def test_model_choice_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model file chosen"):
        model_path_for("Model file", "")
    text, ok = model_status("Model file", tmp_path / "missing.safetensors")
    assert not ok and "missing.json" in text and "model card not found" in text
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    text, ok = model_status("Model file", tmp_path / "other.safetensors")
    assert not ok and "not an EPD Segmentation model card" in text
