"""The field of view (core/field.py): a slice whose content fills the image is padded with
air to the card's share before the network and cropped back after; the card's recipe gives
the share (training field)."""

from __future__ import annotations

import numpy as np
import pytest

from EPDSegmentationLib.core import field
from EPDSegmentationLib.core.inference import predict_volume
from EPDSegmentationLib.core.model_card import validate_card
from EPDSegmentationLib.core.model_io import load_model


def _card(share):
    return {"field": {"content_share": share}}


def test_no_share_no_padding():
    hu = np.zeros((2, 30, 40), np.float32)
    assert field.field_padding(hu, (1.0, 1.0), {}) == field.NO_PADDING
    assert field.pad_slab(hu, field.NO_PADDING) is hu


def test_a_full_slice_is_padded_to_a_square_of_the_share():
    hu = np.full((1, 30, 40), 40.0, np.float32)          # content in every row, 1 mm pixels
    (t, b), (l, r) = field.field_padding(hu, (1.0, 1.0), _card(0.5))
    # 30 / 0.5 = 60 mm, rounded up to 64 (QUANTUM_MM): a 64 x 64 field, centred
    assert field.QUANTUM_MM == 32.0
    assert (t + b, l + r) == (34, 24) and (t, l) == (17, 12)
    out = field.pad_slab(hu, ((t, b), (l, r)))
    assert out.shape == (1, 64, 64) and (out[0, :t] == field.AIR_HU).all()
    assert (out[0, t:t + 30, l:l + 40] == 40.0).all()


def test_the_field_is_square_in_mm_and_the_odd_pixel_goes_last():
    hu = np.full((1, 21, 10), 40.0, np.float32)          # 21 x 20 mm at 1 x 2 mm pixels
    (t, b), (l, r) = field.field_padding(hu, (1.0, 2.0), _card(0.7))
    # 21 / 0.7 = 30 mm, rounded up to 32: 32 rows of 1 mm and 16 columns of 2 mm
    assert (t, b) == (5, 6) and (l, r) == (3, 3)


def test_a_slice_in_the_range_is_left_alone():
    hu = np.full((2, 40, 40), field.AIR_HU, np.float32)
    hu[0, 10:30, 5:35] = 40.0                            # content over half the rows
    assert field.field_padding(hu, (0.8, 0.8), _card(0.62)) == field.NO_PADDING
    hu[1, 4:36, 5:35] = 40.0                             # the slab's union counts: 32 of 40
    assert field.field_padding(hu, (0.8, 0.8), _card(0.62)) != field.NO_PADDING


@pytest.mark.parametrize("bad", [0, 1.5, "0.6", True, None])
def test_a_bad_share_is_refused_by_the_card_check(tiny_model_path, bad):
    _, card = load_model(tiny_model_path)
    card = dict(card, field={"content_share": bad})
    with pytest.raises(ValueError, match="content_share"):
        validate_card(card)


def test_prediction_with_a_field_is_that_of_the_padded_slice_cropped(tiny_model_path):
    """predict_volume with the card's field gives, on the slice's own grid, what the model
    without it gives for the slice padded with air by hand, cropped back; the note says so."""
    model, card = load_model(tiny_model_path)
    rng = np.random.default_rng(0)
    hu = rng.normal(-100, 30, (2, 36, 44)).astype(np.float32)   # fat edge to edge
    hu[:, 8:28, 10:34] = rng.normal(40, 10, (2, 20, 24))
    fielded = dict(card, field={"content_share": 0.62})
    got = predict_volume(hu, (1.6, 1.6), model, fielded, device="cpu")
    assert got.probabilities.shape == (6, 2, 36, 44)
    assert any("padded with air" in n for n in got.notes)
    pad = field.field_padding(hu, (1.6, 1.6), fielded)
    (t, _), (l, _) = pad
    want = predict_volume(field.pad_slab(hu, pad), (1.6, 1.6), model, card, device="cpu")
    np.testing.assert_allclose(
        got.probabilities, want.probabilities[:, :, t:t + 36, l:l + 44], atol=1e-5)
    plain = predict_volume(hu, (1.6, 1.6), model, card, device="cpu")
    assert np.abs(plain.probabilities - got.probabilities).max() > 1e-3   # it does something
    assert not any("padded with air" in n for n in plain.notes)


