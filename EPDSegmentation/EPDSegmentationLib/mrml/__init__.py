"""The MRML layer: small functions on Slicer's MRML and VTK classes, the only part of the
library that imports slicer or vtk. They run inside Slicer and under the slicer-core wheel.
"""
