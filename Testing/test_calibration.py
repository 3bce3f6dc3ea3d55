"""Class-prior calibration (core/calibration.py, ``training calibrate``): the weights a card
carries by pixel size, how they act on probabilities, that segment and evaluate apply them,
and that the fit moves soft areas towards the phantoms' exact ones within its bound."""

from __future__ import annotations

import json

import numpy as np
import pytest

from EPDSegmentationLib.core.calibration import (apply_weights, calibrate, check_calibration,
                                                 class_weights)
from EPDSegmentationLib.core.classes import NUM_CLASSES
from EPDSegmentationLib.core.errors import ModelError
from training.__main__ import main


def _cal(pixels=(1.0, 4.0), rows=None):
    rows = rows or [[1, 0.5, 1, 1, 2, 1], [1, 2, 1, 1, 0.5, 1]]
    return {"pixel_mm": list(pixels), "class_weights": [list(r) for r in rows]}


def test_weights_are_interpolated_in_log_between_pixel_sizes_and_held_outside():
    card = {"calibration": _cal()}
    assert class_weights({}, (1.0, 1.0)) is None
    assert np.allclose(class_weights(card, (1.0, 1.0)), [1, 0.5, 1, 1, 2, 1])
    assert np.allclose(class_weights(card, (0.5, 0.5)), [1, 0.5, 1, 1, 2, 1])   # held
    assert np.allclose(class_weights(card, (9.0, 9.0)), [1, 2, 1, 1, 0.5, 1])
    mid = class_weights(card, (2.0, 2.0))        # half-way in log pixel: log weights averaged
    assert np.allclose(mid, [1, 1, 1, 1, 1, 1], atol=1e-6)
    assert np.allclose(class_weights(card, (1.0, 4.0)), mid, atol=1e-6)   # geometric mean


def test_apply_keeps_a_distribution_and_moves_mass_where_the_network_hesitates():
    import torch

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(NUM_CLASSES), size=(2, 3, 4)).transpose(0, 3, 1, 2)
    p = p.astype(np.float32)                                       # (n, C, h, w)
    w = np.array([1, 0.5, 1, 1, 2, 1], np.float32)
    q = apply_weights(p, w)
    assert np.allclose(q.sum(1), 1.0, atol=1e-6) and q.min() >= 0
    assert q[:, 1].sum() < p[:, 1].sum() and q[:, 4].sum() > p[:, 4].sum()
    t = apply_weights(torch.from_numpy(p), w)
    assert isinstance(t, torch.Tensor) and np.allclose(t.numpy(), q, atol=1e-6)
    sure = np.zeros((1, NUM_CLASSES, 1, 1), np.float32)
    sure[0, 1] = 1.0                                               # certain: stays
    assert np.array_equal(apply_weights(sure, w), sure)
    assert calibrate(p, {}, (1.0, 1.0)) is p


def _two_tissues(width=8, sure=False):
    """(1, C, 6, width) probabilities: left half muscle at 0.6 (MSC 0.4), right half other
    tissue at 0.7 (MUS 0.3); with sure, the left half muscle at 1.0."""
    p = np.zeros((1, NUM_CLASSES, 6, width), np.float32)
    h = width // 2
    p[0, 1, :, :h], p[0, 5, :, :h] = (1.0, 0.0) if sure else (0.6, 0.4)
    p[0, 1, :, h:], p[0, 5, :, h:] = 0.3, 0.7
    return p


