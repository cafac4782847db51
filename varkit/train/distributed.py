"""Process groups and model wrappers for ``torchrun`` scale-out.

Everything here takes a :class:`DistEnv` (rank, world size, device) explicitly; the
only process-wide state is PyTorch's default process group, created once by
:func:`init_distributed` from the variables torchrun sets.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

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
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

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
    """The :class:`DistEnv` that torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` describe.

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


#: Block methods the model calls outside ``block.forward``; FSDP gathers weights for them too.
BLOCK_METHODS_OUTSIDE_FORWARD = ("modulation",)


def wrap_model(model: nn.Module, env: DistEnv, mode: str) -> nn.Module:
    """The module to run forward and backward through.

    One process: ``model`` itself. DDP: a ``DistributedDataParallel`` wrapper (it
    broadcasts rank 0's weights at construction). FSDP: ``model`` sharded in place with
    ``fully_shard``, each block of ``model.blocks`` on its own, then the root.
    """
    if not env.distributed:
        return model
    if mode == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    if mode == "fsdp":
        for block in getattr(model, "blocks", ()):
            fully_shard(block)
            # The transformer computes every block's AdaLN modulation before running the
            # blocks; FSDP must gather a block's weights for that method too.
            for method in BLOCK_METHODS_OUTSIDE_FORWARD:
                if hasattr(block, method):
                    register_fsdp_forward_method(block, method)
        fully_shard(model)
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


def model_state(model: nn.Module, mode: str, env: DistEnv) -> dict[str, torch.Tensor]:
    """The whole state dict of ``model`` on rank 0 (others may get an empty dict).

    A collective under FSDP: every rank must call it.
    """
    if env.distributed and mode == "fsdp":
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str, env: DistEnv) -> dict:
    """The whole optimizer state on rank 0 (a collective under FSDP)."""
    if env.distributed and mode == "fsdp":
        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, mode: str, env: DistEnv
) -> None:
    """Load what :func:`optimizer_state` returned (under FSDP, rank 0's copy is broadcast)."""
    if env.distributed and mode == "fsdp":
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(model, optimizer, state if env.main else {}, options=options)
        return
    optimizer.load_state_dict(state)
