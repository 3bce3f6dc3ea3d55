"""Where the bundled files are: the model and the sample CT.

In the source tree they live in <repo>/Resources; a built Slicer extension installs them
into the module's own Resources folder; a pip-installed wheel carries them as
EPDSegmentationLib/bundled. The three places are searched in that order, module first.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

LIB_DIR = Path(__file__).resolve().parents[1]    # EPDSegmentationLib/
SEARCH_DIRS: List[Path] = [LIB_DIR.parent / "Resources", LIB_DIR.parent.parent / "Resources",
                           LIB_DIR / "bundled"]

#: Bundled model: safetensors weights with a JSON model card of the same stem beside them.
BUNDLED_MODEL = ("Models", "EPDBodyComp_f2.safetensors")
#: Bundled sample: a phantom CT volume (HU, compressed NRRD) and its label map.
SAMPLE_CT = ("Sample", "EPDPhantomCT.nrrd")
SAMPLE_LABELS = ("Sample", "EPDPhantomCT-label.nrrd")


def resource_path(*parts: str) -> Path:
    """The first existing Resources/<parts...>; FileNotFoundError naming every place tried."""
    tried = [d.joinpath(*parts) for d in SEARCH_DIRS]
    for path in tried:
        if path.exists():
            return path
    raise FileNotFoundError(
        f"bundled resource {'/'.join(parts)} not found; looked in: "
        + ", ".join(str(p) for p in tried))


def bundled_model_path() -> Path:
    return resource_path(*BUNDLED_MODEL)


def sample_ct_path() -> Path:
    return resource_path(*SAMPLE_CT)


def sample_labels_path() -> Path:
    return resource_path(*SAMPLE_LABELS)
