"""What the AR and tokenizer training loops share: precision, batches, clocks, guards."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from varkit.checkpoint import latest_checkpoint, remove_leftovers, save_checkpoint, step_dir_name
from varkit.data import build_train_stream
from varkit.errors import DataError, TrainingError
from varkit.train.distributed import DistEnv, barrier, broadcast_object, gather_objects
from varkit.train.state import capture_rng, restore_rng, seed_everything

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Steps between looks at the checkpoint timer; under torchrun each look is a collective.
TIMER_CHECK_EVERY = 10


class Precision:
    """Autocast of one precision setting, and the grad scalers fp16 needs.

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16`` (``TrainConfig.precision``).
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


def build_stream(recipe, *, batch_size: int, env: DistEnv, tokenizer=None):
    """The recipe's training stream for this rank (``varkit.data.build_train_stream``)."""
    return build_train_stream(
        recipe.data,
        batch_size=batch_size,
        seed=recipe.seed,
        rank=env.rank,
        world_size=env.world_size,
        tokenizer=tokenizer,
    )


class Batches:
    """Endless micro-batches from a data stream with ``state_dict`` (exact resume).

    A stream that ends (one epoch) is iterated again; the stream itself decides what
    the next pass holds (a new shuffle of the next epoch).
    """

    def __init__(self, stream):
        self.stream = stream
        self._it: Iterator | None = None

    def start(self) -> None:
        """Create the iterator (it may draw from the global RNG: call before restoring it)."""
        self._it = iter(self.stream)

    def next(self):
        if self._it is None:
            self.start()
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.stream)
            try:
                return next(self._it)
            except StopIteration:
                raise DataError(
                    "the training data stream yields no batches; check data.* in the recipe"
                ) from None


class NonFinite:
    """Remembers the first step whose loss was NaN or inf, without syncing the device.

    ``observe`` is called every step with the loss tensor; ``check`` (at log steps,
    before each checkpoint and at the end) reads the result once and raises.
    """

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def check(self, env: DistEnv, *, stage: str, last_good: str | None) -> None:
        """Raise :class:`TrainingError` when any rank saw a non-finite loss."""
        flag = self.first_bad.clone()
        if env.distributed:
            flag = torch.where(flag < 0, torch.iinfo(torch.long).max, flag)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            flag = torch.where(flag == torch.iinfo(torch.long).max, -1, flag)
        step = int(flag.item())
        if step < 0:
            return
        kept = (
            f"the last good checkpoint, {last_good}, is kept"
            if last_good
            else "no checkpoint was written yet"
        )
        raise TrainingError(
            f"{stage} training stopped: the loss became NaN or infinite at step {step + 1}; {kept}. "
            "Lower the learning rate (train.lr / train.base_lr), keep train.grad_clip on, or use "
            "precision bf16 instead of fp16, then run again to resume from the checkpoint"
        )


class CheckpointClock:
    """Says when a checkpoint is due: every ``every`` steps and every ``minutes`` minutes.

    The timer is read on rank 0 and its verdict broadcast, every
    :data:`TIMER_CHECK_EVERY` steps, so that every rank saves at the same step.
    """

    def __init__(self, every: int, minutes: float, env: DistEnv):
        self.every, self.seconds, self.env = every, minutes * 60.0, env
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every and step % self.every == 0:
            return True
        if not self.seconds or step % TIMER_CHECK_EVERY:
            return False
        late = time.monotonic() - self.last >= self.seconds
        return bool(broadcast_object(late, self.env))

    def saved(self) -> None:
        self.last = time.monotonic()


def gather_process_state(stream, env: DistEnv) -> dict[str, list[Any]]:
    """Every rank's RNG and data-stream state, in rank order (a collective)."""
    mine = {"rng": capture_rng(env.device), "data": stream.state_dict()}
    states = gather_objects(mine, env)
    return {"rng": [s["rng"] for s in states], "data": [s["data"] for s in states]}


def restore_data_state(stream, state: dict[str, Any], env: DistEnv) -> bool:
    """Load this rank's data-stream state; False (with a warning) when the world size changed."""
    data = state.get("data") or []
    if len(data) != env.world_size:
        log.warning(
            "the checkpoint was written by %d processes and this run has %d: the data order "
            "starts afresh, so the run will not repeat the uninterrupted one exactly",
            len(data),
            env.world_size,
        )
        return False
    stream.load_state_dict(data[env.rank])
    return True


def restore_process_rng(state: dict[str, Any], env: DistEnv) -> None:
    """Restore this rank's RNG state when the checkpoint has one for it."""
    rngs = state.get("rng") or []
    if len(rngs) == env.world_size:
        restore_rng(rngs[env.rank], env.device)


def start_batches(stream, resumed: dict[str, Any] | None, seed: int, env: DistEnv) -> Batches:
    """Start reading ``stream``, then set this rank's RNG: the resumed checkpoint's state,
    or ``seed + 1 + rank`` (dropout etc. differ per rank). RNG last: creating the
    iterator may draw from it, as it did in the first run."""
    batches = Batches(stream)
    batches.start()
    if resumed is not None:
        restore_process_rng(resumed, env)
    else:
        seed_everything(seed + 1 + env.rank)
    return batches


# ---------------------------------------------------------------- checkpoints of a stage


def find_checkpoint(ckpt_root: Path, env: DistEnv) -> Path | None:
    """The checkpoint a stage resumes from, after rank 0 cleared what a crash left behind."""
    if env.main:
        remove_leftovers(ckpt_root)
    barrier(env)
    return latest_checkpoint(ckpt_root)


def save_stage(
    ckpt_root: Path,
    *,
    step: int,
    total: int,
    env: DistEnv,
    stream,
    recipe,
    keep: int,
    weights: dict[str, dict[str, torch.Tensor]],
    optimizers: dict[str, Any],
    what: str,
) -> Path:
    """Checkpoint a training stage (every rank calls it): ``weights`` as safetensors, and
    beside them the step, ``optimizers`` (optimizer and scaler states by name) and every
    rank's RNG and data-stream state. Returns the step directory."""
    process = gather_process_state(stream, env)
    path = ckpt_root / step_dir_name(step)
    if env.main:
        state = {"step": step, "total": total, "world_size": env.world_size, **optimizers, **process}
        path = save_checkpoint(
            ckpt_root, step, weights=weights, trainer_state=state, recipe=recipe.to_dict(), keep=keep
        )
        log.info("%s %s", what, path)
    barrier(env)
    return path
