"""The paper's experiment as a grid of runs (training/experiment.py) and its results page
(training/report.py), at smoke size on the CPU."""

from __future__ import annotations

import json

import pytest

from training.__main__ import main
from training.experiment import PRESETS, grid, spec_from_folder
from training.report import collect, paired_gain, stat


def test_grid_has_every_configuration_of_the_paper_once():
    runs = grid(PRESETS["paper"])
    assert len({r.folder for r in runs}) == len(runs)
    main = [r for r in runs if r.dataset == "small" and r.method in ("baseline", "conventional", "epd")]
    # baseline + 2 methods x 3 factors, with and without augmentation, 3 seeds
    assert len(main) == 7 * 2 * 3
    assert {r.factor for r in main if r.method == "baseline"} == {1}
    ablation = [r for r in runs if r.method in ("epd_labels", "epd_images")]
    assert len(ablation) == 2 * 3 * 3 and all(r.augment for r in ablation)
    assert {r.seed for r in runs if r.dataset == "large"} == {0}
    # seed by seed: a partial result already holds every main configuration of seed 0
    assert [r.seed for r in runs[:14]] == [0] * 14


def test_cpu512_preset_is_the_cpu_preset_at_512_with_the_trimmed_runs_in_order():
    cpu, big = PRESETS["cpu"], PRESETS["cpu512"]
    # the same recipe, network, training and split as "cpu"; only the size and the runs differ
    assert {k: v for k, v in big.items() if k not in ("size", "seeds", "runs")} == \
        {k: v for k, v in cpu.items() if k not in ("size", "seeds")}
    assert big["size"] == PRESETS["paper"]["size"] == 512
    pair = ["small/conventional_f{k}_aug/seed{s}", "small/epd_f{k}_aug/seed{s}"]
    expected = [p.format(k=k, s=s) for k, s in ((8, 0), (8, 1), (4, 0), (4, 1), (2, 0))
                for p in pair] + ["small/baseline_f1_aug/seed0"]
    assert [r.folder for r in grid(big)] == expected
    assert [r.folder for r in grid(big, seeds=[1])] == expected[2:4] + expected[6:8]
    assert grid(big, groups=["ablation", "large"]) == []


def test_run_folders_parse_back_and_bad_ones_are_refused():
    for spec in grid(PRESETS["paper"]):
        assert spec_from_folder(spec.folder) == spec
    for bad in ("small/epd_f8_aug", "small/epd_fx_aug/seed0", "small/magic_f2_aug/seed0",
                "medium/epd_f2_aug/seed0", "small/epd_f2_aug/s0"):
        with pytest.raises(ValueError, match="not a run folder"):
            spec_from_folder(bad)


@pytest.mark.slow
def test_experiment_runs_resumes_and_reports(tmp_path, capsys):
    out, page = tmp_path / "exp", tmp_path / "page"
    skip = ["small/*_noaug/*", "small/*_f4_*/*", "small/*_f8_*/*"]
    args = ["experiment", "--preset", "smoke", "--output", str(out), "--groups", "main",
            "--device", "cpu", "--skip", *skip]
    assert main(args) == 0
    folders = sorted(p.parent.relative_to(out / "runs").as_posix()
                     for p in (out / "runs").glob("*/*/seed*/model.json"))
    assert folders == ["small/baseline_f1_aug/seed0", "small/conventional_f2_aug/seed0",
                       "small/epd_f2_aug/seed0"]
    assert main(args + ["--dry-run"]) == 0
    assert "3 runs, 3 done, 0 to go" in capsys.readouterr().err  # finished runs are skipped
    assert main(["experiment", "--preset", "cpu", "--output", str(out), "--dry-run"]) == 2

    assert main(["report", "--runs", str(out), "--output", str(page)]) == 0
    tables = (page / "tables.md").read_text()
    assert "| EPD 1/2 | 1 |" in tables and "| Conventional 1/2 | 1 |" in tables
    assert "+2.85" in tables  # the paper's gain beside ours
    data = collect(out)
    conv, epd = data[("small", "conventional", 2, True)], data[("small", "epd", 2, True)]
    gain = paired_gain(conv, epd, "full", "IoU")
    assert gain[2] == 1
    assert gain[0] == pytest.approx(stat(epd, "full", "IoU")[0] - stat(conv, "full", "IoU")[0])
    summary = json.loads((page / "summary.json").read_text())
    assert summary["configurations"]["small/epd_f2_aug"]["full"]["IoU"]["n"] == 1
    for name in ("iou_dice_vs_factor.png", "downsampling.png"):
        assert (page / name).stat().st_size > 10_000
    assert main(["report", "--runs", str(out), "--output", str(page)]) == 2  # no overwrite
