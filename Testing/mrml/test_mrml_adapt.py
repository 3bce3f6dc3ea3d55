"""The panel's "Improve model from corrected slices" (mrml/adapt.py) on a real MRML scene with
a tiny real network: corrected slices are found against the stored original, the adapted
model is saved as a new file with its card and loads, the other slices are re-segmented."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
torch = pytest.importorskip("torch")

from scene import add_ct, label_stack, node_ids  # noqa: E402

from EPDSegmentationLib.core.adapt import AdaptSettings  # noqa: E402
from EPDSegmentationLib.core.inference import Cancelled  # noqa: E402
from EPDSegmentationLib.core.model_io import load_model  # noqa: E402
from EPDSegmentationLib.mrml.adapt import (corrected_slices, improve_from_corrections,  # noqa: E402
                                          original_node, snapshot_result, uncertainty_volume)
from EPDSegmentationLib.mrml.nodes import InputProblem, ijk_to_ras, slice_pixel_mm, volume_array  # noqa: E402
from EPDSegmentationLib.mrml.segmentation import (fill_tissue_segmentation,  # noqa: E402
                                                  labels_from_segmentation)
from EPDSegmentationLib.mrml.workflow import model_predictor, segment_volume  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (tiny network; thread barriers cost more than the work when loaded)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _segmented(mrml, tiny_model, k=4):
    model, card = tiny_model
    truth = label_stack(k, 48)
    ct = add_ct(mrml.scene, truth)
    predict = model_predictor(model, card, volume_array(ct), slice_pixel_mm(ijk_to_ras(ct)),
                              device="cpu")
    out = segment_volume(mrml.scene, ct, predict)
    snapshot_result(mrml.scene, out.segmentation, ct)
    return ct, out.segmentation, truth


def _correct(seg, ct, truth, slices):
    """The user fixes ``slices``: their labels become the truth's."""
    m = ijk_to_ras(ct)
    labels, _ = labels_from_segmentation(seg, (m, truth.shape))
    labels[slices] = truth[slices]
    fill_tissue_segmentation(seg, labels, m, reference_volume=ct)


def test_improve_from_corrected_slices(mrml, tiny_model, tmp_path):
    model, card = tiny_model
    ct, seg, truth = _segmented(mrml, tiny_model)
    _correct(seg, ct, truth, [1, 2])
    labels, slices = corrected_slices(mrml.scene, seg, ct)
    assert slices == [1, 2]
    progress = []
    out = improve_from_corrections(mrml.scene, ct, seg, model, card, "tiny", tmp_path / "site",
                                   settings=AdaptSettings(steps=3, batch_size=2),
                                   progress=lambda d, t, msg: progress.append((d, t)))
    assert out.slices == [1, 2] and out.resegmented == [0, 3]
    assert progress[-1] == (4, 4)
    loaded, read = load_model(tmp_path / "site.safetensors")
    assert read["training"]["data"]["cases"][0]["slices"] == [1, 2]
    assert read["adapted_from"] == "tiny"
    after, _ = labels_from_segmentation(seg, (ijk_to_ras(ct), truth.shape))
    np.testing.assert_array_equal(after[[1, 2]], truth[[1, 2]])   # corrections kept
    # the new result is the new original: nothing differs any more
    with pytest.raises(InputProblem, match="differs"):
        corrected_slices(mrml.scene, seg, ct)


def test_improve_refills_the_protocol_segmentation_and_table(mrml, tiny_model, tmp_path):
    """A run made with the HU protocol: after Improve its protocol segmentation is the
    protocol's labels of the new result (corrections included) and its table keeps the
    protocol columns."""
    from EPDSegmentationLib.core.indices import protocol_labels
    from EPDSegmentationLib.mrml.tables import table_rows

    model, card = tiny_model
    truth = label_stack(3, 48)
    ct = add_ct(mrml.scene, truth)
    predict = model_predictor(model, card, volume_array(ct), slice_pixel_mm(ijk_to_ras(ct)),
                              device="cpu")
    out = segment_volume(mrml.scene, ct, predict, protocol=True)
    snapshot_result(mrml.scene, out.segmentation, ct)
    _correct(out.segmentation, ct, truth, [1])
    improve_from_corrections(mrml.scene, ct, out.segmentation, model, card, "tiny",
                             tmp_path / "site", settings=AdaptSettings(steps=2, batch_size=2),
                             table_node=out.table, protocol=True)
    m = ijk_to_ras(ct)
    labels, _ = labels_from_segmentation(out.segmentation, (m, truth.shape))
    np.testing.assert_array_equal(labels[1], truth[1])
    got, _ = labels_from_segmentation(out.protocol_segmentation, (m, truth.shape))
    np.testing.assert_array_equal(got, protocol_labels(labels, volume_array(ct)))
    assert all("protocol_area_cm2" in r for r in table_rows(out.table))


