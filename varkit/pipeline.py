"""The Python front door: a trained model ready to use, tokenizer + AR transformer + sampler.

``varkit.from_pretrained(dir_or_hub_id)`` (``varkit.load`` is the same call),
``varkit.from_official_var(vae, var)`` and ``varkit.from_official_llamagen(vq, gpt)``
return a `Pipeline`; ``pipe.save_pretrained(dir)`` writes it as a pretrained
directory. Where the weights come from is `varkit.loading` and
`varkit.importers`; what a pipeline runs is `varkit.generation`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from varkit.base import Sampler, Tokenizer
from varkit.build import build_sampler
from varkit.defaults import SMOOTH_SAMPLER
from varkit.errors import VarkitError
from varkit.generation import generate_images
from varkit.importers import llamagen as llamagen_release
from varkit.importers import var as var_release
from varkit.loading import Loaded, load_pretrained, resolve_classes, save_pretrained
from varkit.pretrained import ModelCard

log = logging.getLogger(__name__)


class Pipeline:
    """Generate images and score codes with a tokenizer and an AR model.

    Attributes:
        tokenizer: the (frozen) tokenizer.
        model: the AR transformer (``varkit.model.transformer.ARModel``).
        sampler: the default sampler of `generate`.
        recipe: the recipe the model was trained with, when known.
        class_names: the class names in index order, when known (``generate`` and
            ``varkit sample --classes`` then accept names).
        card: the model card (source, licence, metrics), when known.
        source: where the weights came from, when known.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        model: torch.nn.Module,
        *,
        sampler: Sampler | None = None,
        recipe=None,
        class_names: tuple[str, ...] | None = None,
        card: ModelCard | None = None,
        source=None,
    ):
        """Args: the tokenizer, the AR model, a sampler (None: the recipe's), the recipe,
        the class names, the model card and the source of the weights."""
        self.tokenizer = tokenizer.eval()
        self.model = model.eval()
        self.recipe = recipe
        self.class_names = class_names
        self.card = card
        self.source = source
        if sampler is None:
            sampler = build_sampler(recipe)
        self.sampler = sampler

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the transformer's weights (the tokenizer stays float32)."""
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move the pipeline to ``device``; ``dtype`` casts the transformer's weights (e.g.
        ``torch.bfloat16`` halves their memory; generation then runs under autocast)."""
        self.tokenizer.to(device)
        self.model.to(device=device, dtype=dtype)
        return self

    def class_indices(self, classes: str | list[int | str]) -> list[int]:
        """Class indices of names and/or indices (``"cat,dog"``, ``["cat", 3]``)."""
        spec = classes if isinstance(classes, str) else ",".join(str(c) for c in classes)
        return resolve_classes(spec, self.class_names, self.model.config.num_classes)

    def save_pretrained(self, directory: str | os.PathLike, *, card: ModelCard | None = None) -> Path:
        """Write this pipeline as a pretrained directory (weights as safetensors, the resolved
        recipe, ``classes.json`` and a README model card); see :mod:`varkit.pretrained`.

        Args:
            directory: where to write; an existing pretrained directory is replaced.
            card: what the README says; None keeps the card this pipeline was loaded
                with, or describes the run it came from.

        Returns:
            The directory.
        """
        if self.recipe is None:
            raise VarkitError("this pipeline has no recipe; build it with a recipe to save it")
        loaded = Loaded(
            tokenizer=self.tokenizer,
            model=self.model,
            recipe=self.recipe,
            source=self.source,
            class_names=self.class_names,
            card=self.card,
        )
        return save_pretrained(loaded, directory, card=card)

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
        labels: torch.Tensor | list[int] | list[str],
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
            labels: class indices ``(b,)``, or class names when the model has them.
            cfg: guidance scale of the sampler (None keeps the sampler's).
            top_k: top-k of the sampler (None keeps it; 0 turns it off).
            top_p: top-p of the sampler (None keeps it; 1 turns it off).
            seed: seeds the generator; the same seed gives the same images.
            more_smooth: VAR's smooth mode (the ``gumbel`` sampler).
            sampler: a sampler name or instance instead of the pipeline's own.
            dtype: autocast dtype (e.g. ``torch.bfloat16`` on GPU); None runs in the
                weights' dtype (autocast to it when they are not float32).
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
        if isinstance(labels, list | tuple) and any(isinstance(c, str) for c in labels):
            labels = self.class_indices(list(labels))
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device).reshape(-1)
        if dtype is None and self.dtype != torch.float32:
            dtype = self.dtype
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return generate_images(self.model, self.tokenizer, chosen, labels, generator=generator, dtype=dtype)

    @torch.inference_mode()
    def logits(self, codes: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(b, l, v)`` of code maps ``[(b, h_k, w_k)]`` (no class dropout)."""
        unit = self.model.unit
        inputs = unit.teacher_forcing(codes, self.tokenizer)
        lowered = self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype) if lowered else contextlib.nullcontext():
            return self.model(inputs, labels.to(self.device)).float()

    @classmethod
    def from_loaded(
        cls, loaded: Loaded, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> Pipeline:
        """A pipeline of what `varkit.loading` or an importer loaded, moved to ``device``."""
        pipe = cls(
            loaded.tokenizer,
            loaded.model,
            recipe=loaded.recipe,
            class_names=loaded.class_names,
            card=loaded.card,
            source=loaded.source,
        )
        return pipe.to(device, dtype)


def from_pretrained(
    name_or_dir: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    ema: bool = True,
    revision: str | None = None,
    overrides: Iterable[str] = (),
) -> Pipeline:
    """A pipeline from a pretrained directory, a run or checkpoint directory, or a Hub id.

    Args:
        name_or_dir: a directory written by `Pipeline.save_pretrained` or ``varkit
            import``, the ``out_dir`` of a run (its latest checkpoint), a
            ``checkpoints/step-N`` directory, or a Hugging Face Hub repository id
            (``owner/name``, needs ``pip install 'varkit[hub]'``; the Hub's cache and
            ``HF_HUB_OFFLINE`` are respected).
        device: where the pipeline runs.
        dtype: cast the transformer's weights to it (e.g. ``torch.bfloat16``); None
            keeps float32.
        ema: use a run's EMA weights when it has them.
        revision: the Hub revision (branch, tag or commit); None is ``main``.
        overrides: ``data.key=value`` applied to the stored recipe; a stored recipe's
            ``pipe:`` shard patterns and ``data.cache_dir`` are used only when given here.

    Raises:
        CheckpointError: nothing loadable (naming the missing files, and for the Hub
            how to fetch them by hand), or weights that do not fit.
    """
    return Pipeline.from_loaded(
        load_pretrained(name_or_dir, ema=ema, revision=revision, overrides=overrides),
        device=device,
        dtype=dtype,
    )


def load(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    ema: bool = True,
    overrides: Iterable[str] = (),
) -> Pipeline:
    """A pipeline from a pretrained, run or checkpoint directory (or a Hub id): `from_pretrained`.

    Raises:
        CheckpointError: nothing loadable at ``path``, or weights that do not fit.
    """
    return from_pretrained(path, device=device, ema=ema, overrides=overrides)


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


def from_official_llamagen(
    vq_ckpt: str | os.PathLike,
    gpt_ckpt: str | os.PathLike,
    *,
    image_size: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Pipeline:
    """A pipeline from LlamaGen's release files (``vq_ds16_c2i.pt``, ``c2i_B_256.pt`` ...).

    Args:
        vq_ckpt: the VQ tokenizer file.
        gpt_ckpt: the class-conditional GPT file (B, L, XL, XXL, 3B; 256 or 384).
        image_size: the GPT's image size; None reads it from the file name (``_256``).
        device: where the pipeline runs.
        dtype: cast the transformer's weights to it (the 3B model: ``torch.bfloat16``).

    Raises:
        CheckpointError: a missing, truncated, wrong or mismatched file, naming the keys.
    """
    loaded = llamagen_release.read_release(vq_ckpt, gpt_ckpt, image_size=image_size)
    return Pipeline.from_loaded(loaded, device=device, dtype=dtype)
