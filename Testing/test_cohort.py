"""Cohorts: heights and indices, protocol areas, case discovery in DICOM folders, shards and
their merge, and ``epdseg segment --level L3`` end to end (tiny random-weight model: these
tests check the pipeline and the table, not accuracy)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from EPDSegmentationLib.cli import cohort
from EPDSegmentationLib.cli.main import main
from EPDSegmentationLib.cli.segment import Case, find_cases
from EPDSegmentationLib.core.indices import (HeightError, dicom_height_m, height_m, indices,
                                             protocol_measures)
from EPDSegmentationLib.core.volume import Volume, ijk_to_ras_matrix
from EPDSegmentationLib.io import write_dicom_series, write_volume


@pytest.mark.parametrize("text,metres", [("172", 1.72), ("1.72", 1.72), ("172 cm", 1.72),
                                         ("1.72m", 1.72), ("100", 1.0), ("2.5", 2.5)])
def test_height_units_are_detected(text, metres):
    assert height_m(text) == pytest.approx(metres)


@pytest.mark.parametrize("text,why", [("0", "positive"), ("-170", "positive"),
                                      ("50", "ambiguous"), ("6", "ambiguous"),
                                      ("300", "outside"), ("0.5 m", "outside"),
                                      ("tall", "cannot read")])
def test_bad_heights_are_refused_with_a_reason(text, why):
    with pytest.raises(HeightError, match=why):
        height_m(text, "manifest column height")


def test_dicom_patient_size_is_metres():
    assert dicom_height_m("1.81") == pytest.approx(1.81)
    assert dicom_height_m(None) is None and dicom_height_m("") is None
    with pytest.raises(HeightError, match="not in metres"):
        dicom_height_m("181")


def test_indices_are_area_over_height_squared():
    out = indices({"MUS": 160.0, "IMAT": 8.0, "SAT": 200.0, "VAT": 100.0}, 2.0)
    assert out == {"SMI": 40.0, "IMATI": 2.0, "SATI": 50.0, "VATI": 25.0}
    assert all(np.isnan(v) for v in indices({"MUS": 160.0}, None).values())


def test_protocol_splits_the_network_muscle_by_hu():
    # one slice, 4 pixels; the network calls pixels 0-2 muscle compartment (MUS or IMAT)
    p = np.zeros((6, 1, 1, 4), np.float32)
    p[1, 0, 0, :3] = [1.0, 0.5, 0.25]
    p[2, 0, 0, :3] = [0.0, 0.5, 0.75]
    p[3, 0, 0, 3] = 1.0
    p[0, 0, 0, :3] = 0.0
    hu = np.array([[[40.0, -100.0, 200.0, -100.0]]], np.float32)   # muscle, fat, bone, fat
    m = protocol_measures(p, hu, (10.0, 10.0, 3.0))                 # 1 cm^2 pixels
    assert m["protocol_area_cm2_MUS"] == pytest.approx(1.0)       # only the 40 HU pixel
    assert m["protocol_area_cm2_IMAT"] == pytest.approx(1.0)      # the -100 HU pixel
    assert m["protocol_area_cm2_SAT"] == pytest.approx(1.0)
    assert m["protocol_hu_mean_MUS"] == pytest.approx(40.0)
    assert np.isnan(m["protocol_hu_mean_VAT"])


def test_protocol_sums_equal_their_float64_definition():
    """protocol_slice_sums (slice by slice, float32 blocks added in float64: what segment's
    output threads run) equals the protocol's definition summed in float64, on 512 x 512
    slices with integer HU across every range's edges, and with probabilities off a grid."""
    from EPDSegmentationLib.core.classes import class_by_key
    from EPDSegmentationLib.core.indices import protocol_slice_sums

    rng = np.random.default_rng(3)
    p = rng.random((6, 2, 512, 512)).astype(np.float32)
    p /= p.sum(axis=0)
    hu = rng.integers(-400, 400, (2, 512, 512)).astype(np.int16)
    got = protocol_slice_sums(p, hu)
    q, h = p.astype(np.float64), hu.astype(np.float64)
    comp = {"MUS": q[1] + q[2], "IMAT": q[1] + q[2], "SAT": q[3], "VAT": q[4]}
    for key, w in comp.items():
        lo, hi = class_by_key(key).hu_range
        w = w * ((h >= lo) & (h <= hi))
        want = np.stack([w.sum(axis=(1, 2)), (w * h).sum(axis=(1, 2))], axis=1)
        np.testing.assert_allclose(got[key], want, rtol=1e-6)
    assert got["MUS"].shape == (2, 2)


