"""Training end to end on tiny phantom data, CPU only: data parallelism with torchrun (gloo),
exact resume, export with the model card, learning, evaluation, and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from EPDSegmentationLib.core.inference import predict_volume
from EPDSegmentationLib.core.model_io import load_model
from training.__main__ import main
from training.checkpoint import load_checkpoint
from training.data import phantom_records
from training.logs import read_csv

REPO = Path(__file__).resolve().parents[1]
TINY = ["--phantom-subjects", "4", "--phantom-slices", "2", "--phantom-size", "48",
        "--factor", "2", "--width", "4", "--batch-size", "4", "--quiet"]
LOSS_COLUMNS = ("train_loss", "train_mae", "train_dice", "sigma_mae", "sigma_dice", "val_loss",
                "val_dice", "val_full_dice")


def train(out: Path, *extra: str) -> None:
    assert main(["train", *TINY, "--output", str(out), *extra]) == 0


def torchrun_two_ranks(*args: str) -> None:
    """python -m training train ARGS as 2 CPU ranks (gloo) under torchrun."""
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "training", "train", *args],
                         capture_output=True, text=True, cwd=REPO, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert two.returncode == 0, two.stderr


def curves(run: Path):
    return [{k: row[k] for k in LOSS_COLUMNS} for row in read_csv(run / "log.csv")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "straight"
    train(out, "--epochs", "3")
    return out


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_match_one_process(tmp_path, uninterrupted):
    """2 CPU processes with gloo, global batch 4 (2 + 2 slices), give the weights and loss
    curve of one process with batch 4."""
    torchrun_two_ranks(*TINY, "--epochs", "3", "--output", str(tmp_path / "two"))
    a = load_file(str(uninterrupted / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    for ra, rb in zip(curves(uninterrupted), curves(tmp_path / "two")):
        for k in LOSS_COLUMNS:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), k
    assert len(curves(tmp_path / "two")) == 3
    card = json.loads((tmp_path / "two" / "model.json").read_text())
    assert card["training"]["world_size"] == 2
    assert card["training"]["command"].startswith("torchrun --nproc-per-node 2 -m training train")


def test_rank_batches_split_every_global_batch_without_repeats():
    """Ranks share each global batch by striding, repeat nothing, and weight a short batch
    split unevenly so the rank average of weighted means is the global mean."""
    from training.distributed import RankBatches

    one = RankBatches(11, 4, 1, 0, seed=3)
    one.set_epoch(2)
    batches = list(one)
    assert [len(b) for b in batches] == [4, 4, 3] and one.weights() == [1.0, 1.0, 1.0]
    assert sorted(i for b in batches for i in b) == list(range(11))
    x = np.random.default_rng(0).random(11)
    for world in (2, 4):
        ranks = [RankBatches(11, 4, world, r, seed=3) for r in range(world)]
        for r in ranks:
            r.set_epoch(2)
        per_rank = [list(r) for r in ranks]
        kept = [b for b in batches if len(b) >= world]
        assert ranks[0].dropped == 11 - sum(len(b) for b in kept)
        for j, b in enumerate(kept):
            shares = [per_rank[r][j] for r in range(world)]
            assert sorted(i for s in shares for i in s) == sorted(b)
            averaged = np.mean([ranks[r].weights()[j] * x[shares[r]].mean()
                                for r in range(world)])
            assert averaged == pytest.approx(x[b].mean(), rel=1e-12)
    assert RankBatches(11, 4, 4, 0).dropped == 3  # a last batch of 3 cannot feed 4 ranks
    # full batches: exactly the batches torch's DistributedSampler gives each rank
    ds = torch.utils.data.TensorDataset(torch.arange(12))
    for r in range(2):
        ours = RankBatches(12, 4, 2, r, seed=5)
        ref = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=r, seed=5)
        for epoch in (0, 1):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            theirs = [b.tolist() for (b,) in torch.utils.data.DataLoader(ds, 2, sampler=ref)]
            assert list(ours) == theirs


@pytest.mark.slow
def test_torchrun_uneven_last_batch_matches_one_process(tmp_path):
    """9 training slices, global batch 6: the last batch (3) splits 2 + 1 over two ranks;
    its weighted loss keeps the two runs together."""
    odd = [a if a != "2" or TINY[i - 1] != "--phantom-slices" else "3" for i, a in enumerate(TINY)]
    odd[odd.index("--batch-size") + 1] = "6"
    assert main(["train", *odd, "--epochs", "2", "--output", str(tmp_path / "one")]) == 0
    torchrun_two_ranks(*odd, "--epochs", "2", "--output", str(tmp_path / "two"))
    card = json.loads((tmp_path / "one" / "model.json").read_text())
    assert card["training"]["data"]["train_slices"] == 9
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    for ra, rb in zip(curves(tmp_path / "one"), curves(tmp_path / "two")):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tmp_path, uninterrupted):
    out = tmp_path / "resumed"
    train(out, "--epochs", "1")
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    train(out, "--epochs", "3", "--resume")
    assert curves(out) == curves(uninterrupted)  # bit for bit: same batches, same states
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(uninterrupted / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 3 and len(state["history"]) == 3


@pytest.mark.slow
def test_average_from_exports_the_mean_of_the_last_epochs_and_resumes_exactly(
        tmp_path, uninterrupted):
    """--average-from 2 of 3 epochs trains exactly as without it and exports the mean of
    the weights after epochs 2 and 3 (epoch 2's from a run stopped there), with the card
    saying so and its metrics the mean's; stopped after epoch 2 and resumed, the same mean."""
    def weights(path):
        net, card = load_model(path)
        return {k: v.double() for k, v in net.state_dict().items()}, card

    two = tmp_path / "two"
    train(two, "--epochs", "2")
    avg = tmp_path / "avg"
    train(avg, "--epochs", "3", "--average-from", "2")
    assert curves(avg) == curves(uninterrupted)
    w2 = {k: v.double() for k, v in load_checkpoint(two / "checkpoint.pt")["model"].items()}
    w3 = {k: v.double() for k, v in
          load_checkpoint(uninterrupted / "checkpoint.pt")["model"].items()}
    got, card = weights(avg / "model.safetensors")
    for k in got:
        torch.testing.assert_close(got[k], (w2[k] + w3[k]) / 2, rtol=1e-6, atol=1e-7)
    assert card["training"]["weights"] == "mean of epochs 2 to 3 (2 epochs)"
    _, plain = weights(uninterrupted / "model.safetensors")
    assert plain["training"]["weights"] == "epoch 3"
    assert card["metrics"] != plain["metrics"]          # validated on the mean's weights
    resumed = tmp_path / "resumed"
    train(resumed, "--epochs", "2", "--average-from", "2")
    train(resumed, "--epochs", "3", "--average-from", "2", "--resume")
    again, _ = weights(resumed / "model.safetensors")
    assert all(torch.equal(again[k], got[k]) for k in got)
    assert main(["train", *TINY, "--epochs", "2", "--average-from", "3",
                 "--output", str(tmp_path / "bad")]) == 2


def test_export_card_and_run_outputs(uninterrupted):
    model, card = load_model(uninterrupted / "model.safetensors")
    state = load_checkpoint(uninterrupted / "checkpoint.pt")
    for k, v in state["model"].items():
        assert torch.equal(model.state_dict()[k], v)
    data = card["training"]["data"]
    assert card["factor"] == 2 and card["label_mode"] == "epd" and card["image_mode"] == "average"
    assert card["pixel_mm"][0] == pytest.approx(2 * data["source_pixel_mm"])
    rows, cols = data["source_size"]
    assert card["input_size"] == [-(-rows // 2), -(-cols // 2)]
    assert data["source"] == "phantom" and data["subjects"] == 4
    assert card["training"]["command"].startswith("python -m training train --phantom-subjects 4")
    assert card["training"]["seed"] == 0 and card["training"]["world_size"] == 1
    mean = card["metrics"]["full_resolution"]["mean"]
    assert 0 <= mean["Dice"] <= 1 and "soft_area_abs_err_cm2" in mean
    assert (uninterrupted / "plots" / "loss.png").stat().st_size > 1000
    assert (uninterrupted / "plots" / "metrics.png").stat().st_size > 1000
    assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    assert [r["epoch"] for r in read_csv(uninterrupted / "log.csv")] == [1.0, 2.0, 3.0]


def test_thick_slices_train_from_the_phantoms_planes(tmp_path):
    """--thick-slices: the training slices' planes rendered, used, recorded in the card."""
    out = tmp_path / "thick"
    assert main(["train", "--phantom-subjects", "3", "--phantom-slices", "1", "--phantom-size",
                 "48", "--phantom-levels", "T12", "L1", "--val-fraction", "0.34", "--factor",
                 "2", "--width", "4", "--batch-size", "2", "--epochs", "1", "--randomize", "1",
                 "--kidney-unenhanced", "1", "--thick-slices", "1", "--output", str(out),
                 "--quiet"]) == 0
    _, card = load_model(out / "model.safetensors")
    assert card["training"]["data"]["thick_planes_mm"] == [-2.0, -1.0, 1.0, 2.0]
    assert "--thick-slices 1" in card["training"]["command"]


@pytest.mark.slow
def test_a_tiny_run_learns_and_beats_chance_on_held_out_slices(tmp_path):
    out = tmp_path / "learn"
    data = ["--phantom-subjects", "5", "--phantom-slices", "3", "--phantom-size", "48",
            "--val-fraction", "0.34"]
    assert main(["train", *data, "--factor", "2", "--width", "8", "--batch-size", "4",
                 "--epochs", "6", "--lr", "3e-3", "--output", str(out), "--quiet"]) == 0
    log = read_csv(out / "log.csv")
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.2
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.2
    # held-out subjects through the inference path
    model, card = load_model(out / "model.safetensors")
    held_out = phantom_records(5, 3, size=48, seed=0, val_fraction=0.34)["val"]
    correct = total = 0
    counts = np.zeros(6)
    for r in held_out:
        pred = predict_volume(r.hu[None], r.pixel_mm, model, card, device="cpu")
        correct += int((pred.probabilities[:, 0].argmax(0) == r.labels).sum())
        total += r.labels.size
        counts += np.bincount(r.labels.ravel(), minlength=6)
    accuracy, chance = correct / total, counts.max() / counts.sum()
    assert accuracy > chance + 0.1, (accuracy, chance)
    assert card["metrics"]["full_resolution"]["mean"]["Dice"] > 0.4


def test_nearest_labels_bilinear_images_from_a_manifest(tmp_path, capsys):
    from training.phantom import write_dataset

    manifest = write_dataset(tmp_path / "data", 3, 2, seed=1, size=32, val_fraction=0.34,
                             progress=False)
    out = tmp_path / "run"
    assert main(["train", "--manifest", str(manifest), "--label-mode", "nearest",
                 "--image-mode", "bilinear", "--factor", "4", "--width", "4", "--batch-size",
                 "2", "--epochs", "1", "--no-augment", "--loss", "ce", "--output", str(out),
                 "--quiet"]) == 0
    _, card = load_model(out / "model")
    assert (card["label_mode"], card["image_mode"], card["factor"]) == ("nearest", "bilinear", 4)
    assert card["training"]["data"]["source"] == "manifest"
    assert len(card["training"]["data"]["manifest_sha256"]) == 64
    assert card["training"]["augment"] is None and card["training"]["loss"] == "ce"
    assert "sigma_ce" not in read_csv(out / "log.csv")[0]

    # A run folder moved together with its data resumes (the manifest is compared by
    # content); a manifest with other content does not.
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "data").rename(moved / "data")
    (tmp_path / "run").rename(moved / "run")
    resume = ["train", "--manifest", str(moved / "data" / manifest.name), "--label-mode",
              "nearest", "--image-mode", "bilinear", "--factor", "4", "--width", "4",
              "--batch-size", "2", "--epochs", "2", "--no-augment", "--loss", "ce",
              "--output", str(moved / "run"), "--quiet", "--resume"]
    assert main(resume) == 0
    assert len(read_csv(moved / "run" / "log.csv")) == 2
    with open(moved / "data" / manifest.name, "a") as f:
        f.write("\n")
    assert main([*resume[:-1], "--epochs", "3", "--resume"]) == 2
    assert "(another file)" in capsys.readouterr().err
    # the organ appearances need the phantom's tissue codes, which a manifest lacks
    assert main(["train", "--manifest", str(moved / "data" / manifest.name), "--factor", "4",
                 "--width", "4", "--batch-size", "2", "--epochs", "1", "--randomize", "1",
                 "--kidney-unenhanced", "0.5", "--output", str(tmp_path / "organs"),
                 "--quiet"]) == 2
    assert "need the phantom's tissue codes" in capsys.readouterr().err


def test_evaluate_writes_tables_and_figures(tmp_path, uninterrupted):
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(uninterrupted / "model.safetensors"),
            "--phantom-subjects", "4", "--phantom-slices", "2", "--phantom-size", "48",
            "--output", str(out), "--quiet"]
    assert main(args) == 0
    table = (out / "table.md").read_text()
    assert "Low resolution (1/2)" in table and "Full resolution" in table
    assert "| **mean** |" in table and "python -m training evaluate" in table
    rows = (out / "table.csv").read_text().splitlines()
    assert rows[0].startswith("resolution,class,ACC,SPE,SEN,PRE,Dice,IoU,softDice,RAD,RD,RMSE")
    assert len(rows) == 1 + 2 * 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["slices"] == 2 and 0 <= metrics["full_resolution"]["mean"]["Dice"] <= 1
    for name in ("examples.png", "dice_per_class.png", "area_agreement.png"):
        assert (out / "figures" / name).stat().st_size > 1000
    assert main(args) == 2  # results exist: refused without --overwrite
    torso = args[:-3] + ["--phantom-levels", "T12", "L1", "--output", str(tmp_path / "torso"),
                         "--quiet"]
    assert main(torso) == 0
    assert "(T12-L1)" in (tmp_path / "torso" / "table.md").read_text()


def test_errors_name_the_problem(tmp_path, uninterrupted, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--output", str(uninterrupted)]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main(["train", *TINY, "--epochs", "4", "--lr", "0.5", "--resume",
                 "--output", str(uninterrupted)]) == 2
    assert "arguments differ from the checkpoint's: lr 0.001 -> 0.5" in capsys.readouterr().err
    assert main(["train", *TINY, "--resume", "--output", str(tmp_path / "none")]) == 2
    assert "no " in capsys.readouterr().err
    assert main(["train", *TINY, "--windows", "fat:-200", "--output", str(tmp_path / "w")]) == 2
    assert "name:lo:hi" in capsys.readouterr().err
    assert main(["train", *TINY, "--loss", "l2", "--output", str(tmp_path / "l")]) == 2
    assert "use one or more of" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_init_fine_tunes_from_a_model_file_and_refuses_another_factor(tmp_path, uninterrupted):
    weights = uninterrupted / "model.safetensors"
    train(tmp_path / "tuned", "--epochs", "1", "--init", str(weights))
    first = read_csv(tmp_path / "tuned" / "log.csv")[0]["train_loss"]
    scratch = read_csv(uninterrupted / "log.csv")
    assert first < scratch[0]["train_loss"]  # starts where the first run ended, not at random
    card = json.loads((tmp_path / "tuned" / "model.json").read_text())
    assert card["training"]["data"]["init"]["model"] == str(weights)
    bad = [a if a != "2" or TINY[i - 1] != "--factor" else "4" for i, a in enumerate(TINY)]
    assert main(["train", *bad, "--epochs", "1", "--init", str(weights),
                 "--output", str(tmp_path / "bad")]) == 2


