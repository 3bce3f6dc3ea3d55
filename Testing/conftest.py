"""Shared fixtures: paths to the repository and to ../shared data (tests skip without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from EPDSegmentationLib.phantom.sheet import shared_sample_dir

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
