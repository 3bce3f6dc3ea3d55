"""A model folder made from another model with one card field added (``training guide``,
``calibrate``, ``field``, ``fix-norms``): the weights unchanged (``fix-norms``: its norms'
statistics added), the field set, and the card's validation metrics, evaluation and bundle
command left out, since they were measured without it; the arguments those commands share."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def add_derived_arguments(p) -> None:
    """--model, --output and --overwrite, as every command that writes a derived model
    folder takes them (argparse parser p)."""
    p.add_argument("--model", type=Path, required=True, help="the model (.safetensors)")
    p.add_argument("--output", type=Path, required=True,
                   help="folder for model.safetensors and model.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model there")


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
