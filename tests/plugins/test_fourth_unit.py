"""A prediction unit written outside varkit runs on the engine with no engine change.

``column`` predicts one column of the code map per step, top to bottom, left to
right. It lives only in this file, registers through a hook implementation like any
third-party plugin, and is then chosen by name in a recipe: the recipe validates it,
the builders build the transformer around it, a training step lowers the loss, and the
generation loop samples images with it.
"""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange
from torch import nn

import varkit
from varkit import recipe as recipe_mod
from varkit.build import build_model, build_tokenizer
from varkit.errors import RecipeError
from varkit.generation import generate_codes, generate_images
from varkit.model.loss import ar_loss


class NextColumn(varkit.PredictionUnit):
    """One column of a single code map per step (step 0: class + ``pos_start``)."""

    name = "column"

    def __init__(self, config, *, tokenizer, width):
        super().__init__(config, tokenizer=tokenizer, width=width)
        self.h, self.w = tokenizer.schedule[-1]
        std = math.sqrt(1 / (3 * width))
        self.pos_start = nn.Parameter(torch.randn(1, self.h, width) * std)
        self.pos_embed = nn.Parameter(torch.randn(1, self.h * self.w, width) * std)

    @classmethod
    def check_tokenizer(cls, tokenizer):
        if len(tokenizer.schedule) != 1:
            return ["column order needs a single-scale tokenizer"]
        return []

    @property
    def step_lengths(self):
        return (self.h,) * self.w

    def start_embedding(self):
        return self.pos_start

    def position_embedding(self):
        return self.pos_embed

    def targets(self, codes):
        return rearrange(codes[-1], "b h w -> b (w h)")

    def teacher_forcing(self, codes, tokenizer):
        return tokenizer.embed(rearrange(codes[-1][:, :, :-1], "b h w -> b (w h)"))

    def start_generation(self, batch, tokenizer):
        return {"columns": []}

    def generation_step(self, state, step, codes, emb, tokenizer):
        state["columns"].append(codes)  # (b, h)
        return None if step == self.w - 1 else emb

    def generated_codes(self, state):
        return [torch.stack(state["columns"], dim=2)]  # (b, h, w)

    def finish_generation(self, state, tokenizer):
        return tokenizer.codes_to_features(self.generated_codes(state))


class ColumnPlugin:
    """What a third-party package's module would hold."""

    @varkit.hookimpl
    def varkit_register_prediction_units(self, register):
        register(NextColumn)


TINY_VQ = {"name": "vq", "image_size": 16, "ch": 16, "ch_mult": [1, 1, 2], "num_res_blocks": 1,
           "norm_groups": 8, "code_dim": 8, "vocab_size": 32}  # fmt: skip


def _recipe(unit="column", tokenizer=None):
    return recipe_mod.from_dict(
        {
            "out_dir": "runs/column",
            "tokenizer": tokenizer or TINY_VQ,
            "unit": {"name": unit},
            "attention": {"name": "sdpa"},
            "sampler": {"name": "topk_topp", "cfg": 1.5, "top_k": 0, "top_p": 0.0},
            "model": {"depth": 2, "width": 32, "heads": 2, "num_classes": 10, "drop_path": 0.0},
            "data": {"resolution": 16, "num_classes": 10},
        }
    )


@pytest.fixture
def column_registry(fresh_registry):
    fresh_registry.add(ColumnPlugin(), name="varkit-column", distribution="varkit-column")
    return fresh_registry


def test_registered_beside_the_builtins(column_registry):
    assert {"column", "scale", "token", "patch"} <= set(column_registry.names("unit"))
    assert column_registry.entry("unit", "column").distribution == "varkit-column"


def test_unknown_without_the_plugin(fresh_registry):
    with pytest.raises(RecipeError, match="column"):
        _recipe()


def test_recipe_checks_the_tokenizer(column_registry):
    msvq = {**TINY_VQ, "name": "msvq", "schedule": [1, 2, 4]}
    with pytest.raises(RecipeError, match="single-scale"):
        _recipe(tokenizer=msvq)


def test_engine_trains_and_samples_the_fourth_unit(column_registry):
    torch.manual_seed(0)
    recipe = _recipe()
    tokenizer = build_tokenizer(recipe).eval().requires_grad_(False)
    model = build_model(recipe, tokenizer)
    assert isinstance(model.unit, NextColumn) and model.unit.step_lengths == (4, 4, 4, 4)

    # Training: the very loss and steps of the AR loop on fixed codes.
    codes = [torch.randint(0, 32, (8, 4, 4), generator=torch.Generator().manual_seed(1))]
    labels = torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(30):
        logits = model(model.unit.teacher_forcing(codes, tokenizer), labels)
        loss = ar_loss(logits, model.unit.targets(codes), 0.0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses

    # Generation: cached steps agree with the teacher-forced pass; images come out.
    model.eval()
    sampler = recipe.sampler.cls(recipe.sampler.config)
    gen, _ = generate_codes(model, tokenizer, sampler, labels[:3], generator=torch.Generator().manual_seed(0))
    assert gen[0].shape == (3, 4, 4)
    with torch.no_grad():
        inputs = model.unit.teacher_forcing(gen, tokenizer)  # (3, 12, c): columns 0..2
        full = model(inputs, labels[:3])
        cache = model.new_cache(3)
        steps = [model.forward_step(None, labels[:3], cache, 0)]
        steps += [
            model.forward_step(x, labels[:3], cache, s + 1) for s, x in enumerate(inputs.split(4, dim=1))
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    images = generate_images(
        model, tokenizer, sampler, labels[:3], generator=torch.Generator().manual_seed(0)
    )
    again = generate_images(model, tokenizer, sampler, labels[:3], generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 16, 16) and torch.equal(images, again)
    assert images.min() >= 0 and images.max() <= 1
