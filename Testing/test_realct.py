"""evaluate-real: a model on a CT against binary masks from another source."""

from __future__ import annotations

import json

import numpy as np
import pytest

from EPDSegmentationLib.io import write_volume
from training.phantom import subject_slices
from training.phantom.dataset import stack
from training.__main__ import main
from training.realct import evaluate_masks, parse_mask


def test_perfect_and_disjoint_predictions():
    labels = np.zeros((2, 4, 4), np.uint8)
    labels[0, :2] = 1
    labels[0, 2, 0] = 2
    labels[1, :, :2] = 3
    probs = np.stack([(labels == c).astype(np.float32) for c in range(6)])
    muscle = (labels == 1) | (labels == 2)
    wrong = np.zeros_like(muscle)
    wrong[0, 3] = True
    r = evaluate_masks(probs, [("MUS+IMAT", [1, 2], muscle), ("SAT", [3], wrong)], 100.0)
    assert r["MUS+IMAT"]["dice"] == 1.0 and r["MUS+IMAT"]["slices"] == 1
    assert r["MUS+IMAT"]["mask_area_cm2"] == 9.0 == r["MUS+IMAT"]["soft_area_cm2"]
    assert r["SAT"]["dice"] == 0.0 and r["SAT"]["slices"] == 1


def test_parse_mask():
    assert parse_mask("MUS+IMAT=a.nii.gz")[0] == [1, 2]
    with pytest.raises(ValueError, match="KEY"):
        parse_mask("a.nii.gz")
    with pytest.raises(ValueError, match="unknown tissue class"):
        parse_mask("FAT=a.nii.gz")


def test_command_writes_table_json_and_figure(tiny_model_path, tmp_path, capsys):
    hu, labels, _ = stack(subject_slices(3, n_slices=2, size=80), gap_mm=5.0)
    write_volume(hu, tmp_path / "ct.nii.gz")
    write_volume(labels.with_array((labels.array == 3).astype(np.uint8)), tmp_path / "sat.nii.gz")
    out = tmp_path / "eval"
    args = ["evaluate-real", "--model", str(tiny_model_path) + ".safetensors", "--ct",
            str(tmp_path / "ct.nii.gz"), "--mask", f"SAT={tmp_path / 'sat.nii.gz'}",
            "--output", str(out)]
    assert main(args) == 0
    result = json.loads((out / "metrics.json").read_text())["results"]
    assert 0.0 <= result["SAT vs sat.nii.gz"]["dice"] <= 1.0
    assert (out / "overlays.png").stat().st_size > 0
    assert "SAT vs sat.nii.gz" in (out / "table.md").read_text()
    assert main(args) == 2  # results exist: kept unless --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_bundle_evaluates_and_writes_the_card(tiny_model_path, tmp_path):
    """bundle on a (tiny) run: held-out phantom evaluation in the card, real CT skipped when
    the folder lacks the sample."""
    import shutil

    from EPDSegmentationLib.core.model_io import load_model

    run = tmp_path / "run"
    run.mkdir()
    for ext in (".safetensors", ".json"):
        shutil.copy(str(tiny_model_path) + ext, run / f"model{ext}")
    args = ["bundle", "--run", str(run), "--name", "Tiny", "--output", str(tmp_path / "models"),
            "--report", str(tmp_path / "report"), "--eval-subjects", "2", "--eval-slices", "1",
            "--real-dir", str(tmp_path / "nothing"), "--device", "cpu",
            "--eval-levels", "T12", "L1", "--no-mirror"]
    assert main(args) == 0
    _, card = load_model(tmp_path / "models" / "Tiny.safetensors")
    ev = card["evaluation"]
    # --no-mirror reaches every evaluation, and the card says how its numbers were measured
    assert ev["mirror"] is False
    assert "--no-mirror" in ev["phantom_held_out"]["command"]
    assert "--no-mirror" in ev["phantom_area_bias"]["command"]
    for part in ("phantom", "phantom_torso"):
        metrics = json.loads((tmp_path / "report" / part / "metrics.json").read_text())
        assert metrics["mirror"] is False
    assert json.loads((tmp_path / "report" / "area_bias.json").read_text())["mirror"] is False
    assert set(ev["phantom_held_out"]["full_resolution_dice"]) >= {"MUS", "SAT", "VAT"}
    assert "--data-seed 7" in ev["phantom_held_out"]["command"]
    assert "--phantom-levels T12 L1" in ev["phantom_torso_held_out"]["command"]
    assert "(T12-L1)" in ev["phantom_torso_held_out"]["data"]
    assert ev["real_ct"] is None and ev["real_ct_levels"] is None and card["name"] == "Tiny"
    assert ev["real_ct_simulated"] is None
    bias = ev["phantom_area_bias"]
    assert bias["pixel_mm"] == 3.0 and bias["slices"] == 2 * 3 and "area-bias" in bias["command"]
    assert abs(sum(bias["error_cm2"].values())) < 1e-3     # the classes share the image
    assert (tmp_path / "report" / "phantom" / "table.md").is_file()
    assert main(args) == 2  # the bundled files exist: kept unless --overwrite


