"""The key/value cache of one generation: preallocated, written in place."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every block for a batch being generated.

    One tensor ``(depth, 2, b, nh, l, hd)`` is allocated up front for the whole
    sequence; each step writes its keys and values into the next free positions, so
    no step concatenates or reallocates. ``length`` counts the positions written.

    ``modulation`` holds the AdaLN scales and shifts of the batch's labels, computed
    by the model at step 0 and reused by every later step (they depend on the class
    alone, never on the position). ``positions`` (the unit's position embedding
    ``(1, l, d)``) and ``rotary`` (cosines and sines of its rotary angles, or None) are
    likewise computed once at step 0 and sliced by each step.

    A step either writes at ``length`` (a Python slice: the shapes change with the
    position) or, for a static-shape step, at the device positions ``write_index``
    set by the model: then every step of one length runs the same kernels on the same
    shapes, reads the whole cache and masks the positions it may not see, which is
    what a CUDA graph replayed at every position needs. Such a cache is made with
    ``zeroed=True``: the masked positions are read too and must be finite.
    """

    def __init__(
        self,
        *,
        depth: int,
        batch: int,
        heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        zeroed: bool = False,
    ):
        # A static-shape step reads positions not written yet (masked): they must hold
        # finite numbers, since a masked weight of 0 times a NaN is still NaN.
        alloc = torch.zeros if zeroed else torch.empty
        self.kv = alloc(depth, 2, batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.length = 0
        self.modulation: list[torch.Tensor] | None = None
        self.positions: torch.Tensor | None = None
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        #: Positions ``(n,)`` (int64, on the cache's device) a static-shape step writes;
        #: None for a step that writes at ``length``.
        self.write_index: torch.Tensor | None = None
        #: ``(max_len,)`` bool, True at positions a step skipped (``forward_positions``):
        #: they hold no keys, and later steps mask them. None while every position is written.
        self.skipped: torch.Tensor | None = None

    def __repr__(self) -> str:
        depth, _, b, nh, l, hd = self.kv.shape
        return (
            f"KVCache(depth={depth}, batch={b}, heads={nh}, max_len={l}, head_dim={hd}, length={self.length})"
        )

    @property
    def batch(self) -> int:
        return self.kv.shape[2]

    @property
    def max_len(self) -> int:
        return self.kv.shape[4]

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def device(self) -> torch.device:
        return self.kv.device

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write block ``layer``'s new keys and values ``(b, nh, n, hd)``.

        They go after ``length``, or at ``write_index`` during a static-shape step.
        Returns the keys and values the step's queries attend to (views into the
        cache): ``(b, nh, length + n, hd)``, or the whole cache ``(b, nh, max_len, hd)``
        during a static-shape step (whose attention masks the positions not yet
        written). Call `advance` once all blocks have written.
        """
        if self.write_index is not None:
            self.kv[layer, 0].index_copy_(2, self.write_index, k.to(self.kv.dtype))
            self.kv[layer, 1].index_copy_(2, self.write_index, v.to(self.kv.dtype))
            return self.kv[layer, 0], self.kv[layer, 1]
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"the KV cache holds {self.max_len} positions but step writes up to {end}; "
                "make a new cache with model.new_cache(...) or call cache.reset()"
            )
        self.kv[layer, 0, :, :, self.length : end] = k
        self.kv[layer, 1, :, :, self.length : end] = v
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as written (after every block appended them)."""
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget the positions from ``length`` on (a strategy that drafted them and rejected some).

        Their keys and values stay in memory and are overwritten by the next steps.
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length
        if self.skipped is not None:
            self.skipped[length:] = False

    def reset(self) -> None:
        """Forget every position and the conditioning: ready for a new batch of the same size."""
        self.length = 0
        self.modulation = None
        self.positions = None
        self.rotary = None
        self.write_index = None
        self.skipped = None


class VisibleKeys:
    """Attention of a cached step through an explicit mask of the keys each query sees.

    A static-shape step attends over the whole cache ``(b, nh, max_len, hd)``; the
    positions after its own are masked instead of sliced off, so the shapes do not
    depend on where the step is. It runs ``torch.nn.functional.scaled_dot_product_attention``
    with the boolean mask; eager cached steps (no mask at all) use the model's backend.

    A span of several steps in one pass (`varkit.model.transformer.ARModel.forward_steps`)
    uses it too, with one row per query: each sees the cache and its own and earlier steps.

    Args:
        visible: ``(max_len,)`` bool, True at the positions written so far, the step's
            own included (every query sees the same keys); or ``(lq, lk)`` bool, one row
            per query.
    """

    def __init__(self, visible: torch.Tensor):
        # broadcast over b and nh (and over the queries for a 1-d mask)
        self.visible = visible[None, None] if visible.ndim == 2 else visible[None, None, None, :]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: object, scale: float
    ) -> torch.Tensor:
        """``(b, nh, lq, hd)`` attention of ``q`` over the cache ``k``, ``v`` ``(b, nh, max_len, hd)``."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.visible, scale=scale)
