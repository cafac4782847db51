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


def _cut(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage", ["model.safetensors", "trainer.pt", "recipe.yaml", "header"])
def test_a_damaged_latest_falls_back_to_the_newest_complete_one(tmp_path, caplog, damage):
    good = _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    if damage == "recipe.yaml":
        (bad / "recipe.yaml").write_text("{not: [yaml")
    elif damage == "header":
        (bad / "model.safetensors").write_bytes(b"\x08\x00")
    else:
        _cut(bad / damage)
    assert ck.checkpoint_problem(good) is None and ck.checkpoint_problem(bad)
    with caplog.at_level("WARNING", logger="varkit.checkpoint"):
        assert ck.latest_checkpoint(tmp_path) == good
    assert "step-0000002 is incomplete" in caplog.text
    assert ck.latest_checkpoint(tmp_path / "nothing") is None
    _cut(good / "model.safetensors")
    assert ck.latest_checkpoint(tmp_path) is None  # nothing complete: nothing to resume


def test_pruning_counts_complete_checkpoints_only_and_removes_damaged_ones(tmp_path, caplog):
    _save(tmp_path, 1, keep=2)
    _save(tmp_path, 2, keep=2)
    (tmp_path / "step-0000009").mkdir()  # a stray directory, newer than any checkpoint
    _cut((stray := _save(tmp_path, 8, keep=5)) / "trainer.pt")  # and a damaged one
    with caplog.at_level("WARNING", logger="varkit.checkpoint"):
        _save(tmp_path, 3, keep=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 3]
    assert "removing the damaged checkpoint" in caplog.text and not stray.exists()


def test_a_failed_write_is_one_paragraph_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    import errno

    from safetensors import SafetensorError

    good = _save(tmp_path, 1)

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(CheckpointError) as info:
        _save(tmp_path, 2)
    message = str(info.value)
    assert "writing checkpoint step-0000002" in message and "no space left on the device" in message
    assert "step-0000001, is intact" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([good.name, "latest"])
    assert ck.latest_checkpoint(tmp_path) == good
    denied = ck.os_error_message(OSError(errno.EACCES, "Permission denied", "/x"), "writing /x")
    assert "permission denied" in denied and "choose an out_dir you can write to" in denied
