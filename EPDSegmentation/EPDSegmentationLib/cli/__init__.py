"""The ``epdseg`` command line (``main``), its ``segment`` pipeline and the EPD ``demo``.

Built on the core and io/; no Slicer imports.
"""
