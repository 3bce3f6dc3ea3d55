"""Slicer .seg.nrrd files: ours open in Slicer's own reader (slicer-core, real MRML) with the
right segments, voxels and geometry, and Slicer's files read back into our classes."""

from __future__ import annotations

import numpy as np
import pytest

from EPDSegmentationLib.core.classes import CLASSES
from EPDSegmentationLib.io import InputError, read_labels, read_seg_nrrd, write_seg_nrrd
from EPDSegmentationLib.io.seg_nrrd import class_for_segment
from training.phantom import subject_slices
from training.phantom.dataset import stack


@pytest.fixture(scope="module")
def phantom():
    """Labels (K, J, I), fractions (6, K, J, I) and geometry of a small phantom volume."""
    hu, labels, fractions = stack(subject_slices(8, n_slices=3, slice_gap_mm=3.0, size=48), 3.0)
    return labels, fractions


@pytest.fixture(scope="module")
def mrml():
    """A headless MRML scene with the segmentation logic set up (GUIDE section 1)."""
    slicer = pytest.importorskip("slicer")
    import vtk

    vtk.vtkObject.GlobalWarningDisplayOff()
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    logic.SetMRMLApplicationLogic(app)
    return slicer, scene, logic, app


def _slicer_read(mrml, path):
    scene = mrml[1]
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node) == 1
    return node.GetSegmentation()


def _layer_array(segment):
    import vtk
    from vtk.util import numpy_support

    img = segment.GetRepresentation("Binary labelmap")
    e = img.GetExtent()
    arr = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())
    m = vtk.vtkMatrix4x4()
    img.GetImageToWorldMatrix(m)
    mat = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    return arr.reshape(e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1), mat, e


def test_hard_labels_open_in_slicer_with_our_segments(tmp_path, mrml, phantom):
    labels, _ = phantom
    path = write_seg_nrrd(tmp_path / "phantom.seg.nrrd", labels.array, labels.ijk_to_ras)
    seg = _slicer_read(mrml, path)
    assert seg.GetSourceRepresentationName() == "Binary labelmap"
    assert seg.GetNumberOfSegments() == 5
    import vtk

    for n, c in enumerate(CLASSES[1:]):
        s = seg.GetSegment(seg.GetNthSegmentID(n))
        assert seg.GetNthSegmentID(n) == c.key and s.GetName() == c.name
        assert s.GetLabelValue() == c.index
        assert np.allclose(s.GetColor(), np.array(c.color) / 255, atol=1e-5)
        tag = vtk.mutable("")
        assert s.GetTag("TerminologyEntry", tag)
        assert c.type.value in str(tag)
        arr, mat, _ = _layer_array(s)
        assert np.array_equal(arr == c.index, labels.array == c.index), c.key
        assert np.allclose(mat, labels.ijk_to_ras, atol=1e-5)
    assert np.array_equal(read_seg_nrrd(path).array, labels.array)


def test_fractional_labelmap_is_slicers_format_and_values_survive(tmp_path, mrml, phantom):
    import nrrd

    labels, fractions = phantom
    path = write_seg_nrrd(tmp_path / "soft.seg.nrrd", fractions, labels.ijk_to_ras,
                          fractional=True)
    # Slicer's reader opens it: one layer per tissue, our names, the char-coded values
    seg = _slicer_read(mrml, path)
    assert seg.GetNumberOfSegments() == 5
    for n, c in enumerate(CLASSES[1:]):
        s = seg.GetSegment(seg.GetNthSegmentID(n))
        assert s.GetName() == c.name
        arr, mat, _ = _layer_array(s)
        expected = np.round(fractions[c.index] * 216 - 108)
        assert np.array_equal(arr.astype(int), expected.astype(int)), c.key
        assert np.allclose(mat, labels.ijk_to_ras, atol=1e-5)
    # our reader decodes the probabilities to within the 1/216 step
    back = read_seg_nrrd(path)
    assert back.meta["representation"] == "Fractional labelmap"
    assert np.abs(back.meta["fractions"][1:] - fractions[1:]).max() <= 0.5 / 216 + 1e-6
    # and the file is laid out as Slicer writes a fractional segmentation itself
    ref = _slicer_fractional_file(mrml, tmp_path / "slicer.seg.nrrd", labels)
    _, ours = nrrd.read(str(path))
    _, theirs = nrrd.read(str(ref))
    for key in ("dimension", "kinds", "space"):
        assert ours[key] == theirs[key], key
    assert {ours["type"], theirs["type"]} <= {"int8", "signed char"}
    seg_keys = {k.split("_", 1)[1] for k in theirs if k.startswith("Segment0_")}
    assert seg_keys <= {k.split("_", 1)[1] for k in ours if k.startswith("Segment0_")}
    assert ours["Segmentation_MasterRepresentation"] == theirs["Segmentation_MasterRepresentation"]


