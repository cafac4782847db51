"""The Python front door: a trained model ready to use, tokenizer + AR transformer + sampler.

``varkit.from_pretrained(dir_or_hub_id)`` (``varkit.load`` is the same call),
``varkit.from_official_var(vae, var)`` and ``varkit.from_official_llamagen(vq, gpt)``
return a `Pipeline`; ``pipe.save_pretrained(dir)`` writes it as a pretrained
directory. Where the weights come from is `varkit.loading` and
`varkit.importers`; what a pipeline runs is `varkit.generation`.

``Pipeline.generate`` samples images of classes; ``Pipeline.edit`` (and ``inpaint``,
``outpaint``, ``change_class``) edits given images with no training.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from varkit.base import Sampler, Strategy, Tokenizer
from varkit.build import build_sampler, build_strategy
from varkit.defaults import SMOOTH_SAMPLER
from varkit.errors import VarkitError
from varkit.generation import editing
from varkit.generation.loop import generate_images
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
        self._companions: dict[tuple[str, str], Pipeline] = {}  # models a strategy's options name

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

    def class_indices(self, classes: str | list[int | str]) -> list[int]:
        """Class indices of names and/or indices (``"cat,dog"``, ``["cat", 3]``)."""
        spec = classes if isinstance(classes, str) else ",".join(str(c) for c in classes)
        return resolve_classes(spec, self.class_names, self.model.config.num_classes)

    def save_pretrained(self, directory: str | os.PathLike, *, card: ModelCard | None = None) -> Path:
        """Write this pipeline as a pretrained directory (weights as safetensors, the resolved
        recipe, ``classes.json`` and a README model card); see `varkit.pretrained`.

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
        cuda_graphs: bool = False,
        strategy: str | Strategy | None = None,
        **strategy_options: Any,
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
            dtype: autocast dtype (e.g. ``torch.bfloat16`` on GPU); None runs the
                transformer in its weights' dtype (see `to`).
            sampler_options: further options of the sampler's Config, by name (e.g.
                ``{"min_p": 0.1}`` for a plugin sampler, ``{"temperature": 0.9}``).
            cuda_graphs: replay CUDA graphs of the transformer's steps (CUDA only);
                the first call records them, later calls of the same batch size reuse
                them (see `varkit.generation.graphs`).
            strategy: a generation strategy (``"collaborative"``, ``"jacobi"``,
                ``"prune_tokens"``, a plugin's, or a `varkit.Strategy`); None uses the
                recipe's ``strategy`` section when it has one, else every step runs in
                order. See docs/plugins.md.
            strategy_options: the strategy's options, e.g. ``draft=other_pipe,
                switch_step=6`` for ``collaborative``; a model option may also be the
                path of a pretrained directory or run.

        Returns:
            Images ``(b, 3, H, W)`` in [0, 1].
        """
        chosen_strategy, models = build_strategy(self.recipe, strategy, **strategy_options)
        strategy_options = {k: self._companion(v) for k, v in models.items()}
        chosen = self._sampler(
            sampler, more_smooth, **{**(sampler_options or {}), "cfg": cfg, "top_k": top_k, "top_p": top_p}
        )
        if isinstance(labels, list | tuple) and any(isinstance(c, str) for c in labels):
            labels = self.class_indices(list(labels))
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
            strategy=chosen_strategy,
            **strategy_options,
        )

    def _companion(self, value: Any) -> Any:
        """A strategy's model option: a path is loaded (EMA weights) onto this pipeline's device,
        once per pipeline."""
        if not isinstance(value, str | os.PathLike):
            return value
        key = (os.fspath(value), str(self.device))
        if key not in self._companions:
            log.info("loading %s for the generation strategy", value)
            self._companions[key] = Pipeline.from_loaded(load_pretrained(value), device=self.device)
        return self._companions[key]

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
                image's size or the code grid's (`box_mask` draws boxes).
            labels: the class to generate under: None (no class, the usual choice
                for inpainting), one int for every image, or one per image.
            keep_until_step: also keep every position of the steps before this one
                (class-conditional editing: regenerate everything under a new label
                while the image's coarse scales hold its layout).
            cfg, top_k, top_p, seed, more_smooth, sampler, dtype, cuda_graphs: as
                `generate`.

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

        ``options`` as `edit`.
        """
        mask = editing.box_mask(box, editing.image_size(self.tokenizer))
        return self.edit(images, mask, labels, **options)

    def outpaint(self, images, box, labels=None, **options) -> torch.Tensor:
        """Keep inside ``box`` ``(y0, x0, y1, x1)`` (fractions of height and width); regenerate around it.

        ``options`` as `edit`.
        """
        mask = editing.box_mask(box, editing.image_size(self.tokenizer), outpaint=True)
        return self.edit(images, mask, labels, **options)

    def change_class(self, images, labels, *, keep_until_step: int, **options) -> torch.Tensor:
        """Regenerate the whole image under ``labels``, keeping its steps before ``keep_until_step``.

        For the ``scale`` unit the kept steps are the coarse scales: the layout stays,
        the class-specific detail is redrawn (VAR's class-conditional editing).
        ``options`` as `edit`.
        """
        mask = editing.full_mask(editing.image_size(self.tokenizer))
        return self.edit(images, mask, labels, keep_until_step=keep_until_step, **options)

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
        return pipe.to(device, dtype=dtype)


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
