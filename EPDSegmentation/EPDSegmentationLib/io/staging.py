"""Per-case output staging: a case's files appear all together, or not at all.

A case is written like this, inside the output folder ``out``:

1. ``out/.<case>.lock`` is created exclusively (O_CREAT | O_EXCL) and holds the writer's
   host and pid. A second run that finds it (the writer still alive) leaves the case alone:
   two runs on one folder never write, replace or delete each other's files. A lock whose
   writer is gone (same host, pid not running: killed with SIGKILL, a crash) is taken over.
2. The outputs are written into a fresh staging folder ``out/.<case>.partial-<random>``.
3. commit(): every staged file is moved to its final name. Without ``overwrite`` each move
   is an exclusive hard link (fails if the name exists), so a file that appeared meanwhile is
   never replaced. With ``overwrite`` the old outputs are first moved aside and only deleted
   once every new file is in place (put back if a move fails).
4. Last, the completion marker ``<case>_provenance.json`` is written: the list of outputs
   (name, bytes, SHA-256) and their provenance. A case without it is incomplete
   (case_state tells a re-run which).

abort() (any error, SIGINT, SIGTERM) removes the staging folder and the lock, and nothing
else: the files of an earlier complete run, or of another run, stay as they were.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from ..core.atomic import write_text
from .errors import OutputError
from .outputs import output_path

MARKER_ROLE = "provenance"


def check_output_folder(folder: Path) -> Path:
    """Create ``folder`` if needed and prove it writable by creating and removing a file
    in it: OutputError naming it and the reason otherwise (before any case runs)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: the output path exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the output folder "
                          f"({exc.strerror or exc})") from None
    probe = folder / f".epdseg-write-test-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{folder}: the output folder is not writable "
                          f"({exc.strerror or exc})") from None
    return folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process: alive
        return True
    return True


def _lock_owner(lock: Path) -> Tuple[str, int]:
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
        return str(info.get("host", "")), int(info.get("pid", 0))
    except (OSError, ValueError, TypeError):
        return "", 0


def _take_lock(lock: Path) -> None:
    """Create ``lock`` exclusively; take over a stale one (its writer no longer runs on this
    host). OutputError when another live run holds it."""
    me = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            host, pid = _lock_owner(lock)
            if host == socket.gethostname() and pid and not _pid_alive(pid):
                # stale: its writer is gone. Rename it away (only one run can rename that
                # file) and check it is still the dead writer's: if another run replaced it
                # meanwhile, put theirs back.
                away = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex[:8]}")
                try:
                    os.rename(lock, away)
                except FileNotFoundError:
                    continue
                if _lock_owner(away) != (host, pid):
                    try:
                        os.link(away, lock)
                    except OSError:
                        pass
                    os.unlink(away)
                    continue
                os.unlink(away)
                continue
            who = f"pid {pid} on {host}" if pid else "another run"
            raise OutputError(f"{lock.parent}: this case is being written by {who} "
                              f"(lock {lock.name}); not touched. If no such run exists, "
                              f"delete the lock file and run again") from None
        except OSError as exc:
            raise OutputError(f"{lock}: cannot create the case's lock file "
                              f"({exc.strerror or exc})") from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(me)
        return
    raise OutputError(f"{lock}: could not take the case's lock")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()


def case_state(folder: Path, name: str, roles: Iterable[str]) -> Tuple[str, List[Path]]:
    """What an earlier run left for case ``name``: ('absent', []), ('complete', files) when
    the completion marker is there and every file it lists exists with its size, or
    ('incomplete', files) when outputs exist without a (consistent) marker."""
    folder = Path(folder)
    paths = [output_path(folder, name, r) for r in roles]
    marker = output_path(folder, name, MARKER_ROLE)
    present = [p for p in paths + [marker] if p.exists()]
    if not present:
        return "absent", []
    if not marker.exists():
        return "incomplete", present
    try:
        listed = json.loads(marker.read_text(encoding="utf-8")).get("outputs", [])
        ok = all((folder / o["file"]).is_file()
                 and (folder / o["file"]).stat().st_size == int(o["bytes"]) for o in listed)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        ok = False
    return ("complete" if ok else "incomplete"), present


