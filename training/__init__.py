"""Headless training and evaluation of the EPD body-composition network.

Imports the EPD, model, windowing and metrics code from EPDSegmentationLib, the same code the
Slicer module runs.
"""