# ----------------------------------------------------------------------------- discovery

def _slice_volume(value: float) -> Volume:
    rng = np.random.default_rng(int(value))
    hu = rng.normal(value, 10, (1, 16, 16)).astype(np.float32)
    hu[0, :2] = -1000
    return Volume(hu, ijk_to_ras_matrix((0.8, 0.8, 3.0), (0, 0, 0)))


def _flat_folder(tmp_path, n: int):
    """n single-slice series, every file in one folder (as exported from a PACS)."""
    root = tmp_path / "l3_batch"
    root.mkdir()
    for i in range(n):
        files = write_dicom_series(_slice_volume(30 + i), tmp_path / f"tmp{i}",
                                   patient_id=f"P{i:03d}", series_number=3)
        shutil.move(str(files[0]), str(root / f"slice_{i}.dcm"))
    return root


def test_folder_of_single_slice_series_is_a_batch(tmp_path):
    root = _flat_folder(tmp_path, 3)
    cases = find_cases([root])
    assert sorted(c.name for c in cases) == ["P000_s3", "P001_s3", "P002_s3"]
    assert all(c.path.is_file() and c.problem is None for c in cases)


def test_study_folder_picks_the_axial_ct_or_asks(tmp_path):
    import pydicom

    hu = np.stack([_slice_volume(40).array[0]] * 3)
    vol = Volume(hu, ijk_to_ras_matrix((0.8, 0.8, 3.0), (0, 0, 0)))
    study = tmp_path / "study"
    study.mkdir()
    axial = write_dicom_series(vol, tmp_path / "a", series_description="abdomen")
    scout = write_dicom_series(vol, tmp_path / "b", series_description="scout")
    for f in axial:
        shutil.move(str(f), str(study / f"a_{f.name}"))
    for f in scout:
        ds = pydicom.dcmread(f)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(study / f"b_{f.name}")
    uid = pydicom.dcmread(study / f"a_{axial[0].name}").SeriesInstanceUID
    (case,) = find_cases([study])
    assert case.problem is None and case.series_uid == uid
    second = write_dicom_series(vol, tmp_path / "c", series_description="thin")
    for f in second:
        shutil.move(str(f), str(study / f"c_{f.name}"))
    (case,) = find_cases([study], strict=False)
    assert "2 axial CT series" in case.problem and "--series-uid" in case.problem
    (case,) = find_cases([study], discover=False)          # --series-uid given: no split
    assert case.problem is None and case.series_uid is None


def test_names_do_not_depend_on_the_argument_order(tmp_path):
    a, b = tmp_path / "site_a", tmp_path / "site_b"
    for folder in (a, b):
        folder.mkdir()
        write_volume(_slice_volume(30), folder / "ct.nii.gz")
    one = {str(c.path): c.name for c in find_cases([a, b])}
    two = {str(c.path): c.name for c in find_cases([b, a])}
    assert one == two and len(set(one.values())) == 2


