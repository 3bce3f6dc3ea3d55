"""Shared fixtures: paths to the repository and to ../shared data (tests skip without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.phantom.sheet import shared_sample_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def totalseg_dir() -> Path:
    """../shared/data/totalseg-example (beside this checkout, or beside its folder of
    worktrees), or skip when there is no shared data."""
    path = shared_sample_dir()
    if path is None:
        pytest.skip("shared data (../shared/data/totalseg-example) not present")
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A small random-weight model (width 4, factor 2, 1.6 mm input pixels) saved through
    model_io.save_model: the real file format, CPU-sized. Returns the stem path."""
    import torch

    from EPDSegmentationLib.core.model import ModelConfig, build_model
    from EPDSegmentationLib.core.model_io import make_card, save_model
    from EPDSegmentationLib.core.windowing import DEFAULT_WINDOWS

    torch.manual_seed(0)
    net = build_model(ModelConfig(width=4))
    card = make_card(net.config.to_dict(), windows=DEFAULT_WINDOWS, factor=2, label_mode="epd",
                     image_mode="average", pixel_mm=(1.6, 1.6), input_size=(32, 32),
                     training={"data": {"phantom subjects": 3}, "command": "test", "seed": 0})
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_model(path, net, card)
    return path
