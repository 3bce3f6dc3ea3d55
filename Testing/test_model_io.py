"""Weights + model card: round trip, atomic writes, and clear errors for files that are not ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from EPDSegmentationLib.core.classes import KEYS
from EPDSegmentationLib.core.model import ModelConfig, build_model
from EPDSegmentationLib.core.model_card import (FORMAT, ModelFileError, make_card, model_paths,
                                               read_card, validate_card)
from EPDSegmentationLib.core.model_io import load_model, save_model
from EPDSegmentationLib.core.windowing import DEFAULT_WINDOWS


def small_card(model, **over):
    kw = dict(windows=DEFAULT_WINDOWS, factor=2, label_mode="epd", image_mode="average",
              pixel_mm=(1.6, 1.6), input_size=(32, 32),
              training={"data": {"source": "phantom"}, "command": "python -m training train",
                        "seed": 0},
              metrics={"val": {"Dice": 0.5}})
    kw.update(over)
    return make_card(model.config.to_dict(), **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(width=4)).eval()


@pytest.fixture()
def saved(tmp_path, model):
    save_model(tmp_path / "net", model, small_card(model))
    return tmp_path / "net"


def test_round_trip_gives_the_same_network_and_card(saved, model):
    weights, card_path = model_paths(saved)
    assert weights.is_file() and card_path.is_file()
    loaded, card = load_model(weights)
    assert card == small_card(model)
    assert [c["key"] for c in card["classes"]] == list(KEYS)
    x = torch.rand(2, 3, 24, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # any of the three spellings finds the pair
    assert load_model(card_path)[1] == load_model(str(saved))[1]
    assert not loaded.training


def test_no_temporary_files_are_left_and_nothing_is_overwritten(saved, model):
    assert sorted(p.name for p in saved.parent.iterdir()) == ["net.json", "net.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    for p in model_paths(saved):  # shared models must be readable as the umask allows
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(FileExistsError, match="net.safetensors exists"):
        save_model(saved, model, small_card(model))
    other = build_model(ModelConfig(width=4))
    save_model(saved, other, small_card(other), overwrite=True)
    loaded, _ = load_model(saved)
    assert torch.equal(loaded.head.weight, other.head.weight)


def test_card_must_be_the_models_architecture(tmp_path, model):
    wider = build_model(ModelConfig(width=8))
    with pytest.raises(ModelFileError, match="not the model's"):
        save_model(tmp_path / "x", model, small_card(wider))
    assert list(tmp_path.iterdir()) == []


def test_a_safetensors_file_that_is_not_ours(tmp_path, saved):
    other = tmp_path / "other"
    save_file({"w": torch.zeros(3)}, str(other) + ".safetensors")
    (tmp_path / "other.json").write_text(model_paths(saved)[1].read_text())
    with pytest.raises(ModelFileError, match="not one of our models"):
        load_model(other)


def test_corrupt_and_truncated_weights(saved):
    weights, _ = model_paths(saved)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_model(saved)
    weights.write_bytes(b"this is not a model at all")
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_model(saved)


def test_card_that_does_not_match_the_weights(saved):
    _, card_path = model_paths(saved)
    card = json.loads(card_path.read_text())
    card["architecture"]["width"] = 8
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelFileError, match="does not match the one stored with the weights"):
        load_model(saved)


def test_missing_card_or_weights(saved):
    weights, card_path = model_paths(saved)
    card_path.unlink()
    with pytest.raises(ModelFileError, match="model card not found"):
        load_model(weights)
    weights.unlink()
    with pytest.raises(ModelFileError, match="weights file not found"):
        load_model(weights)


def test_invalid_json_card(saved):
    _, card_path = model_paths(saved)
    card_path.write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        read_card(card_path)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(format="something-else"), "not an EPD Segmentation model card"),
    (lambda c: c.update(format_version=99), "newer than this software reads"),
    (lambda c: c.pop("windows"), "missing field"),
    (lambda c: c["classes"].reverse(), "do not match this software's classes"),
    (lambda c: c.update(factor=3), "factor must be one of"),
    (lambda c: c.update(label_mode="bilinear"), "label_mode"),
    (lambda c: c.update(image_mode="nearest"), "image_mode"),
    (lambda c: c.update(pixel_mm=[0.8]), "pixel_mm"),
    (lambda c: c.update(pixel_mm=[0.8, -1]), "pixel_mm"),
    (lambda c: c.update(input_size=[32, 32.5]), "input_size"),
    (lambda c: c["training"].pop("command"), "training lacks command"),
    (lambda c: c.update(windows=c["windows"][:2]), "2 windows but the network takes 3"),
    (lambda c: c["windows"][0].__setitem__(1, 5000), "lo < hi"),
    (lambda c: c["architecture"].update(width="wide"), "architecture"),
])
def test_card_validation_names_the_problem(model, change, message):
    card = json.loads(json.dumps(small_card(model)))
    change(card)
    with pytest.raises(ModelFileError, match=message):
        validate_card(card, "my.json")


def test_card_tools_import_without_torch():
    code = ("import sys, EPDSegmentationLib.core.model_card, EPDSegmentationLib.core.metrics, "
            "EPDSegmentationLib.core.inference; print('torch' in sys.modules); "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_format_marker_is_in_the_weights(saved):
    from safetensors import safe_open

    with safe_open(str(model_paths(saved)[0]), framework="pt") as f:
        assert f.metadata()["format"] == FORMAT


def test_a_card_whose_factor_is_not_the_weights_is_refused(saved):
    """save_model stores the factor with the weights: a card saying 4 beside factor-2
    weights would put every area at the wrong scale."""
    from safetensors import safe_open

    weights, card_path = model_paths(saved)
    with safe_open(str(weights), framework="pt") as f:
        assert f.metadata()["factor"] == "2"
    card = json.loads(card_path.read_text())
    card["factor"] = 4
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelFileError, match="card says factor 4.*saved for factor 2"):
        load_model(saved)


def test_weights_saved_before_the_factor_was_stored_load_on_the_cards_word(saved):
    from safetensors import safe_open

    weights, _ = model_paths(saved)
    with safe_open(str(weights), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["factor"]
    save_file(tensors, str(weights), metadata=meta)
    assert load_model(saved)[1]["factor"] == 2


def test_model_file_error_texts(tmp_path, saved):
    """--model x.pt is not a path to guess a .safetensors from; an empty weights file says
    so; and every model error is one of ours."""
    from EPDSegmentationLib.core.errors import EPDError, ModelError

    pt = tmp_path / "x.pt"
    pt.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ModelFileError) as err:
        load_model(pt)
    assert "x.pt.safetensors" not in str(err.value) and "pickled" in str(err.value)
    assert isinstance(err.value, ModelError) and isinstance(err.value, EPDError)
    weights, _ = model_paths(saved)
    weights.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty \\(0 bytes\\)"):
        load_model(saved)


def test_checkpoint_errors_say_what_is_wrong_and_never_suggest_unsafe_loading(tmp_path):
    from training.checkpoint import load_checkpoint

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty \\(0 bytes\\)"):
        load_checkpoint(empty)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 4)
    with pytest.raises(ValueError, match="not a readable training checkpoint") as err:
        load_checkpoint(garbage)
    assert "weights_only" not in str(err.value) and "()" not in str(err.value)


def test_the_same_weights_and_card_give_the_same_file_byte_for_byte(tmp_path, model):
    # safetensors orders its metadata as a hash map does, differently from one save to the
    # next; save_model sorts it, so a re-bundled model can be checked by its checksum
    from safetensors import safe_open

    files = []
    for i in range(6):
        save_model(tmp_path / f"net{i}", model, small_card(model))
        files.append((tmp_path / f"net{i}.safetensors").read_bytes())
    assert all(f == files[0] for f in files[1:])
    n = int.from_bytes(files[0][:8], "little")
    assert (8 + n) % 8 == 0
    header = json.loads(files[0][8:8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    with safe_open(str(tmp_path / "net0.safetensors"), framework="pt") as f:
        assert f.metadata()["factor"] == "2"
        for k, v in model.state_dict().items():
            assert torch.equal(f.get_tensor(k), v)
    loaded, _ = load_model(tmp_path / "net3.safetensors")
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
