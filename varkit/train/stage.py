"""What the training loop trains: the `Stage` protocol and its optimizer slots.

A stage owns its modules, its data stream and its loss; `varkit.train.loop` owns
everything around them, the same for every stage: resuming (weights, optimizer and
scaler states, EMA, RNG and data position, FSDP-aware), the lr and weight-decay
schedule, gradient accumulation, clipping, the metric window and MFU, checkpoints,
previews and the final save. The AR model (`varkit.train.ar.ARStage`) and the
tokenizer (`varkit.train.tokenizer.TokenizerStage`) are the built-in stages.

The loop calls a stage in this order::

    stage = SomeStage(...)             # builds modules and stream (seeded, fresh weights)
    stage.modules()                    # resume: checkpoint weights loaded into these ...
    stage.load_initial_weights()       # ... or, with no checkpoint, the stage's start weights
    stage.distribute()                 # activation checkpointing, compile, DDP/FSDP, EMA
    stage.optimizer_slots()            # optimizers over the (now wrapped) parameters
    stage.train_mode()
    stage.forward_backward(batch, step=...)   # × grad_accum per optimizer step
    stage.summarize(window)                   # at log steps
    stage.preview(tag, final=...)             # every sample_every steps and at the end
    stage.evaluate(step, final=...)           # every eval_every steps and at the end
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from varkit.errors import TrainingError
from varkit.recipe.train import StageConfig
from varkit.train.distributed import DistEnv
from varkit.train.ema import EMA

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast of one precision setting, and the grad scalers fp16 needs.

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16`` (``StageConfig.precision``).
        device: where the model runs; autocast follows its type (CPU autocast exists
            for bf16 and fp16).
    """

    def __init__(self, precision: str, device: torch.device):
        self.name = precision
        self.device = device
        self.dtype = AUTOCAST_DTYPES[precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A grad scaler; a pass-through unless the precision is fp16 (VAR's choice)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")


@attrs.define(kw_only=True, eq=False)
class OptimizerSlot:
    """One optimizer of a stage, with its parameters, grad scaler and clipping.

    After the micro-batches of a step the loop, for each slot in order: averages the
    gradients over processes when ``average_gradients`` (modules without a DDP/FSDP
    wrapper), skips the slot when none of its parameters got a gradient (a
    discriminator before it starts), unscales, clips the global norm to ``clip`` (0:
    measured, not clipped), steps, updates the scaler and zeroes the gradients.

    Attributes:
        name: "" for a stage's main optimizer, else a suffix: the slot's states are
            saved as ``optimizer[_name]`` and ``scaler[_name]`` in ``trainer.pt`` and
            its gradient norm is logged as ``[name_]grad_norm``.
        optimizer: the optimizer (its param groups carry ``name`` ``decay``/``no_decay``
            for the weight-decay schedule, see `varkit.train.optim.param_groups`).
        params: the parameters it steps and whose gradient norm it clips.
        module: the module those parameters belong to (FSDP gathers and scatters the
            optimizer state through it).
        scaler: the grad scaler of its loss (a pass-through except with fp16).
        clip: gradient-norm clip; 0 turns clipping off.
        average_gradients: average the gradients over processes before stepping.
    """

    name: str = ""
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    module: nn.Module
    scaler: torch.amp.GradScaler
    clip: float = 0.0
    average_gradients: bool = False

    @property
    def state_key(self) -> str:
        return f"optimizer_{self.name}" if self.name else "optimizer"

    @property
    def scaler_key(self) -> str:
        return f"scaler_{self.name}" if self.name else "scaler"

    @property
    def metric(self) -> str:
        return f"{self.name}_grad_norm" if self.name else "grad_norm"


@attrs.frozen
class WindowMeans:
    """The metrics of one log window, reduced over processes (what ``summarize`` gets).

    Attributes:
        means: each metric a stage returned from ``forward_backward``, summed over the
            window's micro-batches and every process and divided by the images that
            had it: CPU float64 tensors of the shape the stage returned.
        steps: optimizer steps in the window.
        images: images trained on in the window, over all processes.
        seconds: wall time of the window's training (previews and saves left out).
    """

    means: Mapping[str, torch.Tensor]
    steps: int
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


class Stage:
    """Base class of what the training loop trains (see the module docstring for the order).

    A subclass sets the attributes below in its ``__init__`` (building its modules
    from the seed, and its data stream) and implements `modules`,
    `optimizer_slots` and `forward_backward`; the other methods have
    defaults.

    Attributes:
        name: the stage in metrics records and progress bars (``ar``, ``tokenizer``).
        title: the stage in log lines and errors (``AR``, ``tokenizer``).
        config: the stage's recipe section.
        seed: the run's seed (the loop seeds each rank with ``seed + 1 + rank``).
        env: this process's place in the run.
        root: the stage's directory: ``checkpoints/``, ``metrics.jsonl``, ``samples/``.
        stream: the data stream: iterable of batches with ``state_dict`` and
            ``load_state_dict`` (exact resume) and, when it knows it,
            ``samples_per_epoch``.
        total: optimizer steps of the run.
        net: the module the forward and backward run through after
            `distribute` (a DDP wrapper or the FSDP-sharded model): the loop
            skips its gradient sync on all but the last micro-batch of a step. None
            when no module syncs its own gradients (slots with
            ``average_gradients`` are averaged once per step instead).
        ema: an EMA of weights the loop updates after every step, saves as
            ``ema.safetensors`` and restores; None for none.
        guarded: keys of ``forward_backward``'s result that must stay finite (the
            loop stops the run at the first step where one is not).
        eval_every: steps between calls of `evaluate`; 0 for none.
    """

    name: str
    title: str
    config: StageConfig
    seed: int
    env: DistEnv
    root: Path
    stream: Any
    total: int
    net: nn.Module | None = None
    ema: EMA | None = None
    guarded: tuple[str, ...] = ("loss",)
    eval_every: int = 0

    @property
    def ckpt_root(self) -> Path:
        return self.root / "checkpoints"

    @staticmethod
    def micro_batch(config: StageConfig, env: DistEnv) -> int:
        """Images per process per micro-batch; a `TrainingError` when the batch does
        not split over the processes and accumulation steps of this run."""
        try:
            return config.micro_batch(env.world_size)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None

    @staticmethod
    def total_steps(config: StageConfig, stream: Any) -> int:
        """Optimizer steps of the run; a `TrainingError` for epochs over a stream of
        unknown size."""
        try:
            return config.total_steps(getattr(stream, "samples_per_epoch", None))
        except ValueError as exc:
            raise TrainingError(str(exc)) from None

    # -- weights ---------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        """The modules a checkpoint holds, by file name (``model`` -> ``model.safetensors``).

        Before `distribute` the loop loads a resumed checkpoint's weights into
        them; every checkpoint saves their whole state dicts.
        """
        raise NotImplementedError

    def load_initial_weights(self) -> None:
        """Load the weights a fresh run starts from (not called when resuming).

        Called before `distribute` and `optimizer_slots`, so the optimizer
        and the schedule start fresh over them. The default keeps the seeded
        initialisation; a stage that fine-tunes from pretrained weights loads them here.
        """

    def distribute(self) -> None:
        """Prepare the modules for training on this process and set `net`.

        Activation checkpointing and compilation come before the DDP/FSDP wrap; the
        EMA, if any, is built here, after the wrap (over the sharded parameters under
        FSDP). The default trains the modules as they are.
        """

    def optimizer_slots(self) -> list[OptimizerSlot]:
        """The stage's optimizers (called once, after `distribute`)."""
        raise NotImplementedError

    def train_mode(self) -> None:
        """Put the trained modules in training mode (frozen ones stay in eval mode)."""
        for module in self.modules().values():
            module.train()

    # -- a step ----------------------------------------------------------------
    def forward_backward(self, batch: Any, *, step: int) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch (``step``: optimizer steps done).

        Scale each loss by ``1 / config.grad_accum`` and its slot's scaler before its
        backward. Return the metrics as device tensors holding sums over the
        micro-batch's images (any shape; the same keys and shapes on every process
        when they are present): the loop adds them up without reading them, and
        `summarize` gets them divided by the images.
        """
        raise NotImplementedError

    def summarize(self, window: WindowMeans) -> dict[str, Any]:
        """This stage's part of a metrics record; the default writes every scalar mean."""
        return {key: value.item() for key, value in window.means.items() if value.numel() == 1}

    def flops_per_image(self) -> float | None:
        """FLOPs of one image's forward and backward, for MFU; None counts the first step.

        When None (and the device's peak is known) the loop counts the FLOPs of the
        run's first micro-batch with ``torch.utils.flop_counter.FlopCounterMode``.
        """
        return None

    # -- outputs ---------------------------------------------------------------
    def preview(self, tag: str, *, final: bool) -> dict[str, Any] | None:
        """Write a preview (``tag``: ``step-0001000`` or ``final``) under ``root/samples``.

        Every process calls it (it may hold collectives). Returns metrics for
        ``metrics.jsonl``, or None.
        """
        return None

    def evaluate(self, step: int, *, final: bool) -> dict[str, Any] | None:
        """A periodic evaluation, every `eval_every` steps and at the end.

        Every process calls it. Returns metrics for ``metrics.jsonl``, or None. The
        default evaluates nothing.
        """
        return None
