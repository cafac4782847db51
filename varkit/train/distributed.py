"""Process groups and model wrappers for ``torchrun`` scale-out.

Everything here takes a `DistEnv` (rank, world size, device) explicitly; the
only process-wide state is PyTorch's default process group, created once by
`init_distributed` from the variables torchrun sets.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class DistEnv:
    """Where this process sits in a run: its rank, the world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"), converter=torch.device)

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_torchrun(environ: Mapping[str, str] = os.environ, *, device: str | None = None) -> DistEnv:
    """The `DistEnv` that torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` describe.

    Without torchrun this is rank 0 of 1. The device is ``cuda:LOCAL_RANK`` when CUDA is
    available, else the CPU, unless ``device`` names one.
    """
    rank = int(environ.get("RANK", "0"))
    world = int(environ.get("WORLD_SIZE", "1"))
    local = int(environ.get("LOCAL_RANK", str(rank)))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=torch.device(device))


def init_distributed(env: DistEnv) -> bool:
    """Create the default process group for ``env`` (nccl on CUDA, gloo on the CPU).

    Returns True when this call created it (the caller then destroys it), False when
    there is nothing to do (one process, or a group that already exists).
    """
    if not env.distributed or dist.is_initialized():
        return False
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
        dist.init_process_group("nccl", rank=env.rank, world_size=env.world_size, device_id=env.device)
    else:
        dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
    log.info("process group: %d processes (%s)", env.world_size, dist.get_backend())
    return True


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op for one process)."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(params: list[nn.Parameter], env: DistEnv) -> None:
    """Average the gradients of ``params`` over ranks, as DDP would (one flat all-reduce).

    For modules trained without a DDP wrapper (tokenizers: their loss is not their
    ``forward``). A parameter that has a gradient on some rank gets a zero one where it
    has none, so every rank steps the same parameters.
    """
    if not env.distributed or not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not live:
        return
    flat = torch.cat([p.grad.reshape(-1).float() for p in live])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= env.world_size
    offset = 0
    for p in live:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


# ------------------------------------------------------------------------ wrappers


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly FSDP-sharded) tensor; a collective for sharded ones."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def is_sharded_module(module: nn.Module) -> bool:
    """Whether FSDP sharded ``module``'s parameters (state dicts are then collectives)."""
    return any(is_sharded(p) for p in module.parameters())


#: Block methods the model calls outside ``block.forward``; FSDP gathers weights for them too.
BLOCK_METHODS_OUTSIDE_FORWARD = ("modulation",)


def _blocks(model: nn.Module, what: str) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError(
            f"{what} needs a model with its blocks in `model.blocks`; {type(model).__name__} has none"
        )
    return blocks


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each block's activations in the backward instead of storing them.

    Every block of ``model.blocks`` runs its forward under non-reentrant
    ``torch.utils.checkpoint``: only the block's inputs are kept, its inner activations
    are computed again when the backward reaches the block. The block's ``forward`` is
    replaced on the instance rather than the block wrapped in another module, so
    parameter names, state dicts and checkpoints stay the same. The RNG state is
    stashed and replayed, so drop-path masks and dropout are the same in the recompute
    and the result is bitwise that of a run without it. Apply it before
    `compile_model` and `wrap_model` (FSDP gathers a block's weights
    around the whole checkpointed forward and again before its backward).
    """
    for block in _blocks(model, "train.activation_checkpointing"):
        if isinstance(block.forward, functools.partial) and block.forward.func is _checkpointed:
            continue  # already applied
        block.forward = functools.partial(_checkpointed, block.forward)


def compile_model(model: nn.Module, mode: Literal["blocks", "model"], **options: Any) -> None:
    """``torch.compile`` ``model`` in place, before it is wrapped for DDP or FSDP.

    ``blocks`` compiles every block of ``model.blocks`` as its own graph (the same code,
    so one compilation serves all): each block's backward is its own kernel sequence,
    so DDP's bucketed all-reduce and FSDP's reduce-scatter of a block's gradients run
    while the blocks below it are still in their backward. ``model`` compiles the
    whole forward as one graph: the fewest launches on one GPU, but under DDP the
    gradients become ready together at the end of the backward. ``options`` go to
    ``torch.compile`` (e.g. ``backend``).
    """
    if mode == "blocks":
        for block in _blocks(model, "train.compile: blocks"):
            block.compile(**options)
    elif mode == "model":
        model.compile(**options)
    else:
        raise ValueError(f"unknown compile mode {mode!r}; use blocks or model")


def fsdp_mixed_precision(dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """FSDP2's policy for an autocast ``dtype``: bf16 weights gathered, fp32 gradients reduced.

    Only bf16 gets one: its gathered weights halve the all-gather and the memory of the
    unsharded block, and the fp32 reduce-scatter keeps the summed gradients exact to
    fp32. fp16 keeps fp32 weights (its grad scaler unscales fp32 gradients), fp32 is
    plain. Forward inputs are not cast: autocast picks every op's dtype, so rotary
    angles and masks stay in fp32.
    """
    if dtype is torch.bfloat16:
        return MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    return MixedPrecisionPolicy()


def wrap_model(
    model: nn.Module, env: DistEnv, mode: str, *, mixed_precision: torch.dtype | None = None
) -> nn.Module:
    """The module to run forward and backward through.

    One process: ``model`` itself. DDP: a ``DistributedDataParallel`` wrapper (it
    broadcasts rank 0's weights at construction). FSDP: ``model`` sharded in place with
    FSDP2's ``fully_shard``, each block of ``model.blocks`` on its own, then the root,
    with `fsdp_mixed_precision` of ``mixed_precision`` (the autocast dtype).
    """
    if not env.distributed:
        return model
    if mode == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    if mode == "fsdp":
        policy = fsdp_mixed_precision(mixed_precision)
        for block in getattr(model, "blocks", ()):
            fully_shard(block, mp_policy=policy)
            # A transformer that computes a block's AdaLN modulation outside the block's
            # forward needs FSDP to gather the block's weights for that method too.
            for method in BLOCK_METHODS_OUTSIDE_FORWARD:
                if hasattr(block, method):
                    register_fsdp_forward_method(block, method)
        fully_shard(model, mp_policy=policy)
        return model
    raise ValueError(f"unknown distributed mode {mode!r}; use ddp or fsdp")


@contextlib.contextmanager
def grad_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of a DDP/FSDP ``module`` unless ``sync`` (accumulation)."""
    if sync:
        yield
        return
    if hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def model_state(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """The whole state dict of ``model`` on rank 0 (others may get an empty dict).

    A collective when FSDP sharded ``model``: every rank must call it.
    """
    if env.distributed and is_sharded_module(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict:
    """The whole optimizer state on rank 0 (a collective when ``model`` is sharded)."""
    if env.distributed and is_sharded_module(model):
        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, env: DistEnv
) -> None:
    """Load what `optimizer_state` returned (for a sharded model, rank 0's copy is broadcast)."""
    if env.distributed and is_sharded_module(model):
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(model, optimizer, state if env.main else {}, options=options)
        return
    optimizer.load_state_dict(state)
