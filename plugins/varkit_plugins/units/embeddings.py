"""What several units share: VAR's embedding initialisation and 2-D rotary angles."""

from __future__ import annotations

import math

import torch
from torch import nn


def init_embedding_(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """VAR's initialisation of embeddings: trunc-normal, std ``sqrt(1 / (3 d))``, in place.

    VAR truncates at ±2 in absolute value (not in standard deviations); with a std of
    about 0.02 the cut never bites, which keeps the distribution a plain normal.
    """
    return nn.init.trunc_normal_(tensor, mean=0.0, std=math.sqrt(1 / (3 * width)), a=-2.0, b=2.0)


def rope2d_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, *, base: float) -> torch.Tensor:
    """2-D rotary angles ``(l, head_dim // 2)`` of positions at grid ``rows``/``cols`` ``(l,)``.

    The ``head_dim // 2`` rotated pairs are split between the axes: the first half of
    the frequencies turn with the row, the rest with the column (the column gets the
    extra one when the count is odd). Each axis uses the usual RoPE frequencies
    ``base ** (-i / m)``, ``i = 0..m-1``, over its ``m`` pairs, so position (0, 0) has
    angle 0 everywhere.
    """
    if head_dim < 4 or head_dim % 2:
        raise ValueError(f"2-D RoPE needs an even head_dim of at least 4, got {head_dim}")
    pairs = head_dim // 2
    n_rows = pairs // 2

    def freqs(m: int) -> torch.Tensor:
        return base ** (-torch.arange(m, dtype=torch.float64, device=rows.device) / m)

    angles = torch.cat(
        [rows.double()[:, None] * freqs(n_rows)[None], cols.double()[:, None] * freqs(pairs - n_rows)[None]],
        dim=1,
    )
    return angles.float()  # float64 above: positions × frequencies stay exact for large grids