def _slicer_fractional_file(mrml, path, labels):
    """A fractional segmentation made and written by slicer-core itself."""
    import vtk
    from vtk.util import numpy_support

    slicer, scene = mrml[0], mrml[1]
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg = node.GetSegmentation()
    seg.SetSourceRepresentationName("Fractional labelmap")
    k, j, i = labels.array.shape
    for n in range(2):
        img = slicer.vtkOrientedImageData()
        img.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
        img.AllocateScalars(vtk.VTK_CHAR, 1)
        numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())[:] = -108 + 50 * n
        m = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                m.SetElement(r, c, labels.ijk_to_ras[r, c])
        img.SetImageToWorldMatrix(m)
        s = slicer.vtkSegment()
        s.SetName(f"s{n}")
        s.AddRepresentation("Fractional labelmap", img)
        seg.AddSegment(s, f"s{n}")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(node) == 1
    return path


def test_slicer_written_cropped_segmentation_reads_onto_the_image_grid(tmp_path, mrml, phantom):
    """Slicer crops a .seg.nrrd to the segments' extent; read_labels(like=) puts it back."""
    slicer, scene = mrml[0], mrml[1]
    logic = mrml[2]
    labels, _ = phantom
    arr = np.zeros(labels.array.shape, np.uint8)
    arr[1, 10:20, 12:30] = 1
    arr[1:3, 25:30, 5:9] = 3
    lm = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.util.updateVolumeFromArray(lm, arr)
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, labels.ijk_to_ras[r, c])
    lm.SetIJKToRASMatrix(m)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert logic.ImportLabelmapToSegmentationNode(lm, node)
    seg = node.GetSegmentation()
    names = {1: "skeletal muscle", 3: "Subcutaneous fat"}
    for n in range(seg.GetNumberOfSegments()):
        s = seg.GetSegment(seg.GetNthSegmentID(n))
        s.SetName(names[s.GetLabelValue()])
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    path = tmp_path / "slicer.seg.nrrd"
    storage.SetFileName(str(path))
    assert storage.WriteData(node) == 1
    raw = read_seg_nrrd(path)
    assert raw.array.shape != arr.shape            # Slicer cropped it
    placed = read_labels(path, like=labels)
    assert np.array_equal(placed.array, arr)
    assert np.allclose(placed.ijk_to_ras, labels.ijk_to_ras)


def test_segment_names_map_to_classes():
    assert class_for_segment("Skeletal muscle") == 1
    assert class_for_segment("IMAT") == 2
    assert class_for_segment("subcutaneous_fat") == 3
    assert class_for_segment("Torso fat") == 4
    assert class_for_segment("Visceral Adipose Tissue") == 4
    assert class_for_segment("liver") is None


