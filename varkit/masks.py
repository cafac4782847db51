"""Attention masks described by their structure, never by a dense tensor up front.

A block-causal mask over steps of lengths ``(l_0, l_1, ...)`` lets each position see
every position of its own step and of the steps before. Raster next-token prediction
is the case where every length is 1 (plain causal attention). Backends choose how to
realise it: ``is_causal`` for the all-ones case, one unmasked call per step where the
steps are long enough (`BlockCausal.split`), a block mask for flex attention, a
boolean matrix otherwise.

`BlockCausal` is the structure (hashable, no tensors). `PreparedMask` is
what a model hands its backend in training: the structure plus whatever tensors the
backend needs, held as buffers of a module that the model owns. They are built once,
when the model is built, and move with the model (``model.to(device)``), so a compiled
training forward reads them as inputs instead of rebuilding them inside the graph.
"""

from __future__ import annotations

import functools

import attrs
import torch
from torch import nn


@attrs.frozen
class Segment:
    """One call of an exact split of block-causal attention (`BlockCausal.split`).

    The queries ``[start, end)`` attend to the keys ``[0, end)``: all of them when
    ``masked`` is False (the queries are one step), else through the block-causal mask
    restricted to those rows and columns (the queries are several leading steps).
    """

    start: int
    end: int
    masked: bool


class BlockCausal:
    """Block-causal structure over steps of the given lengths."""

    def __init__(self, step_lengths: tuple[int, ...] | list[int]):
        self.step_lengths = tuple(int(n) for n in step_lengths)
        if not self.step_lengths or min(self.step_lengths) < 1:
            raise ValueError(f"step lengths must be positive, got {self.step_lengths}")
        starts = [0]
        for n in self.step_lengths:
            starts.append(starts[-1] + n)
        #: First position of each step, then the sequence length.
        self.step_starts = tuple(starts)

    def __repr__(self) -> str:
        return f"BlockCausal({self.step_lengths})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockCausal) and other.step_lengths == self.step_lengths

    def __hash__(self) -> int:
        return hash(self.step_lengths)

    @property
    def layout(self) -> BlockCausal:
        """The structure itself (a `PreparedMask` answers with the one it holds)."""
        return self

    @property
    def seq_len(self) -> int:
        return self.step_starts[-1]

    @property
    def is_causal(self) -> bool:
        """True when every step has one position: plain causal attention."""
        return all(n == 1 for n in self.step_lengths)

    @property
    def visible_pairs(self) -> int:
        """(query, key) pairs the mask lets through: the work of an exact kernel."""
        return sum(n * end for n, end in zip(self.step_lengths, self.step_starts[1:], strict=True))

    def step_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The step index of every position, ``(l,)`` int64 (cached per device)."""
        return _step_ids(self.step_lengths, str(torch.device(device or "cpu")))

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The mask as a boolean ``(l, l)`` matrix: True where a query may see a key (cached per device)."""
        return _dense(self.step_lengths, str(torch.device(device or "cpu")))

    def split(self, min_queries: int) -> tuple[Segment, ...] | None:
        """An exact split into calls that need no mask, or None when it would not pay.

        The leading steps are gathered until they hold at least ``min_queries``
        positions; they form one masked segment (small: its mask is a corner of the
        dense one). Every later step is a segment of its own whose queries see every
        key up to the step's end, so it needs no mask at all and a fused kernel (flash
        attention) computes exactly the visible pairs. The split is offered only when
        every later step holds at least ``min_queries`` positions, so that each call
        fills a kernel's tiles; VAR's scales 1..16 at ``min_queries=64`` split into
        scales 1-6 (91 positions, masked) and one call per scale 8, 10, 13 and 16.
        None also when there is a single segment (plain causal layouts have
        ``is_causal`` instead).
        """
        lengths, starts = self.step_lengths, self.step_starts
        first = 0
        while first < len(lengths) - 1 and starts[first + 1] < min_queries:
            first += 1
        rest = range(first + 1, len(lengths))
        if not rest or any(lengths[s] < min_queries for s in rest):
            return None
        head = Segment(0, starts[first + 1], masked=first > 0)
        return (head, *(Segment(starts[s], starts[s + 1], masked=False) for s in rest))


@functools.lru_cache(maxsize=64)
def _step_ids(step_lengths: tuple[int, ...], device: str) -> torch.Tensor:
    ids = [s for s, n in enumerate(step_lengths) for _ in range(n)]
    return torch.tensor(ids, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=32)
def _dense(step_lengths: tuple[int, ...], device: str) -> torch.Tensor:
    ids = _step_ids(step_lengths, device)
    return ids[None, :] <= ids[:, None]  # (lq, lk): key's step <= query's step


class PreparedMask(nn.Module):
    """A `BlockCausal` layout with its tensors as (non-persistent) buffers.

    Built by `varkit.AttentionBackend.prepare` when the model is built, on the
    default device, and held by the model as a submodule, so that it moves with the
    model and a compiled forward reads its buffers instead of building masks in the
    graph. It answers the questions a `BlockCausal` answers (``step_lengths``,
    ``is_causal``, ``step_ids()``, ``dense()``), so a backend written for one works with
    the other. Backends subclass it to hold more (flex attention's block mask).

    Args:
        layout: the structure.
        dense: keep the boolean ``(l, l)`` matrix as a buffer; without it
            `dense` derives it from the step ids when asked.
    """

    def __init__(self, layout: BlockCausal, *, dense: bool = True):
        super().__init__()
        self.layout = layout
        self.register_buffer("ids", _build_step_ids(layout), persistent=False)
        visible = self.ids[None, :] <= self.ids[:, None] if dense else None
        self.register_buffer("visible", visible, persistent=False)

    def extra_repr(self) -> str:
        return f"{self.layout!r}, dense={self.visible is not None}"

    @property
    def step_lengths(self) -> tuple[int, ...]:
        return self.layout.step_lengths

    @property
    def step_starts(self) -> tuple[int, ...]:
        return self.layout.step_starts

    @property
    def seq_len(self) -> int:
        return self.layout.seq_len

    @property
    def is_causal(self) -> bool:
        return self.layout.is_causal

    def step_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The step index of every position ``(l,)``: the buffer (``device`` is where it already is)."""
        return self.ids if device is None else self.ids.to(device)

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The boolean ``(l, l)`` mask: the buffer, or derived from the step ids without one."""
        visible = self.visible if self.visible is not None else self.ids[None, :] <= self.ids[:, None]
        return visible if device is None else visible.to(device)


def _build_step_ids(layout: BlockCausal) -> torch.Tensor:
    """Step ids on the default device, fresh (a buffer must not share the cached tensor)."""
    ids = [s for s, n in enumerate(layout.step_lengths) for _ in range(n)]
    return torch.tensor(ids, dtype=torch.int64)
