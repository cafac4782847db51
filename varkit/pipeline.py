"""The Python front door: a trained model ready to use, tokenizer + AR transformer + sampler.

``Pipeline.generate`` samples images of classes; ``Pipeline.edit`` (and ``inpaint``,
``outpaint``, ``change_class``) edits given images with no training.

``varkit.load(run_dir_or_checkpoint)`` and ``varkit.from_official_var(vae, var)`` return
a :class:`Pipeline`. Where the weights come from is :mod:`varkit.loading` and
:mod:`varkit.importers`; what a pipeline runs is :mod:`varkit.generation`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import attrs
import torch

from varkit.base import Sampler, Tokenizer
from varkit.build import build_sampler
from varkit.defaults import SMOOTH_SAMPLER
from varkit.errors import VarkitError
from varkit.generation import editing
from varkit.generation.loop import generate_images
from varkit.importers import var as var_release
from varkit.loading import Loaded, load_checkpoint

log = logging.getLogger(__name__)


class Pipeline:
    """Generate images and score codes with a tokenizer and an AR model.

    Attributes:
        tokenizer: the (frozen) tokenizer.
        model: the AR transformer (``varkit.model.transformer.ARModel``).
        sampler: the default sampler of :meth:`generate`.
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

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the transformer's weights."""
        return self.model.head.weight.dtype

    def to(self, device: torch.device | str | None = None, *, dtype: torch.dtype | None = None) -> Pipeline:
        """Move the pipeline to ``device`` and/or convert the transformer's weights to ``dtype``.

        ``pipe.to(dtype=torch.bfloat16)`` keeps a bfloat16 copy of the transformer only:
        generation then runs it in bfloat16 with no autocast and no casts per step (the
        fastest way on GPU, and what ``cuda_graphs=True`` wants). The tokenizer stays
        float32: its feature arithmetic between steps needs it, and on CUDA its decoder
        runs under bfloat16 autocast on channels_last tensors instead. On CUDA the
        tokenizer's weights are kept channels_last.
        """
        if dtype is not None and not dtype.is_floating_point:
            raise VarkitError(f"dtype {dtype} is not a floating-point dtype; use e.g. torch.bfloat16")
        if device is not None:
            self.tokenizer.to(device)
            self.model.to(device)
            if torch.device(device).type == "cuda":
                self.tokenizer.to(memory_format=torch.channels_last)
        if dtype is not None:
            self.model.to(dtype=dtype)
        return self

    def make_sampler(self, sampler: str | Sampler | None = None, **options: Any) -> Sampler:
        """A sampler: ``sampler`` (a name or an instance) or this pipeline's, with options set."""
        options = {k: v for k, v in options.items() if v is not None}
        if isinstance(sampler, Sampler):
            if options:
                raise TypeError("pass options to the sampler's Config, not beside a Sampler instance")
            return sampler
        if sampler is None and not options:
            return self.sampler
        name = sampler if sampler is not None else self.sampler.name
        base = self.sampler if name == self.sampler.name else None
        config = attrs.evolve(base.config, **options) if base is not None else None
        if config is not None:
            return type(base)(config)
        return build_sampler(None, name, **options)

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
        cuda_graphs: bool = False,
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
            dtype: autocast dtype (e.g. ``torch.bfloat16`` on GPU); None runs the
                transformer in its weights' dtype (see :meth:`to`).
            cuda_graphs: replay CUDA graphs of the transformer's steps (CUDA only);
                the first call records them, later calls of the same batch size reuse
                them (see :mod:`varkit.generation.graphs`).

        Returns:
            Images ``(b, 3, H, W)`` in [0, 1].
        """
        chosen = self._sampler(sampler, more_smooth, cfg=cfg, top_k=top_k, top_p=top_p)
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device).reshape(-1)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return generate_images(
            self.model,
            self.tokenizer,
            chosen,
            labels,
            generator=generator,
            dtype=dtype,
            cuda_graphs=cuda_graphs,
        )

    def _sampler(self, sampler, more_smooth: bool, **options) -> Sampler:
        if more_smooth:
            sampler = sampler or SMOOTH_SAMPLER
        return self.make_sampler(sampler, **options)

    def _edit_labels(self, labels, batch: int) -> torch.Tensor:
        """``(b,)`` labels: None is "no class" for every image, an int is one class for all."""
        num_classes = self.model.config.num_classes
        if labels is None:
            labels = [num_classes] * batch
        elif isinstance(labels, int):
            labels = [labels] * batch
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 1 and batch > 1:
            labels = labels.expand(batch)
        if labels.numel() != batch:
            raise VarkitError(f"{labels.numel()} labels for {batch} images: give one label, or one per image")
        bad = labels[(labels < 0) | (labels > num_classes)].tolist()
        if bad:
            raise VarkitError(
                f"class {bad[0]} is outside 0..{num_classes - 1} of this model (or {num_classes}: no class)"
            )
        return labels.to(self.device)

    @torch.inference_mode()
    def edit(
        self,
        images,
        mask,
        labels=None,
        *,
        keep_until_step: int = 0,
        cfg: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        more_smooth: bool = False,
        sampler: str | Sampler | None = None,
        dtype: torch.dtype | None = None,
        cuda_graphs: bool = False,
    ) -> torch.Tensor:
        """Zero-shot editing: regenerate the images where ``mask`` says, keep their codes elsewhere.

        Works with every unit that defines ``keep_positions`` (``scale``, ``token``,
        ``patch``); docs/editing.md has the arithmetic. Nothing is trained.

        Args:
            images: ``(b, 3, H, W)`` or ``(3, H, W)`` in [0, 1], or PIL image(s), at the
                tokenizer's resolution.
            mask: what to regenerate: 1 (white) regenerates, 0 (black) keeps; a tensor
                ``(h, w)``, ``(b, h, w)`` or ``(b, 1, h, w)`` or PIL image(s), at the
                image's size or the code grid's (:func:`box_mask` draws boxes).
            labels: the class to generate under: None (no class, the usual choice
                for inpainting), one int for every image, or one per image.
            keep_until_step: also keep every position of the steps before this one
                (class-conditional editing: regenerate everything under a new label
                while the image's coarse scales hold its layout).
            cfg, top_k, top_p, seed, more_smooth, sampler, dtype, cuda_graphs: as
                :meth:`generate`.

        Returns:
            Edited images ``(b, 3, H, W)`` in [0, 1].

        Raises:
            VarkitError: images or mask of the wrong size, a class out of range, a
                step out of range; PluginError: a unit that cannot edit.
        """
        chosen = self._sampler(sampler, more_smooth, cfg=cfg, top_k=top_k, top_p=top_p)
        images = editing.as_images(images, self.tokenizer)
        labels = self._edit_labels(labels, images.shape[0])
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return editing.edit_images(
            self.model,
            self.tokenizer,
            chosen,
            images,
            mask,
            labels,
            generator=generator,
            keep_until_step=keep_until_step,
            dtype=dtype,
            cuda_graphs=cuda_graphs,
        )

    def inpaint(self, images, box, labels=None, **options) -> torch.Tensor:
        """Regenerate inside ``box`` ``(y0, x0, y1, x1)`` (fractions of height and width); keep the rest.

        ``options`` as :meth:`edit`.
        """
        mask = editing.box_mask(box, editing.image_size(self.tokenizer))
        return self.edit(images, mask, labels, **options)

    def outpaint(self, images, box, labels=None, **options) -> torch.Tensor:
        """Keep inside ``box`` ``(y0, x0, y1, x1)`` (fractions of height and width); regenerate around it.

        ``options`` as :meth:`edit`.
        """
        mask = editing.box_mask(box, editing.image_size(self.tokenizer), outpaint=True)
        return self.edit(images, mask, labels, **options)

    def change_class(self, images, labels, *, keep_until_step: int, **options) -> torch.Tensor:
        """Regenerate the whole image under ``labels``, keeping its steps before ``keep_until_step``.

        For the ``scale`` unit the kept steps are the coarse scales: the layout stays,
        the class-specific detail is redrawn (VAR's class-conditional editing).
        ``options`` as :meth:`edit`.
        """
        mask = editing.full_mask(editing.image_size(self.tokenizer))
        return self.edit(images, mask, labels, keep_until_step=keep_until_step, **options)

    @torch.inference_mode()
    def logits(self, codes: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(b, l, v)`` of code maps ``[(b, h_k, w_k)]`` (no class dropout)."""
        unit = self.model.unit
        inputs = unit.teacher_forcing(codes, self.tokenizer)
        return self.model(inputs, labels.to(self.device))

    @classmethod
    def from_loaded(cls, loaded: Loaded, *, device: torch.device | str = "cpu") -> Pipeline:
        """A pipeline of what :mod:`varkit.loading` or an importer loaded, moved to ``device``."""
        return cls(loaded.tokenizer, loaded.model, recipe=loaded.recipe).to(device)


def load(path: str | os.PathLike, *, device: torch.device | str = "cpu", ema: bool = True) -> Pipeline:
    """A pipeline from a run directory or a checkpoint directory.

    Args:
        path: ``out_dir`` of a run (its latest checkpoint is used), a
            ``checkpoints/step-N`` directory, or a directory written by ``varkit import``.
        device: where the pipeline runs.
        ema: use the EMA weights when the checkpoint has them.

    Raises:
        CheckpointError: nothing loadable at ``path``, or weights that do not fit.
    """
    return Pipeline.from_loaded(load_checkpoint(path, ema=ema), device=device)


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
