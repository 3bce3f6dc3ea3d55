"""Model weights (safetensors) with a JSON model card of the same stem beside them.

    save_model("models/EPDBodyComp_f2", model, card)  -> EPDBodyComp_f2.safetensors + .json
    model, card = load_model("models/EPDBodyComp_f2.safetensors")

The card (model_card.py) says everything needed to use the model correctly. Weights are read
with safetensors only (no pickle). Both files are written atomically (a temporary file in the
same folder, then os.replace) and existing files are kept unless ``overwrite=True``.
This module imports torch (through model.py); the card alone needs model_card only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Tuple

from .atomic import atomic_write
from .model import build_model
from .model_card import (FORMAT, FORMAT_VERSION, ModelFileError, PathLike, model_paths, read_card,
                         validate_card, write_card)


def save_model(path: PathLike, model, card: Mapping[str, Any], *,
               overwrite: bool = False) -> Tuple[Path, Path]:
    """Write <stem>.safetensors (the model's state dict) and <stem>.json (the card).

    The card's architecture must be the model's own (``model.config``). Returns both paths."""
    from safetensors.torch import save

    weights_path, card_path = model_paths(path)
    card = validate_card(card, str(card_path))
    config = getattr(model, "config", None)
    if config is None or config.to_dict() != dict(card["architecture"]):
        raise ModelFileError(f"{card_path}: the card's architecture {card['architecture']} is "
                             f"not the model's {config.to_dict() if config else None}")
    for p in (weights_path, card_path):
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass overwrite=True to replace it")
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
            "architecture": json.dumps(card["architecture"], sort_keys=True),
            "factor": str(int(card["factor"]))}
    data = canonical_safetensors(save(tensors, metadata=meta))
    atomic_write(weights_path, lambda tmp: Path(tmp).write_bytes(data))
    write_card(card_path, card, overwrite=True)
    return weights_path, card_path


def canonical_safetensors(data: bytes) -> bytes:
    """safetensors bytes with the header's metadata keys sorted: the same weights and card
    then give the same file, byte for byte. safetensors writes its metadata in the order of a
    Rust hash map, which changes from run to run (the tensors' order is fixed, and the data
    offsets, relative to the end of the header, are kept). The header is padded with spaces
    to a multiple of 8 bytes, as safetensors pads it."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        header = {"__metadata__": header.pop("__metadata__"), **header}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def load_model(path: PathLike, device: Any = "cpu"):
    """(model in eval mode on ``device``, card) from <stem>.safetensors and <stem>.json.

    ModelFileError when a file is missing, is not one of ours, is corrupt, or when the card
    does not match the weights: its architecture, and its downsampling factor, which
    save_model stores in the weights' metadata (a card saying 4 beside factor-2 weights
    would give areas at the wrong scale). Files written before the factor was stored
    (no "factor" in the metadata, e.g. the bundled models so far) are loaded on the card's
    word: nothing in them can contradict it (re-save them with save_model to add it)."""
    from safetensors import SafetensorError, safe_open

    given = Path(path)
    if given.suffix.lower() not in ("", ".safetensors", ".json") and not \
            given.with_name(given.name + ".safetensors").exists():
        raise ModelFileError(
            f"{given}: a '{given.suffix}' file is not a model this program loads; models are "
            f"a .safetensors weights file with its .json card beside it (pickled checkpoints "
            f"such as .pt are never loaded: they can run code)")
    weights_path, card_path = model_paths(path)
    if not weights_path.is_file():
        raise ModelFileError(f"{weights_path}: weights file not found")
    if weights_path.stat().st_size == 0:
        raise ModelFileError(f"{weights_path}: the weights file is empty (0 bytes): an "
                             f"interrupted copy or download?")
    card = read_card(card_path)
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as exc:
        raise ModelFileError(f"{weights_path}: cannot be read "
                             f"({exc.strerror or type(exc).__name__})") from None
    except (SafetensorError, ValueError) as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise ModelFileError(f"{weights_path}: not a readable safetensors file, or a "
                             f"damaged one ({reason})") from None
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{weights_path}: safetensors file without the EPD Segmentation "
                             f"marker (metadata format={meta.get('format')!r}); not one of our "
                             f"models")
    try:
        stored_arch = json.loads(meta.get("architecture", "null"))
    except json.JSONDecodeError:
        stored_arch = None
    stored_factor = meta.get("factor")
    if stored_factor is not None and str(stored_factor) != str(card["factor"]):
        raise ModelFileError(f"{card_path}: the card says factor {card['factor']}, but the "
                             f"weights were trained and saved for factor {stored_factor}; "
                             f"use the card that came with these weights")
    if stored_arch != card["architecture"]:
        raise ModelFileError(f"{card_path}: the card's architecture {card['architecture']} does "
                             f"not match the one stored with the weights {stored_arch}")
    model = build_model(card["architecture"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors)
                   if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensor(s) of the wrong shape (e.g. {k}: "
                         f"{tuple(tensors[k].shape)} vs {tuple(expected[k].shape)})")
        raise ModelFileError(f"{weights_path}: weights do not fit the card's architecture: "
                             + "; ".join(parts))
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise ModelFileError(f"{weights_path}: non-finite values in {bad[0]} (corrupt weights)")
    model.load_state_dict(tensors)
    model.to(device)
    model.eval()
    return model, card
