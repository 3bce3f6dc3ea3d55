"""Dataset manifests: which image goes with which label map, and its split.

CSV with a header row (columns image, label, split and optionally subject) or JSON (a list of
such objects, or {"cases": [...]}). Paths are relative to the manifest's folder (or
absolute). Splits: train, val, test.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Dict, List, Sequence, Union

from ..core.atomic import atomic_file
from .errors import InputError

SPLITS = ("train", "val", "test")
COLUMNS = ("image", "label", "split", "subject")


def _rows(path: Path, required: Sequence[str] = ("image", "label", "split")
          ) -> List[Dict[str, object]]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"is not valid JSON: {exc}") from None
        if isinstance(data, dict):
            data = data.get("cases")
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise InputError(path, 'JSON manifest must be a list of {"image", "label", '
                                   '"split"} objects or {"cases": [...]}')
        return data
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(path, f"CSV header {reader.fieldnames} lacks column(s) {missing}; "
                               f"need {','.join(required)}[,subject]")
    return list(reader)


def read_manifest(path: Union[str, Path], *, images_only: bool = False,
                  missing_ok: bool = False) -> List[Dict[str, object]]:
    """Read a manifest: [{'image': Path, 'label': Path, 'split': str, 'subject': str}, ...].

    Paths come back absolute. Every image and label must exist (a DICOM image may be a
    folder); raises InputError naming the manifest, the row and the problem. With
    images_only (cases to segment), only the image column is needed and read. With
    missing_ok, a row whose file does not exist is returned with 'problem' (a sentence
    naming the manifest, the row and the file) instead of raising, so a batch can report
    it and go on.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "manifest not found")
    rows = _rows(path, ("image",) if images_only else ("image", "label", "split"))
    if not rows:
        raise InputError(path, "manifest lists no cases")
    out = []
    for n, row in enumerate(rows, start=2 if path.suffix.lower() != ".json" else 0):
        where = f"row {n}" if path.suffix.lower() != ".json" else f"case {n}"
        entry: Dict[str, object] = {}
        for key in ("image",) if images_only else ("image", "label"):
            value = str(row.get(key) or "").strip()
            if not value:
                raise InputError(path, f"{where}: no {key} path")
            p = Path(value)
            p = (path.parent / p if not p.is_absolute() else p).resolve()
            if not p.exists():
                if not missing_ok:
                    raise InputError(path, f"{where}: {key} {p} does not exist")
                entry["problem"] = f"{path}: {where}: {key} {p} does not exist"
            entry[key] = p
        split = str(row.get("split") or "").strip().lower()
        if images_only:
            entry["subject"] = str(row.get("subject") or "").strip()
            out.append(entry)
            continue
        if split not in SPLITS:
            raise InputError(path, f"{where}: split {row.get('split')!r} is not one of {SPLITS}")
        entry["split"] = split
        entry["subject"] = str(row.get("subject") or "").strip() or Path(str(row["image"])).name
        out.append(entry)
    return out


def write_manifest(rows: Sequence[Dict[str, object]], path: Union[str, Path], *,
                   overwrite: bool = False) -> Path:
    """Write a CSV manifest (columns image,label,split,subject; paths written relative to
    the manifest's folder when they lie below it). Atomic."""
    path = Path(path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        rec = {}
        for key in COLUMNS:
            value = row.get(key, "")
            if key in ("image", "label"):
                p = Path(str(value))
                try:
                    value = p.resolve().relative_to(path.parent.resolve()).as_posix()
                except ValueError:
                    value = str(p)
            rec[key] = value
        writer.writerow(rec)
    with atomic_file(path, overwrite) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return path


def read_manifest_columns(path: Union[str, Path]) -> Dict[str, Dict[str, str]]:
    """Every column of a cases manifest, keyed by the resolved image path (as read_manifest
    gives it, as text): {image: {column: text}}, for the facts beside an image (height,
    weight, sex, subject). Rows without an image are left out (read_manifest reports them)."""
    path = Path(path)
    out: Dict[str, Dict[str, str]] = {}
    for row in _rows(path, ("image",)):
        value = str(row.get("image") or "").strip()
        if not value:
            continue
        p = Path(value)
        p = (path.parent / p if not p.is_absolute() else p).resolve()
        out[str(p)] = {str(k): "" if v is None else str(v).strip() for k, v in row.items()}
    return out