def test_single_slice_batch_runs_as_l3_cases(tmp_path, tiny_model_path):
    root = _flat_folder(tmp_path, 2)
    out = tmp_path / "out"
    assert main(["segment", str(root), "-o", str(out), "--model", str(tiny_model_path),
                 "--level", "L3", "--height", "1.70"]) == 0
    rows = cohort.read_table(out / "cohort.csv")
    assert [r["case"] for r in rows] == ["P000_s3", "P001_s3"]
    assert all(r["level_source"] == "input (a single slice)" and r["patient_id"] for r in rows)
    assert all(r["height_source"] == "--height" and r["SMI"] for r in rows)


# ----------------------------------------------------------------------------- shards

def test_shards_partition_the_cases_whatever_the_order():
    cases = [Case(f"case{i:04d}", None) for i in range(200)]
    parts = [cohort.select_shard(cases, (i, 7)) for i in range(7)]
    names = sorted(c.name for part in parts for c in part)
    assert names == sorted(c.name for c in cases)              # each case once
    assert min(len(p) for p in parts) > 10                       # roughly balanced
    again = cohort.select_shard(list(reversed(cases)), (3, 7))
    assert sorted(c.name for c in again) == sorted(c.name for c in parts[3])


def test_shard_from_flag_and_slurm():
    assert cohort.parse_shard("2/8", env={}) == (2, 8)
    assert cohort.parse_shard(None, env={}) is None
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_COUNT": "10"}
    assert cohort.parse_shard(None, env=env) == (4, 10)
    for bad in ("8/8", "1/0", "x"):
        with pytest.raises(ValueError, match="shard"):
            cohort.parse_shard(bad, env={})


def test_merge_reports_missing_and_failed(tmp_path):
    rows0 = [{"case": "a", "status": "ok"}, {"case": "b", "status": "failed",
                                             "message": "no iliac crests"}]
    cohort.write_table(rows0, tmp_path / "cohort.shard-0-of-3.csv")
    cohort.write_shard_plan(tmp_path, (0, 3), ["a", "b", "c"])   # c: the job was killed
    cohort.write_table([{"case": "d", "status": "ok"}], tmp_path / "cohort.shard-1-of-3.csv")
    cohort.write_shard_plan(tmp_path, (1, 3), ["d"])
    path, report = cohort.merge(tmp_path)
    assert [r["case"] for r in cohort.read_table(path)] == ["a", "b", "d"]
    assert report["missing"] == ["c"] and report["missing_shards"] == ["2/3"]
    assert report["failed"] == ["b: no iliac crests"]
    with pytest.raises(FileExistsError):
        cohort.merge(tmp_path)
    assert main(["merge", str(tmp_path), "--overwrite"]) == 1
    cohort.write_table([], tmp_path / "cohort.shard-0-of-2.csv")
    with pytest.raises(ValueError, match="different splits"):
        cohort.merge(tmp_path, overwrite=True)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def spine_cases(tmp_path_factory):
    from spine import synthetic_ct

    root = tmp_path_factory.mktemp("spines")
    ct, m, _ = synthetic_ct(3.0, 3.0)
    write_volume(Volume(ct, m), root / "full.nii.gz")
    chest, m2, _ = synthetic_ct(3.0, 3.0, z_mm=(120.0, 300.0), pelvis=False)
    write_volume(Volume(chest, m2), root / "chest.nii.gz")
    return root


@pytest.mark.slow
def test_level_l3_cohort_end_to_end(spine_cases, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out"
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"image,height,sex\n{spine_cases / 'full.nii.gz'},175,F\n"
                        f"{spine_cases / 'chest.nii.gz'},170,M\n")
    rc = main(["segment", str(manifest), "-o", str(out), "--model", str(tiny_model_path),
               "--level", "L3", "--protocol"])
    assert rc == 1                                           # the chest scan fails, alone
    rows = {r["case"]: r for r in csv.DictReader(open(out / "cohort.csv"))}
    full, chest = rows["full"], rows["chest"]
    assert full["status"] == "ok" and full["level"] == "L3" and full["n_slices"] == "1"
    assert float(full["height_m"]) == pytest.approx(1.75) and full["sex"] == "F"
    assert float(full["SMI"]) == pytest.approx(float(full["area_cm2_MUS"]) / 1.75 ** 2,
                                               rel=1e-4)
    assert full["protocol_area_cm2_MUS"] != "" and full["model_version"].startswith("sha256:")
    assert (out / "full_levels.png").is_file() and (out / "full.seg.nrrd").is_file()
    assert chest["status"] == "failed" and "iliac crests" in chest["message"]
    assert "chest: the scan does not reach" in capsys.readouterr().err


