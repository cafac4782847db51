"""Fixtures of the data tests: tiny image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _datahelpers import SYNSETS, png_bytes


@pytest.fixture
def image_folder(tmp_path) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """Three synset folders of 16×16 PNGs (4, 5, 6 images), plus their pixels by class."""
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    pixels: dict[str, list[np.ndarray]] = {}
    for n, name in zip((4, 5, 6), reversed(SYNSETS)):  # created out of order on purpose
        (root / name).mkdir(parents=True)
        pixels[name] = []
        for i in range(n):
            px = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            (root / name / f"{name}_{i}.x.PNG").write_bytes(png_bytes(px))  # a dot inside the stem
            pixels[name].append(px)
    return root, pixels
