"""The workflow with a real network: a tiny random-weight model saved by model_io.save_model,
loaded back, run through inference.predict_volume on the CPU in chunks of slices."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
torch = pytest.importorskip("torch")

from scene import add_ct, label_stack, node_ids  # noqa: E402

from EPDSegmentationLib.core.classes import TISSUES  # noqa: E402
from EPDSegmentationLib.core.inference import Cancelled  # noqa: E402
from EPDSegmentationLib.mrml.nodes import ijk_to_ras, slice_pixel_mm, volume_array  # noqa: E402
from EPDSegmentationLib.mrml.segmentation import fractional_probabilities  # noqa: E402
from EPDSegmentationLib.mrml.tables import table_rows  # noqa: E402
from EPDSegmentationLib.mrml.workflow import (describe_device, describe_model,  # noqa: E402
                                              model_predictor, segment_volume)


def test_network_output_becomes_segments_soft_labels_and_table(mrml, tiny_model):
    model, card = tiny_model
    scene = mrml.scene
    ct = add_ct(scene, label_stack(4, 48))
    hu = volume_array(ct)
    predict = model_predictor(model, card, hu, slice_pixel_mm(ijk_to_ras(ct)), device="cpu",
                              batch_size=2)
    progress = []
    out = segment_volume(scene, ct, predict, slices=[0, 1, 3], chunk_slices=2,
                         soft_segmentation=True,
                         progress=lambda d, t, m: progress.append(d))
    assert out.device == "cpu" and any("device cpu" in n for n in out.notes)
    assert progress[-1] == 3
    assert out.segmentation.GetSegmentation().GetNumberOfSegments() == 5
    probs, _, k0 = fractional_probabilities(out.soft_segmentation)
    assert k0 == 0 and probs.shape[1] == 4
    # the network's soft maps sum to one: the soft areas add up to the whole slice
    rows = [r for r in table_rows(out.table) if r["slice"] == "1"]
    pixel_cm2 = np.prod(ct.GetSpacing()[:2]) / 100
    tissue_area = sum(r["area_cm2"] for r in rows)
    background = probs[0, 1].sum() * pixel_cm2
    assert tissue_area + background == pytest.approx(48 * 48 * pixel_cm2, rel=2e-2)
    assert {r["tissue"] for r in rows} == {c.key for c in TISSUES}


def test_cancel_between_network_batches(mrml, tiny_model):
    model, card = tiny_model
    scene = mrml.scene
    ct = add_ct(scene, label_stack(3, 32))
    before = node_ids(scene)
    predict = model_predictor(model, card, volume_array(ct), slice_pixel_mm(ijk_to_ras(ct)),
                              device="cpu", batch_size=1)
    seen = []

    def cancel():
        return len(seen) >= 1

    with pytest.raises(Cancelled):
        segment_volume(scene, ct, predict, progress=lambda d, t, m: seen.append(d) if d else None,
                       should_cancel=cancel)
    assert node_ids(scene) == before


def test_panel_descriptions(tiny_model):
    _, card = tiny_model
    text = describe_model(card)
    assert "MUS, IMAT, SAT, VAT, MSC" in text and "1/2" in text and "phantom subjects 3" in text
    device, reason = describe_device("cpu")
    assert device == "cpu" and "CPU" in reason
    device, reason = describe_device("auto")
    assert device in ("cpu", "cuda", "mps") and reason
    if not torch.cuda.is_available():
        device, reason = describe_device("cuda")
        assert device == "" and "cuda" in reason.lower()


def test_panel_summary_of_the_bundled_card():
    """The bundled card's Dice sit under ``evaluation``: the summary shows them per class
    (held-out phantoms and the real-CT agreement), and the data recipe in a few words."""
    from EPDSegmentationLib.core.model_card import read_card
    from EPDSegmentationLib.core.resources import bundled_model_path

    card = read_card(bundled_model_path())
    lines = describe_model(card).replace("\u00a0", " ").splitlines()   # no-break spaces
    data = card["training"]["data"]
    where = "-".join(data["levels"]) if data.get("levels") else "L3"
    assert any(line.startswith(f"Trained on: {data['subjects']} phantom subjects x "
                               f"{data['slices_per_subject']} slices ({where}), factor 2")
               for line in lines)
    phantom = card["evaluation"]["phantom_held_out"]
    want = ", ".join(f"{c.key} {phantom['full_resolution_dice'][c.key]:.2f}" for c in TISSUES)
    assert f"Dice, held-out phantoms ({phantom['slices']} slices): {want}" in lines
    real = [line for line in lines if line.startswith("Dice, real CT")]
    assert len(real) == 1 and "TotalSegmentator" in real[0]
    for name, r in card["evaluation"]["real_ct"]["results"].items():
        assert f"{name.split(' vs ')[0]} {r['dice']:.2f}" in real[0]
    assert max(len(line) for line in lines) < 100 and "{" not in "".join(lines)
    simulated = card["evaluation"].get("real_ct_simulated")
    screws = [line for line in lines if line.startswith("Dice, the same CT with spinal screws")]
    if simulated is None:
        assert not screws
    else:
        assert len(screws) == 1
        for name, r in simulated["metal"]["results"].items():
            assert f"{name.split(' vs ')[0]} {r['dice']:.2f}" in screws[0]
    mix = card["training"].get("interpolated")
    weights = [line for line in lines if line.startswith("Weights:")]
    if mix is None:
        assert not weights
    else:
        assert weights == [f"Weights: {mix['weight_a']:g} of this training mixed with "
                           f"{1 - mix['weight_a']:g} of another model"]
    mirror = card["evaluation"].get("mirror")
    measured = [line for line in lines if line.startswith("Measured ")]
    assert measured == ([] if mirror is None else
                        [f"Measured {'with' if mirror else 'without'} mirror averaging "
                         f"(segmentation uses it)"])
    bias = card["evaluation"].get("phantom_area_bias")
    area = [line for line in lines if line.startswith("Area error")]
    if bias is None:
        assert not area
    else:
        assert len(area) == 1 and f"MUS {bias['error_cm2']['MUS']:+.1f}" in area[0]
    plain = dict(card, training={k: v for k, v in card["training"].items()
                                 if k != "interpolated"})
    assert not any(line.startswith("Weights:") for line in describe_model(plain).splitlines())


def test_panel_summary_without_evaluation():
    """A card with only training metrics shows their validation Dice; with none it says so;
    a manifest recipe is named by its file."""
    card = {"classes": [{"key": "BG"}, {"key": "MUS"}, {"key": "SAT"}], "factor": 4,
            "label_mode": "nearest", "pixel_mm": [3.2, 3.2],
            "training": {"data": {"source": "manifest", "manifest": "/data/cases.csv",
                                  "manifest_sha256": "ab" * 32, "train_slices": 120}},
            "metrics": {"split": "val", "slices": 30, "full_resolution": {"per_class": {
                "BG": {"Dice": 0.99}, "MUS": {"Dice": 0.912}, "SAT": {"Dice": 0.95}}}}}
    lines = describe_model(card).replace("\u00a0", " ").splitlines()
    assert "Trained on: manifest cases.csv, 120 training slices, factor 4" in lines
    assert "Dice, validation set (30 slices): MUS 0.91, SAT 0.95" in lines
    card["metrics"] = {}
    assert describe_model(card).splitlines()[-1] == "Dice: not recorded in the model card"


def test_panel_summary_shows_the_real_ct_levels():
    """A card whose evaluation has per-level shares (bundle's real_ct_levels) shows a line
    for the psoas and one for the paraspinal muscles, levels in the card's order; a level
    without the muscle is left out; the VAT behind the back muscles where recorded."""
    card = {"classes": [{"key": "BG"}, {"key": "MUS"}], "factor": 2,
            "evaluation": {"phantom_held_out": {"slices": 4, "full_resolution_dice": {
                "MUS": 0.9}}, "real_ct_levels": {"shares": {
                    "T12": {"psoas": {"voxels": 0, "muscle_share": None},
                            "paraspinal": {"voxels": 9, "muscle_share": 0.917}},
                    "L5": {"psoas": {"voxels": 9, "muscle_share": 0.5},
                           "paraspinal": {"voxels": 9, "muscle_share": 1.0},
                           "vat_behind_back_cm2": 4.04}}}}}
    lines = describe_model(card).replace("\u00a0", " ").splitlines()
    assert "Real CT, psoas called muscle, by level: L5 0.50" in lines
    assert "Real CT, VAT behind back muscles (cm²): L5 4.0" in lines
    assert not any("screws" in line or "myosteatosis" in line or "Calibrated" in line
                   for line in lines)
    card["calibration"] = {"pixel_mm": [0.865, 3.0], "class_weights": [[1] * 2, [1] * 2]}
    lines = describe_model(card).replace("\u00a0", " ").splitlines()
    assert "Calibrated: class weights fitted on phantoms at 0.865, 3 mm pixels" in lines
    card["calibration"]["edge_cells"] = 1             # only near the network's class edges
    lines = describe_model(card).replace("\u00a0", " ").splitlines()
    assert ("Calibrated: class weights fitted on phantoms at 0.865, 3 mm pixels, at class "
            "edges") in lines
    assert not any(line.startswith("Upsampled") for line in lines)
    card["upsampling"] = {"method": "hu-guided", "sigma_hu": 30.0, "sigma_cells": 1.0,
                          "radius_cells": 1}
    lines = describe_model(card).replace("\u00a0", " ").splitlines()
    assert "Upsampled guided by the HU (sigma 30 HU)" in lines
    assert "Real CT, paraspinal called muscle, by level: T12 0.92, L5 1.00" in lines
    assert not any("below L5" in line for line in lines)
    # the slices past L5 (evaluate-real's "below L5"): a line of their own, not a level
    card["evaluation"]["real_ct_levels"]["shares"]["below L5"] = {
        "psoas": {"voxels": 90, "muscle_share": 0.074}, "paraspinal": {"voxels": 2,
                                                                       "muscle_share": 1.0}}
    lines = describe_model(card).replace("\u00a0", " ").splitlines()
    assert "Real CT, psoas called muscle, by level: L5 0.50" in lines
    assert "Real CT, paraspinal called muscle, by level: T12 0.92, L5 1.00" in lines
    assert "Real CT, below L5 (not trained there): iliopsoas called muscle 0.07" in lines


class _OutOfMemoryAbove1(torch.nn.Module):
    """The tiny model, failing like a full GPU whenever a batch holds more than one slice."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.batches = []

    def forward(self, x):
        self.batches.append(int(x.shape[0]))
        if x.shape[0] > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


def test_out_of_memory_fallback_is_kept_for_later_chunks(mrml, tiny_model):
    model, card = tiny_model
    scene = mrml.scene
    ct = add_ct(scene, label_stack(4, 32))
    flaky = _OutOfMemoryAbove1(model)
    predict = model_predictor(flaky, card, volume_array(ct), slice_pixel_mm(ijk_to_ras(ct)),
                              device="cpu", batch_size=2)
    out = segment_volume(scene, ct, predict, chunk_slices=2)
    assert out.segmentation.GetSegmentation().GetNumberOfSegments() == 5
    assert any("out of memory" in n and "batch size" in n for n in out.notes)
    # first chunk: 2 -> fails, retried at 1; second chunk starts at 1 straight away; each
    # batch runs twice, the second time mirrored (mirror averaging, the default)
    assert flaky.batches == [2] + [1, 1] * 4


def test_panel_summary_shows_the_simulated_real_ct_checks():
    """The card's real-CT Dice under drawn-in screws and fattier muscle each get a line after
    the plain real-CT line, in that order."""
    res = {"MUS+IMAT vs m.nii.gz": {"dice": 0.78, "slices": 3},
           "SAT vs s.nii.gz": {"dice": 0.9, "slices": 3}}
    card = {"classes": [{"key": "BG"}, {"key": "MUS"}], "factor": 2, "evaluation": {
        "real_ct": {"results": res, "reference": "TotalSegmentator tissue_types masks"},
        "real_ct_simulated": {
            "metal": {"results": {"MUS+IMAT vs m.nii.gz": {"dice": 0.75}}},
            "myosteatosis": {"results": {"MUS+IMAT vs m.nii.gz": {"dice": 0.768},
                                         "SAT vs s.nii.gz": {"dice": 0.877}}}}}}
    lines = describe_model(card).replace("\u00a0", " ").splitlines()
    i = lines.index("Dice, real CT vs TotalSegmentator masks (3 slices): MUS+IMAT 0.78, SAT 0.90")
    assert lines[i + 1] == "Dice, the same CT with spinal screws drawn in: MUS+IMAT 0.75"
    assert lines[i + 2] == ("Dice, the same CT with its muscle made fattier (myosteatosis): "
                            "MUS+IMAT 0.77, SAT 0.88")


def test_training_data_summary_names_levels_and_fine_tuning():
    from EPDSegmentationLib.mrml.workflow import describe_training_data

    card = {"factor": 2, "training": {"data": {
        "source": "phantom", "subjects": 60, "slices_per_subject": 6, "levels": ["T11", "L4"],
        "init": {"model": "Resources/Models/EPDBodyComp_f2.safetensors"}}}}
    assert describe_training_data(card) == ("60 phantom subjects x 6 slices (T11-L4), factor 2, "
                                            "fine-tuned from an earlier model")
    card["training"]["data"].update(levels=None, init=None)
    assert describe_training_data(card) == "60 phantom subjects x 6 slices (L3), factor 2"
