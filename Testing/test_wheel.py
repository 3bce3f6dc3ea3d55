"""The package as users install it: a wheel (not the editable install the suite runs on) in a
fresh virtual environment, with every subpackage and the bundled model inside it."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # no build isolation: the build needs only setuptools, already in the test environment
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--disable-pip-version-check", "-q", "-w", out, REPO], cwd=out)
    (path,) = out.glob("epd_segmentation-*.whl")
    return path


def test_wheel_holds_every_subpackage_and_the_bundled_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("EPDSegmentationLib/core", "EPDSegmentationLib/io", "EPDSegmentationLib/cli",
                    "EPDSegmentationLib/mrml", "training", "training/phantom"):
        assert f"{package}/__init__.py" in names, package
    for f in ("Models/EPDBodyComp_f2.safetensors", "Models/EPDBodyComp_f2.json",
              "Sample/EPDPhantomCT.nrrd"):
        assert f"EPDSegmentationLib/bundled/{f}" in names, f
    assert not [n for n in names if n.startswith("EPDSegmentationLib/phantom")]


@pytest.mark.slow
def test_wheel_in_a_fresh_environment_segments_the_sample(wheel, tmp_path):
    """Installed from the wheel alone, `epdseg segment` finds its bundled model and writes
    every output for the bundled sample, with the package imported from that environment."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    # the heavy dependencies (torch, SimpleITK, ...) come from the test environment, after
    # the fresh environment's own packages: its .pth files (our editable install) stay unread
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "-q",
          "--disable-pip-version-check", wheel])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run([py, "-c", "import EPDSegmentationLib; print(EPDSegmentationLib.__file__)"],
                 cwd=tmp_path, env=env).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    sample = Path(_run([py, "-c", "from EPDSegmentationLib.core.resources import sample_ct_path;"
                                  "print(sample_ct_path())"], cwd=tmp_path, env=env).stdout.strip())
    assert sample.is_relative_to(venv), sample
    _run([venv / "bin" / "epdseg", "segment", sample, "-o", tmp_path / "out", "--slices", "7-8",
          "--device", "cpu"], cwd=tmp_path, env=env)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    for suffix in (".seg.nrrd", "_soft.seg.nrrd", "_bodycomp.csv", "_overlay.png"):
        assert any(n.endswith(suffix) for n in written), (suffix, written)