class CaseStaging:
    """The staging of one case: ``path(role)`` gives where to write each output; then
    ``commit(provenance)`` or ``abort()``. Use as a context manager: an exception (or
    KeyboardInterrupt / SystemExit) inside the block aborts; leaving it normally without a
    commit aborts too."""

    def __init__(self, folder: Path, name: str, *, overwrite: bool = False):
        self.folder = Path(folder)
        self.name = name
        self.overwrite = overwrite
        self.lock = self.folder / f".{name}.lock"
        self.dir: Optional[Path] = None
        self.committed: List[Path] = []

    # -- lifecycle
    def open(self) -> "CaseStaging":
        """Take the case's lock and make the staging folder (OutputError if the case is
        being written by another run); pair with abort() in a finally."""
        return self.__enter__()

    def __enter__(self) -> "CaseStaging":
        _take_lock(self.lock)
        try:
            # we hold the lock: staging folders of this case are left by dead runs
            for old in self.folder.glob(f".{self.name}.partial-*"):
                shutil.rmtree(old, ignore_errors=True)
            self.dir = self.folder / f".{self.name}.partial-{uuid.uuid4().hex[:8]}"
            self.dir.mkdir()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def _unlock(self) -> None:
        try:
            self.lock.unlink()
        except FileNotFoundError:
            pass

    def abort(self) -> None:
        """Remove the staging folder (never a committed or foreign file) and the lock."""
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self._unlock()

    # -- writing
    def path(self, role: str) -> Path:
        """Where to write output ``role`` (outputs.SUFFIXES) now: inside the staging folder,
        under its final name."""
        assert self.dir is not None, "staging not entered"
        return output_path(self.dir, self.name, role)

    def staged(self) -> List[Path]:
        return sorted(p for p in self.dir.iterdir() if p.is_file()) if self.dir else []

    def existing(self, roles: Iterable[str]) -> List[Path]:
        return [p for p in (output_path(self.folder, self.name, r)
                            for r in list(roles) + [MARKER_ROLE]) if p.exists()]

    def commit(self, provenance: Dict, old_roles: Iterable[str] = ()) -> List[Path]:
        """Move every staged file into the output folder, then write the completion marker
        (outputs with bytes and SHA-256, plus ``provenance``). ``old_roles``: outputs of an
        earlier run to replace (overwrite) - they are removed only when all is in place.
        Returns the final paths (marker last). OutputError when a name is taken (no
        overwrite) or a move fails; the folder is then as it was before the commit."""
        files = self.staged()
        records = [{"file": p.name, "bytes": p.stat().st_size, "sha256": sha256(p)}
                   for p in files]
        marker = output_path(self.folder, self.name, MARKER_ROLE)
        aside_dir = self.folder / f".{self.name}.old-{uuid.uuid4().hex[:8]}"
        aside: List[Tuple[Path, Path]] = []
        placed: List[Path] = []
        try:
            if self.overwrite:
                old = [output_path(self.folder, self.name, r) for r in old_roles]
                old += [self.folder / p.name for p in files] + [marker]
                for p in dict.fromkeys(old):
                    if p.exists():
                        aside_dir.mkdir(exist_ok=True)
                        os.replace(p, aside_dir / p.name)
                        aside.append((aside_dir / p.name, p))
            for p in files:
                target = self.folder / p.name
                _place(p, target)
                placed.append(target)
            doc = dict(provenance, case=self.name, outputs=records)
            write_text(marker, json.dumps(doc, indent=1, default=str) + "\n")
            placed.append(marker)
        except BaseException as exc:
            for p in placed:           # ours only: just created by this commit
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            for src, dst in reversed(aside):
                os.replace(src, dst)
            shutil.rmtree(aside_dir, ignore_errors=True)
            if isinstance(exc, FileExistsError):
                raise OutputError(f"{exc.filename}: appeared while this case ran (another "
                                  f"run?); nothing of this case was written") from None
            if isinstance(exc, OSError) and not isinstance(exc, OutputError):
                raise OutputError(f"{self.folder}: cannot move the outputs into place "
                                  f"({exc.strerror or exc}); the folder is as before") from None
            raise
        shutil.rmtree(aside_dir, ignore_errors=True)
        self.committed = placed
        return placed


def _place(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` so that ``dst`` is never replaced: a hard link (atomic,
    fails if ``dst`` exists) then unlink; where links are not supported, an exclusive
    check plus rename (dst is ours once the check passed, as we hold the case lock)."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK,
                             getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)):
            raise
        if dst.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        os.replace(src, dst)
        return
    os.unlink(src)
