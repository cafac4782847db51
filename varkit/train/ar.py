"""The AR training stage: one loop for every prediction unit.

A frozen tokenizer turns images into code maps on the fly (or the data stream hands
over codes); the unit turns codes into teacher-forcing inputs ``(b, l - l_0, c)`` and
targets ``(b, l)``; the model predicts logits ``(b, l, v)``; the loss is the
cross-entropy averaged over every position of every image.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from varkit.build import build_model, build_sampler
from varkit.checkpoint import (
    load_trainer_state,
    load_weights,
)
from varkit.errors import TrainingError
from varkit.evaluate import class_following
from varkit.generation import generate_images
from varkit.images import save_grid
from varkit.loading import prepare_ar_model
from varkit.model.loss import StepGroups, ar_loss
from varkit.train import distributed as D
from varkit.train import loop
from varkit.train.ema import EMA
from varkit.train.loop import (
    CheckpointClock,
    NonFinite,
    Precision,
    restore_data_state,
)
from varkit.train.lr import lr_at, weight_decay_at
from varkit.train.metrics import MetricsLog, peak_flops
from varkit.train.optim import build_adamw, param_groups, set_lr_wd
from varkit.train.progress import Progress
from varkit.train.state import seed_everything
from varkit.weights import load_state

log = logging.getLogger(__name__)


def sample_labels(num_classes: int, classes: int, per_class: int) -> torch.Tensor:
    """``classes`` class indices spread evenly over ``0..num_classes-1``, each ``per_class`` times."""
    picked = torch.linspace(0, num_classes - 1, min(classes, num_classes)).round().long().unique()
    return picked.repeat_interleave(per_class)


class ARTrainer:
    """Trains the AR model of a recipe into ``out_dir`` (resuming from its checkpoints).

    Args:
        recipe: the validated recipe.
        tokenizer: the tokenizer, already holding its final weights (it is frozen here).
        env: this process's place in the run.
        out_dir: the run directory.
    """

    def __init__(self, recipe, tokenizer, env: D.DistEnv, out_dir: Path):
        self.recipe, self.env, self.out_dir = recipe, env, Path(out_dir)
        self.cfg = cfg = recipe.train
        self.ckpt_root = self.out_dir / "checkpoints"
        device = env.device
        self.precision = Precision(cfg.precision, device)

        self.tokenizer = tokenizer.to(device).eval().requires_grad_(False)
        # Same seed on every rank: identical initial weights (FSDP does not broadcast them).
        seed_everything(recipe.seed)
        self.model = build_model(recipe, self.tokenizer, device=device)
        self.unit = self.model.unit
        self.micro = cfg.micro_batch(env.world_size)

        self.stream = loop.build_stream(recipe, batch_size=self.micro, env=env, tokenizer=self.tokenizer)
        self.total = cfg.total_steps(getattr(self.stream, "samples_per_epoch", None))

        self.step = 0
        self.step_dir: Path | None = None  # the latest checkpoint, once there is one
        self._pending_rng: dict[str, Any] | None = None
        trainer_state = self._resume_weights()
        # Class names into the run; fine-tuning: init weights (a fresh run only) and frozen parts.
        prepare_ar_model(
            self.model, recipe, out_dir=self.out_dir, resumed=trainer_state is not None, main=env.main
        )
        self.net = D.wrap_model(self.model, env, cfg.distributed)
        if cfg.compile:
            self.model.compile()
        self.ema = EMA(self.model, cfg.ema) if cfg.ema is not None else None
        self.optimizer = build_adamw(param_groups(self.model, cfg.weight_decay), cfg, device)
        self.scaler = self.precision.scaler()
        if trainer_state is not None and self.step < self.total:
            self._resume_state(trainer_state)

    # ---------------------------------------------------------------- resume
    def _resume_weights(self) -> dict[str, Any] | None:
        step_dir = loop.find_checkpoint(self.ckpt_root, self.env)
        if step_dir is None:
            return None
        self.step_dir = step_dir
        load_state(self.model, load_weights(step_dir, "model"), what=f"model weights of {step_dir}")
        if (step_dir / "tokenizer.safetensors").is_file():
            load_state(self.tokenizer, load_weights(step_dir, "tokenizer"), what=f"tokenizer of {step_dir}")
        state = load_trainer_state(step_dir)
        self.step = int(state["step"])
        log.info("resuming from step %d (%s)", self.step, step_dir)
        return state

    def _resume_state(self, state: dict[str, Any]) -> None:
        D.load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.cfg.distributed, self.env)
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if (self.step_dir / "ema.safetensors").is_file():
                self.ema.load_state_dict(load_weights(self.step_dir, "ema"))
            else:
                log.warning("%s has no EMA weights; the EMA starts from the current weights", self.step_dir)
        restore_data_state(self.stream, state, self.env)
        self._pending_rng = state

    # ------------------------------------------------------------------ loop
    def train(self) -> Path | None:
        """Run the remaining steps, checkpoint, sample; returns the final checkpoint directory."""
        if self.step_dir is not None and self.step >= self.total:
            log.info("AR: trained already (%s)", self.step_dir)
            return self.step_dir
        cfg, env, device = self.cfg, self.env, self.env.device
        metrics = MetricsLog(
            self.out_dir / "metrics.jsonl",
            enabled=env.main,
            tensorboard_dir=self.out_dir / "tensorboard" if cfg.tensorboard else None,
            resume_step=self.step,
        )
        batches = loop.start_batches(self.stream, self._pending_rng, self.recipe.seed, env)

        groups = StepGroups(self.unit.step_lengths, device)
        seq_len = self.unit.seq_len
        zeros = lambda: torch.zeros(seq_len, device=device, dtype=torch.float64)  # noqa: E731
        loss_sum, correct_sum, grad_norm_sum = zeros(), zeros(), torch.zeros((), device=device)
        seen, window_steps = 0, 0
        guard = NonFinite(device)
        clock = CheckpointClock(cfg.checkpoint_every, cfg.checkpoint_minutes, env)
        progress = Progress("ar", total=self.total, start=self.step, enabled=env.main)
        flops = self.model.flops_per_image(training=True) if hasattr(self.model, "flops_per_image") else None
        peak = peak_flops(device)
        last_saved = self.step if self.step_dir is not None else None
        last_good = str(self.step_dir) if self.step_dir is not None else None
        log.info(
            "training %d steps of batch %d (%d per process × %d accumulation × %d processes), "
            "%.3gM parameters",
            self.total - self.step,
            cfg.batch_size,
            self.micro,
            cfg.grad_accum,
            env.world_size,
            sum(p.numel() for p in self.model.parameters()) / 1e6,
        )
        self.model.train()
        t_window = time.perf_counter()
        try:
            while self.step < self.total:
                lr = lr_at(cfg, self.step, self.total)
                wd = weight_decay_at(cfg, self.step, self.total)
                set_lr_wd(self.optimizer, lr, wd)
                for micro in range(cfg.grad_accum):
                    batch = batches.next()
                    with D.grad_sync(self.net, micro == cfg.grad_accum - 1):
                        per_pos, correct = self._micro_step(batch)
                    guard.observe(per_pos.mean(), self.step)
                    loss_sum += per_pos.detach().sum(0, dtype=torch.float64)
                    correct_sum += correct.sum(0, dtype=torch.float64)
                    seen += per_pos.shape[0]
                grad_norm_sum += self._optimizer_step()
                self.step += 1
                window_steps += 1

                record = None
                if self.step % cfg.log_every == 0 or self.step == self.total:
                    guard.check(env, stage="AR", last_good=last_good)
                    elapsed = time.perf_counter() - t_window
                    record = self._window_record(
                        groups, loss_sum, correct_sum, seen, grad_norm_sum / window_steps, lr, wd, window_steps,
                        elapsed, flops, peak,
                    )  # fmt: skip
                    metrics.write(record)
                    loss_sum, correct_sum = zeros(), zeros()
                    grad_norm_sum = torch.zeros((), device=device)
                    seen, window_steps, t_window = 0, 0, time.perf_counter()
                progress.update(self.step, record)
                t_pause = time.perf_counter()
                if self.step < self.total and clock.due(self.step):
                    guard.check(env, stage="AR", last_good=last_good)
                    last_good = str(self._save())
                    last_saved = self.step
                    clock.saved()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < self.total:
                    self._sample(f"step-{self.step:07d}.png", metrics)
                t_window += time.perf_counter() - t_pause  # throughput counts training time only
            guard.check(env, stage="AR", last_good=last_good)
            final = self._save() if last_saved != self.step else Path(last_good)
            self._check_replicas(metrics)
            self._sample("final.png", metrics, final=True)
        finally:
            progress.close()
            metrics.close()
        return final

    def _micro_step(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one micro-batch; per-position loss and hits ``(b, l)``."""
        batch = batch.to(self.env.device, non_blocking=True)
        labels, codes = batch.labels, batch.codes
        if codes is None:
            with torch.no_grad():  # the tokenizer is frozen; encode in float32 (nearest-code search)
                codes = self.tokenizer.encode(batch.images)
        inputs = self.unit.teacher_forcing(codes, self.tokenizer)  # (b, l - l_0, c)
        targets = self.unit.targets(codes)  # (b, l)
        with self.precision.autocast():
            logits = self.net(inputs, labels)  # (b, l, v)
        per_pos = ar_loss(logits, targets, self.cfg.label_smoothing)  # (b, l)
        self.scaler.scale(per_pos.mean() / self.cfg.grad_accum).backward()
        return per_pos.detach(), (logits.detach().argmax(-1) == targets)

    def _optimizer_step(self) -> torch.Tensor:
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        norm = D.full_tensor(nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return norm.detach().float()

    def _window_record(
        self, groups, loss_sum, correct_sum, seen, grad_norm, lr, wd, steps, elapsed, flops, peak
    ) -> dict[str, Any]:
        env = self.env
        totals = torch.cat(
            [loss_sum, correct_sum, torch.tensor([float(seen)], device=loss_sum.device, dtype=torch.float64)]
        )
        D.all_reduce_sum(totals, env)
        l = loss_sum.numel()
        n = totals[-1].item()
        per_loss, per_hit = totals[:l] / n, totals[l : 2 * l] / n  # (l,) means over images
        record: dict[str, Any] = {"stage": "ar", "step": self.step}
        if getattr(self.stream, "samples_per_epoch", None):
            record["epoch"] = self.step * self.cfg.batch_size / self.stream.samples_per_epoch
        record["loss"] = per_loss.mean().item()
        record["acc"] = per_hit.mean().item()
        for name, gl, ga in zip(groups.names, groups.mean(per_loss).tolist(), groups.mean(per_hit).tolist()):
            record[f"loss/{name}"] = gl
            record[f"acc/{name}"] = ga
        record["lr"] = lr
        record["weight_decay"] = wd
        record["grad_norm"] = grad_norm.item()
        images_per_s = steps * self.cfg.batch_size / max(elapsed, 1e-9)
        record["images_per_s"] = images_per_s
        record["tokens_per_s"] = images_per_s * self.unit.seq_len
        if flops is not None and peak is not None:
            record["mfu"] = images_per_s * flops / (peak * env.world_size)
        if env.device.type == "cuda":
            record["max_memory_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
        if self.precision.name == "fp16":
            record["grad_scale"] = self.scaler.get_scale()
        return record

    # ------------------------------------------------------------ checkpoints
    def _save(self) -> Path:
        env = self.env
        mode = self.cfg.distributed
        weights = {"model": D.model_state(self.model, mode, env)}
        if self.ema is not None:
            weights["ema"] = self.ema.state_dict()
        weights["tokenizer"] = self.tokenizer.state_dict()
        optimizer = D.optimizer_state(self.model, self.optimizer, mode, env)  # collectives first
        return loop.save_stage(
            self.ckpt_root,
            step=self.step,
            total=self.total,
            env=env,
            stream=self.stream,
            recipe=self.recipe,
            keep=self.cfg.keep_checkpoints,
            weights=weights,
            optimizers={"optimizer": optimizer, "scaler": self.scaler.state_dict()},
            what="checkpoint",
        )

    def _check_replicas(self, metrics: MetricsLog) -> None:
        """Under DDP, confirm that every process ends with the same weights."""
        if not self.env.distributed or self.cfg.distributed != "ddp":
            return
        digest = hashlib.sha256()
        for _, tensor in sorted(self.model.state_dict().items()):
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests = D.gather_objects(digest.hexdigest(), self.env)
        same = len(set(digests)) == 1
        metrics.write({"stage": "ar", "step": self.step, "replicas_in_sync": same})
        if not same:
            raise TrainingError(
                f"the {self.env.world_size} processes ended with different weights: {digests}"
            )

    # --------------------------------------------------------------- samples
    def _sampling_model(self) -> nn.Module | None:
        """The (EMA) model to sample from, on rank 0; None elsewhere (a collective under FSDP)."""
        env, mode = self.env, self.cfg.distributed
        if env.distributed and mode == "fsdp":
            state = self.ema.state_dict() if self.ema is not None else D.model_state(self.model, mode, env)
            if not env.main:
                return None
            model = build_model(self.recipe, self.tokenizer, device=env.device)
            model.load_state_dict({k: v.to(env.device) for k, v in state.items()})
            return model
        return self.model if env.main else None

    @torch.no_grad()
    def _sample(self, name: str, metrics: MetricsLog, *, final: bool = False) -> None:
        """A grid of ``sample_classes`` rows × ``sample_per_class`` images into ``out_dir/samples``."""
        env, cfg = self.env, self.cfg
        model = self._sampling_model()
        if model is not None:
            num_classes = min(self.model.config.num_classes, self.recipe.data.classes)
            labels = sample_labels(num_classes, cfg.sample_classes, cfg.sample_per_class).to(env.device)
            generator = torch.Generator(device=env.device).manual_seed(self.recipe.seed)
            dtype = self.precision.dtype if env.device.type == "cuda" else None
            was_training = model.training
            model.eval()
            use_ema = self.ema is not None and model is self.model
            try:
                with self.ema.applied() if use_ema else contextlib.nullcontext():
                    images = generate_images(
                        model,
                        self.tokenizer,
                        build_sampler(self.recipe),
                        labels,
                        generator=generator,
                        dtype=dtype,
                    )
            finally:
                model.train(was_training)
            path = save_grid(images, self.out_dir / "samples" / name, nrow=cfg.sample_per_class)
            log.info("samples %s", path)
            report = class_following(images, labels, self.recipe.data) if final else None
            if report is not None:
                metrics.write({"stage": "ar", "step": self.step, **report})
                log.info(
                    "class-following of the final samples: %.3f by colour, %.3f by colour and shape",
                    report["sample_colour_accuracy"],
                    report["sample_class_accuracy"],
                )
        D.barrier(env)
