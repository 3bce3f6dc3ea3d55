"""EPDSegmentation.py run against Slicer's own Python layer, without the Slicer application.

What is real: the `slicer` package of the slicer-core wheel (vtkMRMLScene, the segmentations
logic, slicer.util's array functions, VTKObservationMixin), and Slicer's pure-Python layer read
from ../shared/slicer-python/slicer (parameterNodeWrapper, ScriptedLoadableModule, i18n,
testing) loaded INTO that package as slicer.parameterNodeWrapper etc. (read in place, never
copied). The module's .ui is loaded by PySide6's QUiLoader (offscreen).

What stands in: `qt` and `ctk` modules made of PySide6 classes with PythonQt's manners
(properties as attributes, ``connect("clicked(bool)", fn)``), Slicer's widgets
(qMRMLNodeComboBox, ctkCollapsibleButton, ctkPathLineEdit, ctkDirectoryButton, qMRMLWidget),
``slicer.app`` (processEvents, translate) and the slicer.util functions that need the
application (loadUI, childWidgetVariables, tryWithErrorDisplay, errorDisplay,
confirmOkCancelDisplay, pip_install, loadVolume, delayDisplay, resetSliceViews). Dialogs are
recorded in ``Harness.dialogs``; confirmations answer ``Harness.answer``.

    with slicer_session() as h:          # skips when ../shared/slicer-python or PySide6 is absent
        widget = h.widget                # EPDSegmentationWidget with the real .ui
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# the .ui's Slicer-only signal connections (mrmlSceneChanged) cannot exist here
os.environ.setdefault("QT_LOGGING_RULES", "qt.core.qobject.connect=false")

REPO = Path(__file__).resolve().parents[1]
MODULE_PATH = REPO / "EPDSegmentation" / "EPDSegmentation.py"
SLICER_PY_CANDIDATES = (REPO.parent / "shared" / "slicer-python" / "slicer",
                        REPO.parent.parent / "shared" / "slicer-python" / "slicer")
#: Slicer's pure-Python modules loaded into the slicer package, in dependency order.
SLICER_MODULES = ("i18n", "parameterNodeWrapper", "ScriptedLoadableModule", "testing")


def slicer_python_dir():
    """../shared/slicer-python/slicer, or None."""
    return next((p for p in SLICER_PY_CANDIDATES if (p / "ScriptedLoadableModule.py").exists()),
                None)


# --- PythonQt manners on PySide6 classes


class PythonQtManners:
    """Qt properties read and written as attributes (``w.checked = True``, ``w.value``) and
    PythonQt's ``connect("signal(args)", fn)``, as Slicer's Python sees its widgets."""

    _qt_properties = {}

    def _property_names(self):
        cls = type(self)
        names = PythonQtManners._qt_properties.get(cls)
        if names is None:
            meta = object.__getattribute__(self, "metaObject")()
            names = {meta.property(i).name() for i in range(meta.propertyCount())}
            PythonQtManners._qt_properties[cls] = names
        return names

    def __getattribute__(self, name):
        if name in ("connect", "disconnect"):  # Shiboken would answer with QObject.connect
            return types.MethodType(getattr(PythonQtManners, "_" + name), self)
        if name[:1] != "_" and name in PythonQtManners._property_names(self):
            return object.__getattribute__(self, "property")(name)
        return super().__getattribute__(name)

    def __setattr__(self, name, value):
        if name[:1] != "_" and name in PythonQtManners._property_names(self):
            if not object.__getattribute__(self, "setProperty")(name, value):
                raise AttributeError(f"{type(self).__name__}.{name} = {value!r} was refused")
            return
        super().__setattr__(name, value)

    def _connect(self, signature, slot):
        getattr(self, signature.split("(")[0]).connect(slot)

    def _disconnect(self, signature, slot):
        getattr(self, signature.split("(")[0]).disconnect(slot)


def _build_qt():
    """(qt, ctk, slicer widget classes, ui class map) built on PySide6."""
    from PySide6 import QtCore, QtGui, QtWidgets
    from PySide6.QtCore import Property, Signal

    qt = types.ModuleType("qt")
    for mod in (QtCore, QtGui, QtWidgets):
        for name in dir(mod):
            if name.startswith("Q"):
                setattr(qt, name, getattr(mod, name))
    wrapped = {}
    for name in ("QWidget", "QLabel", "QPushButton", "QCheckBox", "QComboBox", "QSpinBox",
                 "QDoubleSpinBox", "QProgressBar", "QLineEdit", "QGroupBox", "QFrame",
                 "QToolButton", "QRadioButton", "QTextEdit", "QSlider", "QScrollArea"):
        cls = type(name, (PythonQtManners, getattr(QtWidgets, name)), {})
        setattr(qt, name, cls)
        wrapped[name] = cls

    class qMRMLWidget(PythonQtManners, QtWidgets.QWidget):
        """A panel: setMRMLScene reaches every MRML widget inside (the .ui's connections in
        Slicer); isEntered as the module panel has it."""
        isEntered = True

        def setMRMLScene(self, scene):
            self._scene = scene
            for child in self.findChildren(QtWidgets.QWidget):
                if hasattr(child, "setMRMLScene") and child is not self:
                    child.setMRMLScene(scene)

        def mrmlScene(self):
            return getattr(self, "_scene", None)

    class qMRMLNodeComboBox(PythonQtManners, QtWidgets.QComboBox):
        """Lists the scene's nodes of nodeTypes (plus 'None' when noneEnabled)."""
        currentNodeChanged = Signal(object)

        def __init__(self, parent=None):
            super().__init__(parent)
            self._scene, self._node, self._nodes, self._types = None, None, [], None
            self.currentIndexChanged.connect(self._picked)

        @property
        def nodeTypes(self):
            return self._types if self._types is not None else (
                list(self.property("nodeTypes") or []))

        @nodeTypes.setter
        def nodeTypes(self, value):
            self._types = list(value)
            self._refresh()

        def setMRMLScene(self, scene):
            import vtk

            self.detach()
            self._scene = scene
            self._tags = [scene.AddObserver(event, lambda *a: self._refresh())
                          for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent,
                                        vtk.vtkCommand.ModifiedEvent)]
            self._refresh()

        def detach(self):
            """Stop following the scene (before the widget is deleted)."""
            for tag in getattr(self, "_tags", []):
                self._scene.RemoveObserver(tag)
            self._tags = []

        def _candidates(self):
            if self._scene is None:
                return []
            nodes = []
            for i in range(self._scene.GetNumberOfNodes()):
                n = self._scene.GetNthNode(i)
                if any(n.IsA(t) for t in self.nodeTypes) and not n.GetHideFromEditors():
                    if n.IsA("vtkMRMLLabelMapVolumeNode") and "vtkMRMLLabelMapVolumeNode" \
                            not in self.nodeTypes and self.property("showChildNodeTypes") \
                            is False:
                        continue
                    nodes.append(n)
            return nodes

        def _refresh(self):
            nodes = ([None] if self.property("noneEnabled") else []) + self._candidates()
            if self._node is not None and self._node not in nodes:
                self._node = None
                self.currentNodeChanged.emit(None)
            self._nodes = nodes
            self.blockSignals(True)
            QtWidgets.QComboBox.clear(self)
            for n in nodes:
                QtWidgets.QComboBox.addItem(self, n.GetName() if n is not None else
                                            (self.property("noneDisplay") or "None"))
            QtWidgets.QComboBox.setCurrentIndex(
                self, nodes.index(self._node) if self._node in nodes else -1)
            self.blockSignals(False)

        def _picked(self, index):
            node = self._nodes[index] if 0 <= index < len(self._nodes) else None
            if node is not self._node:
                self._node = node
                self.currentNodeChanged.emit(node)

        def currentNode(self):
            return self._node

        def setCurrentNode(self, node):
            self._refresh()
            if node is not None and node not in self._nodes:
                raise ValueError(f"{node.GetName()} is not selectable here ({self.nodeTypes})")
            if node is not self._node:
                self._node = node
                self._refresh()
                self.currentNodeChanged.emit(node)

    class ctkCollapsibleButton(PythonQtManners, QtWidgets.QGroupBox):
        def _get_collapsed(self):
            return bool(getattr(self, "_collapsed", False))

        def _set_collapsed(self, value):
            self._collapsed = bool(value)
            for child in self.findChildren(QtWidgets.QWidget):
                if child.parent() is self:
                    child.setVisible(not value)
            self.setMaximumHeight(24 if value else 16777215)
            self.setTitle(("\u25b8 " if value else "\u25be ") + self._get_text())

        def _get_text(self):
            return getattr(self, "_text", "")

        def _set_text(self, value):
            self._text = value
            self.setTitle(("\u25b8 " if self._get_collapsed() else "\u25be ") + value)

        collapsed = Property(bool, _get_collapsed, _set_collapsed)
        text = Property(str, _get_text, _set_text)

    class ctkPathLineEdit(PythonQtManners, QtWidgets.QLineEdit):
        currentPathChanged = Signal(str)

        def _get(self):
            return QtWidgets.QLineEdit.text(self)

        def _set(self, value):
            if value != self._get():
                QtWidgets.QLineEdit.setText(self, value)
                self.currentPathChanged.emit(value)

        currentPath = Property(str, _get, _set)

    class ctkDirectoryButton(PythonQtManners, QtWidgets.QPushButton):
        directoryChanged = Signal(str)

        def _get(self):
            return getattr(self, "_directory", "")

        def _set(self, value):
            if value != self._get():
                self._directory = value
                QtWidgets.QPushButton.setText(self, value)
                self.directoryChanged.emit(value)

        directory = Property(str, _get, _set)

    ctk = types.ModuleType("ctk")
    for name in ("ctkCheckBox", "ctkComboBox", "ctkCheckablePushButton", "ctkSliderWidget",
                 "ctkDoubleSlider", "ctkDoubleSpinBox", "ctkRangeWidget",
                 "ctkDoubleRangeSlider", "ctkColorPickerButton"):
        setattr(ctk, name, type(name, (PythonQtManners, QtWidgets.QWidget), {}))
    ctk.ctkCollapsibleButton = ctkCollapsibleButton
    ctk.ctkPathLineEdit = ctkPathLineEdit
    ctk.ctkDirectoryButton = ctkDirectoryButton
    mrml_widgets = {"qMRMLWidget": qMRMLWidget, "qMRMLNodeComboBox": qMRMLNodeComboBox}
    for name in ("qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget"):
        mrml_widgets[name] = type(name, (PythonQtManners, QtWidgets.QWidget), {})
    ui_classes = dict(wrapped, qMRMLWidget=qMRMLWidget, qMRMLNodeComboBox=qMRMLNodeComboBox,
                      ctkCollapsibleButton=ctkCollapsibleButton, ctkPathLineEdit=ctkPathLineEdit,
                      ctkDirectoryButton=ctkDirectoryButton)
    return qt, ctk, mrml_widgets, ui_classes


