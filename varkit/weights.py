"""State dicts: read weights files (safetensors, or foreign ``.pth`` files without
running their code), say what a file that cannot be read seems to be, check state dicts
against a module, and load them strictly with errors that name the keys.

Everything that brings weights into a module goes through `load_state` (or
`check_state_dict` followed by an ``assign=True`` load for meta-device modules).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from varkit.errors import CheckpointError

#: Keys under which training snapshots keep the weights beside other state ("model":
#: DDP runs, "module": DeepSpeed).
WRAPPER_KEYS = ("model", "module", "state_dict")


def file_format(path: str | os.PathLike) -> str:
    """What a weights file seems to be, from its first bytes.

    Returns:
        ``safetensors``, ``torch-zip`` (``torch.save`` since PyTorch 1.6), ``pickle``
        (an older ``torch.save`` or a plain pickle), ``empty`` or ``unknown``.
    """
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80" or head[:1] == b"(":  # pickle protocol 2+, or protocol 0
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"  # an 8-byte header length, then the JSON header
    return "unknown"


def _refusal(path: Path, what: str, exc: BaseException) -> str:
    """Why a ``weights_only`` load failed, said as what the file seems to be."""
    text = str(exc)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        name = match.group(1)
        if name.startswith("numpy"):
            holds = "numpy arrays or scalars"
        elif name.startswith(("argparse", "omegaconf", "collections", "easydict")):
            holds = f"a training snapshot with its settings ({name})"
        else:
            holds = f"a pickled Python object of class {name} (a whole model, or a snapshot with more than weights)"
        return (
            f"{what} file {path} holds {holds}, not only tensors; varkit reads weights without running "
            "code from the file, so it cannot load this one. Where the file was written, save "
            "`model.state_dict()` instead (torch.save or safetensors), or get the release's plain state dict"
        )
    kind = file_format(path)
    if kind == "empty":
        return f"{what} file {path} is empty; download or copy it again"
    if "central directory" in text or "zip archive" in text or isinstance(exc, zipfile.BadZipFile | EOFError):
        return (
            f"{what} file {path} is a truncated or corrupt PyTorch archive ({os.path.getsize(path)} bytes); "
            "download or copy it again and compare its size with the source's"
        )
    if kind == "safetensors":
        return f"{what} file {path} is a safetensors file, not a PyTorch one: name it *.safetensors"
    if kind == "pickle":
        return (
            f"{what} file {path} is a plain pickle, not a state dict saved by torch.save; varkit does not "
            "unpickle such files. Save the weights with torch.save(model.state_dict(), ...) or safetensors"
        )
    with open(path, "rb") as f:
        head = f.read(8)
    return (
        f"{what} file {path} is not a PyTorch checkpoint (it starts with bytes {head!r}); point at "
        "the .pth or .safetensors file of the weights"
    )


def _unwrap(state, path: Path, what: str) -> dict[str, torch.Tensor]:
    if isinstance(state, dict):
        for key in WRAPPER_KEYS:  # training snapshots wrap the weights
            inner = state.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        shown = ", ".join(map(str, list(state)[:8])) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{what} file {path} does not hold a state dict of tensors (it holds: {shown}); point at a file "
            f"of weights, or one that keeps them under {' or '.join(map(repr, WRAPPER_KEYS))}"
        )
    return state


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` file, loaded without unpickling code.

    Training snapshots that wrap the weights as ``{"model": state_dict, ...}`` (or
    ``"module"``, ``"state_dict"``) are unwrapped; an ``argparse.Namespace`` of training
    arguments stored beside them is allowed.

    Raises:
        CheckpointError: the file is missing, truncated, or not a tensor dict; the
            message says what the file seems to be.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file {path} does not exist")
    try:
        # Training scripts (LlamaGen's among them) store their argparse arguments beside
        # the weights: a Namespace holds plain data, so the weights-only unpickler may build it.
        with _safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as exc:  # the weights-only unpickler fails on garbage in many ways (IndexError, KeyError, ...)
        raise CheckpointError(_refusal(path, what, exc)) from None
    return _unwrap(state, path, what)


def read_safetensors(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on the CPU).

    Raises:
        CheckpointError: the file is missing, truncated or not a safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(_not_safetensors(path, what, exc)) from None


def _not_safetensors(path: Path, what: str, exc: BaseException) -> str:
    kind = file_format(path)
    if kind in ("torch-zip", "pickle"):
        return f"{what} file {path} is a PyTorch file, not safetensors: name it *.pth"
    return (
        f"{what} file {path} is not a complete safetensors file ({exc}; {os.path.getsize(path)} bytes): "
        "it is truncated, corrupt or of another format; download or write it again"
    )


def read_weights(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, safetensors or PyTorch, whatever its name says."""
    path = Path(path)
    if path.is_file() and file_format(path) == "safetensors":
        return read_safetensors(path, what)
    if path.suffix == ".safetensors":
        return read_safetensors(path, what)
    return read_state_dict(path, what)


def weight_shapes(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The keys of a weights file with meta tensors of their shapes and dtypes, reading as
    little of the file as its format allows (the header of a safetensors file).

    Raises:
        CheckpointError: as `read_weights`.
    """
    path = Path(path)
    if path.is_file() and (path.suffix == ".safetensors" or file_format(path) == "safetensors"):
        try:
            with safe_open(str(path), framework="pt") as f:
                out = {}
                for key in f.keys():  # noqa: SIM118 (safe_open has keys(), not __iter__)
                    piece = f.get_slice(key)
                    dtype = _DTYPES.get(piece.get_dtype(), torch.float32)
                    out[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
                return out
        except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
            raise CheckpointError(_not_safetensors(path, what, exc)) from None
    if path.is_file() and file_format(path) == "torch-zip":
        try:  # memory-mapped: the tensors' bytes are not read
            with _safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (
            RuntimeError,
            EOFError,
            pickle.UnpicklingError,
            zipfile.BadZipFile,
            ValueError,
            OSError,
        ) as exc:
            raise CheckpointError(_refusal(path, what, exc)) from None
        state = _unwrap(state, path, what)
    else:
        state = read_state_dict(path, what)
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


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


def key_differences(missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str]) -> str:
    """``"missing: a, b; mismatched shapes: c: ..."`` (at most ten keys of each kind shown),
    or ``""`` when all three are empty."""
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched shapes", mismatched)):
        if keys:
            shown = ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


def compare_keys(
    own: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    *,
    theirs: str = "checkpoint",
    ours: str = "model",
) -> tuple[list[str], list[str], list[str]]:
    """The keys of ``own`` that ``state`` lacks, the keys ``state`` has beyond them, and
    ``"key: theirs (shape) vs ours (shape)"`` for the common keys of other shapes."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: {theirs} {tuple(state[k].shape)} vs {ours} {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(own[k].shape) != tuple(state[k].shape)
    ]
    return missing, unexpected, mismatched


def check_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Raise `CheckpointError` naming the keys unless ``state`` fits ``module`` exactly.

    Every key of ``module.state_dict()`` must be in ``state`` with the same shape, and
    ``state`` must hold no other key.
    """
    differences = key_differences(*compare_keys(module.state_dict(), state))
    if differences:
        raise CheckpointError(f"{what} do not fit the model ({differences})")


def load_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the keys that differ."""
    check_state_dict(module, state, what=what)
    module.load_state_dict(dict(state), strict=True)
