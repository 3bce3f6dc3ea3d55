"""The project's error hierarchy: what the user can fix, as opposed to a bug.

    EPDError                 base: the message says what is wrong and what to do
      InputError             an input file or folder cannot be used (also a ValueError)
      OutputError            an output cannot be written (folder unwritable, taken by
                             another run, ...; also an OSError)
      ModelError             a model file or card is missing, not ours, corrupt or
                             inconsistent (model_card.ModelFileError; also a ValueError)
      DeviceError            a requested device is not available (also a RuntimeError)

Entry points catch EPDError and print its one-line message; anything else is a bug and keeps
its traceback. The second base classes keep older ``except ValueError`` code working.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


class EPDError(Exception):
    """Base of every error this project raises on purpose (bad input, model, device, ...)."""


class InputError(EPDError, ValueError):
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


class OutputError(EPDError, OSError):
    """An output cannot be written (the message names the path and the reason)."""

    def __str__(self) -> str:            # OSError's own __str__ would print "(errno, ...)"
        return str(self.args[0]) if self.args else ""


class ModelError(EPDError, ValueError):
    """A model file or card is unusable (missing, not ours, corrupt, inconsistent)."""


class DeviceError(EPDError, RuntimeError):
    """A requested device is not available; the message says why."""
