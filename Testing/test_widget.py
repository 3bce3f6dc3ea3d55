"""The module file itself, run against Slicer's real Python layer (Testing/slicer_harness.py):
EPDSegmentation.py imported, its parameter node made by the real parameterNodeWrapper, its
Widget set up with the real .ui (PySide6), and its handlers driven as a user would: load the
sample CT, Apply (a range, the slice under the red view, all), Cancel half way, close the scene
during a run, EPD preview, Export, re-Apply into the same outputs, the install-on-demand
paths, and the module's own self-test. Skips without ../shared/slicer-python, slicer-core or
PySide6."""

from __future__ import annotations

import builtins
import sys
import types

import numpy as np
import pytest

from slicer_harness import MODULE_PATH, REPO, slicer_session


@pytest.fixture(scope="module")
def h():
    with slicer_session() as harness:
        yield harness


@pytest.fixture
def fresh(h):
    """Dialogs and answers reset; Cancel and processEvents as the harness made them."""
    h.dialogs.clear()
    h.pip_installs.clear()
    h.answer = True
    yield h
    h.answer = True


def _choose(combo, text):
    index = combo.findText(text)
    assert index >= 0, f"{text!r} not offered by {combo.objectName}"
    combo.currentIndex = index


def _ui(h):
    return h.widget.ui


def _param(h):
    return h.widget._parameterNode


def _with_sample(h):
    p = _param(h)
    if p.inputVolume is None or p.inputVolume.GetName() != "EPDPhantomCT":
        _ui(h).loadSampleButton.click()
    return p.inputVolume


def _ensure_result(h):
    """The panel's result, segmenting slices 3-4 of the current CT first if there is none."""
    if _param(h).resultSegmentation is None:
        _apply_range(h, 3, 4)
    return _param(h).resultSegmentation


def _apply_range(h, first, last):
    ui = _ui(h)
    _choose(ui.sliceModeComboBox, "Slice range")
    ui.firstSliceSpinBox.value = first
    ui.lastSliceSpinBox.value = last
    ui.applyButton.click()


def _count(h, cls):
    return h.scene.GetNumberOfNodesByClass(cls)


def _failing_import(names, error):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.split(".")[0] in names:
            raise error(f"simulated: {name} unavailable")
        return real(name, *args, **kwargs)

    return fake


# --- the panel comes up


def test_parameter_node_is_made_by_the_real_wrapper(fresh):
    h = fresh
    p = _param(h)
    assert type(p).__name__ == "EPDSegmentationParameterNode"
    assert p.parameterNode.IsA("vtkMRMLScriptedModuleNode")
    assert p.parameterNode.GetScene() is h.scene
    assert p.previewSource is None and p.inputVolume is None
    ui = _ui(h)
    assert ui.deviceComboBox.currentText == "Auto"
    assert [ui.previewClassComboBox.itemText(i) for i in range(ui.previewClassComboBox.count)] \
        == ["MUS", "IMAT", "SAT", "VAT", "MSC"]
    ui.softVolumesCheckBox.checked = True        # widget -> parameter node
    assert p.softVolumes is True
    p.softVolumes = False                        # parameter node -> widget
    assert ui.softVolumesCheckBox.checked is False
    assert not ui.applyButton.enabled and "Select a CT volume" in ui.applyButton.toolTip
    assert h.dialogs == []


def test_module_metadata_and_scene_import_hook(h):
    assert h.scriptedModule.parent.title == "EPD Segmentation"
    assert ("startupCompleted()", h.module.observeSceneImport) in [
        (s, f) for s, f in __import__("slicer").app.connections]


# --- Apply


def test_load_sample_and_apply_a_range(fresh, monkeypatch):
    import slicer

    h = fresh
    ct = _with_sample(h)
    ui = _ui(h)
    assert ui.applyButton.enabled
    assert ui.statusLabel.text.startswith("Ready")
    shown = []
    monkeypatch.setattr(slicer.app, "processEvents",
                        lambda *a: shown.append(ui.statusLabel.text))
    _apply_range(h, 3, 4)
    # the panel speaks during the model load, the slices and the building of the outputs
    assert shown[0] == "Loading the model..."
    assert any(t.startswith("segmenting: 2 of 2") for t in shown)
    assert "creating the outputs: measures table" in shown
    assert ui.statusLabel.text.startswith("Done: 2 slice(s)"), ui.statusLabel.text
    seg = _param(h).resultSegmentation
    assert seg is not None and seg.GetSegmentation().GetNumberOfSegments() == 5
    assert ui.progressBar.value == ui.progressBar.maximum
    assert not ui.cancelButton.enabled and ui.applyButton.enabled
    assert ui.exportButton.enabled
    assert ct.GetName() == "EPDPhantomCT" and h.messages("error") == []


