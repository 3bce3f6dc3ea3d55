"""The torso phantom below L4 (training/phantom/pelvis.py): iliac wings with the iliacus on
their inner and gluteus medius on their outer surface, the psoas beside a broader L5 body,
L5 as a level everywhere levels are named, and nothing changed above."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from training.phantom import make_slice, subject_slices
from training.phantom.anatomy import subject_from_seed
from training.phantom.generate import level_z, levels_z_range
from training.phantom.pelvis import TOP_MM, pelvis_from_seed, pelvis_layout
from training.phantom.raster import Canvas
from training.phantom.tissues import CLASS_OF, CODE
from training.phantom.torso import LEVELS, draw_torso

MUS, VAT, MSC = 1, 4, 5
BONE = (CODE["cortex"], CODE["marrow"])


def codes_at(seed: int, z: float, size: int = 256):
    """(tissue codes at the output pixel centres, geometry, pixel mm, (row, col) of the
    drawing origin)."""
    s = subject_from_seed(seed)
    cv = Canvas(size, s.fov_mm)
    g = draw_torso(cv, s, z)
    c, r = cv.to_px((0.0, 0.0))
    return cv.codes, g, s.fov_mm / size, (r, c)


@pytest.mark.parametrize("seed", [0, 3, 7, 8, 11])
def test_mid_L5_has_iliac_wings_with_iliacus_inside_and_psoas_beside_the_body(seed):
    codes, g, px, (r0, c0) = codes_at(seed, level_z(seed, "L5"))
    cls = CLASS_OF[codes]
    rows, cols = np.indices(codes.shape)
    x = (cols + 0.5 - c0) * px                         # mm, + = patient's left
    bone = np.isin(codes, BONE)
    assert (cls[bone] == MSC).all()
    for side in (-1, 1):
        # the wing: bone lateral to the psoas, several cm^2, on this side
        lateral = side * x > g.psoas_x + g.psoas_r[0]
        wing = bone & lateral
        assert wing.sum() * px * px > 150, (seed, side, wing.sum() * px * px)
        # the iliacus: muscle just medial to the wing's medial edge in most of its rows
        hits = n = 0
        for r in np.unique(rows[wing]):
            cs = np.nonzero(wing[r])[0]
            c = cs.min() if side > 0 else cs.max()       # the wing's medial-most pixel
            n += 1
            hits += any(cls[r, c - side * k] == MUS for k in range(1, int(4 / px) + 2)
                        if 0 <= c - side * k < codes.shape[1])
        assert hits >= 0.6 * n, (seed, side, hits, n)
        # the psoas: muscle at its centre, in front of the middle of the vertebral body
        pr = int(round(r0 + g.psoas_y / px))
        pc = int(round(c0 + side * g.psoas_x / px))
        assert cls[pr, pc] == MUS and g.psoas_y < g.y_vb
        # outside the wing, lateral: muscle (gluteus medius), not visceral fat
        ys = rows[wing]
        mid = int(np.median(ys))
        cs = np.nonzero(wing[mid])[0]
        c = cs.max() if side > 0 else cs.min()
        outside = [cls[mid, c + side * k] for k in range(2, int(8 / px))]
        assert MUS in outside and VAT not in outside, (seed, side, outside)
    # kidneys and liver are gone; the psoas is larger than at L3
    assert not np.isin(codes, [CODE["kidney_cortex"], CODE["liver"]]).any()
    _, g3, _, _ = codes_at(seed, level_z(seed, "L3"), size=64)
    assert g.psoas_r[0] > g3.psoas_r[0]
    assert g.vb_rx > g3.vb_rx * 1.04, "the L5 body is broader"


def test_wings_grow_from_the_crest_down():
    """No wing above the crest, a small section just below it, a long plate at L5-S1."""
    for seed in (1, 4):
        p = pelvis_from_seed(seed)
        sh = subject_from_seed(seed).vertebra_shift
        areas = []
        for zr in (max(p.crest_z) + 2.0, max(p.crest_z) - 4.0, -88.0):
            codes, g, px, (r0, c0) = codes_at(seed, zr + sh)
            cols = np.indices(codes.shape)[1]
            lateral = np.abs((cols + 0.5 - c0) * px) > g.psoas_x + g.psoas_r[0]
            areas.append(float((np.isin(codes, BONE) & lateral).sum()) * px * px)
        assert areas[0] == 0 and 0 < areas[1] < areas[2], (seed, areas)


def test_L5_is_a_level_in_slices_stacks_and_training_data():
    assert LEVELS[-2:] == ("L5", "S1")
    assert make_slice(3, size=48, level="L5").meta["level"] == "L5"
    assert make_slice(3, size=48, level="L5", z_mm=-17.0).meta["level"] == "L5-S1 disc"
    assert make_slice(3, size=48, level="L5", z_mm=19.5).meta["level"] == "L4-L5 disc"
    assert level_z(3, "L4") - level_z(3, "L5") == pytest.approx(38.0)
    lo, hi = levels_z_range(3, ("L5", "L5"))
    assert hi - lo == pytest.approx(38.0)
    stack = subject_slices(3, 4, None, levels=("T11", "L5"), size=32)
    assert stack[0].meta["level"] in ("L5", "L5-S1 disc") and stack[-1].z_mm > 140
    with pytest.raises(ValueError, match="S1"):
        subject_slices(3, 2, levels=("T11", "S2"), size=32)
    with pytest.raises(ValueError, match="beyond"):
        subject_slices(3, 2, levels=("L5", -140.0), size=32)


def test_training_data_of_L5_alone():
    from training.data import phantom_records

    recs = phantom_records(2, 1, 32, seed=0, val_fraction=0.5, levels=("L5", "L5"))
    assert len(recs["train"]) == 1 and len(recs["val"]) == 1


def test_training_refuses_a_level_below_S1(tmp_path, capsys):
    from training.__main__ import main

    args = ["train", "--phantom-subjects", "2", "--phantom-slices", "1", "--phantom-size", "32",
            "--phantom-levels", "T11", "S2", "--epochs", "1", "--quiet",
            "--output", str(tmp_path / "run")]
    assert main(args) == 2
    assert "T11, T12, L1, L2, L3, L4, L5, S1" in capsys.readouterr().err


def _adigest(s) -> str:
    h = hashlib.sha256()
    for a in (s.hu, s.labels, s.fractions):
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


#: image, labels and fractions (not meta) of torso slices at 64 px, computed before pelvis.py
#: existed (commit 476b799): the levels above the crest must not change
PINNED_ABOVE = {
    (0, "L4"): "1e709d8aeef9d538", (0, "L3"): "47e4f8a22f954bce", (0, "T12"): "61e3129b2e1de0bf",
    (1, "L4"): "38cbdda387b8c06d", (1, "L3"): "54c18f02c7effe39", (1, "T12"): "6ecb338245d3f1ec",
    (2, "L4"): "baf0b3f5db00189f", (2, "L3"): "b5730e2fb222b9a0", (2, "T12"): "274aa297c16837cc",
    (5, "L4"): "6f86938926cf6360", (5, "L3"): "216575407267ab20", (5, "T12"): "0640ded0c9e18d68",
}


def test_levels_above_the_crest_are_unchanged():
    for (seed, level), expected in PINNED_ABOVE.items():
        assert _adigest(make_slice(seed, size=64, level=level)) == expected, (seed, level)
    for seed in range(6):
        lay = pelvis_layout(seed)
        top = TOP_MM + subject_from_seed(seed).vertebra_shift
        assert all(t.z0 + t.half_len <= top + 1e-6 for t in lay["loops"] + lay["imat"]), seed
        assert len(lay["loops"]) > 0


def test_L5_is_reproducible_and_smooth_in_z():
    a, b = make_slice(6, size=64, level="L5"), make_slice(6, size=64, level="L5")
    assert _adigest(a) == _adigest(b) and a.meta == b.meta and json.dumps(a.meta)
    assert a.meta["pelvis"] == pelvis_from_seed(6).meta()
    assert _adigest(make_slice(7, size=64, level="L5")) != _adigest(a)
    # smooth in z: 1 mm apart nearly the same labels, 20 mm apart clearly different
    for dz in (19.0, 0.0, -12.0):
        z = level_z(6, "L5") + dz
        s0, s1, far = (make_slice(6, size=128, z_mm=z + d, anatomy="torso")
                       for d in (0.0, 1.0, -20.0))
        near = np.mean(s0.labels == s1.labels)
        assert near > 0.96, (dz, near)
        assert np.mean(s0.labels == far.labels) < near - 0.01, dz


def test_subjects_differ_in_their_pelvis():
    ps = [pelvis_from_seed(seed) for seed in range(20)]
    crest = np.array([p.crest_z[0] for p in ps])
    assert crest.max() - crest.min() > 8 and crest.max() < TOP_MM
    assert len({round(p.reach, 3) for p in ps}) == 20


def test_contact_sheet_torso_columns_are_checked():
    from training.phantom.__main__ import main
    from training.phantom.sheet import parse_torso_panel

    assert parse_torso_panel("3:L5:19") == (3, "L5", 19.0)
    assert parse_torso_panel("8:l5") == (8, "L5", 0.0)
    for bad in ("3", "x:L5", "3:S2", "3:L5:a"):
        with pytest.raises(ValueError):
            parse_torso_panel(bad)
    assert main(["contact-sheet", "--torso", "3:S2", "--output", "/nonexistent/x.png"]) == 2


def test_psoas_apart_parts_the_l5_psoas_from_the_vertebra_and_thins_the_iliacus():
    """psoas_apart=1 below the L4-L5 disc moves the psoas off the vertebral body (visceral
    fat where it touched), shrinks it a little and thins the iliacus, moving no bone; it leaves every level above pelvis.TOP_MM as it was; 0 is the phantom
    as before; the share is checked and the data pipeline takes it (torso anatomy only)."""
    from training.data import phantom_records
    from training.phantom.pelvis import has_psoas_apart
    from training.phantom.torso import level_centre

    for seed in (3, 11):
        s = subject_from_seed(seed)
        z = level_centre(s, "L5") - 10.0
        drawn = []
        for share in (0.0, 1.0):
            cv = Canvas(256, s.fov_mm)
            drawn.append((cv, draw_torso(cv, s, z, psoas_apart=share)))
        (c0, g0), (c1, g1) = drawn
        assert g1.psoas_x - g1.psoas_r[0] >= g0.psoas_x - g0.psoas_r[0] + 4.0
        assert g1.psoas_r[0] < g0.psoas_r[0] and g1.iliacus_k < 0.6
        # just lateral of the vertebral body, on the psoas' line: muscle before, fat after
        for side in (-1, 1):
            x = side * (g0.vb_rx + 1.5)
            assert c0.code_at(x, g0.psoas_y) == CODE["muscle"]
            assert CLASS_OF[c1.code_at(x, g1.psoas_y)] == VAT     # or its fat pad
        changed = c0.codes != c1.codes
        assert changed.sum() > 100
        # the muscles move and thin; what they covered shows (fat, the ureter, vessels and
        # bowel drawn over fat); no bone moves
        muscle = (c0.codes == CODE["muscle"]) | (c1.codes == CODE["muscle"])
        assert muscle[changed].mean() > 0.8
        bone = [CODE["cortex"], CODE["marrow"], CODE["disc"]]
        assert not (np.isin(c0.codes, bone) ^ np.isin(c1.codes, bone)).any()
        assert (c1.codes == CODE["muscle"]).sum() < (c0.codes == CODE["muscle"]).sum()
        for level in ("L3", "L4"):
            a, b = (make_slice(seed, anatomy="torso", level=level, size=64, supersample=2,
                               psoas_apart=v) for v in (0.0, 1.0))
            assert np.array_equal(a.tissues, b.tissues) and np.array_equal(a.hu, b.hu)
    share = np.mean([has_psoas_apart(subject_from_seed(s), 0.5) for s in range(200)])
    assert 0.4 < share < 0.6
    with pytest.raises(ValueError, match="0..1"):
        phantom_records(1, 1, size=64, levels=("L5", "L5"), psoas_apart=2.0)
    with pytest.raises(ValueError, match="torso"):
        phantom_records(1, 1, size=64, psoas_apart=0.5)
    recs = [phantom_records(3, 1, size=64, levels=("L5", "L5"), psoas_apart=v)["train"]
            for v in (0.0, 1.0)]
    assert any(not np.array_equal(r0.labels, r1.labels) for r0, r1 in zip(*recs))


#: image, labels and fractions of L5 slices at 64 px (mid-L5, 12 mm below, the L5-S1 disc;
#: seed 3 with the psoas apart) computed before S1 existed (commit 01924f1): the sacrum must
#: leave every slice down to the disc as it was
PINNED_L5 = {
    (0, 0.0): "b4a6b78c89256302", (0, -12.0): "3388b187cb1e937e", (0, -18.5): "8ecb783cd17c8fe2",
    (3, 0.0): "3396f01a563e3c71", (3, -12.0): "858303e9d1138ff8", (3, -18.5): "b65bf63ad6f5b24e",
    (7, 0.0): "d4375942df8e46bf", (7, -12.0): "52a2a796ac36db5c", (7, -18.5): "75e9f4a9deb6eebc",
}


def test_S1_leaves_L5_as_it_was_and_extends_the_span_only_below():
    for (seed, mm), expected in PINNED_L5.items():
        got = make_slice(seed, size=64, level="L5", z_mm=mm, psoas_apart=float(seed == 3))
        assert _adigest(got) == expected, (seed, mm)
    from training.phantom.pelvis import S1_DISC_MM

    sh = subject_from_seed(3).vertebra_shift
    assert S1_DISC_MM == pytest.approx((level_z(3, "L5") + level_z(3, "S1")) / 2 - sh)
    lo5, hi5 = levels_z_range(3, ("T11", "L5"))
    lo1, hi1 = levels_z_range(3, ("T11", "S1"))
    assert hi1 == hi5 and lo5 == pytest.approx(level_z(3, "L5") - 19.0)
    # down to the bottom of the S1 body, not into the S1-S2 disc
    assert lo1 == pytest.approx(level_z(3, "S1") - 14.0) and lo1 < lo5 - 25.0
    assert make_slice(3, size=48, level="S1").meta["level"] == "S1"
    assert make_slice(3, size=48, level="S1", z_mm=17.0).meta["level"] == "L5-S1 disc"
    stack = subject_slices(3, 5, None, levels=("T11", "S1"), size=32)
    assert stack[0].meta["level"] == "S1"


@pytest.mark.parametrize("seed", [0, 3, 8, 11])
def test_S1_has_the_sacrum_with_the_psoas_on_its_ala(seed):
    """At S1: bone from the midline out to each iliac wing (body, ala, joint) with no
    visceral fat behind the psoas, which is muscle resting on the ala; the canal behind the
    body; the back muscles still behind."""
    s = subject_from_seed(seed)
    for share in (0.0, 1.0):
        cv = Canvas(256, s.fov_mm)
        g = draw_torso(cv, s, level_z(seed, "S1") - 4.0, psoas_apart=share)
        codes, px = cv.codes, s.fov_mm / 256
        c0, r0 = cv.to_px((0.0, 0.0))
        cls = CLASS_OF[codes]
        bone = np.isin(codes, BONE)
        assert g.level_name() == "S1"
        for side in (-1, 1):
            pc = int(round(c0 + side * g.psoas_x / px))
            pr = int(round(r0 + g.psoas_y / px))
            assert cls[pr, pc] == MUS, (seed, share, side)
            # straight back from the psoas' centre: muscle, then bone, no VAT in between
            col = codes[pr:, pc]
            first_bone = int(np.argmax(np.isin(col, BONE)))
            assert np.isin(col, BONE).any() and first_bone * px < g.psoas_r[1] + 6.0
            assert not (CLASS_OF[col[:first_bone]] == VAT).any(), (seed, share, side)
            # bone all along the row from beside the body out to past the psoas' centre
            row = int(round(r0 + (g.y_vb + g.vb_ry) / px))
            xs = [int(round(c0 + side * x / px))
                  for x in np.arange(0.7 * g.vb_rx, g.psoas_x, 1.0)]
            assert np.mean(bone[row, xs]) > 0.9, (seed, share, side, np.mean(bone[row, xs]))
        # the canal behind the body, muscle behind the sacrum
        assert (codes == CODE["csf"]).any()
        back = int(round(r0 + (g.post_y - 15.0) / px))
        assert cls[back, int(round(c0 + 20.0 / px))] == MUS


def test_sheet_shows_the_real_L5_slice_beside_the_sacrum(totalseg_dir):
    """Under S1 columns the contact sheet shows the real L5 slice that also holds the sacrum
    (TotalSegmentator's 25), below the L5-S1 disc, not mid-L5 again."""
    from EPDSegmentationLib.io.images import read_itk
    from training.phantom.sheet import _real_panels

    panels = _real_panels(totalseg_dir)
    assert {"l5", "l45", "s1"} <= set(panels)
    assert "sacrum" in panels["s1"][1]
    lab = read_itk(totalseg_dir / "ct_abdomen_pelvis_structures.nii.gz").array
    both = np.nonzero((lab == 27).any(axis=(1, 2)) & (lab == 25).any(axis=(1, 2)))[0]
    l5 = np.nonzero((lab == 27).any(axis=(1, 2)))[0]
    assert len(both) and int(np.median(both)) < int(l5.mean())     # caudal of mid-L5 here
    assert not np.array_equal(panels["s1"][2], panels["l5"][2])