def test_edge_cells_weigh_only_the_cells_near_the_networks_own_class_edges():
    """With edge_cells R only the cells within R of a change of the most likely class are
    reweighted (the muscle a weight of 1/4 would otherwise take inside the left half stays
    muscle); numpy and torch agree; the result is a distribution; calibrate and parameters
    follow the card."""
    import torch

    from EPDSegmentationLib.core.calibration import edge_mask, parameters

    p = _two_tissues()
    w = np.array([1, 0.25, 1, 1, 1, 4], np.float32)
    every, edge1, edge2 = apply_weights(p, w), apply_weights(p, w, 1), apply_weights(p, w, 2)
    assert every[0, 1, :, :4].max() < 0.5                   # weights everywhere: all flipped
    cols1 = np.flatnonzero(edge_mask(p, 1)[0, 0, 0])
    assert list(cols1) == [3, 4] and list(np.flatnonzero(edge_mask(p, 2)[0, 0, 0])) == [2, 3, 4, 5]
    assert np.array_equal(edge1[..., [0, 1, 2, 5, 6, 7]], p[..., [0, 1, 2, 5, 6, 7]])
    assert np.allclose(edge1[..., [3, 4]], every[..., [3, 4]])
    assert np.array_equal(edge2[..., [0, 1, 6, 7]], p[..., [0, 1, 6, 7]])
    assert np.allclose(edge1.sum(1), 1.0, atol=1e-6)
    t = apply_weights(torch.from_numpy(p), w, 1)
    assert isinstance(t, torch.Tensor) and np.allclose(t.numpy(), edge1, atol=1e-6)
    assert not edge_mask(_two_tissues(sure=True)[:, :, :, :4], 1).any()   # one class: none
    card = {"calibration": {"pixel_mm": [1.0], "class_weights": [w.tolist()], "edge_cells": 1,
                            "command": "c"}}
    assert np.allclose(calibrate(p, card, (1.0, 1.0)), edge1)
    assert parameters(card) == {"pixel_mm": [1.0], "class_weights": [w.tolist()],
                                "edge_cells": 1}
    assert check_calibration(card["calibration"], NUM_CLASSES) is None


@pytest.mark.parametrize("cal, words", [
    ({"pixel_mm": [2.0, 1.0], "class_weights": [[1] * 6, [1] * 6]}, "ascending"),
    ({"pixel_mm": [1.0], "class_weights": [[1] * 5]}, "rows of 6"),
    ({"pixel_mm": [1.0], "class_weights": [[1, 0, 1, 1, 1, 1]]}, "positive"),
    ({"pixel_mm": [1.0, 2.0], "class_weights": [[1] * 6]}, "a row per pixel size"),
    ({"pixel_mm": [1.0], "class_weights": [[1] * 6], "edge_cells": 0}, "edge_cells"),
    ({"pixel_mm": [1.0], "class_weights": [[1] * 6], "edge_cells": 4}, "edge_cells"),
    ({"pixel_mm": [1.0], "class_weights": [[1] * 6], "edge_cells": True}, "edge_cells"),
    ({"pixel_mm": [1.0], "class_weights": [[1] * 6], "edge_cells": 1.0}, "edge_cells"),
    ("x", "an object"),
])
def test_a_bad_calibration_is_refused_by_the_card_check(cal, words, tiny_model_path):
    from EPDSegmentationLib.core.model_card import validate_card
    from EPDSegmentationLib.core.model_io import load_model

    assert words in check_calibration(cal, NUM_CLASSES)
    card = dict(load_model(str(tiny_model_path) + ".safetensors")[1], calibration=cal)
    with pytest.raises(ModelError, match=words):
        validate_card(card)


