"""``scale``: VAR's next-scale prediction over a multi-scale tokenizer's code pyramid.

One step per scale of the tokenizer's schedule: step ``k`` predicts all ``h_k·w_k``
codes of scale ``k`` at once (row-major inside the scale), seeing every position of
the scales before it (block-causal mask over ``(h_1·w_1, h_2·w_2, ...)``). Step 0 is
the class embedding plus ``pos_start``; step ``k > 0`` is fed the running feature map
``f_hat`` of scales ``< k`` brought down to scale ``k``'s grid
(``tokenizer.next_input``). Every position adds its absolute position embedding and
the level embedding of its scale.

The parameter names ``pos_start``, ``pos_embed`` and ``level_embed`` are what the
official VAR checkpoint converter maps ``pos_start``, ``pos_1LC`` and ``lvl_embed`` onto.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from varkit.base import PredictionUnit, Tokenizer
from varkit.errors import PluginError, VarkitError
from varkit.hookspecs import hookimpl
from varkit_plugins.units.embeddings import init_embedding_


class NextScale(PredictionUnit):
    """Next-scale prediction (VAR): one scale of the code pyramid per step."""

    name = "scale"

    def __init__(self, config, *, tokenizer: Tokenizer, width: int):
        super().__init__(config, tokenizer=tokenizer, width=width)
        problems = self.check_tokenizer(tokenizer)
        if problems:
            raise PluginError(f"unit 'scale' cannot use tokenizer {tokenizer.name!r}: {'; '.join(problems)}")
        self.schedule = tuple((int(h), int(w)) for h, w in tokenizer.schedule)
        lengths = self.step_lengths
        self.pos_start = nn.Parameter(init_embedding_(torch.empty(1, lengths[0], width), width))
        self.pos_embed = nn.Parameter(init_embedding_(torch.empty(1, sum(lengths), width), width))
        self.level_embed = nn.Embedding(len(lengths), width)
        init_embedding_(self.level_embed.weight, width)
        # The scale of every position; derived from the schedule, so not saved.
        self.register_buffer("levels", self.mask().step_ids().clone(), persistent=False)

    @classmethod
    def check_tokenizer(cls, tokenizer: Tokenizer, config=None) -> list[str]:
        schedule = tuple(tokenizer.schedule)
        if len(schedule) < 2:
            return [
                f"next-scale prediction needs a multi-scale tokenizer, but this one has the single "
                f"scale {schedule}: one step would predict every code at once from the class alone. "
                "Use `msvq` with a schedule of several scales (e.g. 1,2,3,4,5,6,8,10,13,16), or the "
                "`token`/`patch` unit for a single-scale tokenizer"
            ]
        return []

    @property
    def step_lengths(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.schedule)

    def start_embedding(self) -> torch.Tensor:
        return self.pos_start

    def position_embedding(self) -> torch.Tensor:
        """``pos_embed`` plus the level embedding of each position's scale, ``(1, l, d)``."""
        return self.pos_embed + self.level_embed(self.levels)[None]

    def targets(self, codes: list[torch.Tensor]) -> torch.Tensor:
        self._check_codes(codes)
        return torch.cat([code.flatten(1) for code in codes], dim=1)  # (b, l)

    def teacher_forcing(self, codes: list[torch.Tensor], tokenizer: Tokenizer) -> torch.Tensor:
        self._check_codes(codes)
        inputs = tokenizer.teacher_forcing_inputs(codes)  # [(b, c, h_k, w_k)] for k = 2..K
        return torch.cat([rearrange(x, "b c h w -> b (h w) c") for x in inputs], dim=1)  # (b, l - l_0, c)

    def _check_codes(self, codes: list[torch.Tensor]) -> None:
        got = tuple(tuple(code.shape[1:]) for code in codes)
        if got != self.schedule:
            raise VarkitError(
                f"code maps of sizes {got} do not follow the unit's schedule {self.schedule}; encode them "
                "with the tokenizer the model was built with"
            )

    # -- generation ---------------------------------------------------------------
    def start_generation(self, batch: int, tokenizer: Tokenizer) -> dict:
        return {"f_hat": None, "codes": []}

    def generation_step(self, state, step, codes, emb, tokenizer):
        h, w = self.schedule[step]
        state["codes"].append(codes.reshape(-1, h, w))
        emb_map = rearrange(emb, "b (h w) c -> b c h w", h=h, w=w)
        state["f_hat"] = tokenizer.add_scale(state["f_hat"], step, emb_map)
        if step == len(self.schedule) - 1:
            return None
        return rearrange(tokenizer.next_input(state["f_hat"], step), "b c h w -> b (h w) c")

    def finish_generation(self, state: dict, tokenizer: Tokenizer) -> torch.Tensor:
        return state["f_hat"]

    def generated_codes(self, state: dict) -> list[torch.Tensor]:
        return list(state["codes"])

    # -- editing ------------------------------------------------------------------
    def keep_positions(self, keep: torch.Tensor) -> torch.Tensor:
        """VAR's rule: the latent keep, resized bilinearly to each scale, kept where > 0.5.

        Scales of at most 3 codes (the 1×1 scale of VAR's schedule) hold the image's
        global content and are kept whole whenever the edit keeps anything of the
        image, as in the official notebook; an edit that keeps nothing keeps none.
        """
        grid = self.schedule[-1]
        if keep.ndim != 3 or tuple(keep.shape[1:]) != grid:
            raise VarkitError(
                f"keep must be (b, {grid[0]}, {grid[1]}) on the last scale's grid, got {tuple(keep.shape)}"
            )
        keep = keep.float()
        anything = (keep > 0.5).flatten(1).any(dim=1)  # (b,)
        per_scale = []
        for h, w in self.schedule:
            if (h, w) == grid:
                kept = keep > 0.5
            else:
                resized = F.interpolate(keep[:, None], size=(h, w), mode="bilinear", align_corners=False)
                kept = resized[:, 0] > 0.5  # (b, h, w)
            if h * w <= 3:
                kept = anything[:, None, None].expand(-1, h, w)
            per_scale.append(kept.flatten(1))
        return torch.cat(per_scale, dim=1)  # (b, l)


@hookimpl
def varkit_register_prediction_units(register):
    register(NextScale)