def load_ui(path, ui_classes):
    """The .ui's top widget, every widget made from the stand-in classes."""
    from PySide6.QtCore import QFile
    from PySide6.QtUiTools import QUiLoader

    class Loader(QUiLoader):
        def createWidget(self, class_name, parent=None, name=""):
            cls = ui_classes.get(class_name)
            if cls is None:
                return super().createWidget(class_name, parent, name)
            widget = cls(parent)
            widget.setObjectName(name)
            return widget

    f = QFile(str(path))
    f.open(QFile.ReadOnly)
    try:
        widget = Loader().load(f)
    finally:
        f.close()
    if widget is None:
        raise RuntimeError(f"QUiLoader could not load {path}")
    return widget


# --- the session


class Harness:
    """Holds the scene, the stand-ins, what dialogs said, and the module's objects."""

    def __init__(self):
        self.dialogs = []        # (kind, text)
        self.answer = True       # what confirmOkCancelDisplay answers
        self.pip_installs = []   # requirements passed to slicer.util.pip_install
        self.modules_selected = []  # slicer.util.selectModule calls
        self.segment_editor = types.SimpleNamespace(segmentation=None, source=None)
        self.module = None       # the EPDSegmentation module (imported from its file)
        self.widget = None

    def messages(self, kind=None):
        return [t for k, t in self.dialogs if kind is None or k == kind]