def test_level_shares_per_vertebra():
    """Each slice goes to the vertebra with the most voxels in it; per level, the share of the
    psoas / paraspinal voxels called MUS or IMAT and of kidney voxels called muscle."""
    from training.realct import level_shares, slice_levels

    st = np.zeros((3, 6, 6), np.int32)
    st[0, 0, :4], st[0, 5, :2] = 29, 28          # slice 0: mostly L3
    st[1, 0, :3], st[2, 0, :3] = 28, 28          # slices 1, 2: L4
    st[:, 2, :4] = 88                            # psoas, 4 voxels a slice
    st[:, 3, :2] = 2                             # kidney, 2 voxels a slice
    assert slice_levels(st) == ["L3", "L4", "L4"]
    labels = np.zeros((3, 6, 6), np.uint8)
    labels[0, 2, :4] = 1                         # L3: the whole psoas is muscle
    labels[1, 2, :1], labels[2, 2, :2] = 2, 5    # L4: 1 of 8 psoas voxels IMAT, the rest not
    labels[1, 3, :2] = 1                         # L4: 2 of 4 kidney voxels called muscle
    s = level_shares(labels, st)
    assert list(s) == ["L3", "L4"] and s["L4"]["slices"] == 2
    assert s["L3"]["psoas"] == {"voxels": 4, "muscle_share": 1.0}
    assert s["L4"]["psoas"] == {"voxels": 8, "muscle_share": 0.125}
    assert s["L4"]["kidneys"]["muscle_share"] == 0.5
    assert s["L3"]["paraspinal"] == {"voxels": 0, "muscle_share": None}
    # per slice: counts that sum to the levels' shares, and their CSV
    from training.realct import TS_GROUPS, _slices_csv, slice_counts

    counts = slice_counts(labels, st)
    psoas = [g for g, _ in TS_GROUPS].index("psoas")
    assert counts[:, psoas].tolist() == [[4, 4], [4, 1], [4, 0]]
    rows = _slices_csv(slice_levels(st), counts).splitlines()
    assert len(rows) == 4 and rows[0].startswith("slice,level,paraspinal_voxels")
    assert rows[2].split(",")[:2] == ["1", "L4"]
    assert rows[2].split(",")[2 + 2 * psoas:4 + 2 * psoas] == ["4", "1"]