def test_segment_and_evaluate_apply_the_cards_calibration(tiny_model_path):
    """predict_volume with a calibrated card gives the uncalibrated probabilities reweighted
    (on the network's grid, so to the restoring's tolerance); evaluate's soft areas move the
    same way."""
    from EPDSegmentationLib.core.inference import predict_volume
    from EPDSegmentationLib.core.model_io import load_model
    from training.evaluate import evaluate
    from training.phantom import subject_slices
    from training.data import SliceRecord

    model, card = load_model(str(tiny_model_path) + ".safetensors")
    s = subject_slices(3, n_slices=2, size=64)
    hu = np.stack([x.hu for x in s])
    px = (s[0].pixel_mm, s[0].pixel_mm)
    w = [1.0, 0.5, 1.0, 1.0, 2.0, 1.0]
    cal = dict(card, calibration={"pixel_mm": [1.0], "class_weights": [w]})
    a = predict_volume(hu, px, model, card, device="cpu").probabilities
    b = predict_volume(hu, px, model, cal, device="cpu").probabilities
    assert np.allclose(b.sum(0), 1.0, atol=1e-5)
    assert b[1].sum() < a[1].sum() and b[4].sum() > a[4].sum()
    expect = apply_weights(a.transpose(1, 0, 2, 3), np.array(w, np.float32)).transpose(1, 0, 2, 3)
    assert np.abs(b - expect).max() < 0.05          # restored after, not before, the weights
    records = [SliceRecord(x.hu, x.labels, px, "s3", f"slice {i}") for i, x in enumerate(s)]
    ea = evaluate(model, card, records, device="cpu")["areas"]["soft_cm2"]
    eb = evaluate(model, cal, records, device="cpu")["areas"]["soft_cm2"]
    assert eb[:, 1].sum() < ea[:, 1].sum() and eb[:, 4].sum() > ea[:, 4].sum()


def test_shrink_keeps_a_weight_the_areas_do_not_identify_near_1():
    """A class whose pixels are all sure (its area does not move with its weight) runs to
    the bound in the plain fit and stays near 1 with shrink; a class whose pixels are
    shared still moves its area towards the truth; shrink outside [0, 1) is refused."""
    from training.calibrate import BOUND, calibrated_areas, fit_weights

    p = np.zeros((1, NUM_CLASSES, 4, 4))
    p[0, 0, :2] = 1.0                      # background, sure
    p[0, 1, 2] = 1.0                       # MUS, sure: 4 cm2 whatever its weight
    p[0, 4, 3], p[0, 5, 3] = 0.5, 0.5      # VAT and MSC share a row
    probs = [(p, 1.0)]
    true = np.array([8.0, 4.4, 0.0, 0.0, 3.0, 1.0])
    plain, shrunk = fit_weights(probs, true), fit_weights(probs, true, shrink=0.3)
    assert plain[1] == pytest.approx(BOUND) and 1.05 < shrunk[1] < 1.3
    assert plain[2] == plain[3] == shrunk[2] == shrunk[3] == 1.0     # no area, no evidence
    for w in (plain, shrunk):
        assert w[4] > 1.0 > w[5]
        assert abs(calibrated_areas(probs, w)[4] - 3.0) < 0.5 < abs(2.0 - 3.0)
    with pytest.raises(ValueError, match="shrink"):
        fit_weights(probs, true, shrink=1.0)


def test_the_fit_with_edge_cells_moves_only_the_areas_at_the_edges():
    """fit_weights with edge_cells fits the weights as the card will apply them: the areas
    come closer to the truth through the edge cells alone, and the areas it reports are
    those calibrated_areas gives with the same edge_cells."""
    from training.calibrate import calibrated_areas, fit_weights

    p = _two_tissues(width=16)
    probs = [(p, 1.0)]
    true = p.sum((0, 2, 3), dtype=np.float64).copy()
    true[1], true[5] = true[1] - 6.0, true[5] + 6.0          # less muscle than the network
    w = fit_weights(probs, true, bound=4.0, edge_cells=1)
    assert w[1] < 1.0 < w[5]
    before = abs(calibrated_areas(probs, np.ones(NUM_CLASSES), 1)[1] - true[1])
    assert abs(calibrated_areas(probs, w, 1)[1] - true[1]) < before
    moved = np.abs(apply_weights(p, w, 1) - p).max(axis=(0, 1, 2))
    assert np.flatnonzero(moved > 0).tolist() == [7, 8]       # the edge cells alone


