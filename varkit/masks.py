"""Attention masks described by their structure, never by a dense tensor up front.

A block-causal mask over steps of lengths ``(l_0, l_1, ...)`` lets each position see
every position of its own step and of the steps before. Raster next-token prediction
is the case where every length is 1 (plain causal attention). Backends choose how to
realise it: ``is_causal`` for the all-ones case, a boolean matrix for SDPA, a block
mask for flex attention.
"""

from __future__ import annotations

import functools

import torch


class BlockCausal:
    """Block-causal structure over steps of the given lengths."""

    def __init__(self, step_lengths: tuple[int, ...] | list[int]):
        self.step_lengths = tuple(int(n) for n in step_lengths)
        if not self.step_lengths or min(self.step_lengths) < 1:
            raise ValueError(f"step lengths must be positive, got {self.step_lengths}")

    def __repr__(self) -> str:
        return f"BlockCausal({self.step_lengths})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockCausal) and other.step_lengths == self.step_lengths

    def __hash__(self) -> int:
        return hash(self.step_lengths)

    @property
    def seq_len(self) -> int:
        return sum(self.step_lengths)

    @property
    def is_causal(self) -> bool:
        """True when every step has one position: plain causal attention."""
        return all(n == 1 for n in self.step_lengths)

    def step_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The step index of every position, ``(l,)`` int64."""
        return _step_ids(self.step_lengths, str(device or "cpu"))

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The mask as a boolean ``(l, l)`` matrix: True where a query may see a key."""
        return _dense(self.step_lengths, str(device or "cpu"))


@functools.lru_cache(maxsize=32)
def _step_ids(step_lengths: tuple[int, ...], device: str) -> torch.Tensor:
    lengths = torch.tensor(step_lengths, device=device)
    return torch.repeat_interleave(torch.arange(len(step_lengths), device=device), lengths)


@functools.lru_cache(maxsize=32)
def _dense(step_lengths: tuple[int, ...], device: str) -> torch.Tensor:
    ids = _step_ids(step_lengths, device)
    return ids[None, :] <= ids[:, None]  # (lq, lk): key's step <= query's step
