"""The official VAR release (arXiv 2404.02905) as varkit models and checkpoints.

The release publishes plain PyTorch state dicts: ``vae_ch160v4096z32.pth`` (the
multi-scale VQ-VAE, read by the ``msvq`` tokenizer plugin's ``from_release``) and
``var_d16.pth`` ... ``var_d30.pth`` (class-conditional ImageNet 256×256 transformers,
converted here). They are read with ``torch.load(weights_only=True)`` only; sizes are
read off the state dicts.

The transformer state dicts hold the transformer's parameters under the official module
names plus three non-learned buffers. `official_model_config` reads the
architecture off the tensors' shapes and `convert_official_var` renames every
parameter to `ARModel`'s names for the ``scale`` unit (which owns
``unit.pos_start``, ``unit.pos_embed`` and ``unit.level_embed``):

| official key | varkit key |
| --- | --- |
| ``pos_start`` | ``unit.pos_start`` |
| ``pos_1LC`` | ``unit.pos_embed`` |
| ``lvl_embed.weight`` | ``unit.level_embed.weight`` |
| ``class_emb.weight`` | ``class_embed.weight`` |
| ``word_embed.{weight,bias}`` | ``word_embed.{weight,bias}`` |
| ``blocks.i.attn.mat_qkv.weight`` | ``blocks.i.attn.qkv.weight`` |
| ``blocks.i.attn.{q_bias,v_bias}`` | ``blocks.i.attn.{q_bias,v_bias}`` |
| ``blocks.i.attn.scale_mul_1H11`` | ``blocks.i.attn.scale_mul`` (``(1, nh, 1, 1)`` -> ``(nh,)``) |
| ``blocks.i.attn.proj.*`` | ``blocks.i.attn.proj.*`` |
| ``blocks.i.ffn.fc{1,2}.*`` | ``blocks.i.mlp.fc{1,2}.*`` |
| ``blocks.i.ada_lin.1.*`` | ``blocks.i.adaln.*`` |
| ``shared_ada_lin.1.*`` (shared AdaLN) | ``shared_adaln.*`` |
| ``blocks.i.ada_gss`` (shared AdaLN) | ``blocks.i.adaln_offset`` (``(1, 1, 6, d)`` -> ``(6, d)``) |
| ``head_nm.ada_lin.1.*`` | ``head_adaln.*`` |
| ``head.*`` | ``head.*`` |

The buffers are checked, then dropped, because varkit derives them: ``lvl_1L`` (the
scale of every position; the unit's schedule gives it) must count up from 0 through
the scales, ``attn_bias_for_masking`` must be the additive block-causal mask of those
scales (0 where a key's scale is <= the query's, -inf elsewhere; the attention
backend gets a `BlockCausal` instead), and each
``blocks.i.attn.zero_k_bias`` must be zero (varkit's keys have no bias). Value checks
are skipped for tensors on the meta device.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from varkit import recipe as recipe_mod
from varkit.build import build_model
from varkit.config_types import unstructure
from varkit.defaults import DEFAULT_PLUGINS, OFFICIAL_VAR_SAMPLER
from varkit.errors import CheckpointError
from varkit.loading import Loaded, save_pretrained
from varkit.model.transformer import ModelConfig
from varkit.plugins import registry
from varkit.pretrained import ModelCard
from varkit.weights import describe_release, key_differences, load_state, read_state_dict

log = logging.getLogger(__name__)

#: The release's AdaLN gate init (``alng``) per depth; d16/d20 use the default 1e-3.
RELEASE_ADALN_GAMMA_INIT = {24: 1e-4, 30: 1e-5}

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A state dict saved from a DDP-wrapped model prefixes every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _require(state: dict[str, torch.Tensor], *keys: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(
            f"this is not an official VAR transformer state dict: it has no {', '.join(missing)} "
            f"(found {len(state)} keys, e.g. {', '.join(sorted(state)[:5]) or 'none'})"
        )


def official_sizes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Sizes read off an official state dict besides the `ModelConfig`.

    Returns:
        ``vocab_size`` (head outputs), ``code_dim`` (``word_embed`` inputs), ``seq_len``
        (positions of ``pos_1LC``) and ``num_steps`` (rows of ``lvl_embed``).
    """
    state = _strip_prefix(state)
    _require(state, "head.weight", "word_embed.weight", "pos_1LC", "lvl_embed.weight")
    return {
        "vocab_size": int(state["head.weight"].shape[0]),
        "code_dim": int(state["word_embed.weight"].shape[1]),
        "seq_len": int(state["pos_1LC"].shape[1]),
        "num_steps": int(state["lvl_embed.weight"].shape[0]),
    }


