"""Fixtures of the training tests."""

from __future__ import annotations

import pytest
from train_helpers import FakeStream


@pytest.fixture
def fake_stream(monkeypatch):
    """Replace the recipe's data stream with :class:`FakeStream` (in-process runs only)."""

    def build(recipe, *, batch_size, env, tokenizer=None):
        return FakeStream(
            batch_size=batch_size,
            resolution=recipe.data.resolution,
            classes=recipe.data.classes,
            seed=recipe.seed,
            rank=env.rank,
        )

    monkeypatch.setattr("varkit.train.loop.build_stream", build)
    return build


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory):
    """One cache directory of synthetic shards for every run of the session."""
    return tmp_path_factory.mktemp("synthetic-cache")