def _load_submodule(slicer, name, folder):
    path = folder / name
    if path.is_dir():
        spec = importlib.util.spec_from_file_location(
            f"slicer.{name}", path / "__init__.py", submodule_search_locations=[str(path)])
    else:
        spec = importlib.util.spec_from_file_location(f"slicer.{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    setattr(slicer, name, module)
    return module


def _util_stand_ins(h, ui_classes, scene):
    """slicer.util functions that need the application, as the harness provides them."""
    import slicer

    def loadUI(path):
        return load_ui(path, ui_classes)

    def childWidgetVariables(widget):
        from PySide6.QtWidgets import QWidget

        ui = types.SimpleNamespace()
        for child in widget.findChildren(QWidget):
            name = child.property("objectName")
            if name:
                setattr(ui, name, child)
        return ui

    def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kw):
        h.dialogs.append(("error", str(text) + ("\n" + kw["detailedText"]
                                                if kw.get("detailedText") else "")))

    def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kw):
        h.dialogs.append(("confirm", str(text)))
        return h.answer

    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as exc:  # noqa: BLE001  as Slicer's: shown, not raised
            import traceback

            h.dialogs.append(("error", f"{message or ''}\n{exc}"))
            h.last_traceback = traceback.format_exc()

    def pip_install(requirements):
        h.pip_installs.append(requirements)

    def loadVolume(path, properties=None, returnNode=False):
        logic = slicer.vtkSlicerVolumesLogic()
        logic.SetMRMLScene(scene)
        node = logic.AddArchetypeVolume(str(path), Path(path).name.split(".")[0])
        logic.SetMRMLScene(None)
        if node is None:
            raise RuntimeError(f"could not load {path}")
        return node

    return dict(loadUI=loadUI, childWidgetVariables=childWidgetVariables,
                errorDisplay=errorDisplay, confirmOkCancelDisplay=confirmOkCancelDisplay,
                tryWithErrorDisplay=tryWithErrorDisplay, pip_install=pip_install,
                loadVolume=loadVolume,
                delayDisplay=lambda message, msec=None, **kw: h.dialogs.append(("delay", message)),
                infoDisplay=lambda text, *a, **kw: h.dialogs.append(("info", str(text))),
                warningDisplay=lambda text, *a, **kw: h.dialogs.append(("warning", str(text))),
                resetSliceViews=lambda: None,
                selectModule=lambda name: h.modules_selected.append(name),
                settingsValue=lambda key, default=None, converter=None: default,
                modulePath=lambda name: str(MODULE_PATH),
                mainWindow=lambda: None)


