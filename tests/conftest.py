"""Shared fixtures. Tests run on 2 CPU cores: keep models and images tiny."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Two cores in CI: more threads only add contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# The suite is reproducible: every run tries the same examples, so a red run can be
# rerun and a green main stays green. `pytest --hypothesis-profile explore` searches
# afresh with more examples (what to run after changing an invariant's code).
settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("explore", max_examples=1000, deadline=None)
settings.load_profile("default")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_registry(monkeypatch):
    """A process registry loaded anew for this test (entry points read again)."""
    from varkit import plugins

    plugins.reset()
    yield plugins.registry()
    plugins.reset()


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    """The README's quickstart, trained once per test session (a few minutes on 2 cores).

    Slow tests that need a trained model (sampling, editing, evaluation, fine-tuning)
    share this run instead of training their own; they must not write into it.
    """
    from varkit.cli import main

    out = tmp_path_factory.mktemp("quickstart") / "run"
    recipe = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    assert main(["run", str(recipe), f"out_dir={out}"]) == 0
    return out