def test_bad_height_is_a_warning_and_shards_merge(spine_cases, tiny_model_path, tmp_path,
                                                  capsys):
    out = tmp_path / "out"
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"image,height\n{spine_cases / 'full.nii.gz'},72\n"
                        f"{spine_cases / 'chest.nii.gz'},170\n")
    for i in range(2):
        main(["segment", str(manifest), "-o", str(out), "--model", str(tiny_model_path),
              "--level", "L3", "--shard", f"{i}/2"])
    plans = [json.loads((out / f"cohort.shard-{i}-of-2.json").read_text())["cases"]
             for i in range(2)]
    assert sorted(plans[0] + plans[1]) == ["chest", "full"]
    assert main(["merge", str(out)]) == 1                   # the chest scan failed
    text = capsys.readouterr().out
    assert "1 failed" in text and "chest" in text
    rows = {r["case"]: r for r in cohort.read_table(out / "cohort.csv")}
    assert rows["full"]["status"] == "warning" and "ambiguous" in rows["full"]["message"]
    assert rows["full"]["SMI"] == "" and rows["full"]["area_cm2_MUS"] != ""
    # the table is not replaced without --overwrite
    assert main(["segment", str(manifest), "-o", str(out), "--model", str(tiny_model_path),
                 "--level", "L3", "--shard", "0/2"]) == 2