def test_the_slices_past_l5_are_a_row_of_their_own():
    """Slices with no lumbar vertebra on the far side of L5 from L4 (the sacrum, the pelvis)
    are counted as "below L5", whichever way the slices run; none without both L4 and L5,
    and the slices cranial of the levels are never in it."""
    from training.realct import BELOW_L5, level_shares, level_slices_by_name

    st = np.zeros((6, 6, 6), np.int32)
    st[0, 0, :3] = 32                            # slice 0: T12 (cranial end, k rising caudally)
    st[1:3, 0, :3], st[3, 0, :3] = 28, 27        # slices 1-2: L4, 3: L5, 4-5: pelvis
    st[:, 2, :4] = 88                            # iliopsoas, 4 voxels a slice
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[4, 2, :4] = 1                         # the pelvis: 4 of 8 iliopsoas voxels muscle
    by_name = level_slices_by_name([None, "L4", "L4", "L5", None, None])
    assert by_name[BELOW_L5] == [4, 5] and list(by_name)[-1] == BELOW_L5
    s = level_shares(labels, st)
    assert list(s) == ["T12", "L4", "L5", BELOW_L5] and s[BELOW_L5]["slices"] == 2
    assert s[BELOW_L5]["psoas"] == {"voxels": 8, "muscle_share": 0.5}
    flipped = level_shares(labels[::-1], st[::-1])            # k rising cranially
    assert flipped[BELOW_L5] == s[BELOW_L5]
    assert BELOW_L5 not in level_slices_by_name([None, "L4", "L4", None])   # no L5
    assert BELOW_L5 not in level_slices_by_name([None, "L4", "L5"])          # cranial None


def test_vat_behind_the_back_muscles_per_level():
    """What we call VAT behind the middle of the paraspinal voxels is counted (cm2, with
    the pixel area) whichever way the grid's j axis points; VAT in front is not; a slice
    without paraspinal voxels has no value, and level_shares averages the level's."""
    from training.realct import level_shares, vat_behind_back

    st = np.zeros((2, 8, 6), np.int32)
    st[:, 0, :] = 29                             # L3
    st[0, 4:6, 1:3] = 86                         # paraspinal rows 4-5 of slice 0; none in 1
    labels = np.zeros((2, 8, 6), np.uint8)
    labels[0, 7, :4] = 4                         # 4 VAT voxels at row 7
    labels[0, 1, :3] = 4                         # 3 VAT voxels at row 1
    ras = np.diag([1.0, 1.0, 1.0, 1.0])           # j grows anterior: row 7 is in front
    lps = np.diag([1.0, -1.0, 1.0, 1.0])          # j grows posterior: row 7 is behind
    assert vat_behind_back(labels, st, ras, 50.0) == [1.5, None]    # 3 x 50 mm2
    assert vat_behind_back(labels, st, lps, 50.0) == [2.0, None]
    s = level_shares(labels, st, lps, 50.0)
    assert s["L3"]["vat_behind_back_cm2"] == 2.0 and "vat_behind_back_cm2" not in level_shares(
        labels, st)["L3"]


def test_command_with_structures_writes_levels(tiny_model_path, tmp_path):
    """--structures alone (no --mask): levels.md, levels.png and the shares in metrics.json;
    a structure map on another grid is refused."""
    hu, labels, _ = stack(subject_slices(3, n_slices=2, size=80), gap_mm=5.0)
    write_volume(hu, tmp_path / "ct.nii.gz")
    st = np.zeros(labels.array.shape, np.int16)
    st[:, 30:50, 30:50] = 29
    st[:, 55:60, 30:40] = 88
    write_volume(labels.with_array(st), tmp_path / "st.nii.gz")
    out = tmp_path / "eval"
    args = ["evaluate-real", "--model", str(tiny_model_path) + ".safetensors", "--ct",
            str(tmp_path / "ct.nii.gz"), "--structures", str(tmp_path / "st.nii.gz"),
            "--output", str(out)]
    assert main(args) == 0
    shares = json.loads((out / "metrics.json").read_text())["levels"]["shares"]
    assert list(shares) == ["L3"] and shares["L3"]["psoas"]["voxels"] == 2 * 50
    assert "| L3 | 2 |" in (out / "levels.md").read_text()
    assert (out / "levels.png").stat().st_size > 0
    from EPDSegmentationLib.core.volume import Volume

    write_volume(Volume(np.ascontiguousarray(st[:, :40]), labels.ijk_to_ras),
                 tmp_path / "small.nii.gz")
    assert main([*args[:-4], "--structures", str(tmp_path / "small.nii.gz"), "--output",
                 str(tmp_path / "e2")]) == 2


