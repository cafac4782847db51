"""The AR training stage: one stage for every prediction unit.

A frozen tokenizer turns images into code maps on the fly (or the data stream hands
over codes); the unit turns codes into teacher-forcing inputs ``(b, l - l_0, c)`` and
targets ``(b, l)``; the model predicts logits ``(b, l, v)``; the loss is the
cross-entropy averaged over every position of every image. The loop around it is
`varkit.train.loop`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from varkit.build import build_model, build_sampler
from varkit.evaluate import TrainingFID, class_following
from varkit.generation import generate_images
from varkit.images import save_grid
from varkit.loading import init_ar_model, prepare_ar_model
from varkit.model.loss import StepGroups, ar_loss
from varkit.train import distributed as D
from varkit.train import loop
from varkit.train.ema import EMA
from varkit.train.optim import build_adamw, param_groups
from varkit.train.stage import OptimizerSlot, Precision, Stage, WindowMeans
from varkit.train.state import seed_everything

log = logging.getLogger(__name__)


def sample_labels(num_classes: int, classes: int, per_class: int) -> torch.Tensor:
    """``classes`` class indices spread evenly over ``0..num_classes-1``, each ``per_class`` times."""
    picked = torch.linspace(0, num_classes - 1, min(classes, num_classes)).round().long().unique()
    return picked.repeat_interleave(per_class)


class ARStage(Stage):
    """The AR model of a recipe, trained into ``out_dir`` (recipe section ``train:``).

    Args:
        recipe: the validated recipe.
        tokenizer: the tokenizer, already holding its final weights (it is frozen here).
        env: this process's place in the run.
        out_dir: the run directory.
    """

    name = "ar"
    title = "AR"

    def __init__(self, recipe, tokenizer, env: D.DistEnv, out_dir: Path):
        self.recipe, self.env = recipe, env
        self.config = cfg = recipe.train
        self.seed = recipe.seed
        self.root = Path(out_dir)
        device = env.device
        self.precision = Precision(cfg.precision, device)
        self.tokenizer = tokenizer.to(device).eval().requires_grad_(False)
        # Streamed images are encoded every step: on a GPU in bf16 with channels_last
        # (the quantizer's nearest-code search stays in fp32 inside the tokenizer).
        self.encode_autocast = device.type == "cuda" and cfg.precision != "fp32"
        if self.encode_autocast:
            self.tokenizer.to(memory_format=torch.channels_last)
        # Same seed on every rank: identical initial weights (FSDP does not broadcast them).
        seed_everything(recipe.seed)
        self.model = build_model(recipe, self.tokenizer, device=device)
        self.unit = self.model.unit
        self.stream = loop.build_stream(
            recipe, batch_size=self.micro_batch(cfg, env), env=env, tokenizer=self.tokenizer
        )
        self.total = self.total_steps(cfg, self.stream)
        self.groups = StepGroups(self.unit.step_lengths, torch.device("cpu"))
        self.scaler: torch.amp.GradScaler | None = None
        self.eval_every = cfg.eval_every
        # Loaded before the first step, so that missing Inception weights stop the run at once.
        self.fid = (
            TrainingFID(recipe.data, self.root / "eval", num=cfg.eval_num, device=device, seed=recipe.seed)
            if cfg.eval_every and env.main
            else None
        )

    # ------------------------------------------------------------------ setup
    def modules(self) -> dict[str, nn.Module]:
        # The frozen tokenizer travels with every checkpoint, so one stands alone.
        return {"model": self.model, "tokenizer": self.tokenizer}

    def load_initial_weights(self) -> None:
        # Fine-tuning: a fresh run starts from init.weights (fresh optimizer and schedule).
        init_ar_model(self.model, self.recipe)

    def distribute(self) -> None:
        cfg, env = self.config, self.env
        # Class names into the run; the parts init.freeze names stop training.
        prepare_ar_model(self.model, self.recipe, out_dir=self.root, main=env.main)
        if cfg.activation_checkpointing:
            D.checkpoint_activations(self.model)
        if cfg.compile_mode is not None:
            D.compile_model(self.model, cfg.compile_mode)
        self.net = D.wrap_model(self.model, env, cfg.distributed, mixed_precision=self.precision.dtype)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema is not None else None

    def optimizer_slots(self) -> list[OptimizerSlot]:
        cfg = self.config
        optimizer = build_adamw(param_groups(self.model, cfg.weight_decay), cfg, self.env.device)
        self.scaler = self.precision.scaler()
        return [
            OptimizerSlot(
                optimizer=optimizer,
                params=list(self.model.parameters()),
                module=self.model,
                scaler=self.scaler,
                clip=cfg.grad_clip,
            )
        ]

    def train_mode(self) -> None:
        self.model.train()

    def flops_per_image(self) -> float | None:
        return self.model.flops_per_image(training=True)

    # ------------------------------------------------------------------- step
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Code maps of streamed images ``(b, 3, H, W)`` by the frozen tokenizer.

        On a CPU (or with precision fp32) in float32, as the tokenizer was trained; on
        a GPU under bf16 autocast with channels_last images, which runs the encoder's
        convolutions on tensor cores.
        """
        with torch.no_grad():
            if not self.encode_autocast:
                return self.tokenizer.encode(images)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.tokenizer.encode(images.contiguous(memory_format=torch.channels_last))

    def forward_backward(self, batch, *, step: int) -> dict[str, torch.Tensor]:
        batch = batch.to(self.env.device, non_blocking=True)
        labels, codes = batch.labels, batch.codes
        if codes is None:
            codes = self.encode(batch.images)
        inputs = self.unit.teacher_forcing(codes, self.tokenizer)  # (b, l - l_0, c)
        targets = self.unit.targets(codes)  # (b, l)
        with self.precision.autocast():
            logits = self.net(inputs, labels)  # (b, l, v)
        per_pos = ar_loss(logits, targets, self.config.label_smoothing)  # (b, l)
        self.scaler.scale(per_pos.mean() / self.config.grad_accum).backward()
        hits = logits.detach().argmax(-1) == targets  # (b, l)
        return {
            "loss": per_pos.detach().sum(0, dtype=torch.float64),  # (l,)
            "acc": hits.sum(0, dtype=torch.float64),  # (l,)
        }

    def summarize(self, window: WindowMeans) -> dict[str, Any]:
        per_loss, per_hit = window.means["loss"], window.means["acc"]  # (l,) means over images
        record: dict[str, Any] = {"loss": per_loss.mean().item(), "acc": per_hit.mean().item()}
        names = self.groups.names
        for name, gl, ga in zip(
            names, self.groups.mean(per_loss).tolist(), self.groups.mean(per_hit).tolist()
        ):
            record[f"loss/{name}"] = gl
            record[f"acc/{name}"] = ga
        record["tokens_per_s"] = window.images_per_s * self.unit.seq_len
        return record

    # --------------------------------------------------------------- samples
    def _sampling_model(self) -> nn.Module | None:
        """The (EMA) model to sample from, on rank 0; None elsewhere (a collective under FSDP)."""
        env = self.env
        if env.distributed and D.is_sharded_module(self.model):
            state = self.ema.state_dict() if self.ema is not None else D.model_state(self.model, env)
            if not env.main:
                return None
            model = build_model(self.recipe, self.tokenizer, device=env.device)
            model.load_state_dict({k: v.to(env.device) for k, v in state.items()})
            return model
        return self.model if env.main else None

    @torch.no_grad()
    def evaluate(self, step: int, *, final: bool) -> dict[str, Any] | None:
        """FID and IS of ``train.eval_num`` samples of the (EMA) model against the
        validation images (``train.eval_every``; rank 0 samples, the others wait)."""
        model = self._sampling_model()
        record = None
        if model is not None and self.fid is not None:
            num_classes = min(self.model.config.num_classes, self.recipe.data.classes)
            dtype = self.precision.dtype if self.env.device.type == "cuda" else None
            use_ema = self.ema is not None and model is self.model
            was_training = model.training
            model.eval()
            try:
                with self.ema.applied() if use_ema else contextlib.nullcontext():
                    record = self.fid(
                        model,
                        self.tokenizer,
                        build_sampler(self.recipe),
                        num_classes=num_classes,
                        dtype=dtype,
                    )
            finally:
                model.train(was_training)
            log.info(
                "step %d: FID %.3f, IS %.3f (%d samples)",
                step,
                record["fid"],
                record["inception_score"],
                record["fid_images"],
            )
        D.barrier(self.env)
        return record

    @torch.no_grad()
    def preview(self, tag: str, *, final: bool) -> dict[str, Any] | None:
        """A grid of ``sample_classes`` rows × ``sample_per_class`` images, ``samples/<tag>.png``.

        The final grid is also measured for class-following where the data source has
        a classifier (the synthetic set); that report is returned for ``metrics.jsonl``.
        """
        env, cfg = self.env, self.config
        model = self._sampling_model()
        report = None
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
            path = save_grid(images, self.root / "samples" / f"{tag}.png", nrow=cfg.sample_per_class)
            log.info("samples %s", path)
            report = class_following(images, labels, self.recipe.data) if final else None
            if report is not None:
                log.info(
                    "class-following of the final samples: %.3f by colour, %.3f by colour and shape",
                    report["sample_colour_accuracy"],
                    report["sample_class_accuracy"],
                )
        D.barrier(env)
        return report
