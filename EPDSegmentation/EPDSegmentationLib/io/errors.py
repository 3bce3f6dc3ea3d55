"""The one error type for bad input files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


class InputError(ValueError):
    """A file or folder cannot be used as given. The message names it and the problem.

    InputError(path, problem) -> "path: problem" (path and problem kept as attributes), or
    InputError(message) with a message that already names the file.
    """

    def __init__(self, path: Optional[Union[str, Path]], problem: Optional[str] = None):
        if problem is None:
            self.path, self.problem = None, str(path)
            super().__init__(str(path))
            return
        self.path = Path(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)
