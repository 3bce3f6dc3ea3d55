"""The phantom's anatomy options, defined once (training/phantom/options.py) for train,
evaluate, calibrate, area-bias and bundle: the same flags everywhere, passed on between
tools as given, checked alike, and reaching the phantoms each tool draws."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from training.phantom.options import (ANATOMY_OPTIONS, add_anatomy_arguments, anatomy_argv,
                                      anatomy_kwargs, checked_anatomy, describe_anatomy)


def _parse(argv):
    p = argparse.ArgumentParser()
    add_anatomy_arguments(p)
    return p.parse_args(argv)


def test_flags_round_trip_and_lumbar_runs_get_only_what_they_take():
    args = _parse(["--flank-sat", "0.5", "--psoas-apart", "1", "--kidney-rise", "20"])
    kw = anatomy_kwargs(args)
    assert list(kw) == [name for name, *_ in ANATOMY_OPTIONS] and kw["psoas_apart"] == 1.0
    assert anatomy_kwargs(_parse(anatomy_argv(args))) == kw          # passed on as given
    assert anatomy_argv(args, torso=False) == ["--flank-sat", "0.5"]  # lumbar: flank only
    assert anatomy_argv(_parse([])) == [] and describe_anatomy(_parse([])) == ""
    assert describe_anatomy(args) == "kidney_rise 20, flank_sat 0.5, psoas_apart 1"


def test_checks_name_the_flag():
    assert checked_anatomy({"flank_sat": 0.5, "psoas_apart": 0.0}, torso=False) == \
        {"flank_sat": 0.5}
    with pytest.raises(ValueError, match="--psoas-apart is a share in 0..1"):
        checked_anatomy({"psoas_apart": 1.5}, torso=True)
    with pytest.raises(ValueError, match="--kidney-contact needs the torso anatomy"):
        checked_anatomy({"kidney_contact": 0.5}, torso=False)
    assert checked_anatomy({"kidney_rise": 20.0}, torso=True) == {"kidney_rise": 20.0}


def test_area_bias_and_calibrate_draw_the_options(tmp_path, tiny_model_path):
    """--psoas-apart reaches the phantoms area-bias and calibrate draw: at L5 the exact areas
    differ from the default anatomy's (the psoas parted from the iliacus by fat), and
    calibrate's card names the option it was fitted with."""
    from EPDSegmentationLib.core.model_io import load_model
    from training.__main__ import main
    from training.areabias import area_bias

    model, card = load_model(str(tiny_model_path) + ".safetensors")
    draw = (model, card, [5], 1, ("L5", "L5"), 4.0, 400.0)
    plain = area_bias(*draw)["true_cm2"]
    apart = area_bias(*draw, psoas_apart=1.0)["true_cm2"]
    assert not np.allclose(plain, apart)
    with pytest.raises(ValueError, match="share"):
        area_bias(*draw, psoas_apart=2.0)
    argv = ["calibrate", "--model", str(tiny_model_path) + ".safetensors", "--output",
            str(tmp_path / "cal"), "--pixel-mm", "4", "--phantom-subjects", "1",
            "--phantom-slices", "1", "--phantom-levels", "L5", "L5", "--psoas-apart", "1",
            "--quiet"]
    assert main(argv) == 0
    cal = load_model(tmp_path / "cal" / "model.safetensors")[1]["calibration"]
    assert "psoas_apart 1" in cal["fitted_on"]
