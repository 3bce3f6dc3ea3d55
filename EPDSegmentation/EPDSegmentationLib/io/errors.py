"""InputError, the error for bad input files (defined in core/errors.py with the rest of
the project's error hierarchy; kept importable from here)."""

from __future__ import annotations

from ..core.errors import EPDError, InputError, OutputError

__all__ = ["EPDError", "InputError", "OutputError"]
