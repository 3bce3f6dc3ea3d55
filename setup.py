"""Package layout (everything else is in pyproject.toml).

The core lives inside the Slicer module folder, so Slicer and pip load the same files; its
subpackages and training's are found automatically. The repository's Resources/ (the
bundled model and sample CT) ships inside the wheel as EPDSegmentationLib/bundled/, where
core/resources.py looks after the source-tree places.
"""

from setuptools import find_packages, setup

setup(
    package_dir={"EPDSegmentationLib": "EPDSegmentation/EPDSegmentationLib",
                 "training": "training",
                 "EPDSegmentationLib.bundled": "Resources"},
    packages=(find_packages("EPDSegmentation", include=["EPDSegmentationLib", "EPDSegmentationLib.*"])
              + find_packages(".", include=["training", "training.*"])
              + ["EPDSegmentationLib.bundled"]),
)
