"""Writing outputs without ever leaving a half-written file or replacing one by surprise.

Every writer in the project goes through ``atomic_file`` (or ``atomic_folder``): the data is
written to a temporary name in the target's folder and moved into place with os.replace, so
readers see the old file or the new one, never half of one; an existing file is replaced only
when the caller says so.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

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
        # some writers (safetensors) create 0600 files: give the usual permissions
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Union[str, Path], write: Callable[[str], object], *,
                 overwrite: bool = True) -> Path:
    """Call write(tmp) for a temporary file name beside ``path``, then move it into place."""
    with atomic_file(path, overwrite) as tmp:
        write(str(tmp))
    return Path(path)


def write_bytes(path: Union[str, Path], data: bytes, *, overwrite: bool = False) -> Path:
    with atomic_file(path, overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Union[str, Path], text: str, *, overwrite: bool = False) -> Path:
    with atomic_file(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


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
