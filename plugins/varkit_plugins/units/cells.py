"""The raster-over-cells units: ``k×k`` cells of one code map in raster order, one cell per step.

``token`` (1×1 cells) and ``patch`` (k×k cells) are the two settings of `CellUnit`.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
from attrs import validators as v
from einops import rearrange
from torch import nn

from varkit.base import PredictionUnit, Tokenizer
from varkit.errors import PluginError, VarkitError
from varkit_plugins.units.embeddings import init_embedding_, rope2d_angles


@attrs.frozen(kw_only=True)
class CellConfig:
    """Position options shared by the raster-over-cells units."""

    #: "learned": an absolute position embedding per position (added to the input);
    #: "rope2d": no absolute embedding, queries and keys are rotated by each position's
    #: (row, column) on the code grid instead (2-D RoPE, as in LlamaGen).
    position: Literal["learned", "rope2d"] = attrs.field(
        default="learned", validator=v.in_(("learned", "rope2d"))
    )
    #: RoPE base: frequencies are ``rope_base ** (-i / m)``; only used by "rope2d".
    rope_base: float = attrs.field(default=10000.0, validator=v.gt(1.0))
    #: Which code's grid cell rotates a position with "rope2d": "target", the code it
    #: predicts (the class position sits at (0, 0)); "input", the code it is fed, as
    #: LlamaGen does, whose class position is fed no code and gets zero queries and keys.
    rope_anchor: Literal["target", "input"] = attrs.field(
        default="target", validator=v.in_(("target", "input"))
    )
    #: What positions are fed: "embeddings", the tokenizer's embedding of the previous
    #: codes, projected by the model (VAR-style); "codes", the codes themselves, looked up
    #: in a table the model learns (LlamaGen's ``tok_embeddings``).
    inputs: Literal["embeddings", "codes"] = attrs.field(
        default="embeddings", validator=v.in_(("embeddings", "codes"))
    )
    #: Learn ``pos_start``, added to the class embedding at step 0 (LlamaGen: none, the
    #: class token alone).
    start_embedding: bool = True


class CellUnit(PredictionUnit):
    """Raster order over ``k×k`` cells of a single code map; one cell per step.

    The final code map ``(hK, wK)`` is cut into ``(hK/k) × (wK/k)`` cells, taken in
    raster order; inside a cell the ``k²`` codes are in raster order too. Step 0's
    ``k²`` positions hold the class embedding plus ``pos_start`` ``(1, k², d)`` and
    predict cell 0; step ``s > 0`` is fed the embeddings of cell ``s - 1``'s codes and
    predicts cell ``s``, all ``k²`` codes at once. ``k = 1`` is plain raster
    next-token prediction with the class as a one-token prefix.

    Subclasses set `cell_size`.
    """

    Config = CellConfig

    def __init__(self, config, *, tokenizer: Tokenizer, width: int):
        super().__init__(config, tokenizer=tokenizer, width=width)
        problems = self.check_tokenizer(tokenizer, config)
        if problems:
            raise PluginError(
                f"unit {self.name!r} cannot use tokenizer {tokenizer.name!r}: {'; '.join(problems)}"
            )
        self.k = self.cell_size(config)
        self.grid = tuple(tokenizer.schedule[-1])
        h, w = self.grid
        self.cells = (h // self.k) * (w // self.k)
        length = h * w
        self.input_codes = config.inputs == "codes"
        self.width = width
        if config.start_embedding:
            self.pos_start = nn.Parameter(init_embedding_(torch.empty(1, self.k * self.k, width), width))
        else:
            self.pos_start = None
        if config.position == "learned":
            self.pos_embed = nn.Parameter(init_embedding_(torch.empty(1, length, width), width))
        else:
            self.pos_embed = None
        # Grid coordinates of every sequence position (not saved: derived from the grid).
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        self.register_buffer("rows", self._to_sequence(rows[None])[0], persistent=False)
        self.register_buffer("cols", self._to_sequence(cols[None])[0], persistent=False)

    @classmethod
    def cell_size(cls, config) -> int:
        """The cell side ``k``."""
        raise NotImplementedError

    @classmethod
    def check_tokenizer(cls, tokenizer: Tokenizer, config=None) -> list[str]:
        schedule = tuple(tuple(g) for g in tokenizer.schedule)
        if len(schedule) != 1:
            return [
                f"it orders the codes of one code map, but the tokenizer has {len(schedule)} scales "
                f"{[f'{h}x{w}' for h, w in schedule]}; use a single-scale tokenizer (`vq`, or `msvq` "
                f"with a one-entry schedule), or the `scale` unit for a multi-scale one"
            ]
        if config is None:
            return []
        k = cls.cell_size(config)
        h, w = schedule[0]
        if h % k or w % k:
            return [
                f"cell side k={k} does not divide the {h}x{w} code grid; choose a k that divides both {h} and {w}"
            ]
        return []

    # -- sequence layout ----------------------------------------------------------
    def _to_sequence(self, grid: torch.Tensor) -> torch.Tensor:
        """``(b, h, w, ...)`` in grid layout -> ``(b, l, ...)`` in cell order."""
        return rearrange(grid, "b (gh kh) (gw kw) ... -> b (gh gw kh kw) ...", kh=self.k, kw=self.k)

    def _to_grid(self, seq: torch.Tensor) -> torch.Tensor:
        """``(b, l, ...)`` in cell order -> ``(b, h, w, ...)``."""
        h, w = self.grid
        return rearrange(
            seq,
            "b (gh gw kh kw) ... -> b (gh kh) (gw kw) ...",
            gh=h // self.k,
            gw=w // self.k,
            kh=self.k,
            kw=self.k,
        )

    @property
    def step_lengths(self) -> tuple[int, ...]:
        return (self.k * self.k,) * self.cells

    def start_embedding(self) -> torch.Tensor:
        if self.pos_start is not None:
            return self.pos_start
        return torch.zeros(1, self.k * self.k, self.width, device=self.rows.device)

    def position_embedding(self) -> torch.Tensor:
        if self.pos_embed is not None:
            return self.pos_embed
        # rope2d places positions by rotation; nothing is added to the input.
        return torch.zeros(1, self.seq_len, self.width, device=self.rows.device)

    def rotary_angles(self, head_dim: int) -> torch.Tensor | None:
        """With ``position="rope2d"``, the angles of each position's grid cell.

        With ``rope_anchor="target"`` a position is rotated by the (row, column) of the
        code it predicts, so the class-prefix position of the token unit, which predicts
        the code at (0, 0), has angle 0. With ``"input"`` it is rotated by the cell of the
        code it is fed (the code ``k²`` positions back); step 0's positions, fed none,
        get angle 0 here and zero tables from `rotary_tables`.
        """
        if self.config.position != "rope2d":
            return None
        rows, cols = self.rows, self.cols
        if self.config.rope_anchor == "input":
            n = self.k * self.k
            rows = torch.cat((rows.new_zeros(n), rows[:-n]))
            cols = torch.cat((cols.new_zeros(n), cols[:-n]))
        return rope2d_angles(rows, cols, head_dim, base=self.config.rope_base)

    def rotary_tables(self, head_dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The tables of `rotary_angles`; with ``rope_anchor="input"`` those of step 0 are
        zero, which zeroes the class positions' queries and keys (LlamaGen's layout)."""
        tables = super().rotary_tables(head_dim)
        if tables is None or self.config.rope_anchor != "input":
            return tables
        n = self.k * self.k
        cos, sin = (t.clone() for t in tables)
        cos[:n] = 0.0
        sin[:n] = 0.0
        return cos, sin

    def targets(self, codes: list[torch.Tensor]) -> torch.Tensor:
        return self._to_sequence(codes[-1])

    def teacher_forcing(self, codes: list[torch.Tensor], tokenizer: Tokenizer) -> torch.Tensor:
        last = self.k * self.k
        code_seq = self._to_sequence(codes[-1])[:, :-last]  # the last cell is never an input
        if self.input_codes:
            return code_seq  # (b, l - k²)
        return tokenizer.embed(code_seq)  # (b, l - k², c)

    # -- generation ---------------------------------------------------------------
    def start_generation(self, batch: int, tokenizer: Tokenizer) -> dict:
        return {"codes": []}

    def generation_step(self, state, step, codes, emb, tokenizer):
        state["codes"].append(codes)
        if step == self.cells - 1:
            return None
        # This cell's codes (or their embeddings) feed the next cell's positions one to one;
        # a unit fed codes has no use for a soft sampler's mixtures.
        return codes if self.input_codes else emb

    def generated_codes(self, state: dict) -> list[torch.Tensor]:
        return [self._to_grid(torch.cat(state["codes"], dim=1))]

    def finish_generation(self, state: dict, tokenizer: Tokenizer) -> torch.Tensor:
        # The decoded map is built from the hard codes; a soft sampler's mixtures only
        # smooth the inputs of the steps.
        return tokenizer.codes_to_features(self.generated_codes(state))

    # -- editing ------------------------------------------------------------------
    def keep_positions(self, keep: torch.Tensor) -> torch.Tensor:
        """A code is kept where more than half of its latent position is, in cell order.

        Generation is causal in raster order: a position sees the kept codes before
        it, never those after it, so the kept region below or right of a regenerated
        one cannot steer it.
        """
        if keep.ndim != 3 or tuple(keep.shape[1:]) != self.grid:
            raise VarkitError(
                f"keep must be (b, {self.grid[0]}, {self.grid[1]}) on the code grid, got {tuple(keep.shape)}"
            )
        return self._to_sequence(keep > 0.5)  # (b, l)