def _ras_copy(volume, array=None):
    """The same volume stored as a RAS+ NIfTI would store it: rows posterior -> anterior,
    columns left -> right (flipped planes, +x and +y axes)."""
    from EPDSegmentationLib.core.volume import Volume

    a = volume.array if array is None else array
    m = np.array(volume.ijk_to_ras, np.float64)
    m[:3, :3] = np.diag(np.abs(np.diag(m[:3, :3])))
    return Volume(np.ascontiguousarray(a[:, ::-1, ::-1]), m)


def test_simulate_draws_in_the_training_orientation_and_reports_what_it_took():
    """Screws (metal) on a phantom volume, stored as DICOM would and as RAS+: the same screws
    in the same anatomy either way (the slices are drawn anterior up, then turned back), on
    every slice; ``lost`` is the metal; cachexia needs the SAT and takes only SAT and skin."""
    from EPDSegmentationLib.core.orientation import network_flips
    from training.metal import METAL_HU
    from training.realsim import simulate

    hu, labels, _ = stack(subject_slices(3, n_slices=2, size=128), gap_mm=5.0)
    assert network_flips(hu.ijk_to_ras)[:2] == (False, False)
    ras = _ras_copy(hu)
    assert network_flips(ras.ijk_to_ras)[:2] == (True, True)
    lab = labels.array
    a, a_lost = simulate(hu, "metal", 4)
    b, b_lost = simulate(ras, "metal", 4)
    assert np.array_equal(a.array, b.array[:, ::-1, ::-1])
    assert np.array_equal(a_lost, b_lost[:, ::-1, ::-1])
    metal = a.array >= METAL_HU[0]
    assert all(metal[k].any() for k in range(metal.shape[0]))
    assert np.array_equal(a.ijk_to_ras, hu.ijk_to_ras) and hu.array.max() < METAL_HU[0]
    assert np.array_equal(a_lost, metal)
    with pytest.raises(ValueError, match="SAT"):
        simulate(hu, "cachexia", 0)
    sat = lab == 3
    c, c_lost = simulate(hu, "cachexia", 0, sat)
    assert 0 < (sat & c_lost).sum() < sat.sum()
    cut = c.array != hu.array
    assert not (cut & ~c_lost).any()
    assert set(np.unique(lab[c_lost])) <= {0, 3, 5}   # SAT, skin (MSC), its partial-volume edge
    assert not (c_lost & (lab == 1)).any()                        # muscle untouched
    with pytest.raises(ValueError, match="--simulate"):
        simulate(hu, "tattoo", 0)


def test_myosteatosis_darkens_only_the_muscle_and_takes_nothing():
    """--simulate myosteatosis: every muscle voxel at least MYOSTEATOSIS_SHIFT_HU darker,
    some (the fatty patches) darker still, no other voxel changed, nothing lost; the same
    patches whether the volume is stored as DICOM would or as RAS+; it needs the muscle."""
    from training.realsim import MYOSTEATOSIS_PATCH_HU, MYOSTEATOSIS_SHIFT_HU, simulate

    hu, labels, _ = stack(subject_slices(3, n_slices=2, size=128), gap_mm=5.0)
    muscle = np.isin(labels.array, (1, 2))
    with pytest.raises(ValueError, match="MUS\\+IMAT"):
        simulate(hu, "myosteatosis", 0)
    a, lost = simulate(hu, "myosteatosis", 0, muscle=muscle)
    assert not lost.any()
    drop = hu.array - a.array
    assert np.all(drop[~muscle] == 0)
    assert np.all(drop[muscle] >= MYOSTEATOSIS_SHIFT_HU - 1e-3)
    assert np.all(drop[muscle] <= MYOSTEATOSIS_SHIFT_HU + MYOSTEATOSIS_PATCH_HU + 1e-3)
    assert 0.05 < np.mean(drop[muscle] > MYOSTEATOSIS_SHIFT_HU + 1.0) < 0.9   # patchy
    b, _ = simulate(_ras_copy(hu), "myosteatosis", 0, muscle=muscle[:, ::-1, ::-1])
    assert np.allclose(a.array, b.array[:, ::-1, ::-1])


