"""Adapting a model from corrected slices (core/adapt.py, epdseg adapt): the fine-tuning lowers
the loss on the corrected slices, the adapted model round-trips through its card, the
uncertainty ranking, and bad input gives a clear message with nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from EPDSegmentationLib.cli.main import main
from EPDSegmentationLib.core.adapt import (AdaptCase, AdaptError, AdaptSettings, adapt_model,
                                           adapted_card, changed_slices, check_case, entropy_map,
                                           save_adapted, slice_uncertainty, soft_targets,
                                           suggest_slices)
from EPDSegmentationLib.core.inference import Cancelled, prepare_slices
from EPDSegmentationLib.core.model import ModelConfig, build_model
from EPDSegmentationLib.core.model_card import ModelFileError, make_card, model_paths
from EPDSegmentationLib.core.model_io import load_model, save_model
from EPDSegmentationLib.core.resources import bundled_model_path
from EPDSegmentationLib.core.volume import Volume
from EPDSegmentationLib.core.windowing import DEFAULT_WINDOWS

PIXEL_MM = (1.0, 1.0)


def tiny_card(model):
    return make_card(model.config.to_dict(), windows=DEFAULT_WINDOWS, factor=2, label_mode="epd",
                     image_mode="average", pixel_mm=(2.0, 2.0), input_size=(48, 48),
                     training={"data": {"source": "test"}, "command": "test", "seed": 0})


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny networks gain nothing from more, and on a loaded machine the
    threads' barriers cost more than the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=4)).eval()
    return model, tiny_card(model)


def body_case(k: int = 5, n: int = 48):
    """A round body: SAT ring, muscle ring, VAT core; HU and labels (k, n, n)."""
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - n / 2, xx - n / 2)
    labels = np.zeros((n, n), np.uint8)
    labels[r < 20] = 3
    labels[r < 15] = 1
    labels[r < 10] = 4
    hu_of = np.array([-1000, 40, -60, -100, -90, 30], np.float32)
    rng = np.random.default_rng(0)
    hu = np.stack([hu_of[labels] + rng.normal(0, 10, labels.shape) for _ in range(k)])
    return hu.astype(np.float32), np.repeat(labels[None], k, axis=0)


def test_soft_targets_sit_on_the_inference_grid():
    hu, labels = body_case(2, 50)
    card = {"factor": 2, "pixel_mm": [1.5, 1.5], "label_mode": "epd", "windows": DEFAULT_WINDOWS,
            "image_mode": "average"}
    x, _ = prepare_slices(hu, (0.9, 0.9), card)
    t = soft_targets(labels, (0.9, 0.9), card)
    assert t.shape == (2, 6) + x.shape[-2:]
    np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-6)


def test_fine_tuning_lowers_the_loss_on_the_corrected_slices_and_keeps_the_base(tiny):
    model, card = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hu, labels = body_case()
    steps = []
    result = adapt_model(model, card, [AdaptCase(hu, labels, PIXEL_MM, [1, 3], "toy")],
                         AdaptSettings(steps=12, lr=3e-3, batch_size=2, replay_fraction=0.25),
                         progress=lambda s, n, loss: steps.append((s, n)))
    assert result.after["mae"] < result.before["mae"]
    assert result.after["dice"] < result.before["dice"]
    assert steps[-1] == (12, 12) and len(result.history) == 12
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any("replay" in n for n in result.notes)


def test_cancel_stops_before_a_step(tiny):
    model, card = tiny
    hu, labels = body_case(3)
    with pytest.raises(Cancelled):
        adapt_model(model, card, [AdaptCase(hu, labels, PIXEL_MM, [1])], AdaptSettings(steps=5),
                    should_cancel=lambda: True)


def test_adapted_model_round_trips_through_its_card(tiny, tmp_path):
    model, card = tiny
    hu, labels = body_case()
    case = AdaptCase(hu, labels, PIXEL_MM, [0, 2], "toy")
    settings = AdaptSettings(steps=2, batch_size=2)
    result = adapt_model(model, card, [case], settings)
    new_card = adapted_card(card, "base.safetensors", [case], settings, result, "epdseg adapt x")
    save_adapted(tmp_path / "site", result.model, new_card)
    loaded, read = load_model(tmp_path / "site.safetensors")
    assert read["adapted_from"] == "base.safetensors"
    assert read["training"]["data"]["cases"][0]["slices"] == [0, 2]
    assert read["training"]["data"]["base_model"]["path"] == "base.safetensors"
    assert read["training"]["adapt_settings"]["steps"] == 2
    assert read["training"]["command"] == "epdseg adapt x"
    assert read["factor"] == card["factor"] and read["windows"] == card["windows"]
    for k, v in result.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(FileExistsError):
        save_adapted(tmp_path / "site", result.model, new_card)


def test_calibrated_logits_give_the_calibrated_probabilities_edges_included():
    """softmax(logits + log w), near the edges only with edge_cells, is what
    calibration.calibrate gives the network's softmax: the fine-tuning sees what segment
    shows."""
    import torch

    from EPDSegmentationLib.core.adapt import _calibrated
    from EPDSegmentationLib.core.calibration import apply_weights

    logits = torch.randn(2, 6, 9, 12, generator=torch.Generator().manual_seed(0)) * 0.3
    logits[:, 1, :, :6] += 1.5           # muscle on the left, other tissue on the right:
    logits[:, 5, :, 6:] += 1.5           # one edge down the middle
    w = np.array([1.0, 0.25, 1.0, 1.0, 4.0, 2.0], np.float32)
    log_w = torch.from_numpy(np.log(w)).view(1, -1, 1, 1)
    p = torch.softmax(logits, 1)
    for edge in (None, 1, 2):
        got = torch.softmax(_calibrated(logits, {"log_w": log_w, "edge_cells": edge}), 1)
        assert torch.allclose(got, apply_weights(p, w, edge), atol=1e-5), edge
    assert not torch.allclose(torch.softmax(_calibrated(logits, {"log_w": log_w,
                                                                 "edge_cells": 1}), 1),
                              apply_weights(p, w), atol=1e-3)


def test_a_calibrated_model_is_fine_tuned_through_its_class_weights_and_keeps_them(tiny):
    """With class weights in the card the losses are those of the calibrated probabilities
    (what segment shows), the fine-tuning lowers them, and the adapted card keeps the
    weights (without them the same network would show other probabilities)."""
    from EPDSegmentationLib.core.calibration import class_weights
    from EPDSegmentationLib.core.inference import predict_volume

    model, card = tiny
    w = [1.0, 0.5, 1.0, 1.0, 2.0, 1.0]
    cal = dict(card, calibration={"pixel_mm": [1.0], "class_weights": [w]})
    hu, labels = body_case()
    case = AdaptCase(hu, labels, PIXEL_MM, [1, 3], "toy")
    settings = AdaptSettings(steps=12, lr=3e-3, batch_size=2, replay_fraction=0.25)
    plain = adapt_model(model, card, [case], settings)
    calibrated = adapt_model(model, cal, [case], settings)
    assert calibrated.before != plain.before         # measured on the weighted probabilities
    assert calibrated.after["mae"] < calibrated.before["mae"]
    new_card = adapted_card(cal, "base.safetensors", [case], settings, calibrated, "x")
    assert new_card["calibration"] == cal["calibration"]
    assert np.allclose(class_weights(new_card, PIXEL_MM), w)
    assert "calibration" not in adapted_card(card, "b", [case], settings, plain, "x")
    # with edge_cells the losses follow the weights near the edges only, as segment does
    edge = dict(card, calibration=dict(cal["calibration"], edge_cells=1))
    at_edges = adapt_model(model, edge, [case], settings)
    assert at_edges.before not in (plain.before, calibrated.before)
    up = {"method": "hu-guided", "sigma_hu": 30.0, "sigma_cells": 1.0, "radius_cells": 1}
    guided = adapted_card(dict(cal, upsampling=up), "b", [case], settings, calibrated, "x")
    assert guided["upsampling"] == up                # its maps reach the grid as the base's
    p = predict_volume(hu[:1], PIXEL_MM, calibrated.model, new_card, device="cpu").probabilities
    q = predict_volume(hu[:1], PIXEL_MM, calibrated.model, card, device="cpu").probabilities
    assert p[4].sum() > q[4].sum()                    # the weights act on the adapted model


def test_never_written_over_or_beside_the_bundled_model(tiny):
    model, card = tiny
    before = {p: p.stat().st_mtime_ns for p in model_paths(bundled_model_path())}
    with pytest.raises(ModelFileError, match="bundled"):
        save_adapted(bundled_model_path(), model, card, overwrite=True)
    with pytest.raises(ModelFileError, match="bundled"):
        save_adapted(bundled_model_path().with_name("other"), model, card)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert not bundled_model_path().with_name("other.safetensors").exists()


@pytest.mark.parametrize("change, message", [
    (lambda hu, lab, s: (hu, lab[:, :-1], s), "not on the image's grid"),
    (lambda hu, lab, s: (hu, np.where(np.arange(5)[:, None, None] == 2, 0, lab), [1, 2]),
     "hold no labels"),
    (lambda hu, lab, s: (hu, lab, []), "no corrected slices"),
    (lambda hu, lab, s: (hu, lab, [9]), "outside the volume"),
    (lambda hu, lab, s: (hu, lab + 5, s), "label values"),
])
def test_bad_corrections_are_named(change, message):
    hu, labels = body_case()
    hu, labels, slices = change(hu, labels, [1])
    with pytest.raises(AdaptError, match=message):
        check_case(AdaptCase(hu, labels, PIXEL_MM, slices))


def test_a_model_that_is_not_the_cards_architecture(tiny):
    _, card = tiny
    other = build_model(ModelConfig(width=8))
    hu, labels = body_case()
    with pytest.raises(AdaptError, match="architecture"):
        adapt_model(other, card, [AdaptCase(hu, labels, PIXEL_MM, [1])])


def test_changed_slices():
    a = np.zeros((4, 3, 3), np.uint8)
    b = a.copy()
    b[2, 1, 1] = 1
    assert changed_slices(a, b) == [2]
    with pytest.raises(AdaptError, match="grid"):
        changed_slices(a, b[:3])


def test_entropy_ranks_the_hesitant_slice_first():
    p = np.zeros((6, 4, 8, 8), np.float32)
    p[1] = 1.0                              # every slice sure: muscle
    p[:, 2] = 0.0
    p[1, 2], p[3, 2] = 0.5, 0.5             # slice 2: muscle or SAT
    p[:, 0, :2] = 1.0 / 6                   # slice 0: a little hesitation
    p[1, 0, :2] = 1.0 / 6
    e = entropy_map(p)
    assert e.shape == (4, 8, 8)
    assert e[1].max() == pytest.approx(0.0, abs=1e-5)
    assert e[0, 0, 0] == pytest.approx(1.0, abs=1e-5)
    scores = slice_uncertainty(p)
    assert list(np.argsort(-scores)[:2]) == [2, 0]
    assert suggest_slices(scores, 2, min_gap=2) == [2, 0]
    assert suggest_slices(scores, 2) == [2]          # the others are within 3 slices
    assert suggest_slices([0.9, 0.8, 0.1, 0.7], 2, min_gap=2) == [0, 3]


# ----------------------------------------------------------------------------- epdseg adapt


@pytest.fixture()
def files(tmp_path, tiny):
    from EPDSegmentationLib.io.images import write_volume

    model, card = tiny
    save_model(tmp_path / "base", model, card)
    hu, labels = body_case()
    m = np.diag([1.0, 1.0, 3.0, 1.0])
    write_volume(Volume(hu, m), tmp_path / "ct.nii.gz", dtype="int16")
    write_volume(Volume(labels, m), tmp_path / "labels.nii.gz")
    return tmp_path


def test_cli_adapts_and_the_new_model_loads(files, capsys):
    out = files / "site.safetensors"
    rc = main(["adapt", "--model", str(files / "base.safetensors"), "--image",
               str(files / "ct.nii.gz"), "--labels", str(files / "labels.nii.gz"),
               "--slices", "1,3", "--steps", "2", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    _, card = load_model(out)
    assert card["training"]["data"]["cases"][0]["slices"] == [1, 3]
    assert card["training"]["command"].startswith("epdseg adapt ")


def _cli_fails(files, capsys, *extra, model=None):
    out = files / "site.safetensors"
    rc = main(["adapt", "--model", str(model or files / "base.safetensors"), "--image",
               str(files / "ct.nii.gz"), "-o", str(out), "--steps", "1", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert not out.exists() and not out.with_suffix(".json").exists()
    return err


def test_cli_labels_on_another_grid(files, capsys):
    from EPDSegmentationLib.io.images import write_volume

    write_volume(Volume(np.ones((5, 40, 48), np.uint8)), files / "small.nii.gz")
    err = _cli_fails(files, capsys, "--labels", str(files / "small.nii.gz"))
    assert "grid" in err


def test_cli_slices_without_corrections(files, capsys):
    from EPDSegmentationLib.io.images import write_volume

    _, labels = body_case()
    labels[2] = 0
    write_volume(Volume(labels, np.diag([1.0, 1.0, 3.0, 1.0])), files / "partial.nii.gz")
    err = _cli_fails(files, capsys, "--labels", str(files / "partial.nii.gz"), "--slices", "1,2")
    assert "hold no labels" in err
    err = _cli_fails(files, capsys, "--labels", str(files / "labels.nii.gz"), "--original",
                     str(files / "labels.nii.gz"))
    assert "nothing was corrected" in err


def test_cli_unknown_segment_names(files, capsys):
    import nrrd

    from EPDSegmentationLib.io.seg_nrrd import write_seg_nrrd

    _, labels = body_case()
    path = files / "bad.seg.nrrd"
    write_seg_nrrd(path, labels, np.diag([1.0, 1.0, 3.0, 1.0]))
    data, header = nrrd.read(str(path))
    header["Segment0_Name"], header["Segment0_ID"] = "Liver", "Liver"
    nrrd.write(str(path), data, header)
    err = _cli_fails(files, capsys, "--labels", str(path))
    assert "'Liver' does not name a tissue class" in err


def test_cli_model_of_another_architecture(files, capsys, tiny):
    wider = build_model(ModelConfig(width=8))
    save_model(files / "wide", wider, tiny_card(wider))
    card_path = files / "wide.json"
    card_path.write_text((files / "base.json").read_text())   # card says width 4
    err = _cli_fails(files, capsys, "--labels", str(files / "labels.nii.gz"),
                     model=files / "wide.safetensors")
    assert "architecture" in err


def test_training_adapt_on_a_manifest_uses_the_labelled_slices(files):
    from EPDSegmentationLib.io.images import write_volume
    from training.__main__ import main as training_main

    _, labels = body_case()
    labels[[0, 2, 4]] = 0                       # corrections on slices 1 and 3 only
    write_volume(Volume(labels, np.diag([1.0, 1.0, 3.0, 1.0])), files / "fixed.nii.gz")
    (files / "m.csv").write_text("image,label,split\nct.nii.gz,fixed.nii.gz,train\n"
                                 "ct.nii.gz,labels.nii.gz,val\n")
    out = files / "site.safetensors"
    rc = training_main(["adapt", "--model", str(files / "base.safetensors"), "--manifest",
                        str(files / "m.csv"), "--split", "train", "--steps", "2",
                        "--output", str(out)])
    assert rc == 0
    _, card = load_model(out)
    assert [c["slices"] for c in card["training"]["data"]["cases"]] == [[1, 3]]


def test_cli_refuses_the_bundled_folder_before_any_work(files, capsys):
    target = bundled_model_path().with_name("site.safetensors")
    rc = main(["adapt", "--image", str(files / "ct.nii.gz"), "--labels",
               str(files / "labels.nii.gz"), "-o", str(target), "--overwrite"])
    assert rc == 2 and "bundled" in capsys.readouterr().err
    assert not target.exists()


def test_cli_suggests_slices_to_correct(files, capsys):
    rc = main(["adapt", "--model", str(files / "base.safetensors"), "--image",
               str(files / "ct.nii.gz"), "--suggest", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "most uncertain slices" in out
    assert not list(files.glob("*site*"))


# ----------------------------------------------------------------------------- the per-case CSV


def test_stream_uncertainty_is_the_rankings_measure():
    """core.stream's per-slab uncertainty (NumPy on the CPU, torch on GPUs; slice by slice)
    equals core.adapt's slice_uncertainty on the same probabilities."""
    from EPDSegmentationLib.core.stream import entropy_torch, mean_entropy_numpy

    rng = np.random.default_rng(1)
    p = rng.random((6, 4, 10, 12)).astype(np.float32) ** 4
    p[:, 1] = 0.0
    p[1, 1] = 1.0                                       # a certain slice
    p /= p.sum(0)
    cpu = np.array([mean_entropy_numpy(p[:, s]) for s in range(p.shape[1])])
    for got in (cpu, entropy_torch(torch.from_numpy(p))):
        np.testing.assert_allclose(got, slice_uncertainty(p), rtol=1e-5, atol=1e-7)
        assert got[1] == pytest.approx(0.0, abs=1e-5)
    # slices of more values than one dot product of the NumPy path takes, and a remainder
    big = rng.random((6, 2, 30, 37)).astype(np.float32) ** 4
    big /= big.sum(0)
    np.testing.assert_allclose([mean_entropy_numpy(big[:, s]) for s in range(2)],
                               slice_uncertainty(big), rtol=1e-6)