def test_flipped_volumes_are_padded_in_the_networks_orientation(tiny_model_path):
    model, card = load_model(tiny_model_path)
    rng = np.random.default_rng(1)
    hu = rng.normal(-100, 30, (1, 30, 50)).astype(np.float32)
    hu[:, 2:20, 5:45] = 40.0                                    # off-centre content
    fielded = dict(card, field={"content_share": 0.5})
    got = predict_volume(hu, (1.6, 1.6), model, fielded, device="cpu")
    # rows stored posterior to anterior (a RAS volume): flipped in, padded, cropped, flipped out
    flipped = predict_volume(hu[:, ::-1].copy(), (1.6, 1.6), model, fielded, device="cpu",
                             ijk_to_ras=np.diag([1.6, 1.6, 1.0, 1.0]) @ np.diag([-1.0, 1.0, 1.0, 1.0]))
    np.testing.assert_allclose(flipped.probabilities[:, :, ::-1], got.probabilities, atol=1e-5)


def test_training_field_measures_the_cards_recipe(tiny_model_path, tmp_path):
    """training field: the share measured on the recipe's phantoms (here a 2-subject L3
    recipe) lands in the card, with the command; the weights are unchanged."""
    import json

    import torch

    from training.__main__ import main as training_main

    _, card = load_model(tiny_model_path)
    src = tmp_path / "src"
    src.mkdir()
    card = dict(card, training=dict(card["training"], command=(
        "python -m training train --phantom-subjects 2 --phantom-levels L3 L3 "
        "--output x"), augment={}))
    (src / "model.json").write_text(json.dumps(card))
    (src / "model.safetensors").write_bytes(
        tiny_model_path.with_suffix(".safetensors").read_bytes())
    training_main(["field", "--model", str(src / "model.safetensors"), "--output",
                   str(tmp_path / "out"), "--subjects", "2"])
    model, got = load_model(tmp_path / "out" / "model.safetensors")
    share = got["field"]["content_share"]
    assert 0.3 < share < 1.0 and "2 phantom slices" in got["field"]["measured_on"]
    assert got["field"]["command"].startswith("python -m training field")
    ref, _ = load_model(tiny_model_path)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_a_slices_result_does_not_depend_on_its_slab(tiny_model_path):
    """Each slice is padded by its own content: in a slab with slices padded differently
    (run in groups, progress counted over the slab), every slice gets what it gets alone."""
    model, card = load_model(tiny_model_path)
    fielded = dict(card, field={"content_share": 0.62})
    rng = np.random.default_rng(2)
    hu = np.full((3, 36, 30), field.AIR_HU, np.float32)
    hu[0] = rng.normal(-100, 30, (36, 30))                       # fills the rows: padded
    hu[1, 10:26, 4:26] = rng.normal(40, 10, (16, 22))            # under half: as it is
    hu[2, 6:30, 4:26] = rng.normal(40, 10, (24, 22))             # 24 of 36 rows: padded less
    pads = {field.field_padding(hu[i:i + 1], (1.6, 1.6), fielded) for i in range(3)}
    assert len(pads) == 3
    seen = []
    got = predict_volume(hu, (1.6, 1.6), model, fielded, device="cpu", batch_size=4,
                         progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (3, 3) and sorted(d for d, _ in seen) == [d for d, _ in seen]
    for i in range(3):
        alone = predict_volume(hu[i:i + 1], (1.6, 1.6), model, fielded, device="cpu")
        np.testing.assert_allclose(got.probabilities[:, i:i + 1], alone.probabilities,
                                   atol=1e-5)


def test_provenance_and_the_panel_name_the_field():
    """A model with a field is another model: the DICOM SEG's algorithm parameters, the
    summary kept on the Slicer segmentation and the panel's model details carry its share
    (not its command or report); a card without one names none."""
    from EPDSegmentationLib.io.dicom_seg import algorithm_identification
    from EPDSegmentationLib.mrml.dicom import model_summary
    from EPDSegmentationLib.mrml.workflow import describe_model

    spec = {"content_share": 0.795, "measured_on": "given", "command": "python -m training field"}
    card = {"name": "M", "factor": 2, "pixel_mm": [1.73, 1.73], "field": spec}
    assert algorithm_identification(card).parameters["field_content_share"] == "0.795"
    assert model_summary(card)["field"] == {"content_share": 0.795}
    assert "more than 0.795 of the rows padded with air" in describe_model(card)
    plain = {"name": "M", "factor": 2, "pixel_mm": [1.73, 1.73]}
    assert not any("field" in k for k in algorithm_identification(plain).parameters)
    assert "field" not in model_summary(plain) and "Field of view" not in describe_model(plain)
