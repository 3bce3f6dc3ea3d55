"""``epdseg segment`` end to end on CPU: real files in, every output written and read back.

The network is a small random-weight model in the real file format (conftest.tiny_model_path):
these tests check the pipeline and the files, not segmentation accuracy.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from EPDSegmentationLib.core.classes import TISSUES
from EPDSegmentationLib.cli.main import main
from EPDSegmentationLib.io import read_seg_nrrd, read_volume, write_dicom_series, write_volume
from EPDSegmentationLib.cli.segment import find_cases, parse_slices
from EPDSegmentationLib.core.volume import hu_range_problem

OUTPUTS = (".seg.nrrd", "_soft.seg.nrrd", "_probabilities.nrrd", "_bodycomp.csv",
           "_overlay.png")


@pytest.fixture(scope="module")
def phantom_volume(phantom_ct):
    return phantom_ct(5, 3, 96, 5.0)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, phantom_volume):
    """A NIfTI case, a DICOM series case (JPEG 2000), and a label map posing as a CT."""
    hu, labels = phantom_volume
    root = tmp_path_factory.mktemp("cases")
    write_volume(hu, root / "ct_a.nii.gz")
    write_dicom_series(hu, root / "ct_dicom", transfer_syntax="jpeg2000")
    write_volume(labels, root / "not_ct.nrrd")
    return root


def _run(*args):
    return main(["segment", *map(str, args)])


def test_nifti_case_writes_every_output(cases, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(cases / "ct_a.nii.gz", "-o", out, "--model", tiny_model_path,
                "--slices", "0-1", "--probabilities") == 0
    text = capsys.readouterr().out
    assert "ct_a" in text and "ok" in text and "device cpu" in text
    for suffix in OUTPUTS:
        assert (out / f"ct_a{suffix}").is_file(), suffix
    ct = read_volume(cases / "ct_a.nii.gz")
    # hard labels on the input grid; the slice not asked for stays empty
    labels = read_seg_nrrd(out / "ct_a.seg.nrrd").array
    assert labels.shape == ct.array.shape
    assert labels[2].max() == 0 and labels[:2].max() > 0
    # the probability volume: 6 components summing to one where segmented
    import SimpleITK as sitk

    probs = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ct_a_probabilities.nrrd")))
    assert probs.shape == ct.array.shape + (6,)
    np.testing.assert_allclose(probs[:2].sum(-1), 1.0, atol=1e-4)
    assert probs[2].max() == 0
    np.testing.assert_array_equal(probs[:2].argmax(-1), labels[:2])
    # the table: five tissues for each of the two slices, then the whole range
    rows = list(csv.DictReader(open(out / "ct_a_bodycomp.csv")))
    assert [r["slice"] for r in rows].count("0") == 5
    assert {r["tissue"] for r in rows} == {"MUS", "IMAT", "SAT", "VAT", "MSC"}
    px_cm2 = ct.pixel_area_mm2 / 100
    hard0 = {r["tissue"]: float(r["hard_area_cm2"]) for r in rows if r["slice"] == "0"}
    assert hard0["MUS"] == pytest.approx((labels[0] == 1).sum() * px_cm2, rel=1e-6)


def test_existing_outputs_are_kept_unless_overwrite(cases, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out"
    args = (cases / "ct_a.nii.gz", "-o", out, "--model", tiny_model_path, "--slices", "1")
    assert _run(*args) == 0
    assert not (out / "ct_a_probabilities.nrrd").exists()     # opt-in (--probabilities)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _run(*args) == 1
    assert "use --overwrite" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert _run(*args, "--overwrite") == 0


def test_batch_reports_bad_cases_and_finishes_the_others(cases, tiny_model_path, tmp_path,
                                                         capsys):
    (cases / "broken.nrrd").write_bytes(b"NRRD0004\nthis is not a volume\n")
    try:
        out = tmp_path / "out"
        assert _run(cases, "-o", out, "--model", tiny_model_path, "--slices", "1") == 1
        captured = capsys.readouterr()
        assert "broken" in captured.err and "not_ct" in captured.err
        assert "mask or label map" in captured.err
        assert (out / "ct_a.seg.nrrd").is_file() and (out / "ct_dicom.seg.nrrd").is_file()
        assert not (out / "not_ct.seg.nrrd").exists()
    finally:
        (cases / "broken.nrrd").unlink()


def test_dicom_input_writes_dicom_seg_that_matches(cases, tiny_model_path, tmp_path):
    highdicom = pytest.importorskip("highdicom")
    out = tmp_path / "out"
    assert _run(cases / "ct_dicom", "-o", out, "--model", tiny_model_path, "--dicom-seg",
                "--probabilities") == 0
    ct = read_volume(cases / "ct_dicom")
    seg = highdicom.seg.segread(out / "ct_dicom_seg.dcm")
    back = seg.get_pixels_by_source_instance(ct.meta["sop_instance_uids"],
                                             combine_segments=True)
    labels = read_seg_nrrd(out / "ct_dicom.seg.nrrd").array
    np.testing.assert_array_equal(back, labels)
    check_frames_on_sources(out / "ct_dicom_seg.dcm", ct)
    prob = highdicom.seg.segread(out / "ct_dicom_prob_seg.dcm")
    assert prob.SegmentationType == "FRACTIONAL"
    assert prob.SegmentationFractionalType == "PROBABILITY"
    assert [d.SegmentLabel for d in prob.SegmentSequence] == [c.name for c in TISSUES]
    # frame n of every segment decodes to the probabilities on source instance n, within
    # half a quantisation step of 1/255
    import SimpleITK as sitk

    probs = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ct_dicom_probabilities.nrrd")))
    soft = prob.get_pixels_by_source_instance(ct.meta["sop_instance_uids"],
                                              rescale_fractional=True)
    assert soft.shape == probs[..., 1:].shape
    np.testing.assert_allclose(soft, probs[..., 1:], atol=0.5 / 255 + 1e-6)
    # the values vary from slice to slice by many steps, so frames on the wrong instance or
    # segments in the wrong order would not pass
    assert np.abs(probs[0] - probs[1]).max() > 5 / 255 and soft.max() > 5 / 255
    assert np.abs(probs[..., 1] - probs[..., 3]).max() > 5 / 255
    check_frames_on_sources(out / "ct_dicom_prob_seg.dcm", ct)


def check_frames_on_sources(path, ct):
    """Every frame of a SEG references a source instance and lies on its plane (position
    and orientation), one frame per instance and segment."""
    import pydicom

    raw = pydicom.dcmread(path)
    sources = {uid: pydicom.dcmread(f, stop_before_pixels=True)
               for uid, f in zip(ct.meta["sop_instance_uids"], ct.meta["files"])}
    seen = []
    for frame in raw.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        src = sources[ref]
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in src.ImagePositionPatient], atol=1e-3)
        seen.append(ref)
    np.testing.assert_allclose(
        [float(v) for v in raw.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
         .ImageOrientationPatient],
        [float(v) for v in next(iter(sources.values())).ImageOrientationPatient], atol=1e-6)
    assert sorted(seen) == sorted(list(sources) * len(TISSUES))


def test_dicom_seg_needs_a_dicom_source(cases, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(cases / "ct_a.nii.gz", "-o", out, "--model", tiny_model_path,
                "--dicom-seg") == 1
    assert "DICOM SEG needs a DICOM source" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_dicom_seg_of_unreferenceable_sources_writes_nothing(totalseg_dir, tiny_model_path,
                                                             tmp_path, capsys):
    """The shared series was de-identified with blank study/series UIDs: a SEG could not
    reference it. That is said before anything is written, so a rerun is not blocked."""
    pytest.importorskip("highdicom")
    out = tmp_path / "out"
    args = (totalseg_dir / "ct_dicom", "-o", out, "--model", tiny_model_path, "--slices", "3")
    assert _run(*args, "--dicom-seg") == 1
    err = capsys.readouterr().err
    assert "ct_dicom" in err and "StudyInstanceUID" in err and "de-identified" in err
    assert not out.exists() or list(out.iterdir()) == []
    assert _run(*args) == 0                     # nothing left behind blocks the rerun
    assert (out / "ct_dicom.seg.nrrd").is_file()


def test_image_that_is_not_hu_is_refused_with_the_modules_rule(phantom_volume, tiny_model_path,
                                                               tmp_path, capsys):
    """A float image with values 0..1500 (an MR image, or CT without its rescale) is not CT:
    refused with the file's name and the rule the Slicer module applies (no voxel at or
    below -100 HU), nothing written."""
    hu, _ = phantom_volume
    mr = tmp_path / "t1_mr.nii.gz"
    write_volume(hu.with_array(np.clip(hu.array + 1000.0, 0, 1500).astype(np.float32)), mr)
    out = tmp_path / "out"
    assert _run(mr, "-o", out, "--model", tiny_model_path) == 1
    err = capsys.readouterr().err
    assert str(mr) in err
    assert hu_range_problem(0.0, 1500.0) in err          # the module's sentence, word for word
    assert "does not look like CT in Hounsfield units" in err and "-100 HU" in err
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("value", [0.0, -1024.0])
def test_empty_volume_is_refused(value, phantom_volume, tiny_model_path, tmp_path, capsys):
    """A blank volume (every voxel the same, air or zero) gives a clear message naming it."""
    hu, _ = phantom_volume
    blank = tmp_path / "blank.nrrd"
    write_volume(hu.with_array(np.full(hu.array.shape, value, np.float32)), blank)
    out = tmp_path / "out"
    assert _run(blank, "-o", out, "--model", tiny_model_path) == 1
    err = capsys.readouterr().err
    assert str(blank) in err and "empty image" in err and f"every voxel is {value:g}" in err
    assert not out.exists() or list(out.iterdir()) == []


def test_module_and_command_line_share_one_ct_rule():
    assert hu_range_problem(-1024.0, 1500.0) is None
    assert hu_range_problem(-100.0, 40.0) is None
    assert "nothing at or below -100 HU" in hu_range_problem(-99.0, 40.0)
    assert "empty image" in hu_range_problem(5.0, 5.0)
    assert "not finite" in hu_range_problem(float("nan"), 40.0)
    import inspect

    pytest.importorskip("slicer")
    from EPDSegmentationLib.mrml import nodes as mrml_nodes

    source = inspect.getsource(mrml_nodes.check_ct_volume)
    assert "hu_range_problem(" in source and "HU_CEILING_OF_MINIMUM" not in source


def test_unexpected_error_in_one_case_is_reported_and_the_batch_goes_on(
        cases, tiny_model_path, tmp_path, capsys, monkeypatch):
    """A RuntimeError (e.g. the CPU out of memory) in one case: that case fails with its
    traceback on stderr and without leftover files; the next case still runs; exit 1."""
    from EPDSegmentationLib.core import inference

    real = inference.network_slab
    calls = []

    def flaky(hu, *args, **kwargs):
        calls.append(hu.shape)
        if len(calls) == 1:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 99 GB")
        return real(hu, *args, **kwargs)

    monkeypatch.setattr(inference, "network_slab", flaky)
    out = tmp_path / "out"
    assert _run(cases / "ct_a.nii.gz", cases / "ct_dicom", "-o", out, "--model",
                tiny_model_path, "--slices", "1") == 1
    captured = capsys.readouterr()
    assert "ct_a" in captured.err and "can't allocate memory" in captured.err
    assert "Traceback" not in captured.err      # out of memory is said plainly, with a hint
    assert "--batch-size" in captured.err
    assert not list(out.glob("ct_a*"))
    assert (out / "ct_dicom.seg.nrrd").is_file()
    assert "FAILED" in captured.out and "ok" in captured.out


def test_a_bug_in_one_case_shows_its_traceback_and_the_batch_goes_on(
        cases, tiny_model_path, tmp_path, capsys, monkeypatch):
    """An error nobody expected (a bug) fails its case with the traceback on stderr; files
    the case had written are removed; the other case still finishes; exit 1."""
    from EPDSegmentationLib.io import overlay

    real = overlay.write_overlay_png

    def broken(path, *args, **kwargs):
        if "ct_a" in str(path):
            raise KeyError("a bug in the overlay")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(overlay, "write_overlay_png", broken)
    out = tmp_path / "out"
    assert _run(cases / "ct_a.nii.gz", cases / "ct_dicom", "-o", out, "--model",
                tiny_model_path, "--slices", "1") == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "a bug in the overlay" in err
    assert not list(out.glob("ct_a*"))           # its .seg.nrrd, soft, CSV ... removed again
    assert (out / "ct_dicom_overlay.png").is_file()
    monkeypatch.setattr(overlay, "write_overlay_png", real)
    assert _run(cases / "ct_a.nii.gz", "-o", out, "--model", tiny_model_path,
                "--slices", "1") == 0            # and the rerun is not blocked


def test_missing_input_among_several_is_reported_and_the_others_run(cases, tiny_model_path,
                                                                    tmp_path, capsys):
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    out = tmp_path / "out"
    assert _run(tmp_path / "missing.nii.gz", cases / "ct_a.nii.gz", empty, "-o", out,
                "--model", tiny_model_path, "--slices", "1") == 1
    captured = capsys.readouterr()
    assert "missing.nii.gz: no such file or folder" in captured.err
    assert "empty_folder" in captured.err and "holds no DICOM files" in captured.err
    assert (out / "ct_a.seg.nrrd").is_file()
    assert captured.out.count("FAILED") == 2


def test_bad_model_and_bad_arguments_exit_2(cases, tmp_path, capsys):
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"not a model")
    assert _run(cases / "ct_a.nii.gz", "-o", tmp_path / "o", "--model", fake) == 2
    assert "fake" in capsys.readouterr().err
    assert _run(tmp_path / "missing.nii.gz", "-o", tmp_path / "o") == 2
    assert "no such file" in capsys.readouterr().err


def test_manifest_of_images(cases, tmp_path):
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"image\n{cases / 'ct_a.nii.gz'}\n{cases / 'ct_dicom'}\n")
    assert [c.name for c in find_cases([manifest])] == ["ct_a", "ct_dicom"]


@pytest.mark.parametrize("spec,n,want", [
    ("all", 4, [0, 1, 2, 3]), (None, 2, [0, 1]), ("1-2", 4, [1, 2]),
    ("3,0-1,1", 5, [0, 1, 3]),
])
def test_parse_slices(spec, n, want):
    assert parse_slices(spec, n) == want


@pytest.mark.parametrize("spec,message", [("5", "outside"), ("3-1", "backwards"),
                                          ("a-b", "cannot read")])
def test_parse_slices_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_slices(spec, 4)


# ----------------------------------------------------------------------- output safety

#: a real `epdseg segment` process whose inference can be slowed from the environment
#: (EPD_SLOW_FROM: from the n-th case's predictor (1-based) on, each slab's prediction sleeps
#: EPD_SLOW_S seconds after touching EPD_STARTED), so a test can signal it mid-case
RUNNER = """
import os, sys, time
from EPDSegmentationLib.core import inference
real, calls = inference.slab_predictor, []
def slow(*args, **kwargs):
    calls.append(1)
    predict = real(*args, **kwargs)
    if len(calls) < int(os.environ.get("EPD_SLOW_FROM", "1")):
        return predict
    def slowed(*a, **k):
        open(os.environ["EPD_STARTED"], "a").close()
        time.sleep(float(os.environ.get("EPD_SLOW_S", "0")))
        return predict(*a, **k)
    return slowed
