"""EPD Segmentation: a 3D Slicer scripted module for CT body composition.

Module, parameter node, Widget, Logic and the self-test. The Widget only wires the panel
(Resources/UI/EPDSegmentation.ui) to the Logic; the Logic calls EPDSegmentationLib, whose
mrml_* functions take the scene and nodes (tested with pytest and slicer-core) and whose
inference runs the network. torch is imported only when a model is loaded.
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile
from typing import Annotated, Optional, Union

import vtk

import slicer
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode, vtkMRMLTableNode)
from slicer.parameterNodeWrapper import Choice, Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from EPDSegmentationLib.mrml import views as mrml_views
from EPDSegmentationLib.core.classes import TISSUES
from EPDSegmentationLib.core.inference import Cancelled
from EPDSegmentationLib.mrml.dicom import (dicom_source, dicom_source_problem, model_summary,
                                           source_volume)
from EPDSegmentationLib.mrml.nodes import (InputProblem, check_ct_volume, ijk_to_ras,
                                           slice_index_at, slice_pixel_mm, volume_array)
from EPDSegmentationLib.mrml.adapt import snapshot_result
from EPDSegmentationLib.mrml.preview import epd_preview
from EPDSegmentationLib.mrml.workflow import (MODEL_SOURCES, OutputExists, device_line,
                                              export_results, model_path_for, model_predictor,
                                              model_status, resolve_slices, result_nodes,
                                              segment_volume)
from EPDSegmentationLib.core.resources import bundled_model_path, sample_ct_path

DEVICES = ["Auto", "CUDA", "MPS", "CPU"]
SELECT_PROMPT = "Select a CT volume (or load the sample CT)."
CORRECTIONS_HINT = "Correct a few slices in the Segment Editor, then improve the model."
#: Slices the uncertainty map suggests correcting first.
N_SUGGEST = 3
RESEARCH_NOTICE = "For research use only, not for clinical decisions."
SLICE_MODES = {"All slices": "all", "Slice under the red view": "current",
               "Slice range": "range"}
PREVIEW_SOFT_KINDS = {"Fractional segmentation": "fractional",
                      "Probability volume": "probability"}
#: PyTorch the network needs; installed through the PyTorch extension's PyTorchUtils.
TORCH_REQUIREMENT = ">=2.1"
TORCH_MINIMUM = (2, 1)
#: Installed with slicer.util.pip_install (neither is part of Slicer's Python nor of torch).
SAFETENSORS_REQUIREMENT = "safetensors>=0.4"
#: What DICOM SEG export installs when Slicer lacks it (Slicer 5.12 and later ship it).
HIGHDICOM_REQUIREMENT = "highdicom>=0.23"
#: What running the model needs; what DICOM SEG export needs.
MODEL_PACKAGES = ("torch", "safetensors")
DICOM_SEG_PACKAGES = ("highdicom",)


#
# Python requirements (the Slicer way: ask, PyTorch through PyTorchUtils, the rest with
# slicer.util.pip_install; modelled on SlicerTotalSegmentator's setupPythonRequirements)
#


class MissingRequirement(RuntimeError):
    """A Python package the module needs is missing or unusable; the message says what to do."""


def _torch_version(version: str):
    """(major, minor) of a torch version string such as "2.13.0+cpu"."""
    parts = version.split("+")[0].split(".")
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts[:2])


def requirementProblems(packages=MODEL_PACKAGES):
    """{package: None when it must be installed, or a MissingRequirement that installing
    cannot fix} for the packages that cannot be used now. Installs nothing."""
    problems = {}
    for name in packages:
        try:
            module = __import__(name)
        except ImportError:
            problems[name] = None
            continue
        except OSError as exc:  # e.g. a broken CUDA install: torch's shared libraries fail
            problems[name] = MissingRequirement(
                f"PyTorch is installed but cannot be loaded ({exc}). This usually means a "
                f"broken or mismatched CUDA installation. Reinstall PyTorch with the PyTorch "
                f"Utils module (pick the CPU build if unsure), then restart Slicer.")
            continue
        if name == "torch" and _torch_version(module.__version__) < TORCH_MINIMUM:
            problems[name] = MissingRequirement(
                f"EPD Segmentation needs PyTorch {TORCH_REQUIREMENT}; this Slicer has "
                f"{module.__version__}. Uninstall it and install a newer one with the PyTorch "
                f"Utils module, then restart Slicer.")
    if "highdicom" in problems and problems["highdicom"] is None:
        import pydicom

        if int(pydicom.__version__.split(".")[0]) < 3:
            # highdicom needs pydicom 3; upgrading Slicer's own pydicom could break its DICOM
            # module, so this is left to the user
            problems["highdicom"] = MissingRequirement(
                f"DICOM SEG export needs the Python package highdicom, which needs pydicom 3; "
                f"this Slicer has pydicom {pydicom.__version__}, and upgrading it could break "
                f"Slicer's DICOM module. Use Slicer 5.12 or later (it ships highdicom), or the "
                f"command line: epdseg segment ... --dicom-seg.")
    return problems


def checkRequirements(packages=MODEL_PACKAGES) -> None:
    """MissingRequirement naming what is missing and how to get it; installs nothing (for the
    Logic called from the console, and for the self-test)."""
    problems = requirementProblems(packages)
    for problem in problems.values():
        if problem is not None:
            raise problem
    if problems:
        raise MissingRequirement(
            f"EPD Segmentation needs the Python package(s) {', '.join(problems)}. Click "
            f"Apply (or Export) in the module panel, which offers to install them, or run "
            f"EPDSegmentation.setupPythonRequirements() in the Python console.")


def setupPythonRequirements(packages=MODEL_PACKAGES, askConfirmation: bool = True) -> bool:
    """Make ``packages`` importable, asking first: PyTorch through the PyTorch extension's
    PyTorchUtils (it picks the build for the GPU driver), safetensors and highdicom with
    slicer.util.pip_install. True when all can be imported; False when the user said no;
    MissingRequirement says what to do when it cannot be done here."""
    problems = requirementProblems(packages)
    for problem in problems.values():
        if problem is not None:
            raise problem
    if not problems:
        return True
    what = {"torch": "PyTorch (through the PyTorch extension; up to a few GB, the build that "
                     "suits your GPU driver or the CPU)",
            "safetensors": f"{SAFETENSORS_REQUIREMENT} (from PyPI, about 1 MB)",
            "highdicom": f"{HIGHDICOM_REQUIREMENT} (from PyPI, a few MB)"}
    if "torch" in problems:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise MissingRequirement(
                "EPD Segmentation needs PyTorch. Install the 'PyTorch' extension from the "
                "Extensions Manager, restart Slicer and click Apply again.") from None
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "EPD Segmentation needs these Python packages, which are not installed:\n"
            + "\n".join(f"- {what[n]}" for n in problems) + "\n\nInstall them now?",
            "Install Python packages"):
        return False
    if "torch" in problems:
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        try:
            torch = torchLogic.installTorch(askConfirmation=False,
                                            torchVersionRequirement=TORCH_REQUIREMENT)
        except Exception as exc:  # noqa: BLE001  pip/light-the-torch failed, or the new
            # torch cannot be imported in this session (installTorch imports it last)
            logging.exception("PyTorch installation failed")
            raise MissingRequirement(f"PyTorch could not be installed or loaded "
                                     f"({type(exc).__name__}: {exc}). Use the PyTorch Utils "
                                     f"module to install it, then restart Slicer.") from None
        if torch is None:
            raise MissingRequirement("PyTorch was not installed. Use the PyTorch Utils module "
                                     "to install it, then restart Slicer.")
    for name, requirement in (("safetensors", SAFETENSORS_REQUIREMENT),
                              ("highdicom", HIGHDICOM_REQUIREMENT)):
        if name in problems:
            slicer.util.pip_install(requirement)
    still = requirementProblems(packages)
    if still:
        raise MissingRequirement(f"{', '.join(still)} installed but cannot be loaded yet. "
                                 f"Restart Slicer and try again.")
    return True


#
# Module
#


class EPDSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "EPD Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["EPD Segmentation developers"]
        self.parent.helpText = (
            "CT body composition: skeletal muscle (MUS), intermuscular (IMAT), subcutaneous "
            "(SAT) and visceral (VAT) adipose tissue and other body tissue (MSC), with networks "
            "trained on Edge-preserving Probabilistic Downsampling (EPD). Outputs a "
            "segmentation, optional soft labels (probabilities) and a table of areas (cm2), "
            "volumes (cm3) and HU per tissue. The EPD preview shows what a label map looks "
            "like downsampled by nearest and by EPD. "
            '<a href="https://github.com/epd-segmentation/SlicerEPDSegmentation">Documentation</a>.')
        # soft labels come back binary from a saved scene unless restored when it is read
        slicer.app.connect("startupCompleted()", observeSceneImport)
        self.parent.acknowledgementText = (
            "EPD: Ali et al., Towards Efficient and Accurate CT Segmentation via "
            "Edge-Preserving Probabilistic Downsampling, arXiv:2404.03991. Terminology codes: "
            "SNOMED CT.")


def observeSceneImport(scene=None) -> None:
    """After a scene (.mrml, .mrb) is read into ``scene`` (default slicer.mrmlScene), make its
    soft-label segmentations fractional again (the storage node reads them as binary)."""
    scene = scene or slicer.mrmlScene

    def restore(caller, event):
        from EPDSegmentationLib.mrml.segmentation import restore_soft_labels

        for node in restore_soft_labels(caller):
            logging.info(f"EPD Segmentation: soft labels of '{node.GetName()}' restored")

    scene.AddObserver(scene.EndImportEvent, restore)


def defaultExportFolder() -> pathlib.Path:
    """Slicer's default folder for saved scenes (the user's documents), else the home folder."""
    folder = getattr(slicer.app, "defaultScenePath", "") or os.path.expanduser("~")
    return pathlib.Path(folder)


def showIn3D(segmentationNode) -> None:
    """Closed surfaces of the segments, shown in the 3D view."""
    segmentationNode.CreateClosedSurfaceRepresentation()
    display = segmentationNode.GetDisplayNode()
    if display is not None:
        display.SetVisibility3D(True)


def openInSegmentEditor(segmentationNode, volumeNode) -> None:
    """Hand the result to the Segment Editor (its segmentation and source volume set)."""
    slicer.util.selectModule("SegmentEditor")
    editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
    editor.setSegmentationNode(segmentationNode)
    if volumeNode is not None:
        editor.setSourceVolumeNode(volumeNode)


#
# Parameter node
#


@parameterNodeWrapper
class EPDSegmentationParameterNode:
    """The panel's state, saved with the scene.

    inputVolume: CT to segment. modelSource / modelPath: bundled model or a .safetensors
    file. device: where the network runs. sliceMode, firstSlice, lastSlice: which slices.
    outputSegmentation / outputTable: picked output nodes (None: create new).
    softSegmentation / softVolumes: soft-label outputs. previewSource, previewFactor,
    previewClass, previewSoftKind: the EPD preview. exportFolder: where Export writes
    (and where an improved model is saved);
    exportDicomSeg: also write DICOM SEG (only for a CT loaded from DICOM).
    resultSegmentation: the last run's segmentation (Export saves it and its companions).
    height: the patient's height, cm (0 = unknown; 1.0..2.5 is read as metres, as
    core.indices.height_m does); with it the measures table has SMI, IMATI, SATI, VATI.
    protocol: the measures and cohort tables also get the HU-protocol areas (Alberta:
    -29..150 HU muscle and -190..-30 HU IMAT within the network's muscle), beside the soft
    areas (core.bodycomp.PROTOCOL_COLUMNS).
    adaptSteps: fine-tuning steps of "Improve model from corrected slices".
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelSource: Annotated[str, Choice(list(MODEL_SOURCES))] = "Bundled model"
    modelPath: pathlib.Path
    device: Annotated[str, Choice(DEVICES)] = "Auto"
    sliceMode: Annotated[str, Choice(list(SLICE_MODES))] = "All slices"
    firstSlice: Annotated[int, Minimum(0)] = 0
    lastSlice: Annotated[int, Minimum(0)] = 0
    outputSegmentation: vtkMRMLSegmentationNode
    outputTable: vtkMRMLTableNode
    softSegmentation: bool = False
    softVolumes: bool = False
    # node unions must admit None: the wrapper writes None as the default when it creates the node
    previewSource: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    previewFactor: Annotated[int, Choice([2, 4, 8])] = 4
    previewClass: Annotated[str, Choice([c.key for c in TISSUES])] = "IMAT"
    previewSoftKind: Annotated[str, Choice(list(PREVIEW_SOFT_KINDS))] = "Fractional segmentation"
    exportFolder: pathlib.Path
    exportDicomSeg: bool = False
    resultSegmentation: vtkMRMLSegmentationNode
    height: Annotated[float, WithinRange(0.0, 250.0)] = 0.0
    protocol: bool = False
    adaptSteps: Annotated[int, Minimum(1)] = 60


#
# Widget
#


class EPDSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the panel to EPDSegmentationLogic; keeps the panel alive during long runs."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False
        self._sceneClosed = False
        self._viewsBeforePreview = None  # capture_views before the first preview
        self._deviceLines = {}  # device choice -> line; asking torch once is enough
        self._suggested = []    # slices the uncertainty map suggests correcting, in order
        self._nextSuggested = 0
        self._uncertaintyNode = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/EPDSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = EPDSegmentationLogic()
        self._lastResult = None   # the last Apply's SegmentationResult (Go to L3's cohort row)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)
        self.ui.previewButton.connect("clicked(bool)", self.onPreview)
        self.ui.goToL3Button.connect("clicked(bool)", self.onGoToL3)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.show3DButton.connect("clicked(bool)", self.onShow3D)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.onSegmentEditor)
        self.ui.restoreViewsButton.connect("clicked(bool)", self.onRestoreViews)
        self.ui.improveButton.connect("clicked(bool)", self.onImprove)
        self.ui.uncertaintyButton.connect("clicked(bool)", self.onShowUncertainty)
        self.ui.goToSuggestedButton.connect("clicked(bool)", self.onGoToSuggested)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        if self._running:  # the run stops at its next progress report and adds nothing
            self._cancelRequested = self._sceneClosed = True
        self._viewsBeforePreview = None
        self._setSuggested([], CORRECTIONS_HINT)
        self._uncertaintyNode = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first
        if str(self._parameterNode.exportFolder) in ("", "."):
            # not the process's working folder (often Slicer's install folder)
            self._parameterNode.exportFolder = defaultExportFolder()
        if str(self._parameterNode.modelPath) in ("", "."):
            # an unset path reads "." in the panel: start from the bundled model's file,
            # which "Model file" then uses until another is picked
            self._parameterNode.modelPath = bundled_model_path()

    def setParameterNode(self, parameterNode: Optional[EPDSegmentationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = parameterNode
        if self._parameterNode:
            # widgets bind to fields through their SlicerParameterName property in the .ui
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        self.ui.modelPathLineEdit.enabled = p.modelSource == "Model file"
        ranged = p.sliceMode == "Slice range"
        self.ui.firstSliceSpinBox.enabled = ranged
        self.ui.lastSliceSpinBox.enabled = ranged
        if p.inputVolume and p.inputVolume.GetImageData():
            last = p.inputVolume.GetImageData().GetDimensions()[2] - 1
            self.ui.firstSliceSpinBox.maximum = last
            self.ui.lastSliceSpinBox.maximum = last
        summary, model_ok = self.logic.modelSummary(p.modelSource, p.modelPath)
        lines = summary.split("\n") if model_ok else [summary]
        # the classes stay in view; factor, network pixel, Dice and device under "Model details"
        self.ui.modelSummaryLabel.text = lines[0]
        self.ui.modelDetailsLabel.text = "\n".join(lines[1:]) or "No model card read."
        trained = [x[len("Trained on: "):] for x in lines if x.startswith("Trained on: ")]
        self.ui.researchNoticeLabel.text = RESEARCH_NOTICE + (
            f" Trained on {trained[0]}." if trained else "")
        if p.device not in self._deviceLines:
            self._deviceLines[p.device] = self.logic.deviceSummary(p.device)
        self.ui.deviceStatusLabel.text = self._deviceLines[p.device]
        can_apply = bool(p.inputVolume) and model_ok and not self._running
        self.ui.applyButton.enabled = can_apply
        self.ui.applyButton.toolTip = ("Segment the CT." if can_apply else
                                       "Select a CT volume and a model first.")
        self.ui.cancelButton.enabled = self._running
        self.ui.goToL3Button.enabled = can_apply
        self.ui.previewButton.enabled = bool(p.previewSource) and not self._running
        self.ui.exportButton.enabled = bool(p.resultSegmentation) and not self._running
        self.ui.show3DButton.enabled = bool(p.resultSegmentation) and not self._running
        self.ui.segmentEditorButton.enabled = bool(p.resultSegmentation) and not self._running
        self.ui.restoreViewsButton.enabled = self._viewsBeforePreview is not None
        can_adapt = bool(p.resultSegmentation) and model_ok and not self._running
        self.ui.improveButton.enabled = can_adapt
        self.ui.uncertaintyButton.enabled = can_adapt
        self.ui.goToSuggestedButton.enabled = bool(self._suggested) and not self._running
        self.ui.heightStatusLabel.text = self.logic.heightSummary(p.height)
        problem = self.logic.dicomSegProblem(p.resultSegmentation, p.inputVolume)
        self.ui.exportDicomSegCheckBox.enabled = problem is None and not self._running
        self.ui.exportDicomSegCheckBox.toolTip = problem or (
            "Also write the tissues as DICOM SEG (binary) and, if soft labels were made, the "
            "probabilities as DICOM SEG (fractional), referencing the CT's DICOM series.")
        if not self._running and not p.inputVolume:
            self.ui.statusLabel.text = SELECT_PROMPT
        elif not self._running and self.ui.statusLabel.text in (SELECT_PROMPT,
                                                                "Select a CT volume."):
            self.ui.statusLabel.text = "Ready: choose the slices and click Apply."

    # --- actions

    def onLoadSample(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not load the sample CT.", waitCursor=True):
            self._parameterNode.inputVolume = self.logic.loadSample()

    def _progress(self, done: int, total: int, message: str) -> None:
        self.ui.progressBar.textVisible = True
        self.ui.progressBar.maximum = max(total, 1)
        self.ui.progressBar.value = done
        self.ui.statusLabel.text = message
        slicer.app.processEvents()  # keeps the panel (and Cancel) responsive
        if self._sceneClosed:
            raise Cancelled("the scene was closed during the run; nothing was added")

    def _allowedToReplace(self, node) -> Optional[bool]:
        """None when ``node`` is not picked or empty; else whether the user agrees to
        replace its content."""
        if node is None:
            return None
        filled = (node.IsA("vtkMRMLSegmentationNode")
                  and node.GetSegmentation().GetNumberOfSegments()) or \
            (node.IsA("vtkMRMLTableNode") and node.GetNumberOfRows())
        if not filled:
            return None
        return slicer.util.confirmOkCancelDisplay(
            f"'{node.GetName()}' already holds data. Replace it with the new results?",
            "Replace output")

    def onApply(self) -> None:
        p = self._parameterNode
        if not self._requirementsReady(MODEL_PACKAGES, "run the model"):
            return
        self._deviceLines.clear()  # torch may have just been installed: ask it again
        try:
            heightM = self.logic.heightMetres(p.height)
        except ValueError as exc:
            self.ui.statusLabel.text = f"Not done: {exc}"
            slicer.util.errorDisplay(str(exc), windowTitle="EPD Segmentation")
            return
        answers = [self._allowedToReplace(n) for n in (p.outputSegmentation, p.outputTable)]
        if False in answers:
            self.ui.statusLabel.text = ("Not done: the picked output holds data. Choose 'Create "
                                        "new' or agree to replace it.")
            return
        self._running, self._cancelRequested, self._sceneClosed = True, False, False
        self._lastResult = None
        self._updateGui()
        try:
            slices = self.logic.slicesFor(p.inputVolume, SLICE_MODES[p.sliceMode],
                                          p.firstSlice, p.lastSlice)
            result = self.logic.segment(
                p.inputVolume, self.logic.modelPathFor(p.modelSource, p.modelPath),
                device=p.device.lower(), slices=slices,
                segmentationNode=p.outputSegmentation, tableNode=p.outputTable,
                replaceExisting=True in answers, softSegmentation=p.softSegmentation,
                softVolumes=p.softVolumes, progress=self._progress,
                shouldCancel=lambda: self._cancelRequested, heightM=heightM,
                protocol=p.protocol)
            p.resultSegmentation = result.segmentation
            self._lastResult = result
            self._setSuggested([], CORRECTIONS_HINT)  # suggestions were for the last result
            self._viewsBeforePreview = None  # the results layout replaces the preview's
            mrml_views.show_results(slicer.mrmlScene, p.inputVolume, result)
            slicer.util.resetSliceViews()
            self.ui.statusLabel.text = self.logic.resultSummary(result)
        except Cancelled as exc:
            self.ui.statusLabel.text = f"Cancelled: {exc}"
        except (InputProblem, OutputExists, FileNotFoundError, ValueError, RuntimeError) as exc:
            self.ui.statusLabel.text = f"Not done: {exc}"
            slicer.util.errorDisplay(str(exc), windowTitle="EPD Segmentation")
            logging.exception("EPD Segmentation failed")
        finally:
            self._running = False
            self.ui.cancelButton.enabled = False
            self._updateGui()
            if self._sceneClosed:  # said after the panel was reset for the new scene
                self.ui.statusLabel.text = ("Cancelled: the scene was closed during the run; "
                                            "nothing was added.")

    def _requirementsReady(self, packages, purpose: str) -> bool:
        """Install what ``packages`` need (asking first); else say why not, in the panel and
        in a message box. False when nothing should be done."""
        try:
            if setupPythonRequirements(packages, askConfirmation=True):
                return True
            self.ui.statusLabel.text = (f"Not done: {', '.join(packages)} needed to {purpose} "
                                        f"(installation declined).")
        except MissingRequirement as exc:
            self.ui.statusLabel.text = f"Not done: {exc}"
            slicer.util.errorDisplay(str(exc), windowTitle="EPD Segmentation")
        return False

    def onGoToL3(self) -> None:
        """Move the red view to the middle of L3 and segment that slice."""
        p = self._parameterNode
        try:
            k = self.logic.goToLevel(p.inputVolume, "L3")
        except InputProblem as exc:
            self.ui.statusLabel.text = f"Not done: {exc}"
            slicer.util.errorDisplay(str(exc), windowTitle="EPD Segmentation")
            return
        p.sliceMode = "Slice under the red view"
        self.ui.statusLabel.text = f"L3 found at slice {k}; segmenting that slice."
        self._lastResult = None
        self.onApply()
        result = self._lastResult
        if result is not None and list(result.slices) == [k]:
            status = self.ui.statusLabel.text
            table = self.logic.addCohortRow(p.inputVolume, result, "L3", k,
                                            self.logic.heightMetres(p.height),
                                            self.logic.modelPathFor(p.modelSource, p.modelPath))
            self.ui.statusLabel.text = (f"{status} Row added to the table "
                                        f"'{table.GetName()}'.")

    def onCancel(self) -> None:
        self._cancelRequested = True
        self.ui.statusLabel.text = "Cancelling after the current batch..."

    def onPreview(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("EPD preview failed.", waitCursor=True):
            self._progress(0, 2, "EPD preview: downsampling...")
            preview = self.logic.preview(p.previewSource, p.previewFactor, p.previewClass,
                                         PREVIEW_SOFT_KINDS[p.previewSoftKind], p.inputVolume)
            self._progress(1, 2, "EPD preview: showing it...")
            before = mrml_views.show_preview(slicer.mrmlScene, p.inputVolume, preview)
            if self._viewsBeforePreview is None:  # later previews restore to the first's
                self._viewsBeforePreview = before
            self._progress(2, 2, "")
            self._updateGui()
            slicer.util.resetSliceViews()
            rows = {r["tissue"]: r for r in preview.rows}
            r = rows[p.previewClass]
            self.ui.statusLabel.text = (
                f"1/{p.previewFactor}: {p.previewClass} {r['original_cm2']:.2f} cm2; nearest "
                f"{r['nearest_error_pct']:+.1f} %, EPD {r['epd_error_pct']:+.1f} %.")

    def onExport(self) -> None:
        p = self._parameterNode
        dicomSeg = p.exportDicomSeg and self.ui.exportDicomSegCheckBox.enabled
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            if dicomSeg and not self._requirementsReady(DICOM_SEG_PACKAGES,
                                                        "export DICOM SEG (untick it to "
                                                        "export the rest)"):
                return
            self._progress(0, 1, "Exporting...")
            try:
                paths = self.logic.export(p.exportFolder, p.resultSegmentation,
                                          dicomSeg=dicomSeg)
            except FileExistsError as exc:
                if not slicer.util.confirmOkCancelDisplay(f"{exc}\n\nReplace these files?",
                                                          "Replace files"):
                    return
                paths = self.logic.export(p.exportFolder, p.resultSegmentation, overwrite=True,
                                          dicomSeg=dicomSeg)
            self._progress(1, 1, "Saved " + ", ".join(os.path.basename(x) for x in paths))

    def onShow3D(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not show the segmentation in 3D.",
                                             waitCursor=True):
            self._progress(0, 1, "Making surfaces for the 3D view...")
            showIn3D(self._parameterNode.resultSegmentation)
            self._progress(1, 1, "Shown in 3D.")

    def onSegmentEditor(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not open the Segment Editor."):
            openInSegmentEditor(p.resultSegmentation,
                                source_volume(p.resultSegmentation) or p.inputVolume)

    # --- learn from corrections

    def _setSuggested(self, slices, text: str) -> None:
        self._suggested, self._nextSuggested = list(slices), 0
        self.ui.suggestionsLabel.text = text
        self.ui.goToSuggestedButton.text = (f"Go to slice {slices[0]}" if slices
                                            else "Go to slice")

    def _runLong(self, work, what: str, unit: str):
        """Run ``work()`` as Apply runs the model: buttons off, Cancel on, progress in
        ``unit``; Cancelled and bad input end in the status line (and a message box for
        errors). Returns work's result, or None when it did not finish."""
        self._running, self._cancelRequested, self._sceneClosed = True, False, False
        self.ui.progressBar.format = f"%v / %m {unit}"
        self._updateGui()
        try:
            return work()
        except Cancelled as exc:
            self.ui.statusLabel.text = f"Cancelled: {exc}"
        except (InputProblem, OutputExists, FileNotFoundError, FileExistsError, ValueError,
                RuntimeError) as exc:
            self.ui.statusLabel.text = f"Not done: {exc}"
            slicer.util.errorDisplay(f"{what} failed.\n{exc}", windowTitle="EPD Segmentation")
            logging.exception(f"EPD Segmentation: {what} failed")
        finally:
            self._running = False
            self.ui.progressBar.format = "%v / %m slices"
            self.ui.cancelButton.enabled = False
            self._updateGui()
            if self._sceneClosed:
                self.ui.statusLabel.text = ("Cancelled: the scene was closed during the run; "
                                            "nothing was changed.")
        return None

    def onImprove(self) -> None:
        """Fine-tune the current model on the corrected slices, save it beside the scene,
        switch the panel to it and segment the other slices again."""
        p = self._parameterNode
        if not self._requirementsReady(MODEL_PACKAGES, "adapt the model"):
            return
        segmentation = p.resultSegmentation
        volume = source_volume(segmentation) or p.inputVolume

        def work():
            modelPath = self.logic.modelPathFor(p.modelSource, p.modelPath)
            output = self.logic.adaptedModelPath(p.exportFolder, volume)
            return self.logic.improveModel(
                volume, segmentation, modelPath, output, device=p.device.lower(),
                steps=p.adaptSteps, progress=self._progress,
                shouldCancel=lambda: self._cancelRequested,
                heightM=self.logic.heightMetres(p.height), protocol=p.protocol)

        outcome = self._runLong(work, "Improving the model", "steps")
        if outcome is None:
            if self.ui.statusLabel.text.startswith("Cancelled"):
                self.ui.statusLabel.text += " No model was saved; the segmentation is unchanged."
            return
        weights = pathlib.Path(outcome.paths[0])
        p.modelSource, p.modelPath = "Model file", weights
        self._setSuggested([], CORRECTIONS_HINT)
        self.ui.statusLabel.text = (
            f"Improved from corrected slice(s) {', '.join(map(str, outcome.slices))}: saved "
            f"{weights.name} in {weights.parent}; {len(outcome.resegmented)} other slice(s) "
            f"segmented again with it ({outcome.summary}); measures table updated. The panel "
            f"now uses it: choose 'Bundled model' under Model to switch back.")

    def onShowUncertainty(self) -> None:
        """Overlay the model's uncertainty on the segmented slices; list those to correct."""
        p = self._parameterNode
        if not self._requirementsReady(MODEL_PACKAGES, "run the model"):
            return
        segmentation = p.resultSegmentation
        volume = source_volume(segmentation) or p.inputVolume

        def work():
            modelPath = self.logic.modelPathFor(p.modelSource, p.modelPath)
            return self.logic.uncertainty(volume, segmentation, modelPath,
                                          device=p.device.lower(), nSuggest=N_SUGGEST,
                                          progress=self._progress,
                                          shouldCancel=lambda: self._cancelRequested)

        found = self._runLong(work, "The uncertainty map", "slices")
        if found is None:
            return
        node, slices = found
        if self._uncertaintyNode is not None and \
                slicer.mrmlScene.IsNodePresent(self._uncertaintyNode):
            slicer.mrmlScene.RemoveNode(self._uncertaintyNode)  # one map at a time
        self._uncertaintyNode = node
        mrml_views.show_overlay(slicer.mrmlScene, volume, node)
        self._setSuggested(slices, "Correct first: slice" + ("s " if len(slices) > 1 else " ")
                           + ", ".join(map(str, slices)) + " (the most uncertain).")
        self._updateGui()
        self.ui.statusLabel.text = (f"Uncertainty of '{node.GetName()}' over the CT (0 certain, "
                                    f"1 uncertain).")

    def onGoToSuggested(self) -> None:
        """Move the red view to the next suggested slice (cycling through them)."""
        if not self._suggested:
            return
        p = self._parameterNode
        volume = source_volume(p.resultSegmentation) or p.inputVolume
        i = self._nextSuggested % len(self._suggested)
        k = self._suggested[i]
        with slicer.util.tryWithErrorDisplay("Could not move the red view."):
            mrml_views.jump_red_to_slice(slicer.mrmlScene, volume, k)
            self._nextSuggested = i + 1
            following = self._suggested[self._nextSuggested % len(self._suggested)]
            self.ui.goToSuggestedButton.text = f"Go to slice {following}"
            self.ui.statusLabel.text = (f"Red view on slice {k} ({i + 1} of "
                                        f"{len(self._suggested)}): correct it in the Segment "
                                        f"Editor.")

    def onRestoreViews(self) -> None:
        if self._viewsBeforePreview is not None:
            mrml_views.restore_views(slicer.mrmlScene, self._viewsBeforePreview)
            self._viewsBeforePreview = None
        self._updateGui()


#
# Logic
#


class EPDSegmentationLogic(ScriptedLoadableModuleLogic):
    """Callable from the Python console and from tests:

        logic = EPDSegmentationLogic()
        result = logic.segment(ctNode, logic.modelPathFor("Bundled model"), slices=[40])
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._model = None
        self._modelKey = None

    def getParameterNode(self):
        return EPDSegmentationParameterNode(super().getParameterNode())

    # --- model and device

    @staticmethod
    def modelPathFor(source: str, path: Optional[pathlib.Path] = None) -> pathlib.Path:
        """The weights file for the panel's choice; FileNotFoundError saying what is missing."""
        return model_path_for(source, path)

    @staticmethod
    def modelSummary(source: str, path: Optional[pathlib.Path]):
        """(text for the panel, whether the model can be used) from the model card."""
        return model_status(source, path)

    @staticmethod
    def deviceSummary(choice: str) -> str:
        """The device that will run for the device choice, and why."""
        return device_line(choice.lower())

    def loadModel(self, path: pathlib.Path):
        """(model, card), cached while the file is unchanged."""
        from EPDSegmentationLib.core.model_io import load_model

        key = (str(path), os.path.getmtime(path) if os.path.exists(path) else None)
        if self._modelKey != key:
            self._model, self._modelKey = load_model(path), key
        return self._model

    @staticmethod
    def heightMetres(value) -> Optional[float]:
        """The panel's height (cm; 0 = unknown) in metres, or None when unknown; a value of
        1.0..2.5 is metres (core.indices.height_m). HeightError (a ValueError) says why a
        value cannot be used."""
        from EPDSegmentationLib.core.indices import height_m

        if not value:
            return None
        return height_m(f"{float(value):g}", "Height")

    @classmethod
    def heightSummary(cls, value) -> str:
        """One line for the panel: what the height field means now."""
        try:
            metres = cls.heightMetres(value)
        except ValueError as exc:
            return str(exc)
        if metres is None:
            return "unknown: no indices"
        return f"{metres:.2f} m: SMI, IMATI, SATI, VATI in the table"

    # --- work

    @staticmethod
    def loadSample():
        """The bundled sample CT as a new volume node."""
        try:
            path = sample_ct_path()
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"The sample CT is not part of this build yet ({exc}).") \
                from None
        return slicer.util.loadVolume(str(path))

    @staticmethod
    def goToLevel(volumeNode, level: str = "L3") -> int:
        """Find ``level`` in the volume (core.levels, no network) and move the red view onto
        its slice; returns the slice index K. InputProblem with the reason otherwise."""
        from EPDSegmentationLib.mrml.levels import go_to_level

        if volumeNode is None or volumeNode.GetImageData() is None:
            raise InputProblem("No input volume: select a CT volume (or load the sample CT).")
        k, _ = go_to_level(slicer.mrmlScene, volumeNode, level)
        return k

    @staticmethod
    def addCohortRow(volumeNode, result, level: str, k: int, heightM, modelPath):
        """The cohort table's row for this CT segmented at ``level`` (slice K): its areas,
        mean HU and, with a height (m), the indices; one row per CT, replaced on a rerun.
        Returns the table node ("Cohort"); the same columns as ``epdseg --cohort``."""
        from EPDSegmentationLib.core.cohort import COHORT_COLUMNS, level_row
        from EPDSegmentationLib.mrml.levels import add_cohort_row

        z = ijk_to_ras(volumeNode) @ [0.0, 0.0, float(k), 1.0]
        row = level_row(volumeNode.GetName(), result.rows, level=level, slices=[k],
                        z_mm=float(z[2]), height_m=heightM, model=pathlib.Path(modelPath).stem,
                        level_source="core.levels (panel)",
                        series_uid=volumeNode.GetAttribute("DICOM.SeriesInstanceUID") or "",
                        height_source="panel" if heightM else "")
        return add_cohort_row(slicer.mrmlScene, row, COHORT_COLUMNS)

    @staticmethod
    def slicesFor(volumeNode, mode: str, first: int = 0, last: int = 0):
        """Slice indices for the panel's slice choice ("all", "current", "range")."""
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise InputProblem("No input volume: select a CT volume (or load the sample CT).")
        n = volumeNode.GetImageData().GetDimensions()[2]
        current = None
        if mode == "current":
            current = slice_index_at(volumeNode, mrml_views.red_slice_ras(slicer.mrmlScene))
        return resolve_slices(mode, n, current=current, first=first, last=last)

    def segment(self, volumeNode, modelPath, *, device: str = "auto", slices=None,
                segmentationNode=None, tableNode=None, replaceExisting: bool = False,
                softSegmentation: bool = False, softVolumes: bool = False, batchSize: int = 8,
                progress=None, shouldCancel=None, heightM: Optional[float] = None,
                mirror: bool = True, protocol: bool = False):
        """Run the model on the volume's slices and build the outputs (see
        mrml.workflow.segment_volume); returns its SegmentationResult. heightM: the
        patient's height in metres (heightMetres), for the indices in the table. protocol:
        the table also gets the HU-protocol areas beside the soft ones. mirror:
        mirror averaging (each slice and its mirror image; False halves the network's
        time), as ``epdseg segment`` does by default. The result
        is remembered (mrml.adapt.snapshot_result) so that corrections can be found."""
        check_ct_volume(volumeNode)  # before the (slow) model load
        checkRequirements(MODEL_PACKAGES)
        if progress is not None:
            progress(0, 1, "Loading the model...")
        model, card = self.loadModel(modelPath)
        predict = model_predictor(model, card, volume_array(volumeNode),
                                  slice_pixel_mm(ijk_to_ras(volumeNode)),
                                  device=device, batch_size=batchSize,
                                  ijk_to_ras=ijk_to_ras(volumeNode), mirror=mirror)
        result = segment_volume(slicer.mrmlScene, volumeNode, predict, slices=slices,
                                segmentation_node=segmentationNode, table_node=tableNode,
                                replace_existing=replaceExisting,
                                soft_segmentation=softSegmentation, soft_volumes=softVolumes,
                                progress=progress, should_cancel=shouldCancel,
                                model_card=model_summary(card, modelPath), height_m=heightM,
                                protocol=protocol)
        snapshot_result(slicer.mrmlScene, result.segmentation, volumeNode)
        return result

    @staticmethod
    def segmentedSlices(volumeNode, segmentationNode):
        """Slice indices K where the segmentation holds any tissue (what a run covered)."""
        import numpy as np

        from EPDSegmentationLib.mrml.segmentation import labels_from_segmentation

        labels, _ = labels_from_segmentation(
            segmentationNode, (ijk_to_ras(volumeNode), volume_array(volumeNode).shape))
        return [int(k) for k in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))]

    @staticmethod
    def adaptedModelPath(folder, volumeNode) -> pathlib.Path:
        """A new file name for an improved model: <folder>/<CT name>_adapted.safetensors,
        numbered (_2, _3, ...) when taken, so nothing is overwritten. folder: the export
        folder, or Slicer's default scene folder when none is set."""
        from EPDSegmentationLib.core.model_card import model_paths
        from EPDSegmentationLib.io.outputs import safe_stem

        if folder is None or str(folder) in ("", "."):
            folder = defaultExportFolder()
        folder = pathlib.Path(folder)
        if not folder.is_dir():
            raise InputProblem(f"The folder for the improved model, {folder}, does not exist: "
                               f"choose an existing export folder.")
        stem = safe_stem(volumeNode.GetName() if volumeNode is not None else "")
        for n in range(1, 1000):
            path = folder / f"{stem}_adapted{'' if n == 1 else f'_{n}'}.safetensors"
            if not any(x.exists() for x in model_paths(path)):
                return path
        raise InputProblem(f"{folder} already holds 999 improved models of '{stem}'.")

    def improveModel(self, volumeNode, segmentationNode, modelPath, outputPath, *,
                     device: str = "cpu", steps: int = 60, slices=None, progress=None,
                     shouldCancel=None, heightM: Optional[float] = None,
                     protocol: bool = False):
        """Fine-tune a copy of the model at ``modelPath`` on the slices corrected in
        ``segmentationNode`` (default: those differing from the result as segmented), save it
        at ``outputPath`` (a new file, never the bundled model's), segment the other slices
        of the run again with it and fill the run's measures table again, as Apply does
        (with the indices for heightM, metres, and the HU-protocol areas with protocol)
        (mrml.adapt.improve_from_corrections).
        Returns its AdaptOutcome; nothing is written or changed when it fails or is
        cancelled."""
        from EPDSegmentationLib.core.adapt import AdaptSettings, check_destination
        from EPDSegmentationLib.mrml.adapt import improve_from_corrections
        from EPDSegmentationLib.mrml.workflow import result_nodes

        if segmentationNode is None:
            raise InputProblem("No result to learn from yet: click Apply first.")
        check_ct_volume(volumeNode)
        check_destination(outputPath)  # before the (slow) model load
        checkRequirements(MODEL_PACKAGES)
        covered = self.segmentedSlices(volumeNode, segmentationNode)
        if progress is not None:
            progress(0, steps + 1, "Loading the model...")
        model, card = self.loadModel(modelPath)
        settings = AdaptSettings(steps=int(steps), device=device)
        table = result_nodes(slicer.mrmlScene, segmentationNode)["table"]
        return improve_from_corrections(slicer.mrmlScene, volumeNode, segmentationNode, model,
                                        card, str(modelPath), outputPath, slices=slices,
                                        settings=settings, resegment_slices=covered,
                                        table_node=table, height_m=heightM,
                                        protocol=protocol, progress=progress, should_cancel=shouldCancel)

    def uncertainty(self, volumeNode, segmentationNode, modelPath, *, device: str = "auto",
                    nSuggest: int = 3, progress=None, shouldCancel=None):
        """(a volume node with the model's uncertainty (normalised entropy 0..1) on the
        slices the segmentation covers, 0 elsewhere; the nSuggest most uncertain of those
        slices, to correct first)."""
        from EPDSegmentationLib.core.inference import predict_volume
        from EPDSegmentationLib.mrml.adapt import uncertainty_volume

        if segmentationNode is None:
            raise InputProblem("No result yet: click Apply first.")
        check_ct_volume(volumeNode)
        checkRequirements(MODEL_PACKAGES)
        slices = self.segmentedSlices(volumeNode, segmentationNode)
        if not slices:
            raise InputProblem(f"'{segmentationNode.GetName()}' holds no tissue on any slice.")
        if progress is not None:
            progress(0, len(slices), "Loading the model...")
        model, card = self.loadModel(modelPath)
        report = None if progress is None else (
            lambda d, t: progress(d, t, f"uncertainty: {d} of {t} slices"))
        pred = predict_volume(volume_array(volumeNode),
                              slice_pixel_mm(ijk_to_ras(volumeNode)), model, card,
                              device=device, slices=slices, progress=report,
                              should_cancel=shouldCancel, ijk_to_ras=ijk_to_ras(volumeNode))
        return uncertainty_volume(slicer.mrmlScene, volumeNode, pred.probabilities,
                                  n_suggest=nSuggest, slices=pred.slices)

    @staticmethod
    def resultSummary(result) -> str:
        from EPDSegmentationLib.core.bodycomp import summary_line

        text = (f"Done: {len(result.slices)} slice(s) on {result.device}. "
                f"{summary_line(result.rows)}.")
        protocol = {r["tissue"]: r["protocol_area_cm2"] for r in result.rows
                    if r.get("slice") == "all" and "protocol_area_cm2" in r}
        if protocol:  # only when asked for; named so that nobody takes it for the soft area
            text += " HU protocol: " + ", ".join(
                f"{k} {protocol[k]:.1f}" for k in ("MUS", "IMAT", "SAT", "VAT")
                if k in protocol) + " cm2 per slice."
        smi = [r["index_cm2_m2"] for r in result.rows
               if r.get("slice") == "all" and r.get("index") == "SMI"]
        if smi:  # only with a height
            text += f" SMI {smi[0]:.1f} cm2/m2 (indices in the table)."
        fallbacks = [n for n in result.notes if "out of memory" in n]
        return text + (" " + "; ".join(fallbacks) if fallbacks else "")

    @staticmethod
    def preview(sourceNode, factor: int, tissue: str, softKind: str, referenceVolume=None):
        return epd_preview(slicer.mrmlScene, sourceNode, int(factor), tissue,
                           soft_kind=softKind, reference_volume=referenceVolume)

    @staticmethod
    def dicomSegProblem(segmentationNode, inputVolume=None) -> Optional[str]:
        """None when DICOM SEG can be exported for the run's CT (or, before a run, for the
        input volume); else why not, for the panel's tooltip."""
        volume = source_volume(segmentationNode) if segmentationNode else inputVolume
        return dicom_source_problem(volume)

    @staticmethod
    def export(folder, segmentationNode, overwrite: bool = False, dicomSeg: bool = False,
               fileForInstance=None):
        """Save the run's segmentation, soft labels and table to ``folder``; with dicomSeg
        also DICOM SEG files referencing the CT's DICOM series, whose files are found with
        fileForInstance(uid) (default: Slicer's DICOM database)."""
        if segmentationNode is None:
            raise InputProblem("Nothing to export yet: click Apply first.")
        if folder is None or str(folder) in ("", "."):
            raise InputProblem("Choose the export folder first.")
        source = None
        if dicomSeg:
            volume = source_volume(segmentationNode)
            if volume is None:
                raise InputProblem(f"DICOM SEG needs the CT '{segmentationNode.GetName()}' was "
                                   f"made from, which is no longer in the scene.")
            if fileForInstance is None:
                database = getattr(slicer, "dicomDatabase", None)
                if database is None or not database.isOpen:
                    raise InputProblem("DICOM SEG export reads the CT's files from Slicer's "
                                       "DICOM database, which is not open: open the DICOM "
                                       "module and load the CT from there.")
                fileForInstance = database.fileForInstance
            source = dicom_source(volume, fileForInstance)
        nodes = result_nodes(slicer.mrmlScene, segmentationNode)
        return export_results(folder, segmentation=segmentationNode,
                              soft_segmentation=nodes["soft_segmentation"],
                              probability_volumes=nodes["probability_volumes"],
                              table=nodes["table"], overwrite=overwrite, dicom_source=source,
                              protocol_segmentation=nodes["protocol_segmentation"])


#
# Test
#


class EPDSegmentationTest(ScriptedLoadableModuleTest):
    """The panel's workflow inside Slicer on the bundled sample CT with the bundled model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def _requirementsPresent(self, packages) -> bool:
        """Whether the packages can be imported; else the test part is skipped with a
        message (the self-test never installs: Apply in the panel asks and installs)."""
        try:
            checkRequirements(packages)
            return True
        except MissingRequirement as exc:
            self.delayDisplay(f"Skipped: {exc}")
            return False

    def runTest(self):
        self.setUp()
        self.test_segment_preview_export()
        self.setUp()
        self.test_dicom_seg_export()
        self.setUp()
        self.test_bad_inputs()

    def test_segment_preview_export(self):
        logic = EPDSegmentationLogic()
        if not self._requirementsPresent(MODEL_PACKAGES):
            return
        ct = EPDSegmentationLogic.loadSample()
        with tempfile.TemporaryDirectory() as folder:
            modelPath = bundled_model_path()
            self.delayDisplay("Segmenting the bundled sample CT with the bundled model")
            n = ct.GetImageData().GetDimensions()[2]
            slices = [n // 2, min(n - 1, n // 2 + 1)]
            seen = []
            result = logic.segment(ct, modelPath, device="cpu", slices=slices,
                                   softSegmentation=True, softVolumes=True, protocol=True,
                                   progress=lambda d, t, m: seen.append(d))
            self.assertEqual(seen[-1], len(set(slices)))
            segmentation = result.segmentation.GetSegmentation()
            self.assertEqual([segmentation.GetNthSegmentID(i) for i in range(5)],
                             [c.key for c in TISSUES])
            self.assertEqual(result.table.GetNumberOfRows(), 5 * len(set(slices)) + 5)
            totals = {r["tissue"]: r for r in result.rows if r["slice"] == "all"}
            self.assertLessEqual(totals["MUS"]["protocol_area_cm2"],  # HU protocol: a subset
                                 totals["MUS"]["area_cm2"] + totals["IMAT"]["area_cm2"] + 1e-6)
            self.assertIsNotNone(result.protocol_segmentation)
            self.assertEqual(len(result.probability_volumes), 5)
            self.assertEqual(result.soft_segmentation.GetSegmentation()
                             .GetSourceRepresentationName(), "Fractional labelmap")
            mrml_views.show_results(slicer.mrmlScene, ct, result)

            self.delayDisplay("EPD preview of the result at 1/4")
            preview = logic.preview(result.segmentation, 4, "IMAT", "fractional", ct)
            before = mrml_views.show_preview(slicer.mrmlScene, ct, preview)
            mrml_views.restore_views(slicer.mrmlScene, before)
            spacing = preview.nearest.GetSpacing()
            self.assertAlmostEqual(spacing[0], ct.GetSpacing()[0] * 4, places=6)
            for row in preview.rows:
                self.assertAlmostEqual(row["epd_cm2"], row["original_cm2"], places=6)

            self.delayDisplay("Export and read back")
            paths = logic.export(folder, result.segmentation)
            self.assertEqual(len(paths), 9)     # _protocol.seg.nrrd too
            with self.assertRaises(FileExistsError):
                logic.export(folder, result.segmentation)
            from EPDSegmentationLib.mrml.segmentation import (fractional_probabilities,
                                                              load_segmentation)

            back = load_segmentation(slicer.mrmlScene, [x for x in paths if
                                                        str(x).endswith("_soft.seg.nrrd")][0])
            a, _, _ = fractional_probabilities(back)
            b, _, _ = fractional_probabilities(result.soft_segmentation)
            self.assertEqual(a.shape, b.shape)
            self.assertLess(float(abs(a - b).max()), 1e-6)
        self.delayDisplay("Test passed")

    def test_dicom_seg_export(self):
        """Four slices of the bundled sample CT written as a DICOM series, imported into a
        temporary DICOM database and loaded by Slicer's DICOM module; its segmentation exported
        as DICOM SEG and read back per instance."""
        if not self._requirementsPresent(MODEL_PACKAGES + DICOM_SEG_PACKAGES):
            return
        try:
            from DICOMLib import DICOMUtils
        except ImportError:  # only Slicer's application has the DICOM module
            self.delayDisplay("Skipped the DICOM SEG test: Slicer's DICOM module (DICOMLib) "
                              "is not available here")
            return
        import highdicom
        import numpy as np
        import pydicom

        from EPDSegmentationLib.core.volume import Volume
        from EPDSegmentationLib.io import read_volume, write_dicom_series
        from EPDSegmentationLib.mrml.segmentation import labels_from_segmentation

        logic = EPDSegmentationLogic()
        sample = read_volume(sample_ct_path())
        hu = Volume(sample.array[:4].copy(), sample.ijk_to_ras)   # K = 0 keeps the origin
        with tempfile.TemporaryDirectory() as folder:
            # uncompressed: Slicer ships no JPEG 2000 encoder for pydicom
            files = write_dicom_series(hu, os.path.join(folder, "dicom"))
            series = str(pydicom.dcmread(str(files[0]), stop_before_pixels=True)
                         .SeriesInstanceUID)
            modelPath = bundled_model_path()
            out = os.path.join(folder, "out")
            os.mkdir(out)
            # the database lives in Slicer's temporary folder (its files stay open)
            with DICOMUtils.TemporaryDICOMDatabase() as db:
                DICOMUtils.importDicom(os.path.join(folder, "dicom"), db)
                ct = slicer.mrmlScene.GetNodeByID(DICOMUtils.loadSeriesByUID([series])[0])
                listed = ct.GetAttribute("DICOM.instanceUIDs").split()
                self.assertEqual(len(listed), len(files))
                self.assertIsNone(logic.dicomSegProblem(None, ct))
                self.delayDisplay("Segmenting the CT loaded from DICOM")
                result = logic.segment(ct, modelPath, device="cpu", slices=[1, 2],
                                       softSegmentation=True)
                paths = logic.export(out, result.segmentation, dicomSeg=True)
            binary = [x for x in paths if str(x).endswith("_seg.dcm")
                      and not str(x).endswith("_prob_seg.dcm")]
            fractional = [x for x in paths if str(x).endswith("_prob_seg.dcm")]
            self.assertEqual((len(binary), len(fractional)), (1, 1))
            # frame n of the SEG lies on the instance Slicer listed for slice K = n
            labels, _ = labels_from_segmentation(result.segmentation)
            seg = highdicom.seg.segread(str(binary[0]))
            frames = seg.get_pixels_by_source_instance(listed, combine_segments=True)
            self.assertTrue(np.array_equal(frames, labels))
            self.assertEqual([d.SegmentLabel for d in seg.SegmentSequence],
                             [c.name for c in TISSUES])
        self.delayDisplay("DICOM SEG export passed")

    def test_bad_inputs(self):
        logic = EPDSegmentationLogic()
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        import numpy as np

        slicer.util.updateVolumeFromArray(labelmap, np.zeros((2, 32, 32), np.uint8))
        with self.assertRaises(InputProblem):
            segment_volume(slicer.mrmlScene, labelmap, lambda s, p, c: None)
        with self.assertRaises(InputProblem):
            logic.slicesFor(None, "all")
        with self.assertRaises(FileNotFoundError):
            logic.modelPathFor("Model file", pathlib.Path(""))
        self.delayDisplay("Bad inputs rejected")