def test_no_correction_or_cancel_changes_nothing(mrml, tiny_model, tmp_path):
    model, card = tiny_model
    ct, seg, truth = _segmented(mrml, tiny_model, 3)
    with pytest.raises(InputProblem, match="Segment Editor"):
        improve_from_corrections(mrml.scene, ct, seg, model, card, "tiny", tmp_path / "a")
    _correct(seg, ct, truth, [0])
    before = node_ids(mrml.scene)
    with pytest.raises(Cancelled):
        improve_from_corrections(mrml.scene, ct, seg, model, card, "tiny", tmp_path / "a",
                                 settings=AdaptSettings(steps=2), should_cancel=lambda: True)
    assert node_ids(mrml.scene) == before
    assert not list(tmp_path.iterdir())
    assert original_node(mrml.scene, seg) is not None


def test_uncertainty_overlay_and_suggestions(mrml):
    truth = label_stack(3, 32)
    ct = add_ct(mrml.scene, truth)
    p = np.zeros((6,) + truth.shape, np.float32)
    p[1] = 1.0
    p[1, 2], p[3, 2] = 0.5, 0.5
    node, top = uncertainty_volume(mrml.scene, ct, p, n_suggest=1)
    assert top == [2]
    assert slicer.util.arrayFromVolume(node)[2].max() == pytest.approx(np.log(2) / np.log(6), abs=1e-4)


def test_uncertainty_of_some_slices_only(mrml):
    """The panel's map: probabilities of the segmented slices only; the others are 0 and
    never suggested."""
    truth = label_stack(8, 32)
    ct = add_ct(mrml.scene, truth)
    p = np.zeros((6, 3) + truth.shape[1:], np.float32)
    p[1] = 1.0
    p[1, 1], p[4, 1] = 0.5, 0.5
    node, top = uncertainty_volume(mrml.scene, ct, p, n_suggest=2, slices=[2, 5, 6])
    assert top[0] == 5 and set(top) <= {2, 5, 6}
    u = slicer.util.arrayFromVolume(node)
    assert u[5].max() > 0.3 and u[[2, 6]].max() < 1e-3          # certain slices: ~0
    assert not np.delete(u, [2, 5, 6], axis=0).any()             # not computed: exactly 0
    with pytest.raises(InputProblem, match="grid"):
        uncertainty_volume(mrml.scene, ct, p, slices=[2, 5])


def test_resegment_only_the_given_slices(mrml, tiny_model, tmp_path):
    model, card = tiny_model
    ct, seg, truth = _segmented(mrml, tiny_model, 5)
    _correct(seg, ct, truth, [1])
    out = improve_from_corrections(mrml.scene, ct, seg, model, card, "tiny", tmp_path / "s",
                                   settings=AdaptSettings(steps=1, batch_size=2),
                                   resegment_slices=[0, 1, 2])
    assert out.slices == [1] and out.resegmented == [0, 2]


def test_measures_after_improve_keep_the_protocol_columns(mrml):
    """After Improve the table is filled again as Apply filled it: with the panel's HU
    protocol on, a corrected slice's protocol areas are its corrected labels' pixels within
    the protocol's HU ranges, a re-segmented slice's those of its new probabilities."""
    from scene import SPACING, one_hot

    from EPDSegmentationLib.core.indices import protocol_measures
    from EPDSegmentationLib.mrml.adapt import measures_after

    truth = label_stack(3, 32)
    ct = add_ct(mrml.scene, truth)
    hu = volume_array(ct).astype(np.float32)
    probs = one_hot(np.roll(truth, 1, axis=2))[:, [0, 2]]          # slices 0 and 2 predicted
    rows = measures_after(hu, truth, probs, [0, 2], [1], ijk_to_ras(ct), 1.7, protocol=True)
    for k, p in ((0, probs[:, :1]), (1, one_hot(truth[1:2])), (2, probs[:, 1:])):
        want = protocol_measures(p, hu[k:k + 1], SPACING)
        got = {r["tissue"]: r for r in rows if r["slice"] == k}
        for key in ("MUS", "IMAT", "SAT", "VAT"):
            assert got[key]["protocol_area_cm2"] == pytest.approx(
                want[f"protocol_area_cm2_{key}"], rel=1e-9)
        assert got["MUS"]["protocol_index_cm2_m2"] == pytest.approx(
            got["MUS"]["protocol_area_cm2"] / 1.7 ** 2)
    assert "protocol_area_cm2" not in measures_after(hu, truth, probs, [0, 2], [1],
                                                     ijk_to_ras(ct))[0]
