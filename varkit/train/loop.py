"""The training loop: one for every `varkit.train.stage.Stage`.

`TrainingLoop` resumes a stage from its newest complete checkpoint (weights,
optimizer and scaler states, EMA, every rank's RNG and data position; FSDP-sharded
modules through full state dicts), then runs its steps: the lr and weight-decay
schedule, ``grad_accum`` micro-batches (gradient sync on the last only), the optimizer
slots (averaging, unscaling, clipping, stepping), the EMA, a metric window read once
per log line (loss, grad norms, throughput, MFU), checkpoints by steps and by time,
previews, evaluations and the final save. Both built-in stages run through it, so
they resume, log and checkpoint the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from varkit.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    remove_leftovers,
    save_checkpoint,
    step_dir_name,
)
from varkit.data import build_train_stream
from varkit.errors import DataError, TrainingError
from varkit.train import distributed as D
from varkit.train.distributed import DistEnv, barrier, broadcast_object, gather_objects
from varkit.train.lr import lr_at, weight_decay_at
from varkit.train.metrics import MetricsLog, peak_flops
from varkit.train.optim import set_lr_wd
from varkit.train.progress import Progress
from varkit.train.stage import OptimizerSlot, Stage, WindowMeans
from varkit.train.state import capture_rng, restore_rng, seed_everything
from varkit.weights import load_state

log = logging.getLogger(__name__)

#: Steps between looks at the checkpoint timer; under torchrun each look is a collective.
TIMER_CHECK_EVERY = 10


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


# ------------------------------------------------------------------------- the parts


class Batches:
    """Endless micro-batches from a data stream with ``state_dict`` (exact resume).

    A stream that ends (one epoch) is iterated again; the stream itself decides what
    the next pass holds (a new shuffle of the next epoch).
    """

    def __init__(self, stream):
        self.stream = stream
        self._it: Iterator | None = None

    def next(self):
        if self._it is None:
            self._it = iter(self.stream)
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
        bad = ~torch.isfinite(loss.detach()).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def check(self, env: DistEnv, *, stage: str, last_good: str | None) -> None:
        """Raise `TrainingError` when any rank saw a non-finite loss."""
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
            "Lower the learning rate (lr / base_lr), keep grad_clip on, or use "
            "precision bf16 instead of fp16, then run again to resume from the checkpoint"
        )


class CheckpointClock:
    """Says when a checkpoint is due: every ``every`` steps and every ``minutes`` minutes.

    The timer is read on rank 0 and its verdict broadcast, every
    `TIMER_CHECK_EVERY` steps, so that every rank saves at the same step.
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


