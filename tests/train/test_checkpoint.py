"""Atomic checkpoints: a crash never leaves a half-written latest."""

from __future__ import annotations

import os

import pytest
import torch

from varkit import checkpoint as ck
from varkit.errors import CheckpointError


def _save(root, step, keep=3, **extra):
    weights = {"model": {"w": torch.full((2, 2), float(step)), "b": torch.zeros(2)}}
    state = {"step": step, "rng": torch.get_rng_state(), "data": [{"offset": step}], **extra}
    return ck.save_checkpoint(root, step, weights=weights, trainer_state=state, recipe={"seed": 1}, keep=keep)


def test_save_and_load_round_trip(tmp_path):
    path = _save(tmp_path / "checkpoints", 7)
    assert path.name == "step-0000007"
    assert ck.latest_checkpoint(tmp_path) == path
    assert ck.latest_checkpoint(tmp_path / "checkpoints") == path
    assert ck.latest_checkpoint(path) == path
    assert torch.equal(ck.load_weights(path, "model")["w"], torch.full((2, 2), 7.0))
    assert ck.load_trainer_state(path)["data"] == [{"offset": 7}]
    assert ck.read_recipe(path) == {"seed": 1}
    assert ck.checkpoint_step(path) == 7


def test_keep_prunes_oldest(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [4, 5]
    assert (tmp_path / "latest").read_text().strip() == "step-0000005"


def test_leftover_temp_dir_never_becomes_latest_and_is_cleaned(tmp_path):
    good = _save(tmp_path, 3)
    # a save killed half-way: a temp dir with some files, and a newer half-written step name
    tmp = tmp_path / ".tmp-step-0000009.1234"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"garbage")
    (tmp_path / ".tmp-latest.1234").write_text("step-0000009\n")
    assert ck.latest_checkpoint(tmp_path) == good
    removed = ck.remove_leftovers(tmp_path)
    assert {p.name for p in removed} == {tmp.name, ".tmp-latest.1234"}
    assert not tmp.exists()
    assert ck.latest_checkpoint(tmp_path) == good


def test_latest_naming_a_missing_dir_falls_back_to_newest_complete(tmp_path):
    _save(tmp_path, 1)
    good = _save(tmp_path, 2)
    (tmp_path / "latest").write_text("step-0000099\n")
    assert ck.latest_checkpoint(tmp_path) == good


def test_saving_the_same_step_again_replaces_it(tmp_path):
    _save(tmp_path, 4)
    path = _save(tmp_path, 4, extra_key=1)
    assert ck.load_trainer_state(path)["extra_key"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_shared_storage_is_saved(tmp_path):
    w = torch.randn(4, 4)
    path = ck.save_checkpoint(
        tmp_path, 1, weights={"model": {"a": w, "b": w, "c": w[1]}}, trainer_state={}, recipe={}
    )
    loaded = ck.load_weights(path, "model")
    assert torch.equal(loaded["a"], loaded["b"]) and torch.equal(loaded["c"], w[1])


def test_errors_name_what_is_missing(tmp_path):
    path = _save(tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"no ema\.safetensors.*model"):
        ck.load_weights(path, "ema")
    (path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="truncated"):
        ck.load_weights(path, "model")
    os.remove(path / "trainer.pt")
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        ck.load_trainer_state(path)
    with pytest.raises(CheckpointError, match="not a varkit checkpoint"):
        ck.read_recipe(tmp_path)
    assert ck.latest_checkpoint(tmp_path / "nothing") is None
