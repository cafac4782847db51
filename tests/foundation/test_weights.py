"""Weights files that cannot be used: the error says what the file seems to be and what to do."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from varkit.errors import CheckpointError
from varkit.loading import load_tokenizer_weights
from varkit.plugins import registry
from varkit.weights import file_format, read_state_dict, read_weights, weight_shapes


class Whole(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)


@pytest.fixture
def tokenizer():
    cls = registry().get("tokenizer", "msvq")
    small = dict(image_size=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, vocab_size=32)
    return cls(cls.Config(**small, code_dim=8, schedule=(1, 2, 4)))


def _error(path, tokenizer) -> str:
    with pytest.raises(CheckpointError) as info:
        load_tokenizer_weights(tokenizer, path)
    message = str(info.value)
    assert "weights_only" not in message and "Re-running" not in message  # never torch's advice
    return message


def test_a_whole_pickled_model_is_named_by_its_class(tmp_path, tokenizer):
    path = tmp_path / "vae.pth"
    torch.save(Whole(), path)
    message = _error(path, tokenizer)
    assert "holds a pickled Python object of class" in message and "Whole" in message
    assert "model.state_dict()" in message


def test_a_snapshot_with_its_arguments_gives_its_weights(tmp_path, tokenizer):
    """Released training snapshots keep their argparse settings beside the weights
    (LlamaGen's do): the weights are read, the settings are not run."""
    path = tmp_path / "snapshot.pth"
    torch.save({"model": tokenizer.state_dict(), "args": argparse.Namespace(lr=1)}, path)
    state = read_state_dict(path, "tokenizer weights")
    assert state.keys() == tokenizer.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in tokenizer.state_dict().items())


def test_garbage_truncated_and_empty_files(tmp_path, tokenizer):
    garbage = tmp_path / "garbage.pth"
    for seed in range(20):  # random bytes fail the unpickler in many ways; each is one message
        garbage.write_bytes(np.random.default_rng(seed).bytes(2000))
        assert "is not a PyTorch checkpoint (it starts with bytes" in _error(garbage, tokenizer), seed
    good = tmp_path / "good.pth"
    torch.save(tokenizer.state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated or corrupt PyTorch archive" in _error(truncated, tokenizer)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert "is empty" in _error(empty, tokenizer)


def test_garbage_and_truncated_safetensors(tmp_path, tokenizer):
    good = tmp_path / "good.safetensors"
    save_file(tokenizer.state_dict(), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "is not a complete safetensors file" in _error(truncated, tokenizer)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(500))
    assert "truncated, corrupt or of another format" in _error(garbage, tokenizer)


def test_the_format_is_read_off_the_bytes_not_the_name(tmp_path, tokenizer):
    state = tokenizer.state_dict()
    odd = tmp_path / "weights.bin"  # a safetensors file under another name
    save_file(state, odd)
    assert file_format(odd) == "safetensors"
    load_tokenizer_weights(tokenizer, odd)
    pth_named = tmp_path / "weights.safetensors"
    torch.save(state, pth_named)
    assert "is a PyTorch file, not safetensors: name it *.pth" in _error(pth_named, tokenizer)
    garbage = tmp_path / "weights.ckpt"
    garbage.write_bytes(b"\x00" * 100)
    assert "is not a PyTorch checkpoint" in _error(garbage, tokenizer)


def test_a_missing_file_says_where_relative_paths_are_read_from(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = _error("checkpoints/vae_ch160v4096z32.pth", tokenizer)
    assert "does not exist (relative paths are read from the current directory" in message
    assert str(tmp_path) in message


def test_wrapped_state_dicts_are_unwrapped_and_shapes_read_cheaply(tmp_path):
    state = Whole().state_dict()
    path = tmp_path / "lightning.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    assert read_state_dict(path, "x").keys() == state.keys()
    shapes = weight_shapes(path, "x")
    assert {k: tuple(v.shape) for k, v in shapes.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert all(v.device.type == "meta" for v in shapes.values())
    st = tmp_path / "w.safetensors"
    save_file(state, st)
    assert {k: v.shape for k, v in weight_shapes(st, "x").items()} == {k: v.shape for k, v in state.items()}
    assert read_weights(st, "x").keys() == state.keys()
    torch.save({"epoch": 3, "note": "x"}, path)
    with pytest.raises(
        CheckpointError, match="does not hold a state dict of tensors \\(it holds: epoch, note\\)"
    ):
        read_state_dict(path, "x")