def test_calibrate_fits_within_its_bound_and_writes_a_model_folder(tiny_model_path, tmp_path):
    from EPDSegmentationLib.cli.cohort import model_version
    from EPDSegmentationLib.core.model_io import load_model
    from training.calibrate import BOUND

    out = tmp_path / "cal"
    argv = ["calibrate", "--model", str(tiny_model_path) + ".safetensors", "--output",
            str(out), "--pixel-mm", "3", "6", "--phantom-subjects", "1", "--phantom-slices",
            "2", "--quiet"]
    assert main(argv) == 0
    model, card = load_model(out / "model.safetensors")
    cal = card["calibration"]
    assert cal["pixel_mm"] == [3.0, 6.0] and "calibrate" in cal["command"]
    w = np.array(cal["class_weights"])
    assert w.shape == (2, NUM_CLASSES) and np.all(w[:, 0] == 1.0)
    assert np.all(w >= 1 / BOUND - 1e-9) and np.all(w <= BOUND + 1e-9)
    for px, fit in cal["fit"].items():                     # closer to the exact areas
        before = sum(abs(v) for k, v in fit["area_error_cm2_before"].items() if k != "BG")
        after = sum(abs(v) for k, v in fit["area_error_cm2_after"].items() if k != "BG")
        assert after < before, (px, before, after)
    assert card["metrics"] == {} and "evaluation" not in card
    tiny = str(tiny_model_path) + ".safetensors"
    assert model_version(out / "model.safetensors", False) == model_version(tiny, False)
    assert model_version(out / "model.safetensors") != model_version(tiny)   # other numbers
    assert model_version(tiny) == model_version(tiny, False)
    assert main(argv) == 2                                  # no silent overwrite
    assert main(argv + ["--overwrite"]) == 0
    assert "edge_cells" not in load_model(out / "model.safetensors")[1]["calibration"]
    assert main(argv + ["--overwrite", "--edge-cells", "1"]) == 0
    edge = load_model(out / "model.safetensors")[1]["calibration"]
    assert edge["edge_cells"] == 1 and "class edges" in edge["fitted_on"]
    assert "--edge-cells 1" in edge["command"]
    assert main(argv + ["--overwrite", "--edge-cells", "4"]) == 2
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", "m", "--output", "o", "--pixel-mm"])


def test_several_shrink_strengths_are_chosen_on_other_subjects(tiny_model_path, tmp_path):
    """With several --shrink values each pixel size keeps the one with the smallest tissue
    area error on the --select-seed subjects, and the card says which and why; a select
    seed equal to the fit's is refused."""
    from EPDSegmentationLib.core.model_io import load_model

    argv = ["calibrate", "--model", str(tiny_model_path) + ".safetensors", "--output",
            str(tmp_path / "cal"), "--pixel-mm", "4", "--phantom-subjects", "1",
            "--phantom-slices", "1", "--shrink", "0", "0.2", "--quiet"]
    assert main(argv) == 0
    fit = load_model(tmp_path / "cal" / "model.safetensors")[1]["calibration"]["fit"]["4.0"]
    sel = fit["selection"]
    errors = sel["tissue_abs_error_cm2"]
    assert sel["select_seed"] == 13 and set(errors) == {"bound 2 shrink 0", "bound 2 shrink 0.2"}
    assert f"bound 2 shrink {fit['shrink']:g}" == min(errors, key=errors.get)
    assert main(argv[:-1] + ["--select-seed", "11", "--overwrite", "--quiet"]) == 2
    # several bounds are chosen the same way, together with the strengths
    argv = argv[:-1] + ["--bound", "1.5", "8", "--overwrite", "--quiet"]
    assert main(argv) == 0
    fit = load_model(tmp_path / "cal" / "model.safetensors")[1]["calibration"]["fit"]["4.0"]
    errors = fit["selection"]["tissue_abs_error_cm2"]
    assert len(errors) == 4 and f"bound {fit['bound']:g} shrink {fit['shrink']:g}" == \
        min(errors, key=errors.get)
    assert np.all(np.abs(np.log(list(fit["weights"].values()))) <= np.log(fit["bound"]) + 1e-9)


