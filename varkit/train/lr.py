"""Learning-rate and weight-decay schedules (VAR's ``lin0`` and ``cos``).

Steps count optimizer steps from 0 to ``total - 1``. The lr warms up linearly from
``warmup_start_ratio × peak`` (at step 0) to the peak (at step ``warmup``), then:

- ``lin0``: stays at the peak for the first 5 % of the steps after warmup, then falls
  linearly to ``final_lr_ratio × peak`` at the last step (VAR's default);
- ``cos``: half a cosine from the peak to ``final_lr_ratio × peak``;
- ``constant``: stays at the peak.

Weight decay follows half a cosine over the whole run from ``weight_decay`` to
``weight_decay_end`` (constant when that is unset).
"""

from __future__ import annotations

import math

from varkit.recipe.train import TrainConfig

#: The share of the post-warmup steps that ``lin0`` holds at the peak.
LIN0_FLAT = 0.05


def lr_factor(
    step: int,
    total: int,
    *,
    warmup: int,
    schedule: str,
    warmup_start_ratio: float,
    final_lr_ratio: float,
) -> float:
    """The lr at ``step`` as a fraction of the peak."""
    if warmup > 0 and step < warmup:
        return warmup_start_ratio + (1.0 - warmup_start_ratio) * step / warmup
    if schedule == "constant":
        return 1.0
    span = total - 1 - warmup
    # 0 -> 1 after warmup; with no step left to decay over, the one after warmup is the peak
    done = min(1.0, (step - warmup) / span) if span > 0 else 0.0
    if schedule == "cos":
        return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * done))
    if schedule == "lin0":
        if done < LIN0_FLAT:
            return 1.0
        return final_lr_ratio + (1.0 - final_lr_ratio) * (1.0 - done) / (1.0 - LIN0_FLAT)
    raise ValueError(f"unknown schedule {schedule!r}; use lin0, cos or constant")


def lr_at(config: TrainConfig, step: int, total: int) -> float:
    """The learning rate of ``step`` in a run of ``total`` steps."""
    return config.peak_lr * lr_factor(
        step,
        total,
        warmup=config.warmup(total),
        schedule=config.schedule,
        warmup_start_ratio=config.warmup_start_ratio,
        final_lr_ratio=config.final_lr_ratio,
    )


def weight_decay_at(config: TrainConfig, step: int, total: int) -> float:
    """The weight decay of ``step``: cosine from ``weight_decay`` to ``weight_decay_end``."""
    if config.weight_decay_end is None:
        return config.weight_decay
    done = min(1.0, step / (total - 1)) if total > 1 else 1.0
    end, start = config.weight_decay_end, config.weight_decay
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * done))
