"""The run directory: its lock, its recipe, a damaged checkpoint, and what cannot be written."""

from __future__ import annotations

import errno
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import tiny_recipe, tiny_recipe_dict

from varkit import checkpoint as ck
from varkit.cli import main
from varkit.errors import DataError
from varkit.train import run
from varkit.train.metrics import read_metrics

HOLD_LOCK = """
import sys, time
from varkit.train.rundir import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _recipe_file(tmp_path, out, **sections) -> str:
    path = tmp_path / f"{Path(out).name}.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(out, **sections)))
    return str(path)


def test_a_second_run_on_a_locked_directory_stops_naming_the_holder_and_a_killed_holder_leaves_no_lock(
    tmp_path, fake_stream, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        recipe = _recipe_file(tmp_path, out, train={"steps": 2})
        assert main(["run", recipe]) == 2
        err = capsys.readouterr().err
        assert f"process {holder.pid} on host {socket.gethostname()}" in err, err
        assert "in use by another varkit run" in err and "Traceback" not in err
        assert ck.latest_checkpoint(out) is None and not (out / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock
        holder.wait()
    assert main(["run", recipe]) == 0
    err = capsys.readouterr().err
    assert f"process {holder.pid}" in err and "ended without releasing it" in err
    assert ck.latest_checkpoint(out).name == "step-0000002"
    assert (out / "run.lock").read_text() == ""  # released


def test_a_run_that_fails_at_start_up_leaves_no_recipe_that_refuses_the_corrected_one(
    tmp_path, fake_stream, monkeypatch
):
    # A failure that only starting the run can find (the data was not there yet), after
    # which the user changes the recipe and runs again.
    def no_data(recipe, **kwargs):
        raise DataError("data.train_shards names no shards")

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr("varkit.train.loop.build_stream", no_data)
        with pytest.raises(DataError, match="names no shards"):
            run(tiny_recipe(out, train={"grad_accum": 1}))
    assert not (out / "recipe.yaml").exists()
    run(tiny_recipe(out, train={"grad_accum": 2, "steps": 2}))  # the corrected recipe is accepted
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["grad_accum"] == 2


def test_a_truncated_latest_checkpoint_resumes_from_the_one_before(tmp_path, fake_stream, caplog):
    out = tmp_path / "run"
    recipe = tiny_recipe(out, train={"steps": 6, "checkpoint_every": 3})
    run(recipe)
    shutil.copytree(out / "checkpoints" / "step-0000006", tmp_path / "kept")
    whole = ck.load_weights(tmp_path / "kept", "model")  # (safetensors maps the file it reads)
    model = out / "checkpoints" / "step-0000006" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    with caplog.at_level("INFO"):
        run(recipe)
    assert "step-0000006 is incomplete (model.safetensors is cut short" in caplog.text
    assert "resuming from step 3" in caplog.text
    redone = ck.load_weights(out / "checkpoints" / "step-0000006", "model")
    assert all(torch.equal(whole[k], redone[k]) for k in whole)  # the resume from step 3 is exact
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_out_dir_under_a_file_is_one_paragraph_and_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    recipe = _recipe_file(tmp_path, tmp_path / "file" / "run")
    assert main(["run", recipe]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("varkit: error: creating out_dir") and "is a file, not a directory" in err
    assert "\n" not in err


def test_out_dir_without_permission_is_one_paragraph_and_exit_2(tmp_path, capsys, monkeypatch):
    out = tmp_path / "locked" / "run"
    real_mkdir = Path.mkdir

    def denied(self, *args, **kwargs):  # what a directory without write permission answers
        if self == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    assert main(["run", _recipe_file(tmp_path, out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot write {out} (permission denied); choose an out_dir you can write to" in err
    assert "\n" not in err


def test_a_full_disk_at_a_checkpoint_is_one_paragraph_and_exit_2(tmp_path, fake_stream, capsys, monkeypatch):
    out = tmp_path / "run"

    def full(state, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(ck, "save_file", full)
    assert main(["run", _recipe_file(tmp_path, out)]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("varkit: error:")]
    assert "writing checkpoint step-0000003" in line and "no space left on the device" in line
    assert "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == []  # no temporary directory left behind
