"""Every way weights come into varkit, in one module.

A run directory (its latest checkpoint), a checkpoint directory, the output of
``varkit import``, or a tokenizer weights file (``.safetensors``, or a plain ``.pth``
state dict read with ``weights_only=True`` such as the official
``vae_ch160v4096z32.pth``). Building modules from a recipe is `varkit.build`;
checking and loading state dicts is `varkit.weights`; reading a foreign release's
own layout is `varkit.importers`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import attrs
import torch

from varkit import recipe as recipe_mod
from varkit.base import Tokenizer
from varkit.build import build_model, build_tokenizer
from varkit.checkpoint import RECIPE, latest_checkpoint, load_weights
from varkit.errors import CheckpointError, RecipeError
from varkit.recipe import Recipe
from varkit.weights import check_state_dict, load_state, read_weights, weight_shapes

log = logging.getLogger(__name__)


@attrs.define
class Loaded:
    """A tokenizer and an AR model with their weights, and the recipe they were built from."""

    tokenizer: Tokenizer
    model: torch.nn.Module
    recipe: Recipe
    #: The checkpoint directory or file the weights came from.
    source: Path


def load_checkpoint(path: str | os.PathLike, *, ema: bool = True, overrides: Iterable[str] = ()) -> Loaded:
    """The tokenizer, model and recipe of a run or checkpoint directory (on the CPU).

    Args:
        path: ``out_dir`` of a run (its latest checkpoint is used), a
            ``checkpoints/step-N`` directory, or a directory written by ``varkit import``.
        ema: use the EMA weights when the checkpoint has them.
        overrides: ``data.key=value`` applied to the stored recipe (see `recipe_of`).

    Raises:
        CheckpointError: nothing loadable at ``path``, or weights that do not fit.
    """
    step_dir = latest_checkpoint(Path(path))
    if step_dir is None:
        raise CheckpointError(
            f"no checkpoint found at {path}: expected a run directory with checkpoints/latest, "
            "a checkpoint directory, or the output of `varkit import`"
        )
    recipe = recipe_of(step_dir, overrides)
    tokenizer = build_tokenizer(recipe)
    load_state(tokenizer, load_weights(step_dir, "tokenizer"), what=f"tokenizer of {step_dir}")
    model = build_model(recipe, tokenizer)
    name = "ema" if ema and (step_dir / "ema.safetensors").is_file() else "model"
    load_state(model, load_weights(step_dir, name), what=f"{name} weights of {step_dir}")
    log.info("loaded %s (%s weights)", step_dir, name)
    return Loaded(tokenizer=tokenizer.eval(), model=model.eval(), recipe=recipe, source=step_dir)


def recipe_of(step_dir: Path, overrides: Iterable[str] = ()) -> Recipe:
    """The validated recipe stored with a checkpoint.

    The recipe is marked as stored (``varkit.recipe.from_dict(..., stored=True)``): it
    came with the checkpoint, perhaps from someone else, so the data layer will not
    run its ``pipe:`` shard commands nor write into its ``data.cache_dir``.

    Args:
        step_dir: the checkpoint directory.
        overrides: ``data.key=value`` given by the user (e.g. on the command line); a
            shard pattern or cache directory given here is the user's own choice.

    Raises:
        RecipeError: an override outside ``data.``, or a stored recipe that no longer
            validates.
    """
    overrides = list(overrides)
    other = [o for o in overrides if not o.partition("=")[0].startswith("data.")]
    if other:
        raise RecipeError(
            f"command line: {', '.join(other)}: only data.* keys can be overridden when loading a "
            "checkpoint (the rest of its recipe is what its weights were trained with)"
        )
    file = step_dir / RECIPE
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist: {step_dir} is not a varkit checkpoint")
    return recipe_mod.from_dict(
        recipe_mod.read_stored(file), source=str(file), stored=True, overrides=overrides
    )


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
    release's ``vae_ch160v4096z32.pth``. A relative path is read from the current
    directory.

    Raises:
        CheckpointError: nothing at ``path``, a file that is not weights (saying what it
            seems to be), or weights that do not fit the tokenizer (naming the keys).
    """
    path = Path(path)
    load_state(tokenizer, _tokenizer_state(path), what=f"tokenizer weights {path}")


def _tokenizer_state(path: Path, *, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    what = "tokenizer weights"
    if path.is_file() or path.suffix in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        if not path.exists():
            raise CheckpointError(
                f"{what} file {path} does not exist (relative paths are read from the current "
                f"directory, {Path.cwd()}); see the docs' page on the official checkpoints for where to get them"
            )
        return weight_shapes(path, what) if shapes_only else read_weights(path, what)
    step_dir = _tokenizer_checkpoint(path)
    if shapes_only:
        return weight_shapes(step_dir / "tokenizer.safetensors", f"tokenizer of {step_dir}")
    return load_weights(step_dir, "tokenizer")


def check_tokenizer_weights(recipe: Recipe) -> None:
    """Check, without loading them, that ``tokenizer.weights`` exist and fit the tokenizer.

    Reads only what the file format allows to be read cheaply (a safetensors header,
    a memory-mapped ``.pth``); the tokenizer is built on the meta device.

    Raises:
        CheckpointError: the weights are missing, unreadable, or do not fit (naming keys).
    """
    weights = recipe.tokenizer.weights
    if not weights:
        return
    path = Path(weights)
    shapes = _tokenizer_state(path, shapes_only=True)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        tokenizer = recipe.tokenizer.cls(recipe.tokenizer.config)
    check_state_dict(tokenizer, shapes, what=f"tokenizer.weights {path}")


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
        what = "does not exist" if not path.exists() else "holds no checkpoint"
        raise CheckpointError(
            f"no tokenizer checkpoint found at {path}: it {what}. Give a run directory, a checkpoint "
            "directory, or a .safetensors/.pth weights file (relative paths are read from the current "
            f"directory, {Path.cwd()})"
        )
    return step_dir