inference.slab_predictor = slow
from EPDSegmentationLib.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _process(tmp_path, args, **env):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(repo / "EPDSegmentation"), str(repo), os.environ.get("PYTHONPATH", "")]),
        EPD_STARTED=str(tmp_path / "started"), **{k: str(v) for k, v in env.items()})
    return subprocess.Popen([sys.executable, str(script), "segment", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environ)


def _hidden(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_two_processes_on_one_folder_keep_every_case_whole(cases, tiny_model_path, tmp_path):
    """Two real runs on the same cases and folder at once: each case is written by one of
    them, complete (all outputs and the marker), nothing of it deleted by the other."""
    from EPDSegmentationLib.io.staging import case_state
    from EPDSegmentationLib.cli.segment import output_roles

    out = tmp_path / "out"
    args = (cases / "ct_a.nii.gz", cases / "ct_dicom", "-o", out, "--model", tiny_model_path,
            "--slices", "0-1")
    runs = [_process(tmp_path, args, EPD_SLOW_S=1.5) for _ in range(2)]
    texts = [r.communicate(timeout=300) for r in runs]
    for name in ("ct_a", "ct_dicom"):
        state, files = case_state(out, name, output_roles(dicom_seg=False))
        assert state == "complete", (name, texts)
        assert len(files) == len(output_roles(dicom_seg=False)) + 1     # and the marker
        oks = sum(f"\n{name} " in "\n" + o and any(
            line.startswith(name + " ") and line.endswith(" ok") for line in o.splitlines())
            for o, _ in texts)
        assert oks == 1, texts          # written once; the other run left it alone
    assert _hidden(out) == []
    err = "".join(e for _, e in texts)
    assert "being written by pid" in err or "complete earlier run" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigterm_removes_the_case_in_progress_and_keeps_the_old_outputs(
        cases, tiny_model_path, tmp_path):
    """SIGTERM during the second case of a run with --overwrite: exit 143, the summary of
    the finished case, no traceback; the interrupted case's earlier outputs are intact and
    nothing half-written (no hidden file) is left."""
    import signal
    import time

    out = tmp_path / "out"
    common = ("-o", out, "--model", tiny_model_path, "--slices", "1")
    assert _run(cases / "ct_dicom", *common) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    run = _process(tmp_path, (cases / "ct_a.nii.gz", cases / "ct_dicom", *common,
                              "--overwrite"), EPD_SLOW_FROM=2, EPD_SLOW_S=60)
    deadline = time.time() + 120
    while not (tmp_path / "started").exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGTERM, (stdout, stderr)
    assert "interrupted by SIGTERM" in stderr and "ct_dicom" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert any(line.startswith("ct_a ") and line.endswith(" ok") for line in stdout.splitlines())
    assert {p.name: p.read_bytes() for p in out.glob("ct_dicom*")} == before
    assert (out / "ct_a_provenance.json").is_file() and _hidden(out) == []


def test_failed_overwrite_keeps_the_old_outputs(cases, tiny_model_path, tmp_path, capsys,
                                                monkeypatch):
    from EPDSegmentationLib.io import overlay

    out = tmp_path / "out"
    args = (cases / "ct_a.nii.gz", "-o", out, "--model", tiny_model_path, "--slices", "1")
    assert _run(*args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(overlay, "write_overlay_png", broken)
    assert _run(*args, "--overwrite") == 1
    assert "No space left" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_rerun_says_which_cases_are_incomplete(cases, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out"
    args = (cases / "ct_a.nii.gz", "-o", out, "--model", tiny_model_path, "--slices", "1")
    assert _run(*args) == 0
    assert _run(*args) == 1
    assert "complete earlier run" in capsys.readouterr().err
    (out / "ct_a_provenance.json").unlink()          # as an older or killed run leaves it
    assert _run(*args) == 1
    err = capsys.readouterr().err
    assert "INCOMPLETE" in err and "ct_a_provenance.json" in err and "ct_a.seg.nrrd" in err
    assert _run(*args, "--overwrite") == 0
    assert (out / "ct_a_provenance.json").is_file()


def test_unwritable_output_folder_is_refused_before_any_inference(cases, tiny_model_path,
                                                                 tmp_path, capsys,
                                                                 monkeypatch):
    from EPDSegmentationLib.core import inference

    calls = []
    monkeypatch.setattr(inference, "slab_predictor", lambda *a, **k: calls.append(1))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert _run(cases / "ct_a.nii.gz", "-o", blocker / "out", "--model",
                tiny_model_path) == 2
    err = capsys.readouterr().err
    assert "cannot create the output folder" in err and str(blocker) in err
    assert calls == [] and "Traceback" not in err


def test_outputs_carry_their_provenance(cases, tiny_model_path, tmp_path):
    import json

    import nrrd

    out = tmp_path / "out"
    assert _run(cases / "ct_dicom", "-o", out, "--model", tiny_model_path, "--slices",
                "1") == 0
    prov = json.loads((out / "ct_dicom_provenance.json").read_text())
    ct = read_volume(cases / "ct_dicom")
    assert prov["source"] == str((cases / "ct_dicom").resolve())
    assert prov["dicom"]["series_instance_uid"] == ct.meta["series_uid"]
    assert prov["dicom"]["study_instance_uid"] == ct.meta["study_uid"]
    assert prov["dicom"]["sop_instance_uids"] == ct.meta["sop_instance_uids"]
    assert prov["model"]["factor"] == 2 and prov["epdseg_version"]
    assert prov["command"].startswith("epdseg segment") and "--slices 1" in prov["command"]
    assert {o["file"] for o in prov["outputs"]} == {f"ct_dicom{s}" for s in OUTPUTS if s != "_probabilities.nrrd"}
    header = nrrd.read_header(str(out / "ct_dicom.seg.nrrd"))
    assert header["EPD_source"] == prov["source"]
    assert header["EPD_series_instance_uid"] == ct.meta["series_uid"]
    assert json.loads(header["EPD_model"])["factor"] == 2


def test_no_mirror_runs_the_network_once_and_says_so(cases, tiny_model_path, tmp_path):
    """--no-mirror: other probabilities than the default mirror averaging (a random model
    is not left-right symmetric), and the provenance and headers say which was used."""
    import json

    import nrrd

    soft = {}
    for flag in ([], ["--no-mirror"]):
        out = tmp_path / ("plain" if flag else "mirrored")
        assert _run(cases / "ct_a.nii.gz", "-o", out, "--model", tiny_model_path, "--slices",
                    "1", *flag) == 0
        prov = json.loads((out / "ct_a_provenance.json").read_text())
        assert prov["model"]["mirror"] is not bool(flag)
        header = nrrd.read_header(str(out / "ct_a.seg.nrrd"))
        assert json.loads(header["EPD_model"])["mirror"] is not bool(flag)
        soft[bool(flag)] = read_seg_nrrd(out / "ct_a_soft.seg.nrrd").meta["fractions"]
    assert np.abs(soft[True].astype(float) - soft[False].astype(float)).max() > 0.01


def test_a_calibrated_model_is_named_as_such_in_the_outputs(cases, tiny_model_path, tmp_path):
    """The same weights with class weights in the card are another model: the provenance,
    the headers and the cohort row's model_version say so, and the soft maps differ."""
    import json
    import shutil

    import nrrd

    cal = tmp_path / "cal"
    cal.mkdir()
    shutil.copy(str(tiny_model_path) + ".safetensors", cal / "tiny.safetensors")
    card = json.loads(open(str(tiny_model_path) + ".json").read())
    card["calibration"] = {"pixel_mm": [1.0], "class_weights": [[1, 0.5, 1, 1, 2, 1]]}
    (cal / "tiny.json").write_text(json.dumps(card))
    soft, version = {}, {}
    for name, model in (("plain", tiny_model_path), ("cal", cal / "tiny")):
        out = tmp_path / name
        assert _run(cases / "ct_a.nii.gz", "-o", out, "--model", model, "--slices", "1",
                    "--cohort") == 0
        prov = json.loads((out / "ct_a_provenance.json").read_text())
        header = json.loads(nrrd.read_header(str(out / "ct_a.seg.nrrd"))["EPD_model"])
        assert ("calibration" in prov["model"]) is (name == "cal")
        assert header.get("calibration") == prov["model"].get("calibration")
        soft[name] = read_seg_nrrd(out / "ct_a_soft.seg.nrrd").meta["fractions"]
        with open(out / "cohort.csv") as f:
            version[name] = f.read().split("sha256:")[1][:12]
    assert version["plain"] != version["cal"]
    assert np.abs(soft["plain"].astype(float) - soft["cal"].astype(float)).max() > 0.01


def test_a_failing_dicom_seg_keeps_the_other_outputs(cases, tiny_model_path, tmp_path,
                                                     capsys, monkeypatch):
    pytest.importorskip("highdicom")
    from EPDSegmentationLib.cli import segment
    from EPDSegmentationLib.io import dicom_seg

    def broken(*a, **k):
        raise dicom_seg.DicomSegError("highdicom cannot read the SEG back")

    monkeypatch.setattr(segment, "write_dicom_seg", broken)      # where segment_case finds it
    out = tmp_path / "out"
    assert _run(cases / "ct_dicom", "-o", out, "--model", tiny_model_path, "--slices", "1",
                "--dicom-seg") == 1
    captured = capsys.readouterr()
    assert "DICOM SEG not written" in captured.err and "cannot read the SEG back" in captured.err
    for suffix in (s for s in OUTPUTS if s != "_probabilities.nrrd"):
        assert (out / f"ct_dicom{suffix}").is_file(), suffix
    assert not list(out.glob("*.dcm")) and _hidden(out) == []


def test_dicom_seg_of_a_deidentified_series_without_type2_attributes(cases, tiny_model_path,
                                                                    tmp_path):
    """De-identified slices without PatientBirthDate, AccessionNumber, PatientID and with
    an empty SpecificCharacterSet: both SEGs are written and read back."""
    import shutil

    import pydicom

    highdicom = pytest.importorskip("highdicom")
    series = tmp_path / "deid"
    shutil.copytree(cases / "ct_dicom", series)
    for f in series.iterdir():
        ds = pydicom.dcmread(f)
        for key in ("PatientBirthDate", "AccessionNumber", "PatientID", "SliceThickness"):
            delattr(ds, key)
        ds.SpecificCharacterSet = ""
        ds.save_as(f)
    out = tmp_path / "out"
    assert _run(series, "-o", out, "--model", tiny_model_path, "--slices", "1",
                "--dicom-seg") == 0
    for name in ("deid_seg.dcm", "deid_prob_seg.dcm"):
        assert highdicom.seg.segread(out / name).number_of_segments == len(TISSUES)
        assert pydicom.dcmread(out / name).PatientBirthDate == ""


def test_manifest_row_with_a_missing_file_is_reported_and_the_others_run(
        cases, tiny_model_path, tmp_path, capsys):
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"image\n{tmp_path / 'gone.nii.gz'}\n{cases / 'ct_a.nii.gz'}\n")
    out = tmp_path / "out"
    assert _run(manifest, "-o", out, "--model", tiny_model_path, "--slices", "1") == 1
    err = capsys.readouterr().err
    assert "row 2: image" in err and "gone.nii.gz does not exist" in err
    assert (out / "ct_a_provenance.json").is_file()


def test_model_given_as_a_pt_file_is_one_clear_line(cases, tmp_path, capsys):
    pt = tmp_path / "x.pt"
    pt.write_bytes(b"\x80\x02}q\x00.")
    assert _run(cases / "ct_a.nii.gz", "-o", tmp_path / "o", "--model", pt) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x.pt" in err and ".safetensors" in err
    assert "x.pt.safetensors" not in err and "Traceback" not in err


def test_a_path_with_letters_beyond_ascii_is_segmented(cases, tiny_model_path, tmp_path):
    """The provenance in the NRRD headers (ASCII) escapes a path's other letters instead of
    failing the case (a 'Müller/中' folder failed with UnicodeEncodeError)."""
    import shutil

    folder = tmp_path / "Müller_中"
    folder.mkdir()
    shutil.copy(cases / "ct_a.nii.gz", folder / "ct_ü.nii.gz")
    out = tmp_path / "out"
    assert _run(folder / "ct_ü.nii.gz", "-o", out, "--model", tiny_model_path, "--slices",
                "1") == 0
    seg = next(out.glob("*.seg.nrrd"))
    assert read_seg_nrrd(seg).array.shape == read_volume(cases / "ct_a.nii.gz").array.shape


def test_nan_voxels_are_named_even_when_the_network_ran_on_them(phantom_volume,
                                                                 tiny_model_path, tmp_path,
                                                                 capsys):
    """segment reads each slice once, checking it as it streams; NaN voxels in a segmented
    slice make the network's output NaN first, but the message names the input's problem
    (read_volume's), and nothing is written."""
    from EPDSegmentationLib.io.readers import nonfinite_error

    hu, _ = phantom_volume
    arr = hu.array.copy()
    arr[1, 40:44, 40:44] = np.nan
    bad = write_volume(hu.with_array(arr), tmp_path / "nan.nii.gz")
    out = tmp_path / "out"
    assert _run(bad, "-o", out, "--model", tiny_model_path) == 1
    err = capsys.readouterr().err
    assert str(nonfinite_error(bad, 16)) in err and "must be finite" not in err
    assert not out.exists() or list(out.iterdir()) == []