def test_init_says_the_guided_upsampling_is_not_carried_over(tmp_path, uninterrupted, capsys):
    """A fine-tuned network starts without the init card's upsampling (chosen for that
    model's outputs): the run says so, with the command that adds it, and records it."""
    assert main(["guide", "--model", str(uninterrupted / "model.safetensors"),
                 "--output", str(tmp_path / "guided")]) == 0
    capsys.readouterr()
    train(tmp_path / "tuned", "--epochs", "1", "--init",
          str(tmp_path / "guided" / "model.safetensors"))
    err = capsys.readouterr().err
    assert "its upsampling is not carried over" in err and "python -m training guide" in err
    assert "calibration" not in err                       # that model had no class weights
    card = json.loads((tmp_path / "tuned" / "model.json").read_text())
    assert "upsampling" not in card
    assert card["training"]["data"]["init"]["not_carried"] == ["upsampling"]


def test_area_bias_compares_soft_areas_with_the_exact_fractions(tmp_path, uninterrupted, capsys):
    """area-bias draws held-out phantoms at coarse pixels: its truth is the phantom's exact
    class areas, its prediction the soft areas of the segment path; both cover the whole
    image, so the errors over all classes (background included) add up to zero. The JSON
    is written once, refused a second time without --overwrite."""
    from EPDSegmentationLib.core.model_io import load_model
    from training.areabias import area_bias
    from training.phantom.generate import subject_slices

    model, card = load_model(uninterrupted / "model.safetensors")
    res = area_bias(model, card, [11], 2, ("L2", "L3"), 6.0, 240.0)
    assert res["slices"] == 2 and res["size"] == 40
    exact = [s.fractions.reshape(6, -1).sum(1) * 0.36 for s in
             subject_slices(11, 2, 12.0, levels=("L2", "L3"), size=40, pixel_mm=6.0,
                            supersample=15)]
    assert np.allclose(res["true_cm2"], exact)
    assert np.allclose(res["soft_cm2"].sum(1), 40 * 40 * 0.36, rtol=1e-5)
    errors = [v["error_cm2"] for v in res["per_class"].values()]
    assert abs(sum(errors)) < 1e-3 and max(abs(e) for e in errors) > 0
    out = tmp_path / "bias.json"
    args = ["area-bias", "--model", str(uninterrupted / "model.safetensors"), "--pixel-mm", "6",
            "--fov-mm", "240", "--phantom-subjects", "1", "--phantom-slices", "1",
            "--output", str(out), "--quiet"]
    assert main(args) == 0
    saved = json.loads(out.read_text())
    assert saved["slices"] == 1 and "area-bias" in saved["command"]
    assert "MUS" in capsys.readouterr().out
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err