def _ct_with_structures(folder, size: int, box: slice):
    """A phantom volume (2 slices) as ct.nii.gz and a TotalSegmentator-like structure map
    st.nii.gz: an L3 vertebra over ``box`` x ``box`` and the muscle labelled paraspinal (86).
    Returns (hu Volume, labels Volume, structures array)."""
    hu, labels, _ = stack(subject_slices(3, n_slices=2, size=size), gap_mm=5.0)
    write_volume(hu, folder / "ct.nii.gz")
    st = np.zeros(labels.array.shape, np.int16)
    st[:, box, box] = 29
    st[labels.array == 1] = 86
    write_volume(labels.with_array(st), folder / "st.nii.gz")
    return hu, labels, st


def test_command_with_myosteatosis_darkens_the_structures_muscles(tiny_model_path, tmp_path):
    """With --structures only, the paraspinal and psoas labels are the muscle to darken (the
    simulation refuses to run without a muscle); with a MUS+IMAT mask, that mask, and the
    table says the masks were not changed."""
    _, labels, st = _ct_with_structures(tmp_path, 96, slice(40, 56))
    out = tmp_path / "myo"
    assert main(["evaluate-real", "--model", str(tiny_model_path), "--ct",
                 str(tmp_path / "ct.nii.gz"), "--structures", str(tmp_path / "st.nii.gz"),
                 "--simulate", "myosteatosis", "--output", str(out), "--device", "cpu"]) == 0
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["simulate"] == {"what": "myosteatosis", "seed": 0}
    assert payload["levels"]["shares"]["L3"]["paraspinal"]["voxels"] == int((st == 86).sum())
    write_volume(labels.with_array((labels.array == 1).astype(np.uint8)), tmp_path / "m.nii.gz")
    assert main(["evaluate-real", "--model", str(tiny_model_path), "--ct",
                 str(tmp_path / "ct.nii.gz"), "--mask", f"MUS+IMAT={tmp_path / 'm.nii.gz'}",
                 "--simulate", "myosteatosis", "--output", str(tmp_path / "myo_mask"),
                 "--device", "cpu"]) == 0
    assert "myosteatosis (seed 0), masks unchanged" in \
        (tmp_path / "myo_mask" / "table.md").read_text()


def test_command_with_simulate_and_structures_drops_the_metal_from_them(tiny_model_path,
                                                                       tmp_path):
    """--simulate metal with --structures: the structures under the metal are not counted
    (the voxel counts of the paraspinal muscle drop by the metal's voxels in it)."""
    from training.metal import METAL_HU
    from training.realsim import simulate
    from EPDSegmentationLib.io import read_volume

    _, labels, st = _ct_with_structures(tmp_path, 128, slice(40, 88))
    base = ["evaluate-real", "--model", str(tiny_model_path) + ".safetensors", "--ct",
            str(tmp_path / "ct.nii.gz"), "--structures", str(tmp_path / "st.nii.gz")]
    assert main([*base, "--output", str(tmp_path / "plain")]) == 0
    assert main([*base, "--simulate", "metal", "--output", str(tmp_path / "metal")]) == 0
    plain, drawn = (json.loads((tmp_path / f / "metrics.json").read_text())["levels"]["shares"]
                    for f in ("plain", "metal"))
    _, lost = simulate(read_volume(tmp_path / "ct.nii.gz"), "metal", 0)
    in_muscle = int((lost & (st == 86)).sum())
    assert in_muscle > 0
    assert (plain["L3"]["paraspinal"]["voxels"] - drawn["L3"]["paraspinal"]["voxels"]
            == in_muscle)


