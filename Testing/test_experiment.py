"""The paper's experiment as a grid of runs (training/experiment.py) and its results page
(training/report.py), at smoke size on the CPU."""

from __future__ import annotations

import json

import pytest

from training.__main__ import main
from training.experiment import PRESETS, grid, spec_from_folder
from training.logs import write_csv
from training.report import (collect, pairs_at_common_epoch, paired_gain, reference_gains,
                             stat, unfinished)


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
    expected = [p.format(k=k, s=s) for k, s in ((8, 0), (4, 0), (8, 1), (4, 1), (2, 0))
                for p in pair] + ["small/baseline_f1_aug/seed0"]
    assert [r.folder for r in grid(big)] == expected
    assert [r.folder for r in grid(big, seeds=[1])] == expected[4:8]
    assert grid(big, groups=["ablation", "large"]) == []


def test_run_folders_parse_back_and_bad_ones_are_refused():
    for spec in grid(PRESETS["paper"]):
        assert spec_from_folder(spec.folder) == spec
    for bad in ("small/epd_f8_aug", "small/epd_fx_aug/seed0", "small/magic_f2_aug/seed0",
                "medium/epd_f2_aug/seed0", "small/epd_f2_aug/s0"):
        with pytest.raises(ValueError, match="not a run folder"):
            spec_from_folder(bad)


@pytest.fixture
def running_experiment(tmp_path):
    """A cpu512 experiment folder in which the first 1/8 pair got 3 and 2 epochs (log.csv
    only, no model card): (folder, its experiment record)."""
    meta = {"preset": "cpu512", "settings": {k: v for k, v in PRESETS["cpu512"].items()
                                             if k != "runs"},
            "runs": [r.folder for r in grid(PRESETS["cpu512"])]}
    runs = tmp_path / "runs"

    def log(name, ious):
        (runs / name).mkdir(parents=True)
        write_csv(runs / name / "log.csv", [{"epoch": i + 1, "seconds": 10.0 * (i + 1),
                                             "val_full_iou": v} for i, v in enumerate(ious)])

    log("small/conventional_f8_aug/seed0", [0.30, 0.35, 0.40])
    log("small/epd_f8_aug/seed0", [0.32, 0.39])
    (tmp_path / "experiment.json").write_text(json.dumps(meta))
    return tmp_path, meta


def test_report_of_a_running_experiment_lists_unfinished_runs_and_pairs(running_experiment):
    folder, meta = running_experiment
    todo = unfinished(folder, meta)
    assert [t["run"] for t in todo] == meta["runs"]  # nothing finished, planned order
    assert todo[0] == {"run": "small/conventional_f8_aug/seed0", "epochs_done": 3,
                       "epochs": 25, "seconds_per_epoch": 20.0, "val_full_iou": 0.40}
    assert todo[2]["epochs_done"] == 0
    (pair,) = pairs_at_common_epoch(folder, meta)  # compared at epoch 2, not 3 against 2
    assert pair["epoch"] == 2 and pair["gain"] == pytest.approx(0.39 - 0.35)
    assert pair["pair"] == "small/{conventional,epd}_f8_aug/seed0"


@pytest.mark.slow
def test_report_page_of_an_experiment_with_no_finished_run(running_experiment, tmp_path):
    """How far each run got and the pairs so far, and no figure of results (none exist)."""
    folder, _ = running_experiment
    page = tmp_path / "page"
    assert main(["report", "--runs", str(folder), "--output", str(page)]) == 0
    tables = (page / "tables.md").read_text()
    assert "No run has finished yet." in tables
    assert "| small/conventional_f8_aug/seed0 | 3 / 25 | 20 | 40.00 |" in tables
    assert "| small/{conventional,epd}_f8_aug/seed0 | 2 | 35.00 | 39.00 | 4.00 |" in tables
    assert (page / "progress.png").exists() and not (page / "iou_dice_vs_factor.png").exists()
    summary = json.loads((page / "summary.json").read_text())
    assert summary["configurations"] == {} and len(summary["unfinished"]) == 11


def test_reference_gains_from_an_earlier_summary():
    conf = {f"small/{m}_f{k}_aug": {"seeds": [0, 1], "full": {"IoU": {"mean": v}}}
            for m, k, v in (("conventional", 2, 0.5), ("epd", 2, 0.55), ("conventional", 4, 0.4),
                            ("epd", 4, 0.43))}
    conf["small/epd_f8_aug"] = {"seeds": [0], "full": {"IoU": {"mean": 0.3}}}
    ref = reference_gains({"configurations": conf})
    assert set(ref) == {2, 4}  # 1/8 has no conventional run to pair with
    assert ref[2][0] == pytest.approx(0.05) and ref[4][0] == pytest.approx(0.03)
    with_gains = reference_gains({"configurations": conf, "gains": {
        "small/f8_aug": {"full": {"mean": 0.02, "sd": 0.004}}}})
    assert with_gains[8] == (0.02, 0.004)


@pytest.mark.slow
def test_experiment_runs_resumes_and_reports(tmp_path, capsys, repo_root):
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

    assert main(["report", "--runs", str(out), "--output", str(page), "--reference",
                 str(repo_root / "docs" / "results" / "summary.json")]) == 0
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
    assert summary["gains"]["small/f2_aug"]["full"]["per_seed"] == [pytest.approx(gain[0])]
    assert summary["unfinished"] == []
    for name in ("iou_dice_vs_factor.png", "downsampling.png", "gain_vs_factor.png",
                 "progress.png"):
        assert (page / name).stat().st_size > 10_000
    assert main(["report", "--runs", str(out), "--output", str(page)]) == 2  # no overwrite
