"""The main job's demo and the EPD benchmark run end to end (the benchmark on a tiny input)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from EPDSegmentationLib.cli.main import main
from EPDSegmentationLib.cli.demo import area_table
from EPDSegmentationLib.core.example import example_labels


def test_demo_writes_png_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path)]) == 0
    png = tmp_path / "epd_vs_nearest.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "IMAT" in out and "1/8 nearest" in out
    before = png.stat().st_mtime_ns
    assert main(["demo", "--output", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert png.stat().st_mtime_ns == before
    assert main(["demo", "--output", str(tmp_path), "--overwrite"]) == 0


def test_epd_keeps_areas_and_nearest_does_not_for_thin_imat():
    labels = example_labels()
    table = area_table(labels, (2, 4, 8), 0.78)
    for k in (2, 4, 8):
        np.testing.assert_allclose(table[k]["epd"], table["full"], rtol=1e-6)
    imat_err = abs(table[8]["nearest"][2] - table["full"][2]) / table["full"][2]
    assert imat_err > 0.05


def test_benchmark_runs_quick(repo_root):
    done = subprocess.run([sys.executable, str(repo_root / "Testing/benchmarks/bench_epd.py"),
                           "--quick", "--factors", "4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "EPD (1 thread)" in done.stdout and "one_hot+avg_pool /" in done.stdout