def test_command_with_simulate_records_it(tiny_model_path, tmp_path):
    hu, labels, _ = stack(subject_slices(3, n_slices=2, size=80), gap_mm=5.0)
    write_volume(hu, tmp_path / "ct.nii.gz")
    write_volume(labels.with_array((labels.array == 3).astype(np.uint8)), tmp_path / "sat.nii.gz")
    out = tmp_path / "eval"
    assert main(["evaluate-real", "--model", str(tiny_model_path) + ".safetensors", "--ct",
                 str(tmp_path / "ct.nii.gz"), "--mask", f"SAT={tmp_path / 'sat.nii.gz'}",
                 "--simulate", "cachexia", "--simulate-seed", "3", "--output", str(out)]) == 0
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["simulate"] == {"what": "cachexia", "seed": 3}
    assert "simulated cachexia (seed 3)" in (out / "table.md").read_text()


def test_bundle_measures_the_real_cts_with_metal_and_cachexia_drawn_in(tiny_model_path,
                                                                      tmp_path):
    """With a real-CT folder (here phantom volumes under the sample's file names), the card
    also records the same CTs with screws and a cut drawn in (evaluate-real --simulate,
    draw 0), each with its command and results, beside the plain ones."""
    import shutil

    from EPDSegmentationLib.core.model_io import load_model
    from training.bundle import REAL_CT, REAL_LEVELS_CT, REAL_MASKS, REAL_STRUCTURES

    real = tmp_path / "real"
    real.mkdir()
    hu, labels, _ = stack(subject_slices(3, n_slices=2, size=96), gap_mm=5.0)
    for name in (REAL_CT, REAL_LEVELS_CT):
        write_volume(hu, real / name)
    for keys, name in REAL_MASKS:
        classes = {"MUS+IMAT": (1, 2), "SAT": (3,), "VAT": (4,)}[keys]
        write_volume(labels.with_array(np.isin(labels.array, classes).astype(np.uint8)),
                     real / name)
    st = np.zeros(labels.array.shape, np.int16)
    st[:, 40:56, 40:56] = 29
    st[labels.array == 1] = 86
    write_volume(labels.with_array(st), real / REAL_STRUCTURES)
    run = tmp_path / "run"
    run.mkdir()
    for ext in (".safetensors", ".json"):
        shutil.copy(str(tiny_model_path) + ext, run / f"model{ext}")
    assert main(["bundle", "--run", str(run), "--name", "Tiny", "--output",
                 str(tmp_path / "models"), "--report", str(tmp_path / "report"),
                 "--eval-subjects", "2", "--eval-slices", "1", "--real-dir", str(real),
                 "--device", "cpu"]) == 0
    ev = load_model(tmp_path / "models" / "Tiny.safetensors")[1]["evaluation"]
    assert ev["mirror"] is True and "--no-mirror" not in ev["real_ct"]["command"]
    assert json.loads((tmp_path / "report" / "real" / "metrics.json").read_text())["mirror"]
    sim = ev["real_ct_simulated"]
    assert set(ev["real_ct"]["results"]) == set(sim["metal"]["results"])
    assert "--simulate metal --simulate-seed 0" in sim["metal"]["command"]
    assert "--simulate cachexia" in sim["cachexia"]["command"]
    assert sim["cachexia"]["results"]["SAT vs " + REAL_MASKS[1][1]]["mask_area_cm2"] < \
        ev["real_ct"]["results"]["SAT vs " + REAL_MASKS[1][1]]["mask_area_cm2"]
    assert set(sim["metal_levels"]["shares"]) == set(ev["real_ct_levels"]["shares"]) == {"L3"}
    assert set(sim["myosteatosis_levels"]["shares"]) == {"L3"}
    assert "--simulate myosteatosis" in sim["myosteatosis"]["command"]
    assert sim["myosteatosis"]["results"]["MUS+IMAT vs " + REAL_MASKS[0][1]]["mask_area_cm2"] == \
        ev["real_ct"]["results"]["MUS+IMAT vs " + REAL_MASKS[0][1]]["mask_area_cm2"]
    for folder in ("real_metal", "real_cachexia", "real_levels_metal", "real_myosteatosis",
                   "real_levels_myosteatosis"):
        assert (tmp_path / "report" / folder / "metrics.json").is_file()
