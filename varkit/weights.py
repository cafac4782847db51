"""State dicts: read foreign ``.pth`` files without running their code, check them
against a module, and load them strictly with errors that name the keys.

Everything that brings weights into a module goes through :func:`load_state` (or
:func:`check_state_dict` followed by an ``assign=True`` load for meta-device modules).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from varkit.errors import CheckpointError


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` file, loaded without unpickling code.

    Training snapshots that wrap the weights as ``{"model": state_dict, ...}`` are
    unwrapped.

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
