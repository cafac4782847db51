"""The AR objective: cross-entropy of each position's logits against its code, and the
grouping of positions by step that training and evaluation report it in."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ar_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-position cross-entropy ``(b, l)`` of logits ``(b, l, v)`` against targets ``(b, l)``.

    Computed in float32 whatever the autocast dtype: the softmax over 4096 codes loses
    too much in half precision. The positions are flattened into rows so that the
    softmax runs over contiguous vocabulary rows (a transposed ``(b, v, l)`` view makes
    the loss several times slower on the CPU).
    """
    per_row = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), reduction="none", label_smoothing=label_smoothing
    )
    return per_row.view(targets.shape)


class StepGroups:
    """Maps the positions of a sequence to at most ``max_groups`` groups of AR steps.

    With few steps (VAR's 10 scales) each step is its own group ``s3``; with many (a
    raster unit's 256 tokens) neighbouring steps share a group ``s0-15``, so that a
    metrics line stays readable.
    """

    def __init__(self, step_lengths: tuple[int, ...], device: torch.device, max_groups: int = 16):
        steps = len(step_lengths)
        per = math.ceil(steps / max_groups)
        self.names = []
        group_of_step = []
        for g, first in enumerate(range(0, steps, per)):
            last = min(first + per, steps) - 1
            self.names.append(f"s{first}" if first == last else f"s{first}-{last}")
            group_of_step.extend([g] * (last - first + 1))
        lengths = torch.tensor(step_lengths)
        self.index = torch.repeat_interleave(torch.tensor(group_of_step), lengths).to(device)  # (l,)
        #: positions per group ``(groups,)`` float64, on ``device``
        self.sizes = torch.bincount(self.index, minlength=len(self.names)).to(torch.float64)

    def reduce(self, per_position: torch.Tensor) -> torch.Tensor:
        """Sums ``(l,)`` -> sums per group ``(groups,)``."""
        out = torch.zeros(len(self.names), dtype=per_position.dtype, device=per_position.device)
        return out.index_add_(0, self.index, per_position)

    def mean(self, per_position: torch.Tensor) -> torch.Tensor:
        """Means ``(l,)`` -> means per group ``(groups,)``, float64."""
        return self.reduce(per_position.to(self.sizes.device, torch.float64)) / self.sizes
