"""Writing outputs without ever leaving a half-written file or replacing one by surprise."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

#: Extensions that name a format by more than the last suffix.
_MULTI = (".seg.nrrd", ".nii.gz", ".seg.nhdr")


def extension(path: Union[str, Path]) -> str:
    """The format extension of a path, lower case: '.nii.gz', '.seg.nrrd', '.nrrd', ..."""
    name = Path(path).name.lower()
    for ext in _MULTI:
        if name.endswith(ext):
            return ext
    return Path(name).suffix


def check_target(path: Union[str, Path], overwrite: bool) -> Path:
    """Refuse to replace an existing output unless asked; make sure its folder exists."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    return path


@contextmanager
def atomic_file(path: Union[str, Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's folder (same extension, so format-sniffing
    writers still work); on success it replaces ``path`` in one step (os.replace), on error
    it is removed and ``path`` is untouched."""
    path = check_target(path, overwrite)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{extension(path)}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_folder(path: Union[str, Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path`` (an old
    folder there is replaced only with overwrite=True, and only after the new one is
    complete)."""
    path = check_target(path, overwrite)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    old = None
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)
