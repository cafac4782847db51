"""State dicts: read foreign ``.pth`` files without running their code, check them
against a module, and load them strictly with errors that name the keys.

Everything that brings weights into a module goes through :func:`load_state` (or
:func:`check_state_dict` followed by an ``assign=True`` load for meta-device modules).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from varkit.errors import CheckpointError


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` file, loaded without unpickling code.

    Training snapshots that wrap the weights as ``{"model": state_dict, ...}`` (or
    ``"module"``, ``"state_dict"``) are unwrapped; an ``argparse.Namespace`` of training
    arguments stored beside them is allowed.

    Raises:
        CheckpointError: the file is missing, truncated, or not a tensor dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file {path} does not exist")
    try:
        # Training scripts (LlamaGen's among them) store their argparse arguments beside
        # the weights: a Namespace holds plain data, so the weights-only unpickler may build it.
        with _safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"{what} file {path} cannot be read as a PyTorch state dict (truncated or not a checkpoint?): {exc}"
        ) from None
    if isinstance(state, dict):
        # Training snapshots wrap the weights ("model": DDP runs, "module": DeepSpeed).
        for wrapper in ("model", "module", "state_dict"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what} file {path} does not hold a state dict of tensors")
    return state


def _safe_globals(classes: list[type]):
    """``torch.serialization.safe_globals`` where this torch has it (2.5+)."""
    allow = getattr(torch.serialization, "safe_globals", None)
    return allow(classes) if allow is not None else contextlib.nullcontext()


#: Keys that identify the state dicts of the releases varkit imports, and what each is.
_RELEASES = (
    (
        ("quantize.ema_vocab_hit_SV", "encoder.down.0.block.0.conv1.weight"),
        "VAR's multi-scale VQ-VAE (vae_ch160v4096z32.pth: `varkit import var --vae`, tokenizer msvq)",
    ),
    (
        ("class_emb.weight", "blocks.0.attn.mat_qkv.weight"),
        "an official VAR transformer (var_d16.pth ... var_d30.pth: `varkit import var --var`)",
    ),
    (
        ("quantize.embedding.weight", "encoder.conv_blocks.0.res.0.conv1.weight"),
        "LlamaGen's VQ tokenizer (vq_ds16_c2i.pt: `varkit import llamagen --vq`, tokenizer vq)",
    ),
    (
        ("tok_embeddings.weight", "layers.0.attention.wqkv.weight"),
        "a LlamaGen GPT (c2i_B_256.pt ... c2i_3B_384.pt: `varkit import llamagen --gpt`)",
    ),
)


def describe_release(state: Mapping[str, torch.Tensor]) -> str | None:
    """Which released checkpoint ``state`` looks like, in words, or None when none.

    Used to name a wrong file clearly: a LlamaGen file given where a VAR one is
    expected, a tokenizer given as a transformer, and so on.
    """
    keys = {k.removeprefix("module.").removeprefix("_orig_mod.") for k in state}
    for needed, what in _RELEASES:
        if all(k in keys for k in needed):
            return what
    return None


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


def load_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the keys that differ."""
    check_state_dict(module, state, what=what)
    module.load_state_dict(dict(state), strict=True)
