"""Probability volumes hold only the segmented slices (one slice of a long CT must not
allocate the whole CT five times) and sit where those slices are in RAS; export and DICOM
SEG arrays put them back on the CT's grid."""

from __future__ import annotations

import numpy as np
import slicer

from EPDSegmentationLib.mrml.dicom import result_arrays, slab_start
from EPDSegmentationLib.mrml.nodes import ijk_to_ras
from EPDSegmentationLib.mrml.workflow import segment_volume
from scene import add_ct, label_stack, predictor, soft_maps


def test_one_slice_gives_one_plane_in_place(mrml):
    labels = label_stack(6, 32)
    ct = add_ct(mrml.scene, labels)
    probs = soft_maps(labels)
    out = segment_volume(mrml.scene, ct, predictor(probs), slices=[4], soft_volumes=True)
    for c, vol in enumerate(out.probability_volumes, start=1):
        arr = slicer.util.arrayFromVolume(vol)
        assert arr.shape == (1, 32, 32)
        np.testing.assert_array_equal(arr[0], probs[c, 4])
        # voxel (0, 0, 0) of the plane is voxel (0, 0, 4) of the CT
        np.testing.assert_allclose(ijk_to_ras(vol) @ [0, 0, 0, 1],
                                   ijk_to_ras(ct) @ [0, 0, 4, 1], atol=1e-9)
        assert slab_start(ijk_to_ras(vol), arr.shape, ijk_to_ras(ct), labels.shape) == 4
    _, back = result_arrays(ct, out.segmentation, None, out.probability_volumes)
    assert back.shape == (6,) + labels.shape
    np.testing.assert_allclose(back[1:, 4], probs[1:, 4])
    assert not back[1:, :4].any() and not back[1:, 5].any()


def test_slab_start_rejects_other_grids():
    m = np.diag([0.8, 0.7, 2.5, 1.0])
    shifted = m.copy()
    shifted[2, 3] = 1.0                       # not a whole number of slices
    assert slab_start(shifted, (1, 4, 4), m, (6, 4, 4)) is None
    assert slab_start(m, (1, 4, 5), m, (6, 4, 4)) is None
    beyond = m.copy()
    beyond[2, 3] = 2.5 * 6
    assert slab_start(beyond, (1, 4, 4), m, (6, 4, 4)) is None


def test_building_the_outputs_reports_progress(mrml):
    labels = label_stack(3, 32)
    ct = add_ct(mrml.scene, labels)
    seen = []
    segment_volume(mrml.scene, ct, predictor(soft_maps(labels)), soft_segmentation=True,
                   soft_volumes=True, progress=lambda d, t, m: seen.append((d, t, m)))
    stages = [m for d, t, m in seen if m.startswith("creating the outputs")]
    assert stages == ["creating the outputs: " + s for s in (
        "tissue segmentation", "measures table", "fractional segmentation",
        "probability volumes")]
    assert all(d == t == 3 for d, t, m in seen if m in stages)
