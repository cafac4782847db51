"""Shared fixtures. Tests run on 2 CPU cores: keep models and images tiny."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores in CI: more threads only add contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
