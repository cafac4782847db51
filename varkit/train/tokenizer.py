"""The tokenizer training stage: ``tokenizer.training_losses`` with a second optimizer
for the discriminator, into ``out_dir/tokenizer`` (its own checkpoints and metrics).

Tokenizers are small next to the AR model, so every process holds the whole tokenizer
and the gradients are averaged explicitly (``training_losses`` is not ``forward``,
which DDP would need); FSDP does not apply here.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from varkit.build import build_tokenizer
from varkit.checkpoint import (
    checkpoint_step,
    load_trainer_state,
    load_weights,
)
from varkit.errors import RecipeError
from varkit.images import save_grid
from varkit.train import distributed as D
from varkit.train import loop
from varkit.train.loop import (
    CheckpointClock,
    NonFinite,
    Precision,
    restore_data_state,
)
from varkit.train.lr import lr_at, weight_decay_at
from varkit.train.metrics import MetricsLog
from varkit.train.optim import build_adamw, param_groups, set_lr_wd
from varkit.train.progress import Progress
from varkit.train.state import seed_everything
from varkit.weights import load_state

log = logging.getLogger(__name__)


class TokenizerTrainer:
    """Trains the recipe's tokenizer into ``out_dir/tokenizer``, resuming when it can.

    Args:
        recipe: the validated recipe (its ``tokenizer_train`` section drives this stage).
        env: this process's place in the run.
        out_dir: the run directory; the stage writes under ``out_dir/tokenizer``.
    """

    def __init__(self, recipe, env: D.DistEnv, out_dir: Path):
        if recipe.data.source == "codes":
            raise RecipeError(
                "tokenizer_train is enabled but data.source is 'codes': training a tokenizer needs "
                "images; use data.source synthetic or shards, or set tokenizer.weights"
            )
        self.recipe, self.env = recipe, env
        self.cfg = cfg = recipe.tokenizer_train
        self.root = Path(out_dir) / "tokenizer"
        self.ckpt_root = self.root / "checkpoints"
        device = env.device
        self.precision = Precision(cfg.precision, device)
        seed_everything(recipe.seed)
        self.tokenizer = build_tokenizer(recipe, device=device)
        self.micro = cfg.micro_batch(env.world_size)

        self.stream = loop.build_stream(recipe, batch_size=self.micro, env=env)
        self.total = cfg.total_steps(getattr(self.stream, "samples_per_epoch", None))

        self.disc_params = [p for p in self.tokenizer.discriminator_parameters() if p.requires_grad]
        disc_ids = {id(p) for p in self.disc_params}
        self.gen_params = [
            p for p in self.tokenizer.parameters() if p.requires_grad and id(p) not in disc_ids
        ]
        self.opt_g = build_adamw(
            param_groups(self.tokenizer, cfg.weight_decay, exclude=self.disc_params), cfg, device
        )
        self.opt_d = (
            build_adamw(param_groups(self.tokenizer, cfg.weight_decay, exclude=self.gen_params), cfg, device)
            if self.disc_params
            else None
        )
        self.scaler_g, self.scaler_d = self.precision.scaler(), self.precision.scaler()

        self.step = 0
        self.step_dir: Path | None = None
        self._pending: dict[str, Any] | None = None
        self._resume()

    def _resume(self) -> None:
        step_dir = loop.find_checkpoint(self.ckpt_root, self.env)
        if step_dir is None:
            return
        load_state(self.tokenizer, load_weights(step_dir, "tokenizer"), what=f"tokenizer of {step_dir}")
        state = load_trainer_state(step_dir)
        self.step, self.step_dir = int(state["step"]), step_dir
        if self.step >= self.total:
            return
        log.info("tokenizer: resuming from step %d (%s)", self.step, step_dir)
        self.opt_g.load_state_dict(state["optimizer"])
        if self.opt_d is not None and state.get("optimizer_disc") is not None:
            self.opt_d.load_state_dict(state["optimizer_disc"])
        self.scaler_g.load_state_dict(state["scaler"])
        if state.get("scaler_disc"):
            self.scaler_d.load_state_dict(state["scaler_disc"])
        restore_data_state(self.stream, state, self.env)
        self._pending = state

    @property
    def done(self) -> bool:
        return self.step >= self.total

    def train(self) -> nn.Module:
        """Run the remaining steps; returns the trained tokenizer (eval mode, frozen)."""
        if self.done:
            log.info("tokenizer: trained already (%s)", self.step_dir)
            return self.tokenizer.eval().requires_grad_(False)
        cfg, env, device = self.cfg, self.env, self.env.device
        metrics = MetricsLog(
            self.root / "metrics.jsonl",
            enabled=env.main,
            tensorboard_dir=self.root / "tensorboard" if cfg.tensorboard else None,
            resume_step=self.step,
        )
        batches = loop.start_batches(self.stream, self._pending, self.recipe.seed, env)
        guard = NonFinite(device)
        clock = CheckpointClock(cfg.checkpoint_every, cfg.checkpoint_minutes, env)
        progress = Progress("tokenizer", total=self.total, start=self.step, enabled=env.main)
        last_good = str(self.step_dir) if self.step_dir else None
        last_saved = checkpoint_step(self.step_dir) if self.step_dir else None
        window: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        window_steps, t_window = 0, time.perf_counter()
        preview = None
        self.tokenizer.train()
        log.info("tokenizer: training %d steps of batch %d", self.total - self.step, cfg.batch_size)
        try:
            while self.step < self.total:
                lr = lr_at(cfg, self.step, self.total)
                wd = weight_decay_at(cfg, self.step, self.total)
                set_lr_wd(self.opt_g, lr, wd)
                if self.opt_d is not None:
                    set_lr_wd(self.opt_d, lr, wd)
                step_stats: dict[str, torch.Tensor] = {}
                for _ in range(cfg.grad_accum):
                    images = batches.next().to(device, non_blocking=True).images
                    if preview is None:
                        preview = images[:8].detach().clone()
                    for key, value in self._micro_step(images, guard).items():
                        step_stats[key] = step_stats.get(key, 0.0) + value / cfg.grad_accum
                step_stats |= self._optimizer_steps()
                for key, value in step_stats.items():
                    # Summed on the device; a metric that starts mid-window (the
                    # discriminator's) is averaged over the steps that had it.
                    window[key] = window.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
                self.step += 1
                window_steps += 1
                record = None
                if self.step % cfg.log_every == 0 or self.step == self.total:
                    guard.check(env, stage="tokenizer", last_good=last_good)
                    elapsed = time.perf_counter() - t_window
                    record = {"stage": "tokenizer", "step": self.step}
                    record.update(self._reduce_window(window, counts))
                    record["lr"] = lr
                    record["images_per_s"] = window_steps * cfg.batch_size / max(elapsed, 1e-9)
                    metrics.write(record)
                    window, counts, window_steps, t_window = {}, {}, 0, time.perf_counter()
                progress.update(self.step, record)
                t_pause = time.perf_counter()
                if self.step < self.total and clock.due(self.step):
                    guard.check(env, stage="tokenizer", last_good=last_good)
                    last_good, last_saved = str(self._save()), self.step
                    clock.saved()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < self.total:
                    self._reconstruct(preview, f"recon-{self.step:07d}.png")
                t_window += time.perf_counter() - t_pause  # throughput counts training time only
            guard.check(env, stage="tokenizer", last_good=last_good)
            if last_saved != self.step:
                self._save()
            self._reconstruct(preview, "recon-final.png")
        finally:
            progress.close()
            metrics.close()
        return self.tokenizer.eval().requires_grad_(False)

    def _micro_step(self, images: torch.Tensor, guard: NonFinite) -> dict[str, float]:
        with self.precision.autocast():
            losses = self.tokenizer.training_losses(images, step=self.step)
        guard.observe(losses.generator, self.step)
        accum = self.cfg.grad_accum
        has_disc = losses.discriminator is not None and self.opt_d is not None
        # inputs= keeps the adversarial term of the generator loss out of the
        # discriminator's gradients (and the discriminator loss out of the generator's).
        self.scaler_g.scale(losses.generator.float() / accum).backward(
            inputs=self.gen_params, retain_graph=has_disc
        )
        out = {"loss": losses.generator.detach(), **losses.metrics}
        if has_disc:
            guard.observe(losses.discriminator, self.step)
            self.scaler_d.scale(losses.discriminator.float() / accum).backward(inputs=self.disc_params)
            out["disc_loss"] = losses.discriminator.detach()
        # Device tensors (or floats), summed over the window and read at log steps only.
        return {k: torch.as_tensor(v, device=self.env.device, dtype=torch.float64) for k, v in out.items()}

    def _optimizer_steps(self) -> dict[str, torch.Tensor]:
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        D.average_gradients(self.gen_params, self.env)
        self.scaler_g.unscale_(self.opt_g)
        norm = nn.utils.clip_grad_norm_(self.gen_params, clip)
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        self.opt_g.zero_grad(set_to_none=True)
        out = {"grad_norm": norm.detach().double()}
        if self.opt_d is not None:
            D.average_gradients(self.disc_params, self.env)
            if any(p.grad is not None for p in self.disc_params):
                self.scaler_d.unscale_(self.opt_d)
                out["disc_grad_norm"] = nn.utils.clip_grad_norm_(self.disc_params, clip).detach().double()
                self.scaler_d.step(self.opt_d)
                self.scaler_d.update()
                self.opt_d.zero_grad(set_to_none=True)
        return out

    def _reduce_window(self, window: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, float]:
        """Means over the window's steps and over processes (every rank has the same keys).

        The one device sync of a log step: everything is read at once.
        """
        keys = sorted(window)
        values = torch.stack([window[k] / counts[k] for k in keys])
        D.all_reduce_sum(values, self.env)
        return {k: v / self.env.world_size for k, v in zip(keys, values.tolist())}

    def _save(self) -> Path:
        self.step_dir = loop.save_stage(
            self.ckpt_root,
            step=self.step,
            total=self.total,
            env=self.env,
            stream=self.stream,
            recipe=self.recipe,
            keep=self.cfg.keep_checkpoints,
            weights={"tokenizer": self.tokenizer.state_dict()},
            optimizers={
                "optimizer": self.opt_g.state_dict(),
                "optimizer_disc": self.opt_d.state_dict() if self.opt_d is not None else None,
                "scaler": self.scaler_g.state_dict(),
                "scaler_disc": self.scaler_d.state_dict(),
            },
            what="tokenizer checkpoint",
        )
        return self.step_dir

    @torch.no_grad()
    def _reconstruct(self, images: torch.Tensor | None, name: str) -> None:
        """Originals (top row) over their reconstructions (bottom row) as a PNG."""
        if images is None or not self.env.main:
            D.barrier(self.env)
            return
        was_training = self.tokenizer.training
        self.tokenizer.eval()
        try:
            recon = self.tokenizer.decode(self.tokenizer.encode(images))
        finally:
            self.tokenizer.train(was_training)
        grid = torch.cat([images, recon.to(images.dtype)]).add(1).div(2)  # [-1, 1] -> [0, 1]
        path = save_grid(grid, self.root / "samples" / name, nrow=len(images))
        log.info("tokenizer reconstructions %s", path)
        D.barrier(self.env)
