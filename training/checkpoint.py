"""Training checkpoints: written atomically every epoch, read back without unpickling code.

A checkpoint holds the model, the loss's uncertainty weights, the optimiser, every rank's
random-number states (torch, CUDA, NumPy, Python), the number of completed epochs (the next
sampler epoch), the run's arguments and the per-epoch history, so ``--resume`` continues
exactly where the last completed epoch left off. Only tensors, numbers, strings, lists and
dicts are stored, and loading uses torch.load(weights_only=True).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from EPDSegmentationLib.core.atomic import atomic_write
from EPDSegmentationLib.core.errors import ModelError

FORMAT = "epd-training-checkpoint"
VERSION = 1


def rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's random-number states, as plain tensors and numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """torch.save to a temporary file beside ``path``, then os.replace: a crash mid-write
    leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, "version": VERSION, **state}, tmp))


def _load_failure(exc: BaseException) -> str:
    """Why torch.load failed, without torch's advice to retry with weights_only=False (that
    would unpickle arbitrary objects, which can run code: never do it for a file you did
    not write)."""
    text = str(exc).strip()
    if "weights_only" in text or "Weights only load failed" in text:
        return ("not a torch checkpoint of tensors and plain data: damaged, another "
                "program's file, or one that holds other objects, which are never unpickled")
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else f"{type(exc).__name__}, truncated?"


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Read a checkpoint (tensors and plain data only); ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: the checkpoint file is empty (0 bytes): the run that "
                         f"wrote it was stopped, or the copy was incomplete")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ModelError(f"{path}: not a readable training checkpoint "
                         f"({_load_failure(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not an EPD training checkpoint")
    if state.get("version", 0) > VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')} is newer than "
                         f"this software ({VERSION})")
    return state
