"""Reading and writing clinical files: DICOM series, NIfTI, NRRD, Slicer .seg.nrrd, manifests.

Every volume comes back as a Volume (array (K, J, I), ijk_to_ras in RAS mm); readers convert
from DICOM's and ITK's LPS once. Bad input raises InputError naming the file and the
problem. Writers are atomic and never replace an existing file unless overwrite=True.
"""

from __future__ import annotations

from .dicom import list_series, read_dicom, write_dicom_series
from .errors import InputError
from .images import write_probabilities, write_volume
from .manifest import read_manifest, write_manifest
from .readers import read_labels, read_volume, same_grid
from .seg_nrrd import read_seg_nrrd, write_seg_nrrd

__all__ = ["InputError", "read_volume", "read_labels", "read_manifest", "write_manifest",
           "write_volume", "write_probabilities", "read_seg_nrrd", "write_seg_nrrd", "read_dicom",
           "write_dicom_series", "list_series", "same_grid"]
