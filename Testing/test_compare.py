"""``python -m training compare``: model cards' evaluations side by side."""

from __future__ import annotations

import json

from training.__main__ import main


def _card(mus_dice, bias_mus, psoas_l5=None, simulated=True):
    levels = {"L4": {"psoas": {"voxels": 10, "muscle_share": 0.9},
                     "paraspinal": {"voxels": 10, "muscle_share": 1.0},
                     "vat_behind_back_cm2": 2.5}}
    if psoas_l5 is not None:
        levels["L5"] = {"psoas": {"voxels": 10, "muscle_share": psoas_l5}}
    ev = {"mirror": True,
          "phantom_held_out": {"full_resolution_dice": {"MUS": mus_dice, "SAT": 0.97}},
          "phantom_area_bias": {"pixel_mm": 3.0,
                                "error_cm2": {"MUS": bias_mus, "IMAT": 1.0, "SAT": -1.0}},
          "real_ct": {"results": {"MUS+IMAT vs m.nii.gz": {"dice": 0.8, "soft_area_cm2": 140.0,
                                                           "mask_area_cm2": 105.9}}},
          "real_ct_levels": {"shares": levels}}
    if simulated:
        ev["real_ct_simulated"] = {"metal": {"results": {"SAT vs s.nii.gz": {"dice": 0.89}}},
                                   "reference": "text, not a simulation"}
    return {"format": "epd-segmentation-model", "evaluation": ev}


def test_cards_side_by_side_with_missing_numbers_as_dashes(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_card(0.942, 1.62, simulated=False)))
    b.write_text(json.dumps(_card(0.930, 2.13, psoas_l5=0.439)))
    (tmp_path / "b.safetensors").write_bytes(b"")           # a card found beside its weights
    out = tmp_path / "cmp.md"
    assert main(["compare", str(a), str(tmp_path / "b.safetensors"), "--output", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
    assert lines["held-out phantoms (mid-L3) Dice MUS"].endswith("| 0.942 | 0.930 |")
    assert lines["phantom area bias at 3 mm MUS + IMAT, cm2/slice"].endswith("| +2.62 | +3.13 |")
    assert lines["real CT levels: psoas L5 called muscle"].endswith("| - | 0.439 |")
    assert lines["real CT MUS+IMAT vs m.nii.gz: soft area, cm2/slice (mask's)"].endswith(
        "| 140.0 (105.9) | 140.0 (105.9) |")
    assert lines["simulated metal: SAT vs s.nii.gz: Dice"].endswith("| - | 0.890 |")
    assert "held-out phantoms (torso) Dice MUS" not in lines    # in neither card: no row
    assert not any("reference" in k for k in lines)
    # no silent overwrite; a card without an evaluation, or no card at all, is refused
    assert main(["compare", str(a), "--output", str(out)]) == 2
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"format": "epd-segmentation-model"}))
    assert main(["compare", str(bare)]) == 2
    assert "no evaluation" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "none.json")]) == 2
