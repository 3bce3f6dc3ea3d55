"""EPDSegmentationLib: the core of EPD Segmentation (EPD, model, inference, metrics, I/O).

Pure Python, NumPy and (where needed) torch: no Qt and no Slicer imports, so the Slicer
module, the command line and the training package all run the same code.
"""

__version__ = "0.1.0"
