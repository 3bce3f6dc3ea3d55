"""The model card: the JSON file beside a model's weights (model_io writes both), torch-free.

The card says everything needed to use the model correctly (see ``validate_card`` and
docs/training.md): the format and its version, the architecture (to rebuild the network), the
classes (must be the keys of classes.py, in order), the HU windows of the input channels, the
downsampling factor, label and image mode, the pixel spacing the network saw (mm, the source
spacing times the factor), the network input size, how it was trained (data recipe, exact
command, seed) and the metrics measured.

``ModelConfig`` (the architecture part of the card) lives here rather than in model.py so that
cards can be read and checked without torch (the Slicer panel shows a card before torch is
installed). Cards are written atomically and kept unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Union

from .atomic import atomic_write
from .calibration import KEY as CALIBRATION_KEY, check_calibration
from .upsampling import KEY as UPSAMPLING_KEY, check_upsampling
from .field import KEY as FIELD_KEY, check_field
from .classes import CLASSES, KEYS
from .errors import ModelError
from .windowing import check_windows

FORMAT = "epd-segmentation-model"
FORMAT_VERSION = 1
FACTORS = (1, 2, 4, 8)
LABEL_MODES = ("epd", "nearest")
IMAGE_MODES = ("average", "bilinear")
#: Keys every card has (more are allowed and kept).
REQUIRED = ("format", "format_version", "architecture", "classes", "windows", "factor",
            "label_mode", "image_mode", "pixel_mm", "input_size", "training", "metrics")
REQUIRED_TRAINING = ("data", "command", "seed")

PathLike = Union[str, os.PathLike]


ARCHITECTURE = "EPDNet"
#: Five max-pools: inputs are padded to a multiple of 2^5.
DIVISOR = 32


#: ModelConfig.norm: each image's own GroupNorm statistics (the default), or fixed ones
NORMS = ("group", "fixed")
#: the card key that says where a fixed normalisation's statistics were measured
NORM_STATISTICS_KEY = "norm_statistics"


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network (stored in the model card).

    in_channels: input channels (the HU windows); num_classes: C; width: channels at full
    resolution; multipliers: width multiplier per level (6 levels); norm_groups: at most this
    many GroupNorm groups; reduction: channel-attention bottleneck ratio; spatial_kernel:
    spatial-attention kernel size; norm: "group" (each image's own group statistics) or
    "fixed" (each group's mean and variance stored with the weights, measured on training
    phantoms by ``python -m training fix-norms``; model.FixedGroupNorm). A card lists norm
    only when it is "fixed", so the cards written before it existed stay as they were.
    """

    in_channels: int = 3
    num_classes: int = 6
    width: int = 16
    multipliers: Tuple[int, ...] = (1, 2, 4, 8, 8, 8)
    norm_groups: int = 8
    reduction: int = 4
    spatial_kernel: int = 7
    norm: str = "group"

    def __post_init__(self) -> None:
        mult = self.multipliers
        if not isinstance(mult, (list, tuple)) or not all(
                isinstance(m, int) and not isinstance(m, bool) for m in mult):
            raise ValueError(f"model config: multipliers must be a list of ints; got {mult!r}")
        object.__setattr__(self, "multipliers", tuple(mult))
        for name in ("in_channels", "num_classes", "width", "norm_groups", "reduction",
                     "spatial_kernel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model config: {name} must be a positive int; got {value!r}")
        if len(self.multipliers) != 6 or any(m < 1 for m in self.multipliers):
            raise ValueError(f"model config: multipliers must be 6 positive ints (one per "
                             f"level); got {self.multipliers!r}")
        if self.spatial_kernel % 2 == 0:
            raise ValueError(f"model config: spatial_kernel must be odd; got {self.spatial_kernel}")
        if self.norm not in NORMS:
            raise ValueError(f"model config: norm must be one of {', '.join(NORMS)}; got "
                             f"{self.norm!r}")

    @property
    def widths(self) -> Tuple[int, ...]:
        return tuple(self.width * m for m in self.multipliers)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["multipliers"] = list(self.multipliers)
        if d["norm"] == NORMS[0]:
            del d["norm"]
        return {"name": ARCHITECTURE, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        name = d.pop("name", ARCHITECTURE)
        if name != ARCHITECTURE:
            raise ValueError(f"architecture {name!r} is not {ARCHITECTURE!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown field(s) {', '.join(unknown)}")
        return cls(**d)


class ModelFileError(ModelError):
    """A model file or card that is missing, not ours, corrupt or inconsistent."""


def model_paths(path: PathLike) -> Tuple[Path, Path]:
    """(<stem>.safetensors, <stem>.json) for a path given with either suffix or none."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def class_table() -> list:
    """The classes as a card lists them: index, key, name (from classes.py)."""
    return [{"index": c.index, "key": c.key, "name": c.name} for c in CLASSES]


def make_card(architecture: Mapping[str, Any], *, windows, factor: int, label_mode: str,
              image_mode: str, pixel_mm, input_size, training: Mapping[str, Any],
              metrics: Mapping[str, Any] = None, **extra) -> Dict[str, Any]:
    """A validated card. pixel_mm: (row, col) spacing in mm the network input has (source
    spacing times factor); input_size: (rows, cols) of the network input during training."""
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": dict(architecture),
        "classes": class_table(),
        "windows": [list(w) for w in check_windows(windows)],
        "factor": factor,
        "label_mode": label_mode,
        "image_mode": image_mode,
        "pixel_mm": [float(v) for v in pixel_mm],
        "input_size": [int(v) for v in input_size],
        "training": dict(training),
        "metrics": dict(metrics or {}),
    }
    card.update(extra)
    return validate_card(card)


def _fail(where: str, msg: str) -> None:
    raise ModelFileError(f"{where}: {msg}")


def validate_card(card: Any, where: str = "model card") -> Dict[str, Any]:
    """Check a card and return it (windows normalised); ModelFileError naming the problem."""
    if not isinstance(card, Mapping):
        _fail(where, f"a model card is a JSON object; got {type(card).__name__}")
    card = dict(card)
    if card.get("format") != FORMAT:
        _fail(where, f"not an EPD Segmentation model card (format is {card.get('format')!r}, "
                     f"expected {FORMAT!r})")
    version = card.get("format_version")
    if not isinstance(version, int) or version < 1:
        _fail(where, f"format_version must be a positive integer; got {version!r}")
    if version > FORMAT_VERSION:
        _fail(where, f"format_version {version} is newer than this software reads "
                     f"({FORMAT_VERSION}); update EPD Segmentation")
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        _fail(where, f"missing field(s): {', '.join(missing)}")
    if not isinstance(card["architecture"], Mapping):
        _fail(where, "architecture must be an object")
    try:
        ModelConfig.from_dict(card["architecture"])
    except (ValueError, TypeError) as exc:
        _fail(where, f"architecture: {exc}")
    classes = card["classes"]
    keys = [c.get("key") if isinstance(c, Mapping) else c for c in classes] \
        if isinstance(classes, list) else None
    if keys != list(KEYS):
        _fail(where, f"classes {keys!r} do not match this software's classes {list(KEYS)!r}")
    if card["architecture"].get("num_classes") != len(KEYS):
        _fail(where, f"architecture has {card['architecture'].get('num_classes')} classes; "
                     f"the class table has {len(KEYS)}")
    try:
        windows = check_windows(card["windows"])
    except (ValueError, TypeError) as exc:
        _fail(where, f"windows: {exc}")
    if len(windows) != card["architecture"].get("in_channels"):
        _fail(where, f"{len(windows)} windows but the network takes "
                     f"{card['architecture'].get('in_channels')} input channels")
    card["windows"] = [list(w) for w in windows]
    if card["factor"] not in FACTORS or isinstance(card["factor"], bool):
        _fail(where, f"factor must be one of {FACTORS}; got {card['factor']!r}")
    if card["label_mode"] not in LABEL_MODES:
        _fail(where, f"label_mode must be one of {LABEL_MODES}; got {card['label_mode']!r}")
    if card["image_mode"] not in IMAGE_MODES:
        _fail(where, f"image_mode must be one of {IMAGE_MODES}; got {card['image_mode']!r}")
    if not _positive_pair(card["pixel_mm"], float):
        _fail(where, f"pixel_mm must be [row mm, column mm], both > 0; got {card['pixel_mm']!r}")
    if not _positive_pair(card["input_size"], int):
        _fail(where, f"input_size must be [rows, columns], both > 0; got {card['input_size']!r}")
    training = card["training"]
    if not isinstance(training, Mapping):
        _fail(where, "training must be an object (data recipe, command, seed)")
    missing = [k for k in REQUIRED_TRAINING if k not in training]
    if missing:
        _fail(where, f"training lacks {', '.join(missing)}")
    if not isinstance(card["metrics"], Mapping):
        _fail(where, "metrics must be an object")
    if CALIBRATION_KEY in card:
        problem = check_calibration(card[CALIBRATION_KEY], len(KEYS))
        if problem is not None:
            _fail(where, problem)
    if UPSAMPLING_KEY in card:
        problem = check_upsampling(card[UPSAMPLING_KEY])
        if problem is not None:
            _fail(where, problem)
    if FIELD_KEY in card:
        problem = check_field(card[FIELD_KEY])
        if problem is not None:
            _fail(where, problem)
    stats = card.get(NORM_STATISTICS_KEY)
    if card["architecture"].get("norm") == "fixed" and not (
            isinstance(stats, Mapping) and isinstance(stats.get("measured_on"), str)):
        _fail(where, f"a network with fixed normalisation statistics needs "
                     f"{NORM_STATISTICS_KEY}.measured_on, where they were measured (python -m "
                     f"training fix-norms writes it); got {stats!r}")
    return card


def _positive_pair(v, kind) -> bool:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        return False
    for x in v:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return False
        if kind is int and not float(x).is_integer():
            return False
        if not math.isfinite(x) or x <= 0:
            return False
    return True


def write_card(path: PathLike, card: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Write a (validated) card as strict JSON (NaN written as null), atomically."""
    path = Path(path)
    card = validate_card(card, str(path))
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_finite(card), f, indent=2, allow_nan=False)
            f.write("\n")

    atomic_write(path, write)
    return path


def _finite(obj):
    """The card with NaN and infinities as null (strict JSON: absent classes have no value)."""
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_card(path: PathLike) -> Dict[str, Any]:
    """The validated card of a model (path to the .json, the .safetensors, or the stem)."""
    _, card_path = model_paths(path)
    if not card_path.is_file():
        raise ModelFileError(f"{card_path}: model card not found (every model needs the JSON "
                             f"card beside its .safetensors weights)")
    try:
        with open(card_path, encoding="utf-8") as f:
            card = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{card_path}: not valid JSON ({exc})") from None
    return validate_card(card, str(card_path))
