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
from slicer.parameterNodeWrapper import Choice, Minimum, parameterNodeWrapper
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
from EPDSegmentationLib.mrml.preview import epd_preview
from EPDSegmentationLib.mrml.workflow import (MODEL_SOURCES, OutputExists, device_line,
                                              export_results, model_path_for, model_predictor,
                                              model_status, resolve_slices, result_nodes,
                                              segment_volume)
from EPDSegmentationLib.core.resources import bundled_model_path, sample_ct_path

DEVICES = ["Auto", "CUDA", "MPS", "CPU"]
SLICE_MODES = {"All slices": "all", "Slice under the red view": "current",
               "Slice range": "range"}
PREVIEW_SOFT_KINDS = {"Fractional segmentation": "fractional",
                      "Probability volume": "probability"}
TORCH_REQUIREMENT = ">=2.1"
#: What DICOM SEG export installs when Slicer lacks it (Slicer 5.12 and later ship it).
HIGHDICOM_REQUIREMENT = "highdicom>=0.23"


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
        self.parent.acknowledgementText = (
            "EPD: Ali et al., Towards Efficient and Accurate CT Segmentation via "
            "Edge-Preserving Probabilistic Downsampling, arXiv:2404.03991. Terminology codes: "
            "SNOMED CT.")


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
    previewClass, previewSoftKind: the EPD preview. exportFolder: where Export writes;
    exportDicomSeg: also write DICOM SEG (only for a CT loaded from DICOM).
    resultSegmentation: the last run's segmentation (Export saves it and its companions).
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
    previewSource: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
    previewFactor: Annotated[int, Choice([2, 4, 8])] = 4
    previewClass: Annotated[str, Choice([c.key for c in TISSUES])] = "IMAT"
    previewSoftKind: Annotated[str, Choice(list(PREVIEW_SOFT_KINDS))] = "Fractional segmentation"
    exportFolder: pathlib.Path
    exportDicomSeg: bool = False
    resultSegmentation: vtkMRMLSegmentationNode


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
        self._deviceLines = {}  # device choice -> line; asking torch once is enough

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/EPDSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = EPDSegmentationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)
        self.ui.previewButton.connect("clicked(bool)", self.onPreview)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
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
        self.ui.modelSummaryLabel.text = summary
        if p.device not in self._deviceLines:
            self._deviceLines[p.device] = self.logic.deviceSummary(p.device)
        self.ui.deviceStatusLabel.text = self._deviceLines[p.device]
        can_apply = bool(p.inputVolume) and model_ok and not self._running
        self.ui.applyButton.enabled = can_apply
        self.ui.applyButton.toolTip = ("Segment the CT." if can_apply else
                                       "Select a CT volume and a model first.")
        self.ui.cancelButton.enabled = self._running
        self.ui.previewButton.enabled = bool(p.previewSource) and not self._running
        self.ui.exportButton.enabled = bool(p.resultSegmentation) and not self._running
        problem = self.logic.dicomSegProblem(p.resultSegmentation, p.inputVolume)
        self.ui.exportDicomSegCheckBox.enabled = problem is None and not self._running
        self.ui.exportDicomSegCheckBox.toolTip = problem or (
            "Also write the tissues as DICOM SEG (binary) and, if soft labels were made, the "
            "probabilities as DICOM SEG (fractional), referencing the CT's DICOM series.")
        if not self._running and not p.inputVolume:
            self.ui.statusLabel.text = "Select a CT volume (or load the sample CT)."

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
        try:
            if not self.logic.ensureTorch(askConfirmation=True):
                self.ui.statusLabel.text = "PyTorch is needed to run the model; nothing was done."
                return
        except RuntimeError as exc:
            self.ui.statusLabel.text = f"Not done: {exc}"
            slicer.util.errorDisplay(str(exc), windowTitle="EPD Segmentation")
            return
        self._deviceLines.clear()  # torch may have just been installed: ask it again
        answers = [self._allowedToReplace(n) for n in (p.outputSegmentation, p.outputTable)]
        if False in answers:
            self.ui.statusLabel.text = ("Not done: the picked output holds data. Choose 'Create "
                                        "new' or agree to replace it.")
            return
        self._running, self._cancelRequested = True, False
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
                shouldCancel=lambda: self._cancelRequested)
            p.resultSegmentation = result.segmentation
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
            self._updateGui()

    def onCancel(self) -> None:
        self._cancelRequested = True
        self.ui.statusLabel.text = "Cancelling after the current batch..."

    def onPreview(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("EPD preview failed.", waitCursor=True):
            preview = self.logic.preview(p.previewSource, p.previewFactor, p.previewClass,
                                         PREVIEW_SOFT_KINDS[p.previewSoftKind], p.inputVolume)
            mrml_views.show_preview(slicer.mrmlScene, p.inputVolume, preview)
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
            if dicomSeg and not self.logic.ensureHighdicom(askConfirmation=True):
                self.ui.statusLabel.text = ("DICOM SEG export needs highdicom; nothing was "
                                            "exported. Untick 'DICOM SEG' to export the rest.")
                return
            try:
                paths = self.logic.export(p.exportFolder, p.resultSegmentation,
                                          dicomSeg=dicomSeg)
            except FileExistsError as exc:
                if not slicer.util.confirmOkCancelDisplay(f"{exc}\n\nReplace these files?",
                                                          "Replace files"):
                    return
                paths = self.logic.export(p.exportFolder, p.resultSegmentation, overwrite=True,
                                          dicomSeg=dicomSeg)
            self.ui.statusLabel.text = "Saved " + ", ".join(os.path.basename(x) for x in paths)


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
    def ensureTorch(askConfirmation: bool = True) -> bool:
        """True when torch can be imported; else offer to install it through the PyTorch
        extension (asking first). RuntimeError says what to do when that is impossible."""
        try:
            import torch  # noqa: F401
            return True
        except ImportError:
            pass
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError("EPD Segmentation needs PyTorch. Install the 'PyTorch' extension "
                               "from the Extensions Manager, restart Slicer and click Apply "
                               "again.") from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    "EPD Segmentation needs PyTorch, which is not installed. Install it now "
                    "through the PyTorch extension? It downloads up to a few GB and picks the "
                    "build that suits your GPU driver (or the CPU build).",
                    "Install PyTorch"):
                return False
            try:
                torch = torchLogic.installTorch(askConfirmation=False,
                                                torchVersionRequirement=TORCH_REQUIREMENT)
            except Exception as exc:  # noqa: BLE001  pip/light-the-torch failed, or the new
                # torch cannot be imported in this session (installTorch imports it last)
                logging.exception("PyTorch installation failed")
                raise RuntimeError(f"PyTorch could not be installed or loaded "
                                   f"({type(exc).__name__}: {exc}). Use the PyTorch Utils "
                                   f"module to install it, then restart Slicer.") from None
            if torch is None:
                raise RuntimeError("PyTorch was not installed. Use the PyTorch Utils module to "
                                   "install it, then restart Slicer.")
        try:
            import torch  # noqa: F401,F811
        except ImportError as exc:
            raise RuntimeError(f"PyTorch was installed but cannot be loaded yet ({exc}). "
                               f"Restart Slicer and click Apply again.") from None
        return True

    @staticmethod
    def ensureHighdicom(askConfirmation: bool = True) -> bool:
        """True when highdicom (DICOM SEG writing) can be imported; else offer to pip-install
        it (asking first). RuntimeError says what to do when that is impossible or unsafe."""
        try:
            import highdicom  # noqa: F401
            return True
        except ImportError:
            pass
        import pydicom

        major = int(pydicom.__version__.split(".")[0])
        if major < 3:
            # highdicom needs pydicom 3; upgrading Slicer's own pydicom could break its DICOM
            # module, so this is left to the user
            raise RuntimeError(
                f"DICOM SEG export needs the Python package highdicom, which needs pydicom 3; "
                f"this Slicer has pydicom {pydicom.__version__}, and upgrading it could break "
                f"Slicer's DICOM module. Use Slicer 5.12 or later (it ships highdicom), or the "
                f"command line: epdseg segment ... --dicom-seg.")
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                "DICOM SEG export needs the Python package highdicom, which is not installed "
                f"in this Slicer. Install it now from PyPI ({HIGHDICOM_REQUIREMENT}, a few MB)?",
                "Install highdicom"):
            return False
        slicer.util.pip_install(HIGHDICOM_REQUIREMENT)
        try:
            import highdicom  # noqa: F401,F811
        except ImportError as exc:
            raise RuntimeError(f"highdicom was installed but cannot be loaded yet ({exc}). "
                               f"Restart Slicer and export again.") from None
        return True

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
                progress=None, shouldCancel=None):
        """Run the model on the volume's slices and build the outputs (see
        mrml.workflow.segment_volume); returns its SegmentationResult."""
        check_ct_volume(volumeNode)  # before the (slow) model load
        model, card = self.loadModel(modelPath)
        predict = model_predictor(model, card, volume_array(volumeNode),
                                  slice_pixel_mm(ijk_to_ras(volumeNode)),
                                  device=device, batch_size=batchSize,
                                  ijk_to_ras=ijk_to_ras(volumeNode))
        return segment_volume(slicer.mrmlScene, volumeNode, predict, slices=slices,
                              segmentation_node=segmentationNode, table_node=tableNode,
                              replace_existing=replaceExisting,
                              soft_segmentation=softSegmentation, soft_volumes=softVolumes,
                              progress=progress, should_cancel=shouldCancel,
                              model_card=model_summary(card, modelPath))

    @staticmethod
    def resultSummary(result) -> str:
        from EPDSegmentationLib.core.bodycomp import summary_line

        text = (f"Done: {len(result.slices)} slice(s) on {result.device}. "
                f"{summary_line(result.rows)}.")
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
                              table=nodes["table"], overwrite=overwrite, dicom_source=source)