def test_segment_csv_has_each_slices_uncertainty_and_the_slices_to_correct(files, capsys):
    """epdseg segment's per-case CSV: each slice's uncertainty (the same value on each of its
    tissue rows, the mean in 'all' rows) equals slice_uncertainty of the model's own
    probabilities, and 'correct_first' ranks the slices suggest_slices picks from it."""
    import csv

    from EPDSegmentationLib.core.inference import predict_volume
    from EPDSegmentationLib.io import read_volume
    from EPDSegmentationLib.io.images import write_volume

    hu, labels = body_case(9)
    hu[4] = np.where(labels[4] == 1, -80.0, hu[4])    # a slice whose muscle looks like fat
    m = np.diag([1.0, 1.0, 3.0, 1.0])
    write_volume(Volume(hu, m), files / "ct9.nii.gz", dtype="int16")
    out = files / "out"
    rc = main(["segment", str(files / "ct9.nii.gz"), "-o", str(out), "--model",
               str(files / "base.safetensors")])
    assert rc == 0, capsys.readouterr().err
    with open(out / "ct9_bodycomp.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-2:] == ["uncertainty", "correct_first"]
    per_slice = {}
    for r in rows:
        if r["slice"] != "all":
            per_slice.setdefault(int(r["slice"]), set()).add((r["uncertainty"], r["correct_first"]))
    assert sorted(per_slice) == list(range(9))
    assert all(len(v) == 1 for v in per_slice.values())     # one value per slice
    scores = np.array([float(next(iter(per_slice[k]))[0]) for k in range(9)])
    model, card = load_model(files / "base.safetensors")
    ct = read_volume(files / "ct9.nii.gz")
    si, sj, _ = ct.spacing
    probs = predict_volume(ct.array, (sj, si), model, card, ijk_to_ras=ct.ijk_to_ras).probabilities
    np.testing.assert_allclose(scores, slice_uncertainty(probs), rtol=1e-4)
    assert np.all((scores >= 0) & (scores <= 1))
    ranks = {k: int(next(iter(v))[1]) for k, v in per_slice.items() if next(iter(v))[1]}
    want = suggest_slices(scores, 3)
    assert len(want) >= 2 and sorted(ranks, key=ranks.get) == want
    assert sorted(ranks.values()) == list(range(1, len(want) + 1))
    alls = [r for r in rows if r["slice"] == "all"]
    assert all(float(r["uncertainty"]) == pytest.approx(scores.mean(), rel=1e-5) and
               r["correct_first"] == "" for r in alls)


def test_zoom_and_rotation_move_image_and_targets_together(tiny):
    """The affine augmentation: identity at scale 1 and angle 0; otherwise the targets stay
    fractions (background outside) and follow the image (a 90 degree turn of a bar)."""
    from EPDSegmentationLib.core.adapt import _affine

    hu = torch.full((1, 32, 32), -1000.0)
    hu[0, 14:18, 4:28] = 40.0                           # a horizontal muscle bar
    target = torch.zeros(1, 6, 16, 16)
    target[0, 0] = 1.0
    target[0, 0, 7:9, 2:14], target[0, 1, 7:9, 2:14] = 0.0, 1.0
    same_hu, same_t, _ = _affine(hu, target, np.random.default_rng(0), 0.0, 0.0)
    torch.testing.assert_close(same_hu, hu, atol=1e-3, rtol=0)
    torch.testing.assert_close(same_t, target, atol=1e-5, rtol=0)

    class Turn:                                         # always +90 degrees, scale 1
        def uniform(self, lo, hi, n):
            return np.full(n, hi if hi == 90.0 else 1.0)

    turned_hu, turned_t, _ = _affine(hu, target, Turn(), 0.0, 90.0)
    assert turned_hu[0, 4:28, 14:18].mean() > 0 and turned_hu[0, 14:18, 4:10].mean() < -900
    torch.testing.assert_close(turned_t.sum(1), torch.ones(1, 16, 16), atol=1e-5, rtol=0)
    assert turned_t[0, 1, 2:14, 7:9].mean() > 0.9 and turned_t[0, 1, 7:9, 2:5].max() < 0.1
    result = adapt_model(*tiny, [AdaptCase(*body_case()[:2], PIXEL_MM, [1])],
                         AdaptSettings(steps=2, zoom=0.1, rotate=10.0, batch_size=2))
    assert len(result.history) == 2 and np.isfinite(result.history).all()


@pytest.mark.parametrize("train", ["decoder", "norm"])
def test_train_decoder_or_norm_leaves_the_other_weights(tiny, train):
    model, card = tiny
    hu, labels = body_case()
    result = adapt_model(model, card, [AdaptCase(hu, labels, PIXEL_MM, [1, 3])],
                         AdaptSettings(steps=2, lr=1e-2, batch_size=2, train=train))
    old, new = model.state_dict(), result.model.state_dict()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and any(k.startswith("head.") for k in changed)
    if train == "decoder":
        assert not any(k.startswith("encoder.") for k in changed)
    else:
        assert all(k.startswith("head.") or ".norm" in k or k.endswith((".1.weight", ".1.bias"))
                   for k in changed), sorted(changed)
    assert all(p.requires_grad for p in result.model.parameters())
    with pytest.raises(AdaptError, match="train must be one of"):
        AdaptSettings(train="encoder")
