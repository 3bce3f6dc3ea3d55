"""The command line and the Slicer module write .seg.nrrd files each other can read.

The CLI writes with io.write_seg_nrrd (pynrrd), the module through Slicer's storage node
(mrml.segmentation.save_segmentation); fractional segments must come back as fractional
labelmaps with the probabilities within one step of the -108..108 encoding (1/216)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer")


from EPDSegmentationLib.io import read_seg_nrrd, write_seg_nrrd  # noqa: E402
from EPDSegmentationLib.mrml.segmentation import (fill_fractional_segmentation,  # noqa: E402
                                                  fill_tissue_segmentation,
                                                  fractional_probabilities, labels_from_segmentation,
                                                  load_segmentation, save_segmentation)
from EPDSegmentationLib.core.volume import ijk_to_ras_matrix  # noqa: E402

STEP = 1 / 216 + 1e-6


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    p = rng.random((6, 3, 20, 24)).astype(np.float32)
    p /= p.sum(0)
    return p, p.argmax(0).astype(np.uint8), ijk_to_ras_matrix((0.8, 0.7, 2.5), (-10, 20, 30))


def test_cli_files_load_in_the_module(mrml, data, tmp_path):  # noqa: F811
    p, labels, m = data
    write_seg_nrrd(tmp_path / "soft.seg.nrrd", p, m, fractional=True)
    write_seg_nrrd(tmp_path / "hard.seg.nrrd", labels, m)
    node = load_segmentation(mrml.scene, tmp_path / "soft.seg.nrrd")
    probs, matrix, k0 = fractional_probabilities(node)
    assert k0 == 0 and np.allclose(matrix, m)
    np.testing.assert_allclose(probs[1:], p[1:], atol=STEP)
    hard = load_segmentation(mrml.scene, tmp_path / "hard.seg.nrrd")
    back, matrix = labels_from_segmentation(hard)
    np.testing.assert_array_equal(back, labels)


def test_module_files_read_without_slicer(mrml, data, tmp_path):  # noqa: F811
    p, labels, m = data
    soft = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    fill_fractional_segmentation(soft, p, m)
    save_segmentation(soft, tmp_path / "soft.seg.nrrd")
    vol = read_seg_nrrd(tmp_path / "soft.seg.nrrd")
    assert vol.meta["representation"] == "Fractional labelmap"
    np.testing.assert_allclose(vol.meta["fractions"][1:], p[1:], atol=STEP)
    hard = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    fill_tissue_segmentation(hard, labels, m)
    save_segmentation(hard, tmp_path / "hard.seg.nrrd")
    np.testing.assert_array_equal(read_seg_nrrd(tmp_path / "hard.seg.nrrd").array, labels)
    assert np.allclose(read_seg_nrrd(tmp_path / "hard.seg.nrrd").ijk_to_ras, m)
