"""Slices reach the network in its training orientation (anterior up, the patient's right on
the left) whatever order the file stores them in (core/orientation.py, predict_volume's
ijk_to_ras)."""

from __future__ import annotations

import numpy as np
import pytest

from EPDSegmentationLib.core.inference import predict_volume
from EPDSegmentationLib.core.model_io import load_model
from EPDSegmentationLib.core.orientation import network_flips
from EPDSegmentationLib.core.volume import ijk_to_ras_matrix

#: IJK-to-RAS directions: an axial DICOM series as usually stored (I -> left, J -> posterior),
#: and a NIfTI in RAS+ order (I -> right, J -> anterior), as TotalSegmentator writes them
DICOM_AXIAL = np.diag([-1.0, -1.0, 1.0])
NIFTI_RAS = np.eye(3)


def test_flips_per_storage_order():
    assert network_flips(ijk_to_ras_matrix((0.8, 0.8, 3.0), (0, 0, 0), DICOM_AXIAL))[:2] == (False, False)
    assert network_flips(ijk_to_ras_matrix((0.8, 0.8, 3.0), (0, 0, 0), NIFTI_RAS))[:2] == (True, True)
    rows_only = network_flips(ijk_to_ras_matrix((1, 1, 1), (0, 0, 0), np.diag([-1.0, 1.0, 1.0])))
    assert rows_only[:2] == (True, False) and "rows" in rows_only[2][0]
    # a sagittal stack (I -> anterior, J -> inferior): used as stored, with a note
    sag = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)
    flip_r, flip_c, notes = network_flips(ijk_to_ras_matrix((1, 1, 1), (0, 0, 0), sag))
    assert (flip_r, flip_c) == (False, False) and "as stored" in notes[0]


@pytest.fixture(scope="module")
def saved_model(tiny_model_path):
    return load_model(tiny_model_path)


def test_a_ras_volume_gets_the_prediction_of_its_radiological_view(saved_model):
    """The same anatomy stored two ways gets the same (correspondingly flipped) result: the
    RAS-ordered copy is predicted as its flipped, DICOM-ordered view is, and not as the
    network would see it upside down."""
    model, card = saved_model
    rng = np.random.default_rng(3)
    dicom = rng.normal(-100, 300, (2, 40, 52)).astype(np.float32)
    dicom[:, 4:20, 6:30] = 40.0  # asymmetric: the network's output is not flip-invariant
    nifti = np.ascontiguousarray(dicom[:, ::-1, ::-1])
    ref = predict_volume(dicom, (0.8, 0.8), model, card, device="cpu",
                         ijk_to_ras=ijk_to_ras_matrix((0.8, 0.8, 3.0), (0, 0, 0), DICOM_AXIAL))
    got = predict_volume(nifti, (0.8, 0.8), model, card, device="cpu",
                         ijk_to_ras=ijk_to_ras_matrix((0.8, 0.8, 3.0), (0, 0, 0), NIFTI_RAS))
    assert any("flipped" in n for n in got.notes)
    assert np.allclose(got.probabilities[:, :, ::-1, ::-1], ref.probabilities, atol=1e-5)
    as_stored = predict_volume(nifti, (0.8, 0.8), model, card, device="cpu")
    assert not np.allclose(as_stored.probabilities[:, :, ::-1, ::-1], ref.probabilities,
                           atol=1e-3)
