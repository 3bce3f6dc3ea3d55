"""Shared fixtures: paths to the repository and to ../shared data (tests skip without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def totalseg_dir() -> Path:
    """../shared/data/totalseg-example, or skip when this checkout has no shared data."""
    path = SHARED_DATA / "totalseg-example"
    if not path.is_dir():
        pytest.skip(f"shared data not present at {path}")
    return path
