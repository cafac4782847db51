"""Tiny recipes and a deterministic in-memory stream for the training tests."""

from __future__ import annotations

import copy
from typing import Any

import torch

from varkit.data.stream import Batch


def tiny_recipe_dict(out_dir, **sections: dict[str, Any]) -> dict[str, Any]:
    """A recipe of a few thousand parameters on 16-px synthetic images (msvq, scale unit)."""
    data: dict[str, Any] = {
        "out_dir": str(out_dir),
        "seed": 0,
        "tokenizer": {
            "name": "msvq",
            "image_size": 16,
            "ch": 16,
            "ch_mult": [1, 2, 2],
            "num_res_blocks": 1,
            "norm_groups": 8,
            "level_attention": False,
            "mid_attention": False,
            "vocab_size": 64,
            "code_dim": 8,
            "schedule": "1,2,4",
        },
        "unit": {"name": "scale"},
        "model": {"depth": 1, "width": 32, "heads": 2, "num_classes": 4},
        "data": {
            "source": "synthetic",
            "resolution": 16,
            "num_classes": 4,
            "workers": 0,
            "shuffle_buffer": 8,
            "synthetic": {"num_classes": 4, "images_per_class": 8, "val_images_per_class": 1},
        },
        "train": {
            "steps": 6,
            "batch_size": 8,
            "lr": 1e-3,
            "precision": "fp32",
            "log_every": 1,
            "checkpoint_every": 3,
            "checkpoint_minutes": 0,
            "sample_classes": 2,
            "sample_per_class": 2,
        },
    }
    for key, value in sections.items():
        same_plugin = not isinstance(value, dict) or value.get(
            "name", data.get(key, {}).get("name")
        ) == data.get(key, {}).get("name")
        if isinstance(value, dict) and isinstance(data.get(key), dict) and same_plugin:
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return copy.deepcopy(data)


def tiny_recipe(out_dir, **sections):
    from varkit import recipe as recipe_mod

    return recipe_mod.from_dict(tiny_recipe_dict(out_dir, **sections))


class FakeStream:
    """Endless random images (uint8 pixels, as the real stream's batches hold), a pure
    function of (seed, rank, batch index)."""

    def __init__(self, *, batch_size: int, resolution: int, classes: int, seed: int, rank: int):
        self.batch_size, self.resolution, self.classes = batch_size, resolution, classes
        self.seed, self.rank = seed, rank
        self.index = 0
        self.samples_per_epoch = 64

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + self.index)
            self.index += 1
            shape = (self.batch_size, self.resolution, self.resolution, 3)
            pixels = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
            labels = torch.randint(0, self.classes, (self.batch_size,), generator=g)
            yield Batch(pixels=pixels, codes=None, labels=labels)

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]