class _App:
    """slicer.app: what the module and Slicer's Python layer ask of the application."""

    def __init__(self, qapp):
        import tempfile

        self._qapp = qapp
        self.defaultScenePath = tempfile.gettempdir()
        self.connections = []  # (signal, slot) the module connected
        self.commandOptions = lambda: types.SimpleNamespace(testingEnabled=True)

    def connect(self, signal, slot):
        self.connections.append((signal, slot))

    def emit(self, signal):
        for s, slot in self.connections:
            if s == signal:
                slot()

    def processEvents(self, *args):
        self._qapp.processEvents()

    def translate(self, context, text):
        return text

    def moduleManager(self):
        return types.SimpleNamespace(connect=lambda *a: None, disconnect=lambda *a: None)

    def layoutManager(self):
        return None


@contextlib.contextmanager
def slicer_session():
    """A Harness with EPDSegmentation.py imported against Slicer's Python layer and its
    Widget set up on a fresh scene; everything put into sys.modules and slicer is taken out
    again on exit. Skips when ../shared/slicer-python, slicer-core or PySide6 is absent."""
    folder = slicer_python_dir()
    if folder is None:
        pytest.skip("Slicer's Python layer (../shared/slicer-python) not present")
    slicer = pytest.importorskip("slicer")
    pytest.importorskip("PySide6.QtUiTools")
    from PySide6.QtWidgets import QApplication

    sys.path.insert(0, str(REPO / "Testing" / "mrml"))
    from scene import Scene  # noqa: E402  (Testing/mrml/scene.py)

    qapp = QApplication.instance() or QApplication([])
    qt, ctk, mrml_widgets, ui_classes = _build_qt()
    mrml = Scene()
    mrml.add_views()
    h = Harness()
    h.mrml, h.scene, h.qt = mrml, mrml.scene, qt
    saved_modules = {k: sys.modules.get(k) for k in ("qt", "ctk", "EPDSegmentation")}
    util_overrides = _util_stand_ins(h, ui_classes, mrml.scene)
    saved_util = {k: getattr(slicer.util, k, None) for k in util_overrides}
    editor = types.SimpleNamespace(
        setSegmentationNode=lambda n: setattr(h.segment_editor, "segmentation", n),
        setSourceVolumeNode=lambda n: setattr(h.segment_editor, "source", n))
    # the Segment Editor module as the hand-off reaches it (a recorder: no editor here)
    modules = types.SimpleNamespace(segmenteditor=types.SimpleNamespace(
        widgetRepresentation=lambda: types.SimpleNamespace(
            self=lambda: types.SimpleNamespace(editor=editor))))
    added = dict(mrml_widgets, mrmlScene=mrml.scene, app=_App(qapp), modules=modules)
    saved_attrs = {k: getattr(slicer, k, None) for k in list(added) + list(SLICER_MODULES)
                   + ["selfTests"]}
    loaded = []
    try:
        sys.modules["qt"], sys.modules["ctk"] = qt, ctk
        for k, v in added.items():
            setattr(slicer, k, v)
        for k, v in util_overrides.items():
            setattr(slicer.util, k, v)
        for name in SLICER_MODULES:
            _load_submodule(slicer, name, folder)
            loaded.append(name)
        spec = importlib.util.spec_from_file_location("EPDSegmentation", MODULE_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["EPDSegmentation"] = module
        spec.loader.exec_module(module)
        h.module = module
        h.moduleInfo = types.SimpleNamespace(path=str(MODULE_PATH))
        h.scriptedModule = module.EPDSegmentation(h.moduleInfo)
        slicer.app.emit("startupCompleted()")
        parent = mrml_widgets["qMRMLWidget"]()
        parent.setLayout(qt.QVBoxLayout())
        parent.setMRMLScene(mrml.scene)
        h.widget = module.EPDSegmentationWidget(parent)
        h.widget.setup()
        h.panel = parent
        yield h
    finally:
        if h.widget is not None:
            h.widget.cleanup()
            for combo in h.panel.findChildren(mrml_widgets["qMRMLNodeComboBox"]):
                combo.detach()
        sys.path.remove(str(REPO / "Testing" / "mrml"))
        for k in [m for m in sys.modules if m.split(".")[0] == "slicer"
                  and m.split(".")[1:2] and m.split(".")[1] in SLICER_MODULES]:
            del sys.modules[k]
        for k, v in saved_modules.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for k, v in saved_util.items():
            if v is None:
                delattr(slicer.util, k)
            else:
                setattr(slicer.util, k, v)
        for k, v in saved_attrs.items():
            if v is None:
                if hasattr(slicer, k):
                    delattr(slicer, k)
            else:
                setattr(slicer, k, v)
        mrml.close()