#
# Test
#


class EPDSegmentationTest(ScriptedLoadableModuleTest):
    """The panel's workflow inside Slicer on the bundled sample CT with the bundled model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_preview_export()
        self.setUp()
        self.test_dicom_seg_export()
        self.setUp()
        self.test_bad_inputs()

    def test_segment_preview_export(self):
        logic = EPDSegmentationLogic()
        self.assertTrue(logic.ensureTorch(askConfirmation=False))
        ct = EPDSegmentationLogic.loadSample()
        with tempfile.TemporaryDirectory() as folder:
            modelPath = bundled_model_path()
            self.delayDisplay("Segmenting the bundled sample CT with the bundled model")
            n = ct.GetImageData().GetDimensions()[2]
            slices = [n // 2, min(n - 1, n // 2 + 1)]
            seen = []
            result = logic.segment(ct, modelPath, device="cpu", slices=slices,
                                   softSegmentation=True, softVolumes=True,
                                   progress=lambda d, t, m: seen.append(d))
            self.assertEqual(seen[-1], len(set(slices)))
            segmentation = result.segmentation.GetSegmentation()
            self.assertEqual([segmentation.GetNthSegmentID(i) for i in range(5)],
                             [c.key for c in TISSUES])
            self.assertEqual(result.table.GetNumberOfRows(), 5 * len(set(slices)) + 5)
            self.assertEqual(len(result.probability_volumes), 5)
            self.assertEqual(result.soft_segmentation.GetSegmentation()
                             .GetSourceRepresentationName(), "Fractional labelmap")
            mrml_views.show_results(slicer.mrmlScene, ct, result)

            self.delayDisplay("EPD preview of the result at 1/4")
            preview = logic.preview(result.segmentation, 4, "IMAT", "fractional", ct)
            mrml_views.show_preview(slicer.mrmlScene, ct, preview)
            spacing = preview.nearest.GetSpacing()
            self.assertAlmostEqual(spacing[0], ct.GetSpacing()[0] * 4, places=6)
            for row in preview.rows:
                self.assertAlmostEqual(row["epd_cm2"], row["original_cm2"], places=6)

            self.delayDisplay("Export and read back")
            paths = logic.export(folder, result.segmentation)
            self.assertEqual(len(paths), 8)
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
        try:
            import highdicom
        except ImportError:
            self.delayDisplay("highdicom is not installed: DICOM SEG export not tested")
            return
        import numpy as np
        import pydicom
        from DICOMLib import DICOMUtils

        from EPDSegmentationLib.core.volume import Volume
        from EPDSegmentationLib.io import read_volume, write_dicom_series
        from EPDSegmentationLib.mrml.segmentation import labels_from_segmentation

        logic = EPDSegmentationLogic()
        self.assertTrue(logic.ensureTorch(askConfirmation=False))
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
