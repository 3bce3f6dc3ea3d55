"""Render the module's panel for docs/panel.png from the real .ui, through the module's own
Widget run against Slicer's Python layer (Testing/slicer_harness.py), in one consistent
state: the sample CT loaded and slices 7-8 segmented with the bundled model (height
172 cm, HU protocol on), Model details collapsed, "Learn from corrections" open, the EPD preview section
open with the result as its source. Also draws the module icon. Needs ../shared/slicer-python,
slicer-core, PySide6 and torch.

    PYTHONPATH=$PWD/EPDSegmentation:$PWD:$PWD/Testing \
        .venv/bin/python Testing/tools/render_panel.py            # docs/panel.png
    ... Testing/tools/render_panel.py --icon                      # and the module icon
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO = Path(__file__).resolve().parents[2]
ICON_PATH = REPO / "EPDSegmentation" / "Resources" / "Icons" / "EPDSegmentation.png"
PANEL_PNG = REPO / "docs" / "panel.png"
#: The state docs/panel.png shows.
SLICES = (7, 8)


def render(out: Path = PANEL_PNG, width: int = 440) -> Path:
    """Set the panel up as a user would (see the module docstring) and save it as PNG."""
    sys.path.insert(0, str(REPO / "Testing"))
    from slicer_harness import slicer_session

    with slicer_session() as h:
        ui = h.widget.ui
        ui.loadSampleButton.click()
        ui.sliceModeComboBox.currentIndex = ui.sliceModeComboBox.findText("Slice range")
        ui.firstSliceSpinBox.value, ui.lastSliceSpinBox.value = SLICES
        ui.softSegmentationCheckBox.checked = True
        ui.heightSpinBox.value = 172          # the indices (SMI ...) in the measures table
        ui.protocolCheckBox.checked = True    # the HU-protocol areas beside the soft ones
        ui.applyButton.click()
        if not ui.statusLabel.text.startswith("Done"):
            raise RuntimeError(f"the run did not finish: {ui.statusLabel.text}")
        ui.previewSourceSelector.setCurrentNode(h.widget._parameterNode.resultSegmentation)
        ui.previewCollapsibleButton.collapsed = False
        ui.exportCollapsibleButton.collapsed = False
        h.widget._parameterNode.exportFolder = Path.home() / "EPDSegmentation"
        panel = h.panel
        panel.resize(width, 10)
        panel.resize(width, panel.sizeHint.height())
        h.qt.QApplication.processEvents()
        out.parent.mkdir(parents=True, exist_ok=True)
        if not panel.grab().save(str(out)):
            raise OSError(f"could not write {out}")
    return out


def draw_icon(out: Path = ICON_PATH, size: int = 128) -> Path:
    """The module icon: EPD soft labels of the built-in label map at 1/8, tissue colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from EPDSegmentationLib.core.classes import color_table
    from EPDSegmentationLib.core.epd import epd_labels
    from EPDSegmentationLib.core.example import example_labels

    labels = example_labels((512, 512))[96:416, 40:472]
    soft = epd_labels(labels, 6, 8)
    rgb = np.einsum("chw,cd->hwd", soft, color_table())
    alpha = 1.0 - soft[0]
    fig = plt.figure(figsize=(1, 1), dpi=size)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(np.dstack([rgb, alpha]), interpolation="nearest", aspect="auto")
    ax.axis("off")
    fig.savefig(out, dpi=size, transparent=True)
    plt.close(fig)
    return out



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PANEL_PNG)
    parser.add_argument("--icon", action="store_true", help="also draw the module icon")
    args = parser.parse_args(argv)
    print(render(args.out))
    if args.icon:
        print(draw_icon())
    return 0


if __name__ == "__main__":
    sys.exit(main())
