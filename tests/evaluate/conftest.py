"""Fixtures of the evaluation tests: tiny checkpoints, and torch-fidelity's Inception with
random weights (nothing is downloaded)."""

from __future__ import annotations

import pytest
from eval_helpers import install_torchvision_stand_in, save_random_inception, tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory with a checkpoint of random weights (16-px images, 4 classes)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture(scope="session")
def torch_fidelity():
    """torch-fidelity importable, with the torchvision stand-in where the real one fails
    (see ``install_torchvision_stand_in``); skips when torch-fidelity is not installed."""
    install_torchvision_stand_in()
    return pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")


@pytest.fixture(scope="session")
def inception_weights(torch_fidelity, tmp_path_factory):
    """A weights file of torch-fidelity's Inception architecture with random weights."""
    return save_random_inception(tmp_path_factory.mktemp("inception") / "random-inception.pth")
