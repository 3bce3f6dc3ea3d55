"""io/staging.py: a case's outputs appear together or not at all, and two runs on one
folder never write, replace or delete each other's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from EPDSegmentationLib.core.errors import EPDError, OutputError
from EPDSegmentationLib.io.staging import CaseStaging, case_state, check_output_folder

ROLES = ["segmentation", "table"]


def _stage(folder, name="c", text="new", overwrite=False):
    with CaseStaging(folder, name, overwrite=overwrite) as stage:
        for role in ROLES:
            stage.path(role).write_text(f"{text} {role}")
        return stage.commit({"source": "x"}, old_roles=ROLES)


def test_commit_moves_all_files_and_writes_the_marker_last(tmp_path):
    written = _stage(tmp_path)
    assert [p.name for p in written] == ["c.seg.nrrd", "c_bodycomp.csv", "c_provenance.json"]
    marker = json.loads((tmp_path / "c_provenance.json").read_text())
    assert {o["file"] for o in marker["outputs"]} == {"c.seg.nrrd", "c_bodycomp.csv"}
    assert marker["source"] == "x" and len(marker["outputs"][0]["sha256"]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    assert case_state(tmp_path, "c", ROLES)[0] == "complete"


def test_an_error_inside_the_case_leaves_the_folder_as_it_was(tmp_path):
    _stage(tmp_path, text="old")
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError):
        with CaseStaging(tmp_path, "c", overwrite=True) as stage:
            stage.path("segmentation").write_text("new")
            raise RuntimeError("inference failed")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_a_failing_overwrite_commit_puts_the_old_outputs_back(tmp_path, monkeypatch):
    from EPDSegmentationLib.io import staging

    _stage(tmp_path, text="old")
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    real, calls = staging._place, []

    def full_disk(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(staging, "_place", full_disk)
    with pytest.raises(OutputError, match="No space left"):
        _stage(tmp_path, text="new", overwrite=True)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_without_overwrite_a_file_that_appeared_meanwhile_is_never_replaced(tmp_path):
    with pytest.raises(OutputError, match="appeared while this case ran"):
        with CaseStaging(tmp_path, "c") as stage:
            for role in ROLES:
                stage.path(role).write_text("mine")
            (tmp_path / "c_bodycomp.csv").write_text("theirs")   # another writer
            stage.commit({}, old_roles=ROLES)
    assert (tmp_path / "c_bodycomp.csv").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c_bodycomp.csv"]


def test_a_live_lock_keeps_a_second_writer_out_and_a_stale_one_is_taken_over(tmp_path):
    with CaseStaging(tmp_path, "c"):
        with pytest.raises(OutputError, match=f"being written by pid {os.getpid()}"):
            CaseStaging(tmp_path, "c").__enter__()
        assert (tmp_path / ".c.lock").exists()          # the loser did not remove it
    # a lock left by a process that no longer runs (killed with SIGKILL)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket

    (tmp_path / ".c.lock").write_text(json.dumps({"host": socket.gethostname(),
                                                   "pid": int(dead)}))
    (tmp_path / ".c.partial-deadbeef").mkdir()          # and its staging folder
    _stage(tmp_path)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_outputs_without_the_marker_are_incomplete(tmp_path):
    _stage(tmp_path)
    (tmp_path / "c_provenance.json").unlink()
    state, present = case_state(tmp_path, "c", ROLES)
    assert state == "incomplete" and len(present) == 2
    _stage(tmp_path, overwrite=True)
    (tmp_path / "c.seg.nrrd").write_text("truncated")     # a file changed after the run
    assert case_state(tmp_path, "c", ROLES)[0] == "incomplete"
    assert case_state(tmp_path, "other", ROLES) == ("absent", [])


def test_output_folder_that_cannot_be_made_is_an_output_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot create the output folder") as info:
        check_output_folder(blocker / "out")
    assert isinstance(info.value, EPDError) and str(blocker) in str(info.value)
    with pytest.raises(OutputError, match="not a folder"):
        check_output_folder(blocker)
    assert check_output_folder(tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []
