"""A model folder made from another model with one card field added (``training guide``,
``calibrate``, ``field``): the weights unchanged, the field set, and the card's validation
metrics, evaluation and bundle command left out, since they were measured without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def save_derived(model, card: Mapping[str, Any], key: str, value: Any, output,
                 overwrite: bool = False) -> Path:
    """Write ``model`` with ``card[key] = value`` to OUTPUT/model.safetensors and
    model.json (model_io.save_model: atomic, never over a file without ``overwrite``);
    returns the .safetensors path."""
    from EPDSegmentationLib.core.model_io import save_model

    card = dict(card)
    card[key] = value
    card["metrics"] = {}
    for stale in ("evaluation", "bundle_command"):
        card.pop(stale, None)
    out = Path(output) / "model"
    save_model(out, model, card, overwrite=overwrite)
    return out.with_suffix(".safetensors")