def test_bound_limits_the_weights_and_is_recorded(tiny_model_path, tmp_path):
    """--bound B keeps every weight within 1/B .. B and the card records B; the untrained
    model's areas are far off, so its weights run to whichever bound is given (a wider one
    gives weights beyond the default's); B <= 1 is refused."""
    from EPDSegmentationLib.core.model_io import load_model
    from training.calibrate import BOUND

    def weights(bound, name):
        argv = ["calibrate", "--model", str(tiny_model_path) + ".safetensors", "--output",
                str(tmp_path / name), "--pixel-mm", "4", "--phantom-subjects", "1",
                "--phantom-slices", "1", "--bound", str(bound), "--quiet"]
        assert main(argv) == 0
        cal = load_model(tmp_path / name / "model.safetensors")[1]["calibration"]
        assert cal["fit"]["4.0"]["bound"] == bound
        return np.array(cal["class_weights"][0])

    plain, wide = weights(BOUND, "plain"), weights(8.0, "wide")
    assert np.all(plain >= 1 / BOUND - 1e-9) and np.all(plain <= BOUND + 1e-9)
    assert np.all(wide >= 1 / 8.0 - 1e-9) and np.all(wide <= 8.0 + 1e-9)
    on_bound = np.isclose(np.abs(np.log(plain)), np.log(BOUND))
    assert on_bound.any()                                   # the default bound binds here
    assert np.all(np.abs(np.log(wide[on_bound])) > np.log(BOUND) + 1e-6)
    assert main(["calibrate", "--model", str(tiny_model_path) + ".safetensors", "--output",
                 str(tmp_path / "no"), "--pixel-mm", "4", "--bound", "1", "--quiet"]) == 2


def test_interpolation_drops_a_calibration(tiny_model_path, tmp_path):
    """Mixed weights are other weights: a calibration fitted for A does not hold for them."""
    from EPDSegmentationLib.core.model_io import load_model

    cal = tmp_path / "cal"
    assert main(["calibrate", "--model", str(tiny_model_path) + ".safetensors", "--output",
                 str(cal), "--pixel-mm", "4", "--phantom-subjects", "1", "--phantom-slices",
                 "1", "--quiet"]) == 0
    assert main(["interpolate", "--model", str(cal / "model.safetensors"), "--with",
                 str(tiny_model_path) + ".safetensors", "--weight", "0.5", "--output",
                 str(tmp_path / "mix")]) == 0
    assert "calibration" not in load_model(tmp_path / "mix" / "model.safetensors")[1]
    assert json.loads((cal / "model.json").read_text())["calibration"]["pixel_mm"] == [4.0]


def test_dicom_seg_and_the_scene_name_the_class_weights():
    """A calibrated model is another model: the DICOM SEG's algorithm parameters and the
    summary kept on the Slicer segmentation carry its class weights (not the fit report);
    highdicom's own parser reads the parameters back (no ',' or '=' inside a value)."""
    from EPDSegmentationLib.io.dicom_seg import algorithm_identification
    from EPDSegmentationLib.mrml.dicom import model_summary

    cal = {"pixel_mm": [1.0, 3.0], "class_weights": [[1, 0.5, 1, 1, 2, 1], [1, 0.5, 1, 0.97, 2, 1]],
           "fit": {"x": 1}, "command": "python -m training calibrate ..."}
    card = {"name": "M", "factor": 2, "pixel_mm": [1.73, 1.73], "calibration": cal}
    params = algorithm_identification(card).parameters          # highdicom splits on , and =
    assert params["calibration_pixel_mm"] == "1.0 3.0"
    assert [[float(v) for v in row.split()] for row in
            params["calibration_class_weights"].split(";")] == cal["class_weights"]
    assert params["pixel_mm"] == "1.73 1.73" and params["factor"] == "2"
    assert model_summary(card)["calibration"] == {"pixel_mm": [1.0, 3.0],
                                                  "class_weights": cal["class_weights"]}
    plain = {"name": "M", "factor": 2}
    assert not any("calibration" in k for k in algorithm_identification(plain).parameters)
    assert "calibration" not in model_summary(plain)