def test_interpolate_mixes_two_models_weights_into_a_run_folder(tmp_path, uninterrupted, capsys):
    """interpolate writes w x A + (1 - w) x B tensor by tensor into <output>/model.*, a card
    that says so (both inputs' SHA-256, the command; A's validation metrics dropped), and
    refuses models whose cards differ in what the weights mean."""
    import torch
    from EPDSegmentationLib.core.model_io import save_model

    a_path = uninterrupted / "model.safetensors"
    net, card = load_model(a_path)
    a = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.linspace(-1.0, 1.0, p.numel()).reshape(p.shape))
    b = {k: v.clone() for k, v in net.state_dict().items()}
    save_model(tmp_path / "b", net, card)
    out = tmp_path / "mix"
    assert main(["interpolate", "--model", str(a_path), "--with", str(tmp_path / "b.safetensors"),
                 "--weight", "0.25", "--output", str(out)]) == 0
    mixed, mcard = load_model(out / "model.safetensors")
    for k, v in mixed.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.25 * a[k] + 0.75 * b[k], atol=1e-6), k
    info = mcard["training"]["interpolated"]
    assert info["weight_a"] == 0.25 and info["a"]["weights"].startswith("sha256:")
    assert info["a"]["weights"] != info["b"]["weights"]
    assert "interpolate" in info["command"] and mcard["metrics"] == {}
    assert mcard["training"]["weights"].startswith("0.25 x ")
    # the output is not overwritten silently; bad weights and other factors are refused
    assert main(["interpolate", "--model", str(a_path), "--with", str(a_path), "--weight", "1",
                 "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["interpolate", "--model", str(a_path), "--with", str(a_path), "--weight",
                 "1.5", "--output", str(tmp_path / "w")]) == 2
    assert "0..1" in capsys.readouterr().err
    other = dict(card, factor=int(card["factor"]) * 2)
    save_model(tmp_path / "f", net, other)
    assert main(["interpolate", "--model", str(a_path), "--with", str(tmp_path / "f.safetensors"),
                 "--weight", "0.5", "--output", str(tmp_path / "x")]) == 2
    assert "differ in factor" in capsys.readouterr().err


def test_init_from_fixed_statistics_trains_them_fixed(tmp_path, uninterrupted):
    """A model with fixed normalisation statistics (training fix-norms) fine-tunes with them
    fixed: the run's network has the init's buffers unchanged, other weights trained, and its
    card says where the statistics were measured."""
    import torch

    from EPDSegmentationLib.core.model_io import load_model

    assert main(["fix-norms", "--model", str(uninterrupted / "model.safetensors"),
                 "--output", str(tmp_path / "fixed"), "--subjects", "1"]) == 0
    train(tmp_path / "tuned", "--epochs", "1", "--init",
          str(tmp_path / "fixed" / "model.safetensors"))
    before, _ = load_model(tmp_path / "fixed" / "model.safetensors")
    after, card = load_model(tmp_path / "tuned" / "model.safetensors")
    assert card["architecture"]["norm"] == "fixed"
    assert "kept fixed while trained further" in card["norm_statistics"]["measured_on"]
    b, a = before.state_dict(), after.state_dict()
    buffers = [k for k in a if k.endswith(("group_mean", "group_var"))]
    assert buffers and all(torch.equal(a[k], b[k]) for k in buffers)
    assert not torch.equal(a["head.weight"], b["head.weight"])
