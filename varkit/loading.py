"""Every way weights come into varkit, in one module.

A run directory (its latest checkpoint), a checkpoint directory, the output of
``varkit import``, or a tokenizer weights file (``.safetensors``, or a plain ``.pth``
state dict read with ``weights_only=True`` such as the official
``vae_ch160v4096z32.pth``). Building modules from a recipe is :mod:`varkit.build`;
checking and loading state dicts is :mod:`varkit.weights`; reading a foreign release's
own layout is :mod:`varkit.importers`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import attrs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from varkit import recipe as recipe_mod
from varkit.base import Tokenizer
from varkit.build import build_model, build_tokenizer
from varkit.checkpoint import latest_checkpoint, load_weights, read_recipe
from varkit.errors import CheckpointError
from varkit.recipe import Recipe
from varkit.weights import load_state, read_state_dict

log = logging.getLogger(__name__)


@attrs.define
class Loaded:
    """A tokenizer and an AR model with their weights, and the recipe they were built from."""

    tokenizer: Tokenizer
    model: torch.nn.Module
    recipe: Recipe
    #: The checkpoint directory or file the weights came from.
    source: Path


def load_checkpoint(path: str | os.PathLike, *, ema: bool = True) -> Loaded:
    """The tokenizer, model and recipe of a run or checkpoint directory (on the CPU).

    Args:
        path: ``out_dir`` of a run (its latest checkpoint is used), a
            ``checkpoints/step-N`` directory, or a directory written by ``varkit import``.
        ema: use the EMA weights when the checkpoint has them.

    Raises:
        CheckpointError: nothing loadable at ``path``, or weights that do not fit.
    """
    step_dir = latest_checkpoint(Path(path))
    if step_dir is None:
        raise CheckpointError(
            f"no checkpoint found at {path}: expected a run directory with checkpoints/latest, "
            "a checkpoint directory, or the output of `varkit import`"
        )
    recipe = recipe_of(step_dir)
    tokenizer = build_tokenizer(recipe)
    load_state(tokenizer, load_weights(step_dir, "tokenizer"), what=f"tokenizer of {step_dir}")
    model = build_model(recipe, tokenizer)
    name = "ema" if ema and (step_dir / "ema.safetensors").is_file() else "model"
    load_state(model, load_weights(step_dir, name), what=f"{name} weights of {step_dir}")
    log.info("loaded %s (%s weights)", step_dir, name)
    return Loaded(tokenizer=tokenizer.eval(), model=model.eval(), recipe=recipe, source=step_dir)


def recipe_of(step_dir: Path) -> Recipe:
    """The validated recipe stored with a checkpoint."""
    return recipe_mod.from_dict(read_recipe(step_dir), source=str(step_dir / "recipe.yaml"))


def load_tokenizer(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> Tokenizer:
    """The tokenizer of a run (tokenizer stage or AR run) or of a checkpoint directory."""
    step_dir = _tokenizer_checkpoint(Path(path))
    tokenizer = build_tokenizer(recipe_of(step_dir))
    load_state(tokenizer, load_weights(step_dir, "tokenizer"), what=f"tokenizer of {step_dir}")
    return tokenizer.to(device).eval()


def load_tokenizer_weights(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Load a tokenizer's weights from a file or a directory.

    ``path`` is a run, a checkpoint directory, a ``.safetensors`` file, or a plain
    ``.pth`` state dict (read with ``weights_only=True``) such as the official VAR
    release's ``vae_ch160v4096z32.pth``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"tokenizer weights {path} do not exist")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} cannot be read ({exc}); it may be truncated") from None
    elif path.suffix in (".pth", ".pt"):  # e.g. the official vae_ch160v4096z32.pth
        state = read_state_dict(path, "tokenizer checkpoint")
    else:
        state = load_weights(_tokenizer_checkpoint(path), "tokenizer")
    load_state(tokenizer, state, what=f"tokenizer weights {path}")


def recipe_tokenizer(recipe: Recipe, *, device: torch.device | str = "cpu") -> Tokenizer:
    """The recipe's tokenizer; with ``tokenizer.weights`` set, those weights loaded."""
    tokenizer = build_tokenizer(recipe, device=device)
    if recipe.tokenizer.weights:
        load_tokenizer_weights(tokenizer, recipe.tokenizer.weights)
        log.info("tokenizer weights from %s", recipe.tokenizer.weights)
    return tokenizer


def _tokenizer_checkpoint(path: Path) -> Path:
    """The checkpoint holding a tokenizer: of the run (or checkpoint) at ``path``, else of
    its tokenizer stage."""
    step_dir = latest_checkpoint(path) or latest_checkpoint(path / "tokenizer")
    if step_dir is None:
        raise CheckpointError(f"no tokenizer checkpoint found at {path}")
    return step_dir
