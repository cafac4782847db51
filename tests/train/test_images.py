"""Sample grids."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from varkit.images import make_grid, save_grid, to_uint8


def test_grid_layout_and_values(tmp_path):
    images = torch.stack([torch.full((3, 4, 5), i / 5) for i in range(5)])
    grid = make_grid(images, nrow=2, padding=1)
    assert grid.shape == (3 * 5 + 1, 2 * 6 + 1, 3) and grid.dtype == np.uint8
    assert grid[1, 1, 0] == 0 and grid[1, 7, 0] == round(0.2 * 255) and grid[11, 1, 0] == round(0.8 * 255)
    assert grid[0].max() == 0  # padding is black
    path = save_grid(images, tmp_path / "sub" / "g.png", nrow=2)
    assert np.array_equal(np.asarray(Image.open(path)), make_grid(images, 2))
    assert [p.name for p in path.parent.iterdir()] == ["g.png"]


def test_to_uint8_clips():
    out = to_uint8(torch.tensor([-1.0, 0.5, 2.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2))
    assert out.shape == (1, 2, 2, 3) and out[0, 0, 0].tolist() == [0, 128, 255]
