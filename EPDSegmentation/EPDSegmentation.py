"""EPD Segmentation: a 3D Slicer scripted module for CT body composition.

A shell for now: the module registers itself; the panel, logic and test follow. All the work
lives in EPDSegmentationLib, which this folder carries.
"""

from __future__ import annotations

from slicer.ScriptedLoadableModule import ScriptedLoadableModule


class EPDSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "EPD Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["EPD Segmentation developers"]
        self.parent.helpText = (
            "CT body composition (skeletal muscle, intermuscular, subcutaneous and visceral fat) "
            "with networks trained on Edge-preserving Probabilistic Downsampling (EPD).")
        self.parent.acknowledgementText = (
            "EPD: Ali et al., Towards Efficient and Accurate CT Segmentation via "
            "Edge-Preserving Probabilistic Downsampling, arXiv:2404.03991.")
