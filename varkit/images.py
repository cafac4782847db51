"""Image grids and conversions for sample outputs."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images ``(n, 3, H, W)`` in [0, 1] -> ``(n, H, W, 3)`` uint8 (values outside are clipped)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (n, 3, H, W), got shape {tuple(images.shape)}")
    pixels = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor | np.ndarray, nrow: int, padding: int = 2) -> np.ndarray:
    """Tile images ``(n, 3, H, W)`` in [0, 1] (or `to_uint8`'s ``(n, H, W, 3)``
    uint8) into one ``(H', W', 3)`` uint8 array.

    ``nrow`` images per row, ``padding`` black pixels between and around them.
    """
    if nrow < 1:
        raise ValueError(f"nrow is {nrow}; it must be >= 1")
    pixels = images if isinstance(images, np.ndarray) else to_uint8(images)
    n, h, w, _ = pixels.shape
    cols = min(nrow, max(n, 1))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), np.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top : top + h, left : left + w] = img
    return grid


def save_grid(images: torch.Tensor | np.ndarray, path: str | os.PathLike, nrow: int = 8) -> Path:
    """Save images (as `make_grid` takes them) as one PNG grid with ``nrow`` images per row.

    The file is written beside its final name and renamed, so a reader never sees half
    a PNG. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(make_grid(images, nrow)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
