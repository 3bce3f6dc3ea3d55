"""The one error type for bad input files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


class InputError(ValueError):
    """A file or folder cannot be used as given. The message names it and the problem.

    path: the offending file or folder; problem: what is wrong, in words.
    """

    def __init__(self, path: Optional[Union[str, Path]], problem: str):
        self.path = Path(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)
