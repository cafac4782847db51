"""A trained model ready to use: tokenizer + AR transformer + sampler.

``varkit.load(run_dir_or_checkpoint)`` and ``varkit.from_official_var(vae, var)`` return
a :class:`Pipeline`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from varkit.base import Sampler, Tokenizer
from varkit.errors import CheckpointError

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
        self.tokenizer = tokenizer.eval()
        self.model = model.eval()
        self.recipe = recipe
        if sampler is None:
            from varkit.build import build_sampler

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
        """A sampler: ``sampler`` (a name or an instance) or this pipeline's, with options set."""
        from varkit.build import build_sampler

        options = {k: v for k, v in options.items() if v is not None}
        if isinstance(sampler, Sampler):
            if options:
                raise TypeError("pass options to the sampler's Config, not beside a Sampler instance")
            return sampler
        if sampler is None and not options:
            return self.sampler
        name = sampler if sampler is not None else self.sampler.name
        base = self.sampler if name == self.sampler.name else None
        import attrs

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

        Returns:
            Images ``(b, 3, H, W)`` in [0, 1].
        """
        from varkit.generation import generate_images

        if more_smooth:
            sampler = sampler or "gumbel"
        chosen = self.make_sampler(sampler, cfg=cfg, top_k=top_k, top_p=top_p)
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device).reshape(-1)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return generate_images(self.model, self.tokenizer, chosen, labels, generator=generator, dtype=dtype)

    @torch.inference_mode()
    def logits(self, codes: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(b, l, v)`` of code maps ``[(b, h_k, w_k)]`` (no class dropout)."""
        unit = self.model.unit
        inputs = unit.teacher_forcing(codes, self.tokenizer)
        return self.model(inputs, labels.to(self.device))


# ------------------------------------------------------------------------- loading


def load(path: str | os.PathLike, *, device: torch.device | str = "cpu", ema: bool = True) -> Pipeline:
    """A pipeline from a run directory or a checkpoint directory.

    Args:
        path: ``out_dir`` of a run (its latest checkpoint is used), a
            ``checkpoints/step-N`` directory, or a directory written by ``varkit import``.
        ema: use the EMA weights when the checkpoint has them.

    Raises:
        CheckpointError: nothing loadable at ``path``, or weights that do not fit.
    """
    from varkit import recipe as recipe_mod
    from varkit.build import build_model, build_tokenizer
    from varkit.checkpoint import latest_checkpoint, load_weights, read_recipe

    step_dir = latest_checkpoint(Path(path))
    if step_dir is None:
        raise CheckpointError(
            f"no checkpoint found at {path}: expected a run directory with checkpoints/latest, "
            "a checkpoint directory, or the output of `varkit import`"
        )
    recipe = recipe_mod.from_dict(read_recipe(step_dir), source=str(step_dir / "recipe.yaml"))
    tokenizer = build_tokenizer(recipe, load_weights=False)
    load_state(tokenizer, load_weights(step_dir, "tokenizer"), what=f"tokenizer of {step_dir}")
    model = build_model(recipe, tokenizer)
    name = "ema" if ema and (step_dir / "ema.safetensors").is_file() else "model"
    load_state(model, load_weights(step_dir, name), what=f"{name} weights of {step_dir}")
    log.info("loaded %s (%s weights)", step_dir, name)
    return Pipeline(tokenizer, model, recipe=recipe).to(device)


def load_tokenizer(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> Tokenizer:
    """The tokenizer of a run (tokenizer stage or AR run) or of a checkpoint directory."""
    from varkit import recipe as recipe_mod
    from varkit.build import build_tokenizer
    from varkit.checkpoint import load_weights, read_recipe

    step_dir = _tokenizer_checkpoint(Path(path))
    recipe = recipe_mod.from_dict(read_recipe(step_dir), source=str(step_dir / "recipe.yaml"))
    tokenizer = build_tokenizer(recipe, load_weights=False)
    load_state(tokenizer, load_weights(step_dir, "tokenizer"), what=f"tokenizer of {step_dir}")
    return tokenizer.to(device).eval()


def load_tokenizer_weights(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Load a tokenizer's weights from a file or a directory.

    ``path`` is a run, a checkpoint directory, a ``.safetensors`` file, or a plain
    ``.pth`` state dict (read with ``weights_only=True``) such as the official VAR
    release's ``vae_ch160v4096z32.pth``.
    """
    from varkit.checkpoint import load_weights

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise CheckpointError(f"tokenizer weights {path} do not exist")
        state = load_file(str(path))
    elif path.suffix in (".pth", ".pt"):  # e.g. the official vae_ch160v4096z32.pth
        from varkit.official import read_state_dict

        state = read_state_dict(path, "tokenizer checkpoint")
    else:
        state = load_weights(_tokenizer_checkpoint(path), "tokenizer")
    load_state(tokenizer, state, what=f"tokenizer weights {path}")


def _tokenizer_checkpoint(path: Path) -> Path:
    """The checkpoint holding a tokenizer: of the run (or checkpoint) at ``path``, else of
    its tokenizer stage."""
    from varkit.checkpoint import latest_checkpoint

    step_dir = latest_checkpoint(path) or latest_checkpoint(path / "tokenizer")
    if step_dir is None:
        raise CheckpointError(f"no tokenizer checkpoint found at {path}")
    return step_dir


def check_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Raise :class:`CheckpointError` naming the keys unless ``state`` fits ``module`` exactly.

    Every key of ``module.state_dict()`` must be in ``state`` with the same shape, and
    ``state`` must hold no other key.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(own[k].shape) != tuple(state[k].shape)
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched shapes", mismatched)):
        if keys:
            shown = ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")
            parts.append(f"{label}: {shown}")
    if parts:
        raise CheckpointError(f"{what} do not fit the model ({'; '.join(parts)})")


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the keys that differ."""
    check_state_dict(module, state, what=what)
    module.load_state_dict(state, strict=True)