def test_apply_the_slice_under_the_red_view(fresh):
    from EPDSegmentationLib.mrml.nodes import ijk_to_ras
    from EPDSegmentationLib.mrml.views import slice_node

    h = fresh
    ct = _with_sample(h)
    k = 7
    z = (ijk_to_ras(ct) @ np.array([0.0, 0.0, k, 1.0]))[2]
    slice_node(h.scene, "Red").SetSliceOffset(z)
    _choose(_ui(h).sliceModeComboBox, "Slice under the red view")
    assert not _ui(h).firstSliceSpinBox.enabled
    assert h.widget.logic.slicesFor(ct, "current") == [k]
    _ui(h).applyButton.click()
    assert _ui(h).statusLabel.text.startswith("Done: 1 slice(s)"), _ui(h).statusLabel.text


def test_cancel_half_way_leaves_the_scene_as_it_was(fresh, monkeypatch):
    import slicer

    h = fresh
    _with_sample(h)
    before = _count(h, "vtkMRMLSegmentationNode"), _count(h, "vtkMRMLTableNode")
    calls = []

    def events(*args):   # the user's click arrives while the run processes events
        calls.append(1)
        if len(calls) == 2:
            assert _ui(h).cancelButton.enabled
            _ui(h).cancelButton.click()

    monkeypatch.setattr(slicer.app, "processEvents", events)
    _apply_range(h, 0, 15)
    assert _ui(h).statusLabel.text.startswith("Cancelled"), _ui(h).statusLabel.text
    assert (_count(h, "vtkMRMLSegmentationNode"), _count(h, "vtkMRMLTableNode")) == before
    assert _ui(h).applyButton.enabled and not _ui(h).cancelButton.enabled


def test_reapply_into_the_same_outputs_asks_and_replaces(fresh):
    h = fresh
    _with_sample(h)
    ui, p = _ui(h), _param(h)
    _ensure_result(h)
    seg, table = p.resultSegmentation, None
    table = next(h.scene.GetNthNodeByClass(i, "vtkMRMLTableNode")
                 for i in range(_count(h, "vtkMRMLTableNode")))
    ui.outputSegmentationSelector.setCurrentNode(seg)
    ui.outputTableSelector.setCurrentNode(table)
    assert p.outputSegmentation is seg and p.outputTable is table
    n_segs = _count(h, "vtkMRMLSegmentationNode")
    h.answer = False
    _apply_range(h, 5, 5)
    assert ui.statusLabel.text.startswith("Not done: the picked output holds data")
    h.answer = True
    _apply_range(h, 5, 5)
    assert any("already holds data" in m for m in h.messages("confirm"))
    assert ui.statusLabel.text.startswith("Done: 1 slice(s)"), ui.statusLabel.text
    assert _count(h, "vtkMRMLSegmentationNode") == n_segs
    assert p.resultSegmentation is seg
    ui.outputSegmentationSelector.setCurrentNode(None)
    ui.outputTableSelector.setCurrentNode(None)


# --- preview and export


def test_epd_preview_of_the_result(fresh):
    h = fresh
    _with_sample(h)
    p, ui = _param(h), _ui(h)
    _ensure_result(h)
    ui.previewSourceSelector.setCurrentNode(p.resultSegmentation)
    assert p.previewSource is p.resultSegmentation and ui.previewButton.enabled
    ui.previewButton.click()
    assert h.messages("error") == [], h.messages("error")
    assert ui.statusLabel.text.startswith("1/4: IMAT"), ui.statusLabel.text


def test_export_asks_before_replacing_files(fresh, tmp_path):
    h = fresh
    _with_sample(h)
    p, ui = _param(h), _ui(h)
    _ensure_result(h)
    assert not ui.exportDicomSegCheckBox.enabled      # the sample CT is not from DICOM
    assert "DICOM" in ui.exportDicomSegCheckBox.toolTip
    ui.exportDirectoryButton.directory = str(tmp_path)
    assert p.exportFolder == tmp_path
    ui.exportButton.click()
    assert ui.statusLabel.text.startswith("Saved "), (ui.statusLabel.text, h.dialogs)
    written = sorted(x.name for x in tmp_path.iterdir())
    assert any(n.endswith(".seg.nrrd") for n in written) and \
        any(n.endswith(".csv") for n in written)
    h.answer = False
    ui.exportButton.click()
    assert any("Replace these files?" in m for m in h.messages("confirm"))
    assert sorted(x.name for x in tmp_path.iterdir()) == written


# --- requirements, the Slicer way


def test_missing_safetensors_is_offered_and_installed_with_pip_install(fresh, monkeypatch):
    h = fresh
    _with_sample(h)
    monkeypatch.setattr(builtins, "__import__", _failing_import({"safetensors"}, ImportError))
    h.answer = False
    _apply_range(h, 3, 3)
    assert "safetensors" in h.messages("confirm")[-1]
    assert h.pip_installs == [] and _ui(h).statusLabel.text.startswith("Not done")
    h.answer = True
    _apply_range(h, 3, 3)
    assert h.pip_installs == [h.module.SAFETENSORS_REQUIREMENT]
    # the recorder installs nothing: the module says to restart, with no traceback
    assert "Restart Slicer" in h.messages("error")[-1]


