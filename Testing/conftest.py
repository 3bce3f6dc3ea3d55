"""Shared fixtures: paths to the repository and to ../shared data (tests skip without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: ../shared beside this checkout, or beside its folder of worktrees
SHARED_CANDIDATES = (REPO.parent / "shared", REPO.parent.parent / "shared")


def shared_dir(*parts: str):
    """The first existing ../shared/<parts...>, or None."""
    return next((p.joinpath(*parts) for p in SHARED_CANDIDATES if p.joinpath(*parts).exists()),
                None)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def totalseg_dir() -> Path:
    """../shared/data/totalseg-example (beside this checkout, or beside its folder of
    worktrees), or skip when there is no shared data."""
    path = shared_dir("data", "totalseg-example")
    if path is None:
        pytest.skip("shared data (../shared/data/totalseg-example) not present")
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A small random-weight model (width 4, factor 2, 1.6 mm input pixels) saved through
    model_io.save_model: the real file format, CPU-sized. Returns the stem path."""
    import torch

    from EPDSegmentationLib.core.model import ModelConfig, build_model
    from EPDSegmentationLib.core.model_card import make_card
    from EPDSegmentationLib.core.model_io import save_model
    from EPDSegmentationLib.core.windowing import DEFAULT_WINDOWS

    torch.manual_seed(0)
    net = build_model(ModelConfig(width=4))
    card = make_card(net.config.to_dict(), windows=DEFAULT_WINDOWS, factor=2, label_mode="epd",
                     image_mode="average", pixel_mm=(1.6, 1.6), input_size=(32, 32),
                     training={"data": {"phantom subjects": 3}, "command": "test", "seed": 0})
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_model(path, net, card)
    return path


@pytest.fixture(scope="session")
def phantom_ct():
    """phantom_ct(seed, n_slices, size, gap_mm) -> (hu, labels): a phantom CT stack, float32 HU
    and uint8 classes (K, H, W), made once per argument set for the whole session."""
    from functools import lru_cache

    from training.phantom import subject_slices
    from training.phantom.dataset import stack

    @lru_cache(maxsize=None)
    def make(seed: int, n_slices: int, size: int, gap_mm: float):
        hu, labels, _ = stack(subject_slices(seed, n_slices=n_slices, slice_gap_mm=gap_mm, size=size),
                              gap_mm)
        return hu, labels

    return make


@pytest.fixture(scope="session")
def load_tool():
    """load_tool(name) -> the module Testing/tools/<name>.py (the tools are scripts, not a
    package), loaded once per name."""
    import importlib.util

    loaded = {}

    def load(name: str):
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(
                name, Path(__file__).resolve().parent / "tools" / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            loaded[name] = mod
        return loaded[name]

    return load