def test_unknown_segment_name_is_refused(tmp_path, phantom):
    labels, _ = phantom
    path = write_seg_nrrd(tmp_path / "x.seg.nrrd", labels.array, labels.ijk_to_ras)
    text = path.read_bytes().replace(b"Segment2_Name:=Subcutaneous adipose tissue",
                                     b"Segment2_Name:=Liver").replace(b"Segment2_ID:=SAT",
                                                                      b"Segment2_ID:=S3")
    path.write_bytes(text)
    with pytest.raises(InputError, match="segment 'Liver' does not name a tissue class") as err:
        read_labels(path)
    assert "x.seg.nrrd" in str(err.value)


def test_writer_checks_its_input(tmp_path, phantom):
    labels, fractions = phantom
    with pytest.raises(ValueError, match="must end in .seg.nrrd"):
        write_seg_nrrd(tmp_path / "a.nrrd", labels.array, labels.ijk_to_ras)
    with pytest.raises(ValueError, match="0..5"):
        write_seg_nrrd(tmp_path / "a.seg.nrrd", labels.array + 6, labels.ijk_to_ras)
    with pytest.raises(ValueError, match="0..1"):
        write_seg_nrrd(tmp_path / "a.seg.nrrd", fractions * 2, labels.ijk_to_ras, fractional=True)
    path = write_seg_nrrd(tmp_path / "a.seg.nrrd", labels.array, labels.ijk_to_ras)
    with pytest.raises(FileExistsError):
        write_seg_nrrd(path, labels.array, labels.ijk_to_ras)


def test_streamed_seg_nrrd_compresses_in_order_in_its_thread(tmp_path, monkeypatch, phantom):
    """seg_nrrd_slices compresses in a thread of its own: the file holds the slices in the
    order written (more than the queue holds), each as it was when written (the caller may
    reuse its array), equal to write_seg_nrrd's; an error leaves no file behind."""
    from EPDSegmentationLib.io import nrrd_stream
    from EPDSegmentationLib.io.seg_nrrd import read_seg_nrrd, seg_nrrd_slices

    monkeypatch.setattr(nrrd_stream.SliceWriter, "MAX_PENDING", 2)
    labels = phantom[0]
    K = labels.array.shape[0]
    buf = np.empty((1,) + labels.array.shape[1:], np.uint8)
    with seg_nrrd_slices(tmp_path / "s.seg.nrrd", labels.ijk_to_ras, labels.array.shape) as out:
        out.fill(1, 0)
        for k in range(1, K):
            buf[0] = labels.array[k]
            out.write(buf)
            buf[:] = 5                                  # reused at once
    want = labels.array.copy()
    want[0] = 0
    np.testing.assert_array_equal(read_seg_nrrd(tmp_path / "s.seg.nrrd").array, want)
    with pytest.raises(ValueError, match="never written"):
        with seg_nrrd_slices(tmp_path / "t.seg.nrrd", labels.ijk_to_ras,
                             labels.array.shape) as out:
            out.fill(2, 0)
    assert not list(tmp_path.glob("t*"))


def test_frozen_slices_are_compressed_without_a_copy(tmp_path, phantom):
    """write(frozen=True) hands the caller's array to the compression thread when it is in
    the file's order already (the stream's slabs), and copies anything else, as write does:
    the files are the same."""
    from EPDSegmentationLib.io.seg_nrrd import read_seg_nrrd, seg_nrrd_slices

    labels = phantom[0]
    arr = np.ascontiguousarray(labels.array)
    K = arr.shape[0]
    for name, frozen in (("copied", False), ("frozen", True)):
        with seg_nrrd_slices(tmp_path / f"{name}.seg.nrrd", labels.ijk_to_ras, arr.shape) as out:
            for k in range(K):          # every other slice not in C order: copied
                view = arr[k:k + 1] if k % 2 else np.asfortranarray(arr[k:k + 1])
                out.write(view, frozen=frozen)
        np.testing.assert_array_equal(read_seg_nrrd(tmp_path / f"{name}.seg.nrrd").array, arr)
    assert (tmp_path / "copied.seg.nrrd").read_bytes() == (tmp_path / "frozen.seg.nrrd").read_bytes()