class MetricWindow:
    """Sums of metrics over the steps between two log lines, kept on the device.

    `add` accumulates device tensors (sums over a micro-batch's images, or one
    value per optimizer step) without reading them; `reduce` sums them over
    processes in one all-reduce, reads them in one device sync and divides each by
    the images (or steps) that had it, so a metric that starts mid-window (a
    discriminator's) is averaged over the micro-batches that had it.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0

    def add(self, stats: Mapping[str, torch.Tensor], weight: int) -> None:
        for key, value in stats.items():
            value = value.detach().to(torch.float64)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + weight

    def reduce(self, env: DistEnv) -> dict[str, torch.Tensor]:
        """Means over the window and every process (a collective under torchrun)."""
        shapes = {key: tuple(value.shape) for key, value in self.sums.items()}
        if env.distributed:  # every rank takes part with the same keys, zeros for missing ones
            for theirs in gather_objects(shapes, env):
                for key, shape in theirs.items():
                    shapes.setdefault(key, shape)
        keys = sorted(shapes)
        if not keys:
            return {}
        ref = next(iter(self.sums.values()), None)
        device = ref.device if ref is not None else env.device
        parts = []
        for key in keys:
            value = self.sums.get(key)
            parts.append(
                value.reshape(-1)
                if value is not None
                else torch.zeros(math.prod(shapes[key]), device=device, dtype=torch.float64)
            )
        counts = torch.tensor(
            [float(self.counts.get(k, 0)) for k in keys], dtype=torch.float64, device=device
        )
        flat = torch.cat([*parts, counts])
        D.all_reduce_sum(flat, env)
        flat = flat.cpu()  # the one device sync of a log line
        out, offset = {}, 0
        totals = flat[-len(keys) :]
        for i, key in enumerate(keys):
            n = math.prod(shapes[key])
            out[key] = flat[offset : offset + n].reshape(shapes[key]) / max(totals[i].item(), 1.0)
            offset += n
        return out


# ------------------------------------------------------------------ process state


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
    """Batches of ``stream``, and this rank's RNG set: the resumed checkpoint's state, or
    ``seed + 1 + rank`` (dropout etc. differ per rank).

    The stream's iterator is created lazily, at the first batch, in a fresh run and in
    a resumed one alike; a stream whose loader draws from the global RNG when it is
    created must make that draw the same in both (see
    `varkit.data.stream.TrainStream`).
    """
    batches = Batches(stream)
    if resumed is not None:
        restore_process_rng(resumed, env)
    else:
        seed_everything(seed + 1 + env.rank)
    return batches


# --------------------------------------------------------------- checkpoints of a stage


def find_checkpoint(ckpt_root: Path, env: DistEnv) -> Path | None:
    """The newest complete checkpoint a stage resumes from, after rank 0 cleared what a
    crash left behind (a damaged newer one is skipped with a warning naming it).

    Rank 0 decides and tells the others, so every rank resumes from the same one.
    """
    found = None
    if env.main:
        remove_leftovers(ckpt_root)
        found = latest_checkpoint(ckpt_root)
    found = broadcast_object(None if found is None else str(found), env)
    return None if found is None else Path(found)


def save_stage(
    ckpt_root: Path,
    *,
    step: int,
    total: int,
    env: DistEnv,
    stream,
    recipe: dict[str, Any],
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
            ckpt_root, step, weights=weights, trainer_state=state, recipe=recipe, keep=keep
        )
        log.info("%s %s", what, path)
    barrier(env)
    return path


# ------------------------------------------------------------------------- the loop


class TrainingLoop:
    """Runs a `varkit.train.stage.Stage` to its last step, resuming where it stopped.

    Args:
        stage: the stage, built (modules with their seeded weights, data stream).
        recipe: the resolved recipe stored with every checkpoint (plain data).
    """

    def __init__(self, stage: Stage, *, recipe: dict[str, Any]):
        self.stage = stage
        self.recipe = recipe
        self.env = stage.env
        self.config = stage.config
        self.step = 0
        self.step_dir: Path | None = None  # the checkpoint resumed from, then the latest written
        self.slots: list[OptimizerSlot] = []
        self._resumed: dict[str, Any] | None = None
        self._ready = False

    @property
    def done(self) -> bool:
        return self.step >= self.stage.total

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Load the newest checkpoint (or the stage's initial weights), distribute, build
        the optimizers and restore their states."""
        stage, env = self.stage, self.env
        self.step_dir = find_checkpoint(stage.ckpt_root, env)
        state = None
        if self.step_dir is not None:
            for name, module in stage.modules().items():
                load_state(
                    module, load_weights(self.step_dir, name), what=f"{name} weights of {self.step_dir}"
                )
            state = load_trainer_state(self.step_dir)
            self.step = int(state["step"])
            log.info("%s: resuming from step %d (%s)", stage.title, self.step, self.step_dir)
        else:
            stage.load_initial_weights()
        stage.distribute()
        self.slots = stage.optimizer_slots()
        if state is not None and not self.done:
            self._restore(state)
            self._resumed = state
        self._ready = True

    def _restore(self, state: dict[str, Any]) -> None:
        stage, env, step_dir = self.stage, self.env, self.step_dir
        for slot in self.slots:
            if state.get(slot.state_key) is not None:
                D.load_optimizer_state(slot.module, slot.optimizer, state[slot.state_key], env)
            else:
                log.warning("%s has no %s state; that optimizer starts afresh", step_dir, slot.state_key)
            if state.get(slot.scaler_key):
                slot.scaler.load_state_dict(state[slot.scaler_key])
        if stage.ema is not None:
            if (step_dir / "ema.safetensors").is_file():
                stage.ema.load_state_dict(load_weights(step_dir, "ema"))
            else:
                log.warning("%s has no EMA weights; the EMA starts from the current weights", step_dir)
        restore_data_state(stage.stream, state, env)

    # ------------------------------------------------------------------- run
    def run(self) -> Path | None:
        """Run the remaining steps; returns the final checkpoint directory."""
        if not self._ready:
            self.setup()
        stage, cfg, env = self.stage, self.config, self.env
        if self.step_dir is not None and self.done:
            log.info("%s: trained already (%s)", stage.title, self.step_dir)
            return self.step_dir
        metrics = MetricsLog(
            stage.root / "metrics.jsonl",
            enabled=env.main,
            tensorboard_dir=stage.root / "tensorboard" if cfg.tensorboard else None,
            resume_step=self.step,
        )
        batches = start_batches(stage.stream, self._resumed, stage.seed, env)
        guard = NonFinite(env.device)
        clock = CheckpointClock(cfg.checkpoint_every, cfg.checkpoint_minutes, env)
        progress = Progress(stage.name, total=stage.total, start=self.step, enabled=env.main)
        window = MetricWindow()
        peak = peak_flops(env.device)
        flops = stage.flops_per_image()
        count_flops = flops is None and peak is not None
        last_saved = self.step if self.step_dir is not None else None
        last_good = str(self.step_dir) if self.step_dir is not None else None
        log.info(
            "%s: training %d steps of batch %d (%d per process × %d accumulation × %d processes), "
            "%.3gM parameters",
            stage.title,
            stage.total - self.step,
            cfg.batch_size,
            cfg.micro_batch(env.world_size),
            cfg.grad_accum,
            env.world_size,
            sum(p.numel() for slot in self.slots for p in slot.params) / 1e6,
        )
        stage.train_mode()
        t_window = time.perf_counter()
        try:
            while not self.done:
                lr = lr_at(cfg, self.step, stage.total)
                wd = weight_decay_at(cfg, self.step, stage.total)
                for slot in self.slots:
                    set_lr_wd(slot.optimizer, lr, wd)
                for micro in range(cfg.grad_accum):
                    batch = batches.next()
                    with self._sync(micro == cfg.grad_accum - 1):
                        if count_flops:
                            with FlopCounterMode(display=False) as counter:
                                stats = stage.forward_backward(batch, step=self.step)
                            flops, count_flops = counter.get_total_flops() / max(len(batch), 1), False
                        else:
                            stats = stage.forward_backward(batch, step=self.step)
                    for key in stage.guarded:
                        if key in stats:
                            guard.observe(stats[key], self.step)
                    window.add(stats, len(batch))
                window.add(self._optimizer_step(), 1)
                if stage.ema is not None:
                    stage.ema.update()
                self.step += 1
                window.steps += 1

                record = None
                if self.step % cfg.log_every == 0 or self.done:
                    guard.check(env, stage=stage.title, last_good=last_good)
                    record = self._record(window, time.perf_counter() - t_window, lr, wd, flops, peak)
                    metrics.write(record)
                    window, t_window = MetricWindow(), time.perf_counter()
                progress.update(self.step, record)
                t_pause = time.perf_counter()
                if not self.done and clock.due(self.step):
                    guard.check(env, stage=stage.title, last_good=last_good)
                    last_good, last_saved = str(self._save()), self.step
                    clock.saved()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and not self.done:
                    self._write(metrics, stage.preview(step_dir_name(self.step), final=False))
                if stage.eval_every and self.step % stage.eval_every == 0 and not self.done:
                    self._write(metrics, stage.evaluate(self.step, final=False))
                t_window += time.perf_counter() - t_pause  # throughput counts training time only
            guard.check(env, stage=stage.title, last_good=last_good)
            final = self._save() if last_saved != self.step else Path(last_good)
            self._check_replicas(metrics)
            self._write(metrics, stage.preview("final", final=True))
            if stage.eval_every:
                self._write(metrics, stage.evaluate(self.step, final=True))
        finally:
            progress.close()
            metrics.close()
        return final

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradient sync of a DDP/FSDP ``net`` on the last micro-batch of a step only."""
        net = self.stage.net
        return D.grad_sync(net, last) if net is not None else contextlib.nullcontext()

    def _optimizer_step(self) -> dict[str, torch.Tensor]:
        norms = {}
        for slot in self.slots:
            if slot.average_gradients:
                D.average_gradients(slot.params, self.env)
            if not any(p.grad is not None for p in slot.params):
                continue  # nothing to step (a discriminator before it starts)
            slot.scaler.unscale_(slot.optimizer)
            clip = slot.clip if slot.clip > 0 else math.inf
            norm = D.full_tensor(nn.utils.clip_grad_norm_(slot.params, clip))
            slot.scaler.step(slot.optimizer)
            slot.scaler.update()
            slot.optimizer.zero_grad(set_to_none=True)
            norms[slot.metric] = norm.detach()
        return norms

    def _record(self, window: MetricWindow, seconds: float, lr, wd, flops, peak) -> dict[str, Any]:
        stage, cfg, env = self.stage, self.config, self.env
        means = window.reduce(env)
        slot_norms = {slot.metric: means.pop(slot.metric) for slot in self.slots if slot.metric in means}
        summary = WindowMeans(
            means=means, steps=window.steps, images=window.steps * cfg.batch_size, seconds=seconds
        )
        record: dict[str, Any] = {"stage": stage.name, "step": self.step}
        samples = getattr(stage.stream, "samples_per_epoch", None)
        if samples:
            record["epoch"] = self.step * cfg.batch_size / samples
        record.update(stage.summarize(summary))
        record["lr"] = lr
        record["weight_decay"] = wd
        record.update({key: value.item() for key, value in slot_norms.items()})
        record["images_per_s"] = summary.images_per_s
        if flops is not None and peak is not None:
            record["mfu"] = summary.images_per_s * flops / (peak * env.world_size)
        if env.device.type == "cuda":
            record["max_memory_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
        for slot in self.slots:
            if slot.scaler.is_enabled():
                record[f"grad_scale{'_' + slot.name if slot.name else ''}"] = slot.scaler.get_scale()
        return record

    def _write(self, metrics: MetricsLog, record: dict[str, Any] | None) -> None:
        if record:
            metrics.write({"stage": self.stage.name, "step": self.step, **record})

    def _save(self) -> Path:
        stage, env = self.stage, self.env
        # Collectives first (full state dicts of FSDP-sharded modules), in the same
        # order on every rank; rank 0 then writes.
        weights = {name: D.model_state(module, env) for name, module in stage.modules().items()}
        if stage.ema is not None:
            weights["ema"] = stage.ema.state_dict()
        optimizers: dict[str, Any] = {}
        for slot in self.slots:
            optimizers[slot.state_key] = D.optimizer_state(slot.module, slot.optimizer, env)
            optimizers[slot.scaler_key] = slot.scaler.state_dict()
        self.step_dir = save_stage(
            stage.ckpt_root,
            step=self.step,
            total=stage.total,
            env=env,
            stream=stage.stream,
            recipe=self.recipe,
            keep=self.config.keep_checkpoints,
            weights=weights,
            optimizers=optimizers,
            what=f"{stage.title} checkpoint",
        )
        return self.step_dir

    def _check_replicas(self, metrics: MetricsLog) -> None:
        """With replicated modules on several processes, confirm they ended the same."""
        stage, env = self.stage, self.env
        modules = stage.modules()
        if not env.distributed or any(D.is_sharded_module(m) for m in modules.values()):
            return
        digest = hashlib.sha256()
        for name, module in modules.items():
            for key, tensor in sorted(module.state_dict().items()):
                digest.update(f"{name}.{key}".encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests = gather_objects(digest.hexdigest(), env)
        same = len(set(digests)) == 1
        metrics.write({"stage": stage.name, "step": self.step, "replicas_in_sync": same})
        if not same:
            raise TrainingError(f"the {env.world_size} processes ended with different weights: {digests}")
