"""AdamW with weight decay only where it belongs."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from varkit.recipe.train import TrainConfig


def _matches(name: str, key: str) -> bool:
    """Whether the dotted ``key`` is a run of whole components of parameter ``name``."""
    return name == key or name.startswith(key + ".") or name.endswith("." + key) or f".{key}." in name


def no_decay_names(module: nn.Module) -> set[str]:
    """Names of the parameters of ``module`` that get no weight decay.

    These are the parameters with fewer than two dimensions (biases, norm weights,
    per-channel scales), the ones named by ``module.no_weight_decay()`` when the module
    has it (a key matches a parameter when it is a run of whole dotted components of its
    name: ``pos_start``, ``blocks.0.attn.scale_mul`` or ``scale_mul`` for all blocks),
    and, for a module without ``no_weight_decay()``, the weights of ``nn.Embedding``.
    """
    keys = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
    if not hasattr(module, "no_weight_decay"):
        for prefix, sub in module.named_modules():
            if isinstance(sub, nn.Embedding):
                keys.add(f"{prefix}.weight" if prefix else "weight")
    names = set()
    for name, param in module.named_parameters():
        if param.ndim < 2 or any(_matches(name, key) for key in keys):
            names.add(name)
    return names


def param_groups(
    module: nn.Module, weight_decay: float, *, exclude: Iterable[nn.Parameter] = ()
) -> list[dict]:
    """AdamW parameter groups: ``decay`` (matrices) and ``no_decay`` (see `no_decay_names`).

    Only parameters that require grad are included; ``exclude`` drops more (the
    discriminator of a tokenizer, which has its own optimizer). Each group carries a
    ``name`` and its base ``weight_decay`` as ``base_weight_decay``, so a weight-decay
    schedule scales the decayed group only.
    """
    skip = {id(p) for p in exclude}
    no_decay = no_decay_names(module)
    decay_params, plain_params = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad or id(param) in skip:
            continue
        (plain_params if name in no_decay else decay_params).append(param)
    groups = []
    if decay_params:
        groups.append({"name": "decay", "params": decay_params, "weight_decay": weight_decay})
    if plain_params:
        groups.append({"name": "no_decay", "params": plain_params, "weight_decay": 0.0})
    return groups


def build_adamw(groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``groups``: fused kernels on CUDA, the multi-tensor path elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        groups,
        lr=config.peak_lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        fused=fused or None,
        foreach=None if fused else True,
    )


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set the lr of every group and the weight decay of the groups that decay."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("name") != "no_decay":
            group["weight_decay"] = weight_decay