def test_torch_is_installed_through_pytorchutils_after_asking(fresh, monkeypatch):
    h = fresh
    _with_sample(h)
    calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            calls.append((askConfirmation, torchVersionRequirement))
            return None   # e.g. the user cancelled PyTorchUtils' own dialog

    monkeypatch.setitem(sys.modules, "PyTorchUtils",
                        types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    monkeypatch.setattr(builtins, "__import__", _failing_import({"torch"}, ImportError))
    _apply_range(h, 3, 3)
    assert "PyTorch" in h.messages("confirm")[-1]
    assert calls == [(False, ">=2.1")]
    assert h.pip_installs == []
    assert "PyTorch was not installed" in _ui(h).statusLabel.text


def test_old_torch_and_broken_torch_give_messages(fresh, monkeypatch):
    h = fresh
    _with_sample(h)
    monkeypatch.setattr(builtins, "__import__", _failing_import({"torch"}, OSError))
    h.widget._deviceLines.clear()
    h.widget._updateGui()                            # the panel still comes up
    assert "cannot be loaded" in _ui(h).deviceStatusLabel.text
    _apply_range(h, 3, 3)
    assert "CUDA" in h.messages("error")[-1] and h.messages("confirm") == []
    monkeypatch.undo()
    monkeypatch.setattr(sys.modules["torch"], "__version__", "1.13.1+cu117")
    with pytest.raises(h.module.MissingRequirement, match="1.13.1"):
        h.module.checkRequirements()
    h.widget._deviceLines.clear()


def test_logic_from_the_console_says_what_is_missing(fresh, monkeypatch):
    h = fresh
    ct = _with_sample(h)
    monkeypatch.setattr(builtins, "__import__", _failing_import({"safetensors"}, ImportError))
    with pytest.raises(h.module.MissingRequirement, match="setupPythonRequirements"):
        h.widget.logic.segment(ct, h.widget.logic.modelPathFor("Bundled model"), slices=[3])


# --- scene closed during a run; the self-test


def test_scene_closed_during_a_run_cancels_it(fresh, monkeypatch):
    import slicer

    h = fresh
    _with_sample(h)
    calls = []

    def events(*args):   # File > Close Scene while the run processes events
        calls.append(1)
        if len(calls) == 2:
            h.scene.Clear()

    monkeypatch.setattr(slicer.app, "processEvents", events)
    _apply_range(h, 0, 15)
    assert h.messages("error") == [], h.messages("error")
    assert _count(h, "vtkMRMLSegmentationNode") == 0
    assert _count(h, "vtkMRMLTableNode") == 0
    assert _ui(h).statusLabel.text.startswith("Cancelled"), _ui(h).statusLabel.text
    assert _param(h) is not None and _param(h).inputVolume is None


def test_self_test_does_not_install_and_skips_without_requirements(fresh, monkeypatch):
    h = fresh
    monkeypatch.setattr(builtins, "__import__", _failing_import({"safetensors"}, ImportError))
    h.scriptedModule.runTest(msec=0)
    assert h.pip_installs == [] and h.messages("confirm") == []
    assert any(m.startswith("Skipped") and "safetensors" in m for m in h.messages("delay"))


@pytest.mark.slow
def test_self_test_runs(fresh):
    h = fresh
    h.scriptedModule.runTest(msec=0)
    delays = h.messages("delay")
    assert "Test passed" in delays and "Bad inputs rejected" in delays
    assert any("DICOMLib" in m for m in delays), delays   # no DICOM module outside Slicer
    assert h.pip_installs == [] and h.messages("confirm") == []


# --- the extension build


def test_extension_build_carries_the_module(tmp_path):
    """Configure EPDSegmentation/CMakeLists.txt with stand-ins for Slicer's CMake macros and
    check what a built extension would carry: every module Python file, the .ui and icon,
    and the registered self-test."""
    import shutil
    import subprocess

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not installed")
    out = tmp_path / "carried.txt"
    (tmp_path / "CMakeLists.txt").write_text(f"""
cmake_minimum_required(VERSION 3.16)
project(stub NONE)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/qt-scripted-modules)
set(BUILD_TESTING ON)
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${{ARGN}})
  foreach(s ${{MY_SCRIPTS}})
    file(APPEND {out} "SCRIPT ${{s}}\\n")
  endforeach()
  foreach(r ${{MY_RESOURCES}})
    file(APPEND {out} "RESOURCE ${{r}}\\n")
  endforeach()
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${{ARGN}})
  file(APPEND {out} "UNITTEST ${{MY_SCRIPT}}\\n")
endmacro()
add_subdirectory({REPO / 'EPDSegmentation'} ${{CMAKE_BINARY_DIR}}/module)
""")
    done = subprocess.run([cmake, "-S", str(tmp_path), "-B", str(tmp_path / "build")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = out.read_text().splitlines()
    scripts = {line.split(" ", 1)[1] for line in lines if line.startswith("SCRIPT ")}
    module_dir = REPO / "EPDSegmentation"
    expected = {str(p.relative_to(module_dir)) for p in module_dir.rglob("*.py")
                if "Testing" not in p.parts and "__pycache__" not in p.parts}
    assert scripts == expected
    for line in lines:
        if line.startswith("RESOURCE "):
            assert (module_dir / line.split(" ", 1)[1]).is_file(), line
    assert {"Resources/UI/EPDSegmentation.ui", "Resources/Icons/EPDSegmentation.png"} <= {
        line.split(" ", 1)[1] for line in lines if line.startswith("RESOURCE ")}
    unittests = [line.split(" ", 1)[1] for line in lines if line.startswith("UNITTEST ")]
    assert unittests == [str(MODULE_PATH)]
    top = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert f"set({key} " in top
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert "docs/panel.png" in top
    assert (REPO / "LICENSE").is_file() and \
        "Apache License" in (REPO / "LICENSE").read_text()[:200]


# --- the panel as a radiologist reads it; hand-offs; the preview gives the views back


def test_panel_keeps_model_details_collapsed_with_a_research_notice(fresh):
    h = fresh
    ui = _ui(h)
    assert ui.modelDetailsCollapsibleButton.collapsed
    assert ui.modelSummaryLabel.text.startswith("Classes: MUS, IMAT")
    assert "Dice" not in ui.modelSummaryLabel.text and "network pixel" not in \
        ui.modelSummaryLabel.text
    details = ui.modelDetailsLabel.text
    assert "Factor 1/2" in details and "network pixel" in details and "Dice" in details
    assert ui.deviceStatusLabel.parent() is ui.modelDetailsCollapsibleButton
    notice = ui.researchNoticeLabel.text
    assert notice.startswith("For research use only") and "Trained on" in notice \
        and "phantom" in notice and "\n" not in notice


def test_export_folder_does_not_default_to_the_working_folder(fresh):
    import slicer

    p = _param(fresh)
    assert str(p.exportFolder) not in ("", ".")
    assert p.exportFolder.is_absolute() or str(p.exportFolder) == slicer.app.defaultScenePath


def test_model_file_field_shows_a_file_not_a_dot(fresh):
    """An unset Path parameter reads "." in its ctkPathLineEdit (Slicer's connector writes
    str(Path())): the model field starts at the bundled model's file instead, which the
    "Model file" choice then loads."""
    from EPDSegmentationLib.core.resources import bundled_model_path

    p, ui = _param(fresh), fresh.widget.ui
    assert p.modelPath == bundled_model_path()
    assert ui.modelPathLineEdit.currentPath == str(bundled_model_path())
    p.modelSource = "Model file"
    assert fresh.widget.logic.modelPathFor(p.modelSource, p.modelPath) == bundled_model_path()


@pytest.mark.slow
def test_show_3d_and_segment_editor_hand_off(fresh):
    h = fresh
    ct = _with_sample(h)
    ui, p = _ui(h), _param(h)
    _ensure_result(h)
    seg = p.resultSegmentation
    assert ui.show3DButton.enabled and ui.segmentEditorButton.enabled
    ui.segmentEditorButton.click()
    assert h.modules_selected[-1] == "SegmentEditor"
    assert h.segment_editor.segmentation is seg and h.segment_editor.source is ct
    ui.show3DButton.click()
    assert h.messages("error") == [], h.messages("error")
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")
    assert seg.GetDisplayNode().GetVisibility3D()


def test_preview_changes_are_restored(fresh):
    from EPDSegmentationLib.mrml.views import composite_node, layout_node, slice_node

    h = fresh
    ct = _with_sample(h)
    ui, p = _ui(h), _param(h)
    _ensure_result(h)
    seg = p.resultSegmentation
    red, yellow = composite_node(h.scene, "Red"), composite_node(h.scene, "Yellow")
    yellow.SetLinkedControl(False)
    layout = layout_node(h.scene).GetViewArrangement()
    views_before = seg.GetDisplayNode().GetNumberOfViewNodeIDs()
    assert not ui.restoreViewsButton.enabled
    ui.previewSourceSelector.setCurrentNode(seg)
    ui.previewButton.click()
    ui.previewButton.click()                       # a second preview: still the first state
    assert seg.GetDisplayNode().GetViewNodeIDs() == (slice_node(h.scene, "Red").GetID(),)
    assert yellow.GetLinkedControl() and ui.restoreViewsButton.enabled
    ui.restoreViewsButton.click()
    assert seg.GetDisplayNode().GetNumberOfViewNodeIDs() == views_before
    assert not yellow.GetLinkedControl()
    assert layout_node(h.scene).GetViewArrangement() == layout
    assert red.GetBackgroundVolumeID() in (None, ct.GetID())
    assert not ui.restoreViewsButton.enabled


def test_export_with_dicom_seg_for_a_ct_from_dicom(fresh, monkeypatch, tmp_path):
    """A CT as Slicer's DICOM module leaves it (voxels, geometry, DICOM.instanceUIDs), the
    series' files found through slicer.dicomDatabase (a dict here): the DICOM SEG box turns
    on and Export writes SEGs whose frames lie on the CT's instances."""
    highdicom = pytest.importorskip("highdicom")
    import slicer

    from EPDSegmentationLib.core.resources import sample_ct_path
    from EPDSegmentationLib.core.volume import Volume
    from EPDSegmentationLib.io import read_volume, write_dicom_series
    from EPDSegmentationLib.mrml.nodes import vtk_matrix
    from EPDSegmentationLib.mrml.segmentation import labels_from_segmentation

    h = fresh
    sample = read_volume(sample_ct_path())
    write_dicom_series(Volume(sample.array[:4].copy(), sample.ijk_to_ras), tmp_path / "dicom")
    vol = read_volume(tmp_path / "dicom")
    uids = vol.meta["sop_instance_uids"]
    monkeypatch.setattr(slicer, "dicomDatabase", types.SimpleNamespace(
        isOpen=True, fileForInstance=dict(zip(uids, map(str, vol.meta["files"]))).get),
        raising=False)
    ct = h.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT from DICOM")
    slicer.util.updateVolumeFromArray(ct, np.rint(vol.array).astype(np.int16))
    ct.SetIJKToRASMatrix(vtk_matrix(vol.ijk_to_ras))
    ct.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    ui, p = _ui(h), _param(h)
    ui.inputVolumeSelector.setCurrentNode(ct)
    ui.softSegmentationCheckBox.checked = True
    _apply_range(h, 1, 2)
    assert ui.statusLabel.text.startswith("Done: 2 slice(s)"), ui.statusLabel.text
    assert ui.exportDicomSegCheckBox.enabled, ui.exportDicomSegCheckBox.toolTip
    ui.exportDicomSegCheckBox.checked = True
    out = tmp_path / "out"
    out.mkdir()
    ui.exportDirectoryButton.directory = str(out)
    ui.exportButton.click()
    assert h.messages("error") == [], h.messages("error")
    names = sorted(x.name for x in out.iterdir())
    binary = [n for n in names if n.endswith("_seg.dcm") and not n.endswith("_prob_seg.dcm")]
    assert len(binary) == 1 and any(n.endswith("_prob_seg.dcm") for n in names)
    seg = highdicom.seg.segread(str(out / binary[0]))
    labels, _ = labels_from_segmentation(p.resultSegmentation)
    frames = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    assert np.array_equal(frames, labels)
    ui.softSegmentationCheckBox.checked = False
    ui.exportDicomSegCheckBox.checked = False


# --- learn from corrections (issue 17) and the height's indices (issue 18)


@pytest.fixture
def tiny(fresh, tiny_model_path):
    """The panel on a small CT (12 slices of 64 x 64, tissues of known HU: Testing/mrml/
    scene.py) with the tiny model as 'Model file' and 2 fine-tuning steps, so each handler
    runs in seconds on a CPU; the bundled model, height 0 and 60 steps again afterwards."""
    import torch
    from scene import add_ct, label_stack

    h = fresh
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny network: thread barriers cost more than the work
    ct = add_ct(h.scene, label_stack(12, 64), name="Small CT")
    ui, p = _ui(h), _param(h)
    ui.inputVolumeSelector.setCurrentNode(ct)
    assert p.inputVolume is ct
    _choose(ui.modelSourceComboBox, "Model file")
    ui.modelPathLineEdit.currentPath = str(tiny_model_path) + ".safetensors"
    ui.adaptStepsSpinBox.value = 2
    assert p.adaptSteps == 2 and p.modelSource == "Model file"
    yield h, ct
    torch.set_num_threads(threads)
    _choose(ui.modelSourceComboBox, "Bundled model")
    ui.heightSpinBox.value = 0
    ui.protocolCheckBox.checked = False
    p.adaptSteps = 60


def _labels(h, ct):
    from EPDSegmentationLib.mrml.nodes import ijk_to_ras, volume_array
    from EPDSegmentationLib.mrml.segmentation import labels_from_segmentation

    labels, _ = labels_from_segmentation(_param(h).resultSegmentation,
                                         (ijk_to_ras(ct), volume_array(ct).shape))
    return labels


def _correct_slice(h, ct, k):
    """What the user does in the Segment Editor: change the labels of slice k."""
    from EPDSegmentationLib.mrml.nodes import ijk_to_ras
    from EPDSegmentationLib.mrml.segmentation import fill_tissue_segmentation

    labels = _labels(h, ct)
    labels[k, 8:24, 8:24] = (labels[k, 8:24, 8:24] + 1) % 6
    fill_tissue_segmentation(_param(h).resultSegmentation, labels, ijk_to_ras(ct),
                             reference_volume=ct)
    return labels[k].copy()


def test_improve_model_from_corrected_slices(tiny, tmp_path, monkeypatch):
    import json

    import slicer

    from EPDSegmentationLib.core.resources import bundled_model_path
    from EPDSegmentationLib.io.outputs import safe_stem

    h, ct = tiny
    ui, p = _ui(h), _param(h)
    tiny_path = p.modelPath
    ui.exportDirectoryButton.directory = str(tmp_path)
    taken = tmp_path / f"{safe_stem(ct.GetName())}_adapted.json"   # e.g. an earlier model
    taken.write_text("not to be overwritten")
    _apply_range(h, 3, 5)
    assert ui.statusLabel.text.startswith("Done: 3 slice(s)"), ui.statusLabel.text
    assert ui.improveButton.enabled and ui.uncertaintyButton.enabled
    # nothing corrected yet (Apply stored the result to compare with): said, nothing written
    ui.improveButton.click()
    assert "Segment Editor" in h.messages("error")[-1] and list(tmp_path.iterdir()) == [taken]
    corrected = _correct_slice(h, ct, 4)
    # Cancel during the fine-tuning: no file, the segmentation and the model choice unchanged
    calls = []

    def events(*args):
        calls.append(1)
        if len(calls) == 2:
            assert ui.cancelButton.enabled and not ui.improveButton.enabled
            ui.cancelButton.click()

    monkeypatch.setattr(slicer.app, "processEvents", events)
    ui.improveButton.click()
    monkeypatch.undo()
    assert ui.statusLabel.text.startswith("Cancelled") and "No model was saved" in \
        ui.statusLabel.text, ui.statusLabel.text
    assert list(tmp_path.iterdir()) == [taken] and p.modelPath == tiny_path
    before = _labels(h, ct)
    # the real run: a new model file beside the scene, used at once, the rest re-segmented
    ui.improveButton.click()
    stem = safe_stem(ct.GetName())                  # "Small_CT" (or Small_CT_1 ...)
    assert ui.statusLabel.text.startswith(f"Improved from corrected slice(s) 4: saved "
                                          f"{stem}_adapted_2.safetensors"), \
        (ui.statusLabel.text, h.messages("error"))
    assert "'Bundled model' under Model to switch back" in ui.statusLabel.text
    first = tmp_path / f"{stem}_adapted_2.safetensors"           # the name was taken
    assert taken.read_text() == "not to be overwritten"
    card = json.loads(first.with_suffix(".json").read_text())
    assert card["adapted_from"] == str(tiny_path)
    assert card["training"]["data"]["cases"][0]["slices"] == [4]
    assert p.modelSource == "Model file" and p.modelPath == first
    assert ui.modelPathLineEdit.currentPath == str(first)
    after = _labels(h, ct)
    np.testing.assert_array_equal(after[4], corrected)             # the correction is kept
    np.testing.assert_array_equal(after[6:], before[6:])           # unsegmented stay empty
    # the measures table is filled again for the segmentation as it now stands: the hard
    # areas are its labels' (slice 4 as corrected: soft = hard), for the run's slices
    from EPDSegmentationLib.core.classes import TISSUES
    from EPDSegmentationLib.mrml.nodes import ijk_to_ras, spacing_ijk
    from EPDSegmentationLib.mrml.tables import table_rows
    from EPDSegmentationLib.mrml.workflow import result_nodes

    table = result_nodes(h.scene, p.resultSegmentation)["table"]
    got = {(r["slice"], r["tissue"]): r for r in table_rows(table)}
    si, sj, _ = spacing_ijk(ijk_to_ras(ct))
    assert sorted({sl for sl, _ in got}) == ["3", "4", "5", "all"]
    for k in (3, 4, 5):
        for c in TISSUES:
            assert got[(str(k), c.key)]["hard_area_cm2"] == pytest.approx(
                (after[k] == c.index).sum() * si * sj / 100), (k, c.key)
    for c in TISSUES:
        assert got[("4", c.key)]["area_cm2"] == pytest.approx(got[("4", c.key)]["hard_area_cm2"])
    assert "measures table updated" in ui.statusLabel.text
    assert not after[6:].any() and ui.progressBar.format == "%v / %m slices"
    # never beside the bundled model, even when the export folder points there
    bundled_folder = bundled_model_path().parent
    listing = sorted(bundled_folder.iterdir())
    _correct_slice(h, ct, 5)
    p.exportFolder = bundled_folder
    ui.improveButton.click()
    assert "bundled model" in h.messages("error")[-1]
    assert sorted(bundled_folder.iterdir()) == listing
    # one click back to the bundled model
    _choose(ui.modelSourceComboBox, "Bundled model")
    assert h.widget.logic.modelPathFor(p.modelSource, p.modelPath) == bundled_model_path()
    assert not ui.modelPathLineEdit.enabled and ui.applyButton.enabled
    assert "adapted" not in ui.modelSummaryLabel.text.lower()


def test_show_uncertainty_and_go_to_the_suggested_slices(tiny):
    from EPDSegmentationLib.mrml.nodes import slice_index_at
    from EPDSegmentationLib.mrml.views import composite_node, red_slice_ras

    h, ct = tiny
    ui = _ui(h)
    _apply_range(h, 2, 11)
    assert not ui.goToSuggestedButton.enabled
    ui.uncertaintyButton.click()
    assert h.messages("error") == [], h.messages("error")
    node = h.widget._uncertaintyNode
    import slicer

    u = slicer.util.arrayFromVolume(node)
    assert u.shape == slicer.util.arrayFromVolume(ct).shape
    assert not u[:2].any()                               # only the segmented slices
    assert 0 < u[2:].max() <= 1.0 + 1e-6
    assert composite_node(h.scene, "Red").GetForegroundVolumeID() == node.GetID()
    suggested = h.widget._suggested
    assert len(suggested) == 3 and all(2 <= k <= 11 for k in suggested)
    assert ui.suggestionsLabel.text == ("Correct first: slices " + ", ".join(map(str, suggested))
                                        + " (the most uncertain).")
    assert ui.goToSuggestedButton.enabled
    assert ui.goToSuggestedButton.text == f"Go to slice {suggested[0]}"
    for k in suggested[:2]:
        ui.goToSuggestedButton.click()
        assert slice_index_at(ct, red_slice_ras(h.scene)) == k
    assert ui.goToSuggestedButton.text == f"Go to slice {suggested[2]}"
    ui.uncertaintyButton.click()                          # one map at a time
    maps = [h.scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
            for i in range(_count(h, "vtkMRMLScalarVolumeNode"))]
    assert sum(m.GetName().startswith(f"{ct.GetName()} uncertainty") for m in maps) == 1
    _apply_range(h, 3, 3)                                 # a new result: old suggestions go
    assert not ui.goToSuggestedButton.enabled and ui.suggestionsLabel.text.startswith("Correct a")


def test_height_gives_the_indices_in_the_measures_table(tiny):
    from EPDSegmentationLib.mrml.tables import table_rows
    from EPDSegmentationLib.mrml.workflow import result_nodes

    h, ct = tiny
    ui, p = _ui(h), _param(h)

    def rows():
        table = result_nodes(h.scene, p.resultSegmentation)["table"]
        return {(r["slice"], r["tissue"]): r for r in table_rows(table)}

    assert ui.heightStatusLabel.text == "unknown: no indices"
    _apply_range(h, 3, 3)
    assert "index_cm2_m2" not in rows()[("3", "MUS")]
    assert "SMI" not in ui.statusLabel.text
    for value in (172.0, 1.72):                           # cm, or metres as core.indices reads it
        ui.heightSpinBox.value = value
        assert p.height == value and ui.heightStatusLabel.text.startswith("1.72 m")
        _apply_range(h, 3, 3)
        assert ui.statusLabel.text.startswith("Done"), ui.statusLabel.text
        got = rows()
        for key, name in (("MUS", "SMI"), ("IMAT", "IMATI"), ("SAT", "SATI"), ("VAT", "VATI")):
            for sl in ("3", "all"):
                r = got[(sl, key)]
                assert r["index"] == name
                assert r["index_cm2_m2"] == pytest.approx(r["area_cm2"] / 1.72 ** 2)
        assert got[("3", "MSC")]["index"] == "" and np.isnan(got[("3", "MSC")]["index_cm2_m2"])
        assert np.isfinite(got[("3", "MUS")]["hu_mean"])    # mean muscle HU beside SMI
        smi = got[("all", "MUS")]["index_cm2_m2"]
        assert f"SMI {smi:.1f} cm2/m2" in ui.statusLabel.text, ui.statusLabel.text
    # a height in neither unit: said in the panel, Apply refuses with the reason
    ui.heightSpinBox.value = 50
    assert "ambiguous" in ui.heightStatusLabel.text
    n = _count(h, "vtkMRMLSegmentationNode")
    _apply_range(h, 3, 3)
    assert ui.statusLabel.text.startswith("Not done: Height") and "ambiguous" in \
        h.messages("error")[-1]
    assert _count(h, "vtkMRMLSegmentationNode") == n


def test_protocol_areas_beside_the_soft_areas_when_ticked(tiny):
    """The "HU protocol" box: the measures table gets the protocol area, its mean HU and
    (with a height) its index beside the soft ones, the status line names them as protocol
    areas; unticked, the table has none."""
    from EPDSegmentationLib.mrml.tables import table_rows
    from EPDSegmentationLib.mrml.workflow import result_nodes

    h, ct = tiny
    ui, p = _ui(h), _param(h)

    def rows():
        table = result_nodes(h.scene, p.resultSegmentation)["table"]
        return {(r["slice"], r["tissue"]): r for r in table_rows(table)}

    ui.protocolCheckBox.checked = True                    # widget -> parameter node
    assert p.protocol is True
    ui.heightSpinBox.value = 172.0
    _apply_range(h, 3, 4)
    assert ui.statusLabel.text.startswith("Done"), ui.statusLabel.text
    got = rows()
    for sl in ("3", "4", "all"):
        mus, imat = got[(sl, "MUS")], got[(sl, "IMAT")]
        assert 0 < mus["protocol_area_cm2"] <= mus["area_cm2"] + imat["area_cm2"] + 1e-9
        assert -29 <= mus["protocol_hu_mean"] <= 150
        assert mus["protocol_index_cm2_m2"] == pytest.approx(mus["protocol_area_cm2"] / 1.72 ** 2)
        assert np.isnan(got[(sl, "MSC")]["protocol_area_cm2"])
    assert f"HU protocol: MUS {got[('all', 'MUS')]['protocol_area_cm2']:.1f}" in \
        ui.statusLabel.text, ui.statusLabel.text
    protocol_seg = result_nodes(h.scene, p.resultSegmentation)["protocol_segmentation"]
    assert protocol_seg.GetName().startswith(f"{ct.GetName()} HU protocol")
    assert not protocol_seg.GetDisplayNode().GetVisibility()     # hidden, as soft outputs
    p.protocol = False                                    # parameter node -> widget
    assert ui.protocolCheckBox.checked is False
    _apply_range(h, 3, 3)
    assert "protocol_area_cm2" not in rows()[("3", "MUS")]
    assert "HU protocol" not in ui.statusLabel.text
    assert result_nodes(h.scene, p.resultSegmentation)["protocol_segmentation"] is None


def test_go_to_l3_segments_the_level_and_fills_the_cohort_table(tiny):
    """Go to L3 on a CT with a spine and pelvis (Testing/spine.py): the red view's slice is
    segmented and the "Cohort" table gets this CT's row (level, slice, areas, mean HU, SMI
    from the height); a second run replaces the row instead of adding one."""
    import slicer
    from spine import synthetic_ct

    from EPDSegmentationLib.core.cohort import COHORT_COLUMNS
    from EPDSegmentationLib.core.levels import find_levels
    from EPDSegmentationLib.mrml.levels import cohort_rows_from_table
    from EPDSegmentationLib.mrml.nodes import vtk_matrix

    h, _ = tiny
    ui = _ui(h)
    hu, m, _ = synthetic_ct(3.0, 3.0)
    ct = h.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Spine CT")
    slicer.util.updateVolumeFromArray(ct, np.rint(hu).astype(np.int16))
    ct.SetIJKToRASMatrix(vtk_matrix(m))
    ui.inputVolumeSelector.setCurrentNode(ct)
    ui.heightSpinBox.value = 172.0
    k = find_levels(np.rint(hu), m).slice_of("L3")
    for _ in range(2):
        ui.goToL3Button.click()
        assert "Row added to the table 'Cohort'" in ui.statusLabel.text, ui.statusLabel.text
        tables = [t for t in h.scene.GetNodesByClass("vtkMRMLTableNode")
                  if t.GetName() == "Cohort"]
        assert len(tables) == 1
        rows = cohort_rows_from_table(tables[0])
        assert len(rows) == 1 and tables[0].GetTable().GetNumberOfColumns() == len(COHORT_COLUMNS)
    row = rows[0]
    assert (row["case"], row["level"], int(row["slice"]), row["status"]) == ("Spine CT", "L3", k,
                                                                             "ok")
    assert row["SMI"] == pytest.approx(row["area_cm2_MUS"] / 1.72 ** 2)
    assert np.isfinite(row["hu_mean_MUS"]) and row["model"] == "tiny"
    assert np.isnan(row["protocol_area_cm2_MUS"])         # the box unticked: left empty
    ui.protocolCheckBox.checked = True                    # ticked: filled, as --protocol does
    ui.goToL3Button.click()
    row = cohort_rows_from_table(tables[0])[0]
    assert 0 <= row["protocol_area_cm2_MUS"] <= row["area_cm2_MUS"] + row["area_cm2_IMAT"]
    assert row["protocol_SMI"] == pytest.approx(row["protocol_area_cm2_MUS"] / 1.72 ** 2)
