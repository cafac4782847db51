"""An exponential moving average of a module's parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import distribute_tensor

from varkit.train.distributed import full_tensor, is_sharded


class EMA:
    """``shadow = decay · shadow + (1 - decay) · param`` after every optimizer step.

    The shadow tensors have the parameters' own layout (sharded under FSDP), so an EMA
    costs one more copy of the weights per process, no more.

    Args:
        module: the module whose parameters are averaged (the unwrapped model).
        decay: the EMA decay, e.g. 0.9999.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.module = module
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average: every shadow tensor in one ``torch._foreach_lerp_``.

        One multi-tensor kernel per dtype and device instead of one kernel per
        parameter (hundreds at d16); each element is the same ``lerp`` as a
        per-tensor update's.
        """
        names = list(self.shadow)
        params = dict(self.module.named_parameters())
        torch._foreach_lerp_(
            [self.shadow[n] for n in names], [params[n].detach() for n in names], 1.0 - self.decay
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights with the module's buffers: a state dict of the module.

        A collective under FSDP (every rank must call it).
        """
        # The module's own state dict gives the persistent buffers (and skips the
        # non-persistent ones, which a strict load would reject); the weights are swapped.
        state = {name: t for name, t in self.module.state_dict().items() if name not in self.shadow}
        state.update({name: full_tensor(t) for name, t in self.shadow.items()})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load averaged weights saved by `state_dict` (buffers are ignored)."""
        for name, shadow in self.shadow.items():
            value = state[name]
            if is_sharded(shadow):
                value = distribute_tensor(
                    value.to(shadow.device_mesh.device_type), shadow.device_mesh, shadow.placements
                )
            shadow.copy_(value)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The module holds the averaged weights inside the block, its own again after."""
        params = dict(self.module.named_parameters())
        backup = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])
