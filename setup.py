"""Packaging for fatr_seg.

torch and mmcv are not in ``install_requires``: ``make install`` installs them (torch only when it
is missing, so a user's CUDA build stays; mmcv is compiled by tools/install_mmcv.sh).
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def read_version():
    text = (ROOT / "fatr_seg" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def read_requirements(name):
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
    name="fatr_seg",
    version=read_version(),
    description="Frequency-Aware Token Reduction for plain-ViT semantic segmentation (mmseg 1.x)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fatr_seg", "fatr_seg.*"]),
    python_requires=">=3.10",
    install_requires=read_requirements("runtime.txt"),
    extras_require={"dev": read_requirements("dev.txt")},
)