def official_model_config(state: dict[str, torch.Tensor]) -> ModelConfig:
    """The `ModelConfig` of an official VAR checkpoint, read off its shapes.

    Depth is the number of ``blocks.i``; width, classes, heads (from the per-head
    ``scale_mul``), MLP ratio and shared AdaLN come from the tensors. The options that
    leave no trace in the weights are the release's training values (class dropout
    0.1, drop path 0.1·depth/24, AdaLN gate init 1e-3, 1e-4 for d24, 1e-5 for d30).

    Raises:
        CheckpointError: the state dict is not an official VAR transformer.
    """
    state = _strip_prefix(state)
    _require(state, "class_emb.weight", "blocks.0.attn.mat_qkv.weight", "blocks.0.ffn.fc1.weight")
    indices = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))}
    depth = max(indices) + 1
    gaps = sorted(set(range(depth)) - indices)
    if gaps:
        raise CheckpointError(
            f"VAR checkpoint lacks every key of blocks {gaps} (it has blocks up to {depth - 1})"
        )
    classes, width = state["class_emb.weight"].shape
    scale_mul = state.get("blocks.0.attn.scale_mul_1H11")
    heads = int(scale_mul.shape[1]) if scale_mul is not None else max(1, width // 64)
    hidden = state["blocks.0.ffn.fc1.weight"].shape[0]
    try:
        return ModelConfig(
            depth=depth,
            width=int(width),
            heads=heads,
            mlp_ratio=hidden / width,
            num_classes=int(classes) - 1,
            shared_adaln="shared_ada_lin.1.weight" in state,
            attn_l2_norm=scale_mul is not None,
            adaln_gamma_init=RELEASE_ADALN_GAMMA_INIT.get(depth, 1e-3),
        )
    except ValueError as exc:
        raise CheckpointError(f"VAR checkpoint has an unusable architecture: {exc}") from None


def _expected(config: ModelConfig, sizes: dict[str, int]) -> dict[str, tuple[str | None, tuple[int, ...]]]:
    """Every official key -> (varkit key or None for a dropped buffer, official shape)."""
    d, nh, hidden, depth = config.width, config.heads, config.mlp_hidden, config.depth
    seq_len = sizes["seq_len"]
    table: dict[str, tuple[str | None, tuple[int, ...]]] = {
        "pos_start": ("unit.pos_start", (1, -1, d)),  # l_0 is checked against the model
        "pos_1LC": ("unit.pos_embed", (1, seq_len, d)),
        "lvl_embed.weight": ("unit.level_embed.weight", (sizes["num_steps"], d)),
        "lvl_1L": (None, (1, seq_len)),
        "attn_bias_for_masking": (None, (1, 1, seq_len, seq_len)),
        "class_emb.weight": ("class_embed.weight", (config.num_classes + 1, d)),
        "word_embed.weight": ("word_embed.weight", (d, sizes["code_dim"])),
        "word_embed.bias": ("word_embed.bias", (d,)),
        "head_nm.ada_lin.1.weight": ("head_adaln.weight", (2 * d, d)),
        "head_nm.ada_lin.1.bias": ("head_adaln.bias", (2 * d,)),
        "head.weight": ("head.weight", (sizes["vocab_size"], d)),
        "head.bias": ("head.bias", (sizes["vocab_size"],)),
    }
    if config.shared_adaln:
        table["shared_ada_lin.1.weight"] = ("shared_adaln.weight", (6 * d, d))
        table["shared_ada_lin.1.bias"] = ("shared_adaln.bias", (6 * d,))
    for i in range(depth):
        o, v = f"blocks.{i}.", f"blocks.{i}."
        table |= {
            o + "attn.mat_qkv.weight": (v + "attn.qkv.weight", (3 * d, d)),
            o + "attn.q_bias": (v + "attn.q_bias", (d,)),
            o + "attn.v_bias": (v + "attn.v_bias", (d,)),
            o + "attn.zero_k_bias": (None, (d,)),
            o + "attn.proj.weight": (v + "attn.proj.weight", (d, d)),
            o + "attn.proj.bias": (v + "attn.proj.bias", (d,)),
            o + "ffn.fc1.weight": (v + "mlp.fc1.weight", (hidden, d)),
            o + "ffn.fc1.bias": (v + "mlp.fc1.bias", (hidden,)),
            o + "ffn.fc2.weight": (v + "mlp.fc2.weight", (d, hidden)),
            o + "ffn.fc2.bias": (v + "mlp.fc2.bias", (d,)),
        }
        if config.attn_l2_norm:
            table[o + "attn.scale_mul_1H11"] = (v + "attn.scale_mul", (1, nh, 1, 1))
        if config.shared_adaln:
            table[o + "ada_gss"] = (v + "adaln_offset", (1, 1, 6, d))
        else:
            table[o + "ada_lin.1.weight"] = (v + "adaln.weight", (6 * d, d))
            table[o + "ada_lin.1.bias"] = (v + "adaln.bias", (6 * d,))
    return table


def _shape_fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(shape) == len(expected) and all(e in (-1, s) for s, e in zip(shape, expected, strict=True))


def _check_buffers(state: dict[str, torch.Tensor], depth: int) -> list[str]:
    """Problems with the non-learned buffers' values (empty when they are what varkit derives)."""
    problems = []
    levels = state["lvl_1L"]
    if not levels.is_meta:
        levels = levels[0].long()
        num_steps = state["lvl_embed.weight"].shape[0]
        counts = torch.bincount(levels.clamp(min=0), minlength=num_steps)
        steps = torch.repeat_interleave(torch.arange(len(counts)), counts)
        if (
            levels.min() < 0
            or len(counts) != num_steps
            or (counts == 0).any()
            or not torch.equal(levels, steps)
        ):
            problems.append(
                f"lvl_1L does not count up from 0 through the {num_steps} scales of lvl_embed "
                f"(scales per position: {levels.tolist()[:12]} ...)"
            )
        elif not state["attn_bias_for_masking"].is_meta:
            visible = steps[None, :] <= steps[:, None]
            bias = state["attn_bias_for_masking"][0, 0]
            if not (torch.all(bias[visible] == 0) and torch.all(torch.isneginf(bias[~visible]))):
                problems.append(
                    "attn_bias_for_masking is not the block-causal mask of lvl_1L's scales "
                    "(0 where a key's scale <= the query's, -inf elsewhere)"
                )
    for i in range(depth):
        bias = state[f"blocks.{i}.attn.zero_k_bias"]
        if not bias.is_meta and bias.any():
            problems.append(f"blocks.{i}.attn.zero_k_bias is not zero (varkit's attention keys have no bias)")
    return problems


def convert_official_var(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official VAR transformer state dict renamed to `ARModel`'s keys.

    Every official key must be present with the shape that the architecture read off
    the state dict implies, and every key is consumed: the parameters are renamed (two
    reshaped), the buffers ``lvl_1L``, ``attn_bias_for_masking`` and
    ``blocks.i.attn.zero_k_bias`` are checked and dropped (see the module docs). The
    result loads with ``load_state_dict(strict=True)`` into the ARModel built from
    `official_model_config` with the ``scale`` unit and a tokenizer of the
    release's schedule, vocabulary and code dimension.

    Raises:
        CheckpointError: naming the missing, unexpected and mismatched keys, or the
            buffers whose values are not what varkit derives.
    """
    state = _strip_prefix(state)
    config = official_model_config(state)
    sizes = official_sizes(state)
    table = _expected(config, sizes)
    missing = sorted(k for k in table if k not in state)
    unexpected = sorted(k for k in state if k not in table)
    mismatched = [
        f"{k}: {tuple(state[k].shape)}, expected {tuple(s if s >= 0 else 'l_0' for s in shape)}"
        for k, (_, shape) in table.items()
        if k in state and not _shape_fits(tuple(state[k].shape), shape)
    ]
    differences = key_differences(missing, unexpected, mismatched)
    if differences:
        raise CheckpointError(
            f"VAR checkpoint (read as d{config.depth}, width {config.width}) does not have the official "
            f"layout ({differences}); is the file complete and an official var_d*.pth?"
        )
    problems = _check_buffers(state, config.depth)
    if problems:
        raise CheckpointError("VAR checkpoint buffers are not what varkit derives: " + "; ".join(problems))
    out = {}
    for key, (name, _) in table.items():
        if name is None:
            continue
        tensor = state[key]
        if key.endswith("scale_mul_1H11"):
            tensor = tensor.reshape(-1)  # (1, nh, 1, 1) -> (nh,)
        elif key.endswith("ada_gss"):
            tensor = tensor.reshape(6, -1)  # (1, 1, 6, d) -> (6, d)
        out[name] = tensor
    return out


# ------------------------------------------------------------------ whole release


def official_recipe(
    tokenizer_config: Any, model_config: ModelConfig, *, out_dir: str = "runs/official_var"
) -> dict:
    """The resolved recipe of an official release model (for loading and sampling)."""
    return {
        "out_dir": out_dir,
        "seed": 0,
        "tokenizer": {"name": "msvq", "weights": None, **unstructure(tokenizer_config)},
        "unit": {"name": "scale"},
        "attention": {"name": DEFAULT_PLUGINS["attention"]},
        "sampler": dict(OFFICIAL_VAR_SAMPLER),
        "model": unstructure(model_config),
        "data": {"resolution": tokenizer_config.image_size, "num_classes": model_config.num_classes},
        "train": {},
        "tokenizer_train": {"steps": 0},
    }


def read_release(vae_ckpt: str | os.PathLike, var_ckpt: str | os.PathLike) -> Loaded:
    """The tokenizer, transformer and recipe of the official release files.

    Depth, width, heads, vocabulary and classes are read off the state dicts. Every key
    of both files must be consumed and every shape must match.

    Raises:
        CheckpointError: a missing, truncated or mismatched file, naming the keys.
    """
    vae_state = read_state_dict(vae_ckpt, "VAE checkpoint")
    var_state = read_state_dict(var_ckpt, "VAR checkpoint")
    for flag, path, state, expected in (
        ("--vae", vae_ckpt, vae_state, "VAR's multi-scale VQ-VAE"),
        ("--var", var_ckpt, var_state, "an official VAR transformer"),
    ):
        what = describe_release(state)
        if what is not None and not what.startswith(expected):
            raise CheckpointError(f"{flag} {path} is not {expected}: it looks like {what}")
    tokenizer = registry().get("tokenizer", "msvq").from_release(vae_state)
    model_config = official_model_config(var_state)
    recipe = recipe_mod.from_dict(official_recipe(tokenizer.config, model_config), source=str(var_ckpt))
    model = build_model(recipe, tokenizer)
    load_state(model, convert_official_var(var_state), what=f"VAR checkpoint {var_ckpt}")
    log.info(
        "official VAR d%d with %.1fM parameters",
        model_config.depth,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return Loaded(tokenizer=tokenizer, model=model.eval(), recipe=recipe, source=Path(var_ckpt))


#: FID-50k on ImageNet 256×256 (VAR README, cfg 1.5, top-k 900, top-p 0.96) by depth.
RELEASE_FID = {16: "3.55", 20: "2.95", 24: "2.33", 30: "1.97"}
SOURCE = "https://huggingface.co/FoundationVision/var"
PAPER = "Tian et al., Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction, arXiv 2404.02905"


def release_card(vae_ckpt: str | os.PathLike, var_ckpt: str | os.PathLike, loaded: Loaded) -> ModelCard:
    """The model card of a converted official VAR release."""
    depth = loaded.model.config.depth
    metrics = {}
    if depth in RELEASE_FID:
        metrics["FID-50k, ImageNet 256×256 (cfg 1.5, top-k 900, top-p 0.96)"] = (
            f"{RELEASE_FID[depth]} (VAR README)"
        )
    return ModelCard(
        title=f"VAR-d{depth} (ImageNet 256×256, class-conditional)",
        summary=(
            f"The official VAR-d{depth}: next-scale prediction over the ten scales of VAR's multi-scale "
            "VQ-VAE (1×1 to 16×16 codes), AdaLN class conditioning; 1000 ImageNet classes."
        ),
        license="mit",
        source=f"{SOURCE}/resolve/main/{Path(var_ckpt).name} with {Path(vae_ckpt).name}",
        conversion=(
            f"`varkit import var` from {Path(vae_ckpt).name} + {Path(var_ckpt).name}: read with "
            "torch.load(weights_only=True); VQ-VAE keys as they are; transformer keys renamed (two reshaped); "
            "the buffers lvl_1L, attn_bias_for_masking and zero_k_bias checked and dropped; every key consumed."
        ),
        metrics=metrics,
        paper=PAPER,
        tags=("var", "imagenet"),
    )


def import_release(vae_ckpt: str | os.PathLike, var_ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the official files as a pretrained directory (``varkit import var``)."""
    loaded = read_release(vae_ckpt, var_ckpt)
    return save_pretrained(loaded, out, card=release_card(vae_ckpt, var_ckpt, loaded))
