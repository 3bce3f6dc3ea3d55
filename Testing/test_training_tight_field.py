"""--tight-field (training.data.tight_field): training batches cropped to one frame tight
around their bodies, as scans reconstructed close to the body are; exact labels, the
network's multiple, and a resumed run that draws the same frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.__main__ import main
from training.data import AIR_HU, TIGHT_SHARE, tight_field
from training.logs import read_csv


def batch():
    """Three 300 x 280 slices in air: a large body, a small one off centre, and none."""
    hu = torch.full((3, 300, 280), AIR_HU)
    lab = torch.zeros((3, 300, 280), dtype=torch.uint8)
    hu[0, 40:250, 30:260], lab[0, 40:250, 30:260] = 40.0, 1
    hu[0, 100:120, 100:150], lab[0, 100:120, 100:150] = -100.0, 3
    hu[1, 10:90, 190:270], lab[1, 10:90, 190:270] = -90.0, 4
    return hu, lab


def test_a_batch_is_cropped_to_one_frame_over_every_body():
    """One frame for the batch: a multiple of 32 (or the slice's side), at least the largest
    body and at most that over the lowest share, rounded up; every body whole in its crop,
    the labels cut exactly as the HU; the offsets drawn."""
    hu, lab = batch()
    offsets = set()
    for seed in range(8):
        c_hu, c_lab = tight_field(hu, lab, np.random.default_rng(seed), multiple=32)
        rows, cols = c_hu.shape[1:]
        assert c_lab.shape == c_hu.shape and c_hu.shape[0] == 3
        for side, extent, full in ((rows, 210, 300), (cols, 230, 280)):
            assert side == full or side % 32 == 0
            assert extent <= side <= min(full, np.ceil(extent / TIGHT_SHARE[0] / 32) * 32)
        assert (rows, cols) != (300, 280)
        for i in range(3):                   # nothing of a body is lost, nothing resized
            assert (c_hu[i] > -500).sum() == (hu[i] > -500).sum()
            assert torch.equal(c_lab[i] == 3, c_hu[i] == -100.0)
            assert torch.equal(c_lab[i] == 0, c_hu[i] == AIR_HU)
        where = torch.nonzero(c_lab[1] == 4)[0].tolist()
        offsets.add(tuple(where))
    assert len(offsets) > 2


def test_the_same_draws_give_the_same_frames_and_an_empty_batch_stays():
    hu, lab = batch()
    a = tight_field(hu, lab, np.random.default_rng(3), multiple=64)
    b = tight_field(hu, lab, np.random.default_rng(3), multiple=64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    air = torch.full((2, 100, 100), AIR_HU)
    none = torch.zeros((2, 100, 100), dtype=torch.uint8)
    out = tight_field(air, none, np.random.default_rng(0), multiple=32)
    assert out[0] is air and out[1] is none
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        tight_field(hu[0], lab[0], np.random.default_rng(0), multiple=32)
    with pytest.raises(ValueError, match="share"):
        tight_field(hu, lab, np.random.default_rng(0), multiple=32, share=(0.5, 1.2))


@pytest.mark.slow
def test_training_with_tight_fields_resumes_exactly(tmp_path):
    """On 192-pixel phantoms at factor 2 (frames of 64 pixels), --tight-field 1 changes the
    run, and a run stopped after one epoch and resumed gives the uninterrupted curves bit for
    bit; the card's command records it; a share outside 0..1 is refused."""
    tiny = ["train", "--phantom-subjects", "3", "--phantom-slices", "2", "--phantom-size",
            "192", "--factor", "2", "--width", "4", "--batch-size", "2", "--quiet"]

    def curve(out):
        return [row["train_loss"] for row in read_csv(out / "log.csv")]

    assert main(tiny + ["--epochs", "2", "--output", str(tmp_path / "plain")]) == 0
    assert main(tiny + ["--epochs", "2", "--tight-field", "1",
                        "--output", str(tmp_path / "tight")]) == 0
    assert curve(tmp_path / "tight") != curve(tmp_path / "plain")
    out = tmp_path / "resumed"
    assert main(tiny + ["--epochs", "1", "--tight-field", "1", "--output", str(out)]) == 0
    assert main(tiny + ["--epochs", "2", "--tight-field", "1", "--output", str(out),
                        "--resume"]) == 0
    assert curve(out) == curve(tmp_path / "tight")
    import json
    card = json.loads((tmp_path / "tight" / "model.json").read_text())
    assert "--tight-field 1" in card["training"]["command"]
    assert main(tiny + ["--tight-field", "1.5", "--output", str(tmp_path / "bad")]) == 2
