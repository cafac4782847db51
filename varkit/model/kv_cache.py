"""The key/value cache of one generation: preallocated, written in place."""

from __future__ import annotations

import torch


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
    ):
        self.kv = torch.empty(depth, 2, batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.length = 0
        self.modulation: list[torch.Tensor] | None = None
        self.positions: torch.Tensor | None = None
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None

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

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write block ``layer``'s new keys and values ``(b, nh, n, hd)`` after ``length``.

        Returns the keys and values of every position so far, ``(b, nh, length + n, hd)``
        (views into the cache). Call `advance` once all blocks have written.
        """
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

    def reset(self) -> None:
        """Forget every position and the conditioning: ready for a new batch of the same size."""
        self.length = 0
        self.modulation = None
        self.positions = None
        self.rotary = None
