"""The tokenizer training stage: ``tokenizer.training_losses`` with a second optimizer
for the discriminator, into ``out_dir/tokenizer`` (its own checkpoints and metrics).

Tokenizers are small next to the AR model, so every process holds the whole tokenizer
and the gradients are averaged explicitly once per step (``training_losses`` is not
``forward``, which DDP would need); FSDP, compilation and an EMA do not apply here,
and ``tokenizer_train`` has no such options. The loop around it is
`varkit.train.loop`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from varkit.build import build_tokenizer
from varkit.data import data_source
from varkit.errors import RecipeError
from varkit.images import save_grid
from varkit.train import distributed as D
from varkit.train import loop
from varkit.train.optim import build_adamw, param_groups
from varkit.train.stage import OptimizerSlot, Precision, Stage
from varkit.train.state import seed_everything

log = logging.getLogger(__name__)

#: Images of the first batch shown with their reconstructions in each preview.
PREVIEW_IMAGES = 8


class TokenizerStage(Stage):
    """The recipe's tokenizer, trained into ``out_dir/tokenizer`` (section ``tokenizer_train:``).

    Args:
        recipe: the validated recipe.
        env: this process's place in the run.
        out_dir: the run directory; the stage writes under ``out_dir/tokenizer``.
    """

    name = "tokenizer"
    title = "tokenizer"
    guarded = ("loss", "disc_loss")

    def __init__(self, recipe, env: D.DistEnv, out_dir: Path):
        if data_source(recipe.data.source).yields != "images":
            raise RecipeError(
                f"tokenizer_train is enabled but data.source {recipe.data.source!r} yields codes, not "
                "images: training a tokenizer needs images; use an image source (e.g. synthetic or "
                "shards), or set tokenizer.weights"
            )
        self.recipe, self.env = recipe, env
        self.config = cfg = recipe.tokenizer_train
        self.seed = recipe.seed
        self.root = Path(out_dir) / "tokenizer"
        device = env.device
        self.precision = Precision(cfg.precision, device)
        seed_everything(recipe.seed)
        self.tokenizer = build_tokenizer(recipe, device=device)
        self.stream = loop.build_stream(recipe, batch_size=self.micro_batch(cfg, env), env=env)
        self.total = self.total_steps(cfg, self.stream)
        self.disc_params = [p for p in self.tokenizer.discriminator_parameters() if p.requires_grad]
        disc_ids = {id(p) for p in self.disc_params}
        self.gen_params = [
            p for p in self.tokenizer.parameters() if p.requires_grad and id(p) not in disc_ids
        ]
        self.gen: OptimizerSlot | None = None
        self.disc: OptimizerSlot | None = None
        self.preview_images: torch.Tensor | None = None

    # ------------------------------------------------------------------ setup
    def modules(self) -> dict[str, nn.Module]:
        return {"tokenizer": self.tokenizer}

    def optimizer_slots(self) -> list[OptimizerSlot]:
        cfg, device = self.config, self.env.device
        self.gen = OptimizerSlot(
            optimizer=build_adamw(
                param_groups(self.tokenizer, cfg.weight_decay, exclude=self.disc_params), cfg, device
            ),
            params=self.gen_params,
            module=self.tokenizer,
            scaler=self.precision.scaler(),
            clip=cfg.grad_clip,
            average_gradients=True,
        )
        if not self.disc_params:
            return [self.gen]
        self.disc = OptimizerSlot(
            name="disc",
            optimizer=build_adamw(
                param_groups(self.tokenizer, cfg.weight_decay, exclude=self.gen_params), cfg, device
            ),
            params=self.disc_params,
            module=self.tokenizer,
            scaler=self.precision.scaler(),
            clip=cfg.grad_clip,
            average_gradients=True,
        )
        return [self.gen, self.disc]

    # ------------------------------------------------------------------- step
    def forward_backward(self, batch, *, step: int) -> dict[str, torch.Tensor]:
        images = batch.to(self.env.device, non_blocking=True).images
        if self.preview_images is None:
            self.preview_images = images[:PREVIEW_IMAGES].detach().clone()
        with self.precision.autocast():
            losses = self.tokenizer.training_losses(images, step=step)
        accum = self.config.grad_accum
        has_disc = losses.discriminator is not None and self.disc is not None
        # inputs= keeps the adversarial term of the generator loss out of the
        # discriminator's gradients (and the discriminator loss out of the generator's).
        self.gen.scaler.scale(losses.generator.float() / accum).backward(
            inputs=self.gen_params, retain_graph=has_disc
        )
        out = {"loss": losses.generator.detach(), **losses.metrics}
        if has_disc:
            self.disc.scaler.scale(losses.discriminator.float() / accum).backward(inputs=self.disc_params)
            out["disc_loss"] = losses.discriminator.detach()
        # The tokenizer reports batch means; the window sums over images.
        b = images.shape[0]
        return {
            key: torch.as_tensor(value, device=self.env.device).detach().to(torch.float64) * b
            for key, value in out.items()
        }

    # --------------------------------------------------------------- samples
    @torch.no_grad()
    def preview(self, tag: str, *, final: bool) -> dict[str, Any] | None:
        """Originals (top row) over their reconstructions (bottom row), ``samples/recon-<tag>.png``."""
        images = self.preview_images
        if images is not None and self.env.main:
            was_training = self.tokenizer.training
            self.tokenizer.eval()
            try:
                recon = self.tokenizer.decode(self.tokenizer.encode(images))
            finally:
                self.tokenizer.train(was_training)
            grid = torch.cat([images, recon.to(images.dtype)]).add(1).div(2)  # [-1, 1] -> [0, 1]
            path = save_grid(grid, self.root / "samples" / f"recon-{tag}.png", nrow=len(images))
            log.info("tokenizer reconstructions %s", path)
        D.barrier(self.env)
        return None
