"""The official VAR release (arXiv 2404.02905) as varkit pipelines and checkpoints.

The release publishes plain PyTorch state dicts: ``vae_ch160v4096z32.pth`` (the
multi-scale VQ-VAE) and ``var_d16.pth`` ... ``var_d30.pth`` (class-conditional
ImageNet 256×256 transformers). They are read with ``torch.load(weights_only=True)``
only; sizes are read off the state dicts.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from varkit.errors import CheckpointError

log = logging.getLogger(__name__)

#: The sampling defaults of the release's reported FIDs.
OFFICIAL_SAMPLER = {"name": "topk_topp", "cfg": 1.5, "top_k": 900, "top_p": 0.96}


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` file, loaded without unpickling code.

    Raises:
        CheckpointError: the file is missing, truncated, or not a tensor dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"{what} file {path} cannot be read as a PyTorch state dict (truncated or not a checkpoint?): {exc}"
        ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training snapshots wrap the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what} file {path} does not hold a state dict of tensors")
    return state


def official_recipe(tokenizer_config: Any, model_config: Any, *, out_dir: str = "runs/official_var") -> dict:
    """The resolved recipe of an official release model (for ``varkit.load`` and sampling)."""
    from varkit.config_types import unstructure

    return {
        "out_dir": out_dir,
        "seed": 0,
        "tokenizer": {"name": "msvq", "weights": None, **unstructure(tokenizer_config)},
        "unit": {"name": "scale"},
        "attention": {"name": "sdpa"},
        "sampler": dict(OFFICIAL_SAMPLER),
        "model": unstructure(model_config),
        "data": {"resolution": tokenizer_config.image_size, "num_classes": model_config.num_classes},
        "train": {},
        "tokenizer_train": {"steps": 0},
    }


def from_official_var(
    vae_ckpt: str | os.PathLike, var_ckpt: str | os.PathLike, *, device: torch.device | str = "cpu"
):
    """A :class:`~varkit.pipeline.Pipeline` from the official release files.

    Depth, width, heads, vocabulary and classes are read off the state dicts. Every key
    of both files must be consumed and every shape must match.

    Raises:
        CheckpointError: a missing, truncated or mismatched file, naming the keys.
    """
    from varkit import recipe as recipe_mod
    from varkit.build import build_model
    from varkit.model.official import convert_official_var, official_model_config
    from varkit.pipeline import Pipeline, load_state
    from varkit_plugins.tokenizers.msvq import load_official_vae

    vae_state = read_state_dict(vae_ckpt, "VAE checkpoint")
    var_state = read_state_dict(var_ckpt, "VAR checkpoint")
    tokenizer = load_official_vae(vae_state)
    model_config = official_model_config(var_state)
    recipe = recipe_mod.from_dict(official_recipe(tokenizer.config, model_config), source=str(var_ckpt))
    model = build_model(recipe, tokenizer)
    load_state(model, convert_official_var(var_state), what=f"VAR checkpoint {var_ckpt}")
    log.info(
        "official VAR d%d with %.1fM parameters",
        model_config.depth,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return Pipeline(tokenizer, model, recipe=recipe).to(device)


def import_var(vae_ckpt: str | os.PathLike, var_ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the official files as a varkit checkpoint directory (``varkit import var``)."""
    from varkit.checkpoint import save_checkpoint

    pipe = from_official_var(vae_ckpt, var_ckpt)
    out = Path(out)
    recipe = pipe.recipe.to_dict()
    recipe["out_dir"] = str(out)
    path = save_checkpoint(
        out,
        0,
        weights={"model": pipe.model.state_dict(), "tokenizer": pipe.tokenizer.state_dict()},
        trainer_state={},
        recipe=recipe,
    )
    log.info("wrote %s", path)
    return path
