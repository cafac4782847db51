"""The Python front door: a trained model ready to use, tokenizer + AR transformer + sampler.

``varkit.load(run_dir_or_checkpoint)`` and ``varkit.from_official_var(vae, var)`` return
a `Pipeline`. Where the weights come from is `varkit.loading` and
`varkit.importers`; what a pipeline runs is `varkit.generation`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from varkit.base import Sampler, Tokenizer
from varkit.build import build_sampler
from varkit.defaults import SMOOTH_SAMPLER
from varkit.generation import generate_images
from varkit.importers import var as var_release
from varkit.loading import Loaded, load_checkpoint

log = logging.getLogger(__name__)


class Pipeline:
    """Generate images and score codes with a tokenizer and an AR model.

    Attributes:
        tokenizer: the (frozen) tokenizer.
        model: the AR transformer (``varkit.model.transformer.ARModel``).
        sampler: the default sampler of `generate`.
        recipe: the recipe the model was trained with, when known.
    """

    def __init__(
        self, tokenizer: Tokenizer, model: torch.nn.Module, *, sampler: Sampler | None = None, recipe=None
    ):
        """Args: the tokenizer, the AR model, a sampler (None: the recipe's) and the recipe."""
        self.tokenizer = tokenizer.eval()
        self.model = model.eval()
        self.recipe = recipe
        if sampler is None:
            sampler = build_sampler(recipe)
        self.sampler = sampler

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> Pipeline:
        self.tokenizer.to(device)
        self.model.to(device)
        return self

    def make_sampler(self, sampler: str | Sampler | None = None, **options: Any) -> Sampler:
        """A sampler: ``sampler`` (a name or an instance) or this pipeline's, with options set.

        Another sampler by name keeps the options of this pipeline's sampler that it has
        too (e.g. ``cfg``).
        """
        options = {k: v for k, v in options.items() if v is not None}
        if isinstance(sampler, Sampler):
            if options:
                raise TypeError("pass options to the sampler's Config, not beside a Sampler instance")
            return sampler
        if sampler is None and not options:
            return self.sampler
        name = sampler if sampler is not None else self.sampler.name
        return build_sampler(None, name, carry=self.sampler.config, **options)

    @torch.inference_mode()
    def generate(
        self,
        labels: torch.Tensor | list[int],
        *,
        cfg: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        more_smooth: bool = False,
        sampler: str | Sampler | None = None,
        dtype: torch.dtype | None = None,
        sampler_options: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """Generate one image per label.

        Args:
            labels: class indices ``(b,)``.
            cfg: guidance scale of the sampler (None keeps the sampler's).
            top_k: top-k of the sampler (None keeps it; 0 turns it off).
            top_p: top-p of the sampler (None keeps it; 1 turns it off).
            seed: seeds the generator; the same seed gives the same images.
            more_smooth: VAR's smooth mode (the ``gumbel`` sampler).
            sampler: a sampler name or instance instead of the pipeline's own.
            dtype: autocast dtype (e.g. ``torch.bfloat16`` on GPU); None runs in float32.
            sampler_options: further options of the sampler's Config, by name (e.g.
                ``{"min_p": 0.1}`` for a plugin sampler, ``{"temperature": 0.9}``).

        Returns:
            Images ``(b, 3, H, W)`` in [0, 1].
        """
        if more_smooth:
            sampler = sampler or SMOOTH_SAMPLER
        chosen = self.make_sampler(
            sampler, **{**(sampler_options or {}), "cfg": cfg, "top_k": top_k, "top_p": top_p}
        )
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device).reshape(-1)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return generate_images(self.model, self.tokenizer, chosen, labels, generator=generator, dtype=dtype)

    @torch.inference_mode()
    def logits(self, codes: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(b, l, v)`` of code maps ``[(b, h_k, w_k)]`` (no class dropout)."""
        unit = self.model.unit
        inputs = unit.teacher_forcing(codes, self.tokenizer)
        return self.model(inputs, labels.to(self.device))

    @classmethod
    def from_loaded(cls, loaded: Loaded, *, device: torch.device | str = "cpu") -> Pipeline:
        """A pipeline of what `varkit.loading` or an importer loaded, moved to ``device``."""
        return cls(loaded.tokenizer, loaded.model, recipe=loaded.recipe).to(device)


def load(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    ema: bool = True,
    overrides: Iterable[str] = (),
) -> Pipeline:
    """A pipeline from a run directory or a checkpoint directory.

    Args:
        path: ``out_dir`` of a run (its latest checkpoint is used), a
            ``checkpoints/step-N`` directory, or a directory written by ``varkit import``.
        device: where the pipeline runs.
        ema: use the EMA weights when the checkpoint has them.
        overrides: ``data.key=value`` applied to the stored recipe; a stored recipe's
            ``pipe:`` shard patterns and ``data.cache_dir`` are used only when given here.

    Raises:
        CheckpointError: nothing loadable at ``path``, or weights that do not fit.
    """
    return Pipeline.from_loaded(load_checkpoint(path, ema=ema, overrides=overrides), device=device)


def from_official_var(
    vae_ckpt: str | os.PathLike, var_ckpt: str | os.PathLike, *, device: torch.device | str = "cpu"
) -> Pipeline:
    """A pipeline from the official VAR release files (``vae_ch160v4096z32.pth``, ``var_dN.pth``).

    Depth, width, heads, vocabulary and classes are read off the state dicts. Every key
    of both files must be consumed and every shape must match.

    Raises:
        CheckpointError: a missing, truncated or mismatched file, naming the keys.
    """
    return Pipeline.from_loaded(var_release.read_release(vae_ckpt, var_ckpt), device=device)