def test_protocol_comes_from_segments_own_pass(spine_cases, tiny_model_path, tmp_path,
                                               monkeypatch):
    """segment_case(protocol=True) sums the HU-protocol areas from its own slabs (the
    network runs once per slice) and they equal protocol_measures on predict_volume's
    probabilities for the same slices."""
    from EPDSegmentationLib.cli.segment import segment_case
    from EPDSegmentationLib.core.indices import protocol_measures
    from EPDSegmentationLib.core.inference import predict_volume
    from EPDSegmentationLib.core.model_io import load_model
    from EPDSegmentationLib.io import read_volume

    from EPDSegmentationLib.io import overlay

    drawn = {}
    real = overlay.write_overlay_png

    def spy(*args, **kwargs):
        drawn.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(overlay, "write_overlay_png", spy)
    model, card = load_model(str(tiny_model_path) + ".safetensors")
    calls = []
    model.register_forward_hook(lambda _m, inp, _o: calls.append(int(inp[0].shape[0])))
    vol = read_volume(spine_cases / "full.nii.gz")
    k_idx = [3, 4, 5, 20]
    result = segment_case(Case("full", spine_cases / "full.nii.gz"), tmp_path / "out", model,
                          card, slices=",".join(map(str, k_idx)), protocol=True, device="cpu")
    # one pass over the slices (each run twice, the second time mirrored: mirror averaging)
    assert result.ok and sum(calls) == 2 * len(k_idx)
    si, sj, _ = vol.spacing
    pred = predict_volume(vol.array, (sj, si), model, card, device="cpu", slices=k_idx,
                          ijk_to_ras=vol.ijk_to_ras)
    want = protocol_measures(pred.probabilities, vol.array[k_idx], vol.spacing)
    assert set(result.protocol) == set(want)
    for key, value in want.items():
        assert result.protocol[key] == pytest.approx(value, rel=1e-4, abs=1e-4, nan_ok=True)
    # the case's own CSV has them too, per slice and in its "all" rows (the same numbers)
    with open(tmp_path / "out" / "full_bodycomp.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({r["slice"] for r in rows if r["protocol_area_cm2"] != ""}) == len(k_idx) + 1
    for r in rows:
        if r["slice"] == "all" and r["tissue"] != "MSC":
            assert float(r["protocol_area_cm2"]) == pytest.approx(
                result.protocol[f"protocol_area_cm2_{r['tissue']}"], rel=1e-5, abs=1e-6)
        if r["tissue"] == "MSC":
            assert r["protocol_area_cm2"] == ""
    # the overlay's legend (the middle slice, 5) shows that slice's protocol areas, its own line
    shown = {r["tissue"]: float(r["protocol_area_cm2"]) for r in rows
             if r["slice"] == "5" and r["tissue"] != "MSC"}
    assert drawn["protocol_cm2"] == pytest.approx(shown, rel=1e-5, abs=1e-6)
    # and the protocol's labels: the hard labels split by HU, the other slices empty
    from EPDSegmentationLib.core.indices import protocol_labels
    from EPDSegmentationLib.io.seg_nrrd import read_seg_nrrd

    hard = read_seg_nrrd(tmp_path / "out" / "full.seg.nrrd").array
    prot = read_seg_nrrd(tmp_path / "out" / "full_protocol.seg.nrrd").array
    want = np.zeros_like(hard)
    want[k_idx] = protocol_labels(hard[k_idx], vol.array[k_idx])
    np.testing.assert_array_equal(prot, want)
    assert (prot[k_idx] != hard[k_idx]).any() and (prot[k_idx] == 1).any()


def test_cohort_writes_the_outputs_asked_for(tmp_path, tiny_model_path, capsys):
    """--dicom-seg and --probabilities give a cohort's cases the same outputs as without the
    table (they were ignored); --overlay-slice, which cannot apply, is refused."""
    import json

    root = _flat_folder(tmp_path, 1)
    out = tmp_path / "out"
    args = ["segment", str(root), "-o", str(out), "--model", str(tiny_model_path),
            "--level", "L3"]
    assert main(args + ["--dicom-seg", "--probabilities"]) == 0
    (row,) = cohort.read_table(out / "cohort.csv")
    name = row["case"]
    assert row["status"] == "ok"
    for suffix in ("_seg.dcm", "_prob_seg.dcm", "_probabilities.nrrd"):
        assert (out / f"{name}{suffix}").is_file(), suffix
    prov = json.loads((out / f"{name}_provenance.json").read_text())
    assert "--dicom-seg" in prov["command"]
    assert main(args + ["--overlay-slice", "0", "--overwrite"]) == 2
    assert "--overlay-slice does not apply to a cohort" in capsys.readouterr().err


@pytest.mark.slow
def test_a_failed_case_leaves_no_levels_picture(
        spine_cases, tiny_model_path, tmp_path, monkeypatch):
    """The levels picture is staged with the case's other outputs: a case that fails after
    its level was found leaves nothing behind (the picture was written straight into the
    folder before); run again, the picture is committed and recorded in the completion
    marker."""
    import json

    from EPDSegmentationLib.core import stream

    out = tmp_path / "out"
    args = ["segment", str(spine_cases / "full.nii.gz"), "-o", str(out), "--model",
            str(tiny_model_path), "--level", "L3"]
    real = stream.stream_slabs

    def broken(*a, **kw):
        raise MemoryError("no room for the slab")

    monkeypatch.setattr(stream, "stream_slabs", broken)
    assert main(args) == 1
    assert sorted(p.name for p in out.iterdir()) == ["cohort.csv"]
    monkeypatch.setattr(stream, "stream_slabs", real)
    assert main(args + ["--overwrite"]) == 0        # the table exists: a new run of it
    assert (out / "full_levels.png").is_file()
    marker = json.loads((out / "full_provenance.json").read_text())
    assert "full_levels.png" in [o["file"] for o in marker["outputs"]]
