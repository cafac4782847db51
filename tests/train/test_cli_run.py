"""``varkit run`` in subprocesses: SIGKILL and resume, torchrun with 2 gloo processes."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from train_helpers import tiny_recipe_dict

from varkit import checkpoint as ck
from varkit.train.metrics import read_metrics


def _recipe_file(tmp_path, out_dir, cache, **sections):
    data = tiny_recipe_dict(out_dir, **sections)
    data["data"]["cache_dir"] = str(cache)
    path = tmp_path / f"{out_dir.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def test_sigkill_at_any_moment_resumes_to_a_loadable_checkpoint(tmp_path, synthetic_cache):
    out = tmp_path / "run"
    recipe = _recipe_file(
        tmp_path,
        out,
        synthetic_cache,
        train={"steps": 30, "checkpoint_every": 1, "log_every": 1, "sample_classes": 1},
    )
    command = [sys.executable, "-m", "varkit", "run", str(recipe)]
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not (out / "checkpoints" / "latest").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere inside a later step or save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = ck.checkpoint_step(ck.latest_checkpoint(out))
    assert killed_at is not None and killed_at < 30, "the run finished before it was killed; make it longer"

    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming from step {killed_at}" in done.stderr
    root = out / "checkpoints"
    assert ck.latest_checkpoint(out) == root / "step-0000030"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "leftovers of the killed save"

    import varkit

    pipe = varkit.load(out)
    images = pipe.generate([0, 1], seed=0)
    assert images.shape == (2, 3, 16, 16)
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 31))  # no duplicates of the killed run's last steps


def test_torchrun_two_gloo_processes_match_one_process(tmp_path, synthetic_cache):
    sections = {"train": {"steps": 4, "lr": 3e-3, "checkpoint_every": 0, "log_every": 1}}
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "varkit",
            "run",
            str(_recipe_file(tmp_path, ddp_out, synthetic_cache, **sections)),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "varkit",
            "run",
            str(_recipe_file(tmp_path, single_out, synthetic_cache, **sections)),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-4000:]

    records = read_metrics(ddp_out / "metrics.jsonl")
    assert [r["replicas_in_sync"] for r in records if "replicas_in_sync" in r] == [True]
    state = ck.load_trainer_state(ck.latest_checkpoint(ddp_out))
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and len(state["data"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # RNG per rank

    ddp_loss = [r["loss"] for r in records if "loss" in r]
    single_loss = [r["loss"] for r in read_metrics(single_out / "metrics.jsonl") if "loss" in r]
    assert len(ddp_loss) == len(single_loss) == 4
    # same initial weights, same global batch of the same data distribution
    assert ddp_loss == pytest.approx(single_loss, rel=0.03)
    a = ck.load_weights(ck.latest_checkpoint(ddp_out), "model")
    b = ck.load_weights(ck.latest_checkpoint(single_out), "model")
    moved = sum((a[k] - b[k]).abs().sum() for k in a) / sum(b[k].abs().sum() for k in b)
    assert moved < 0.05  # both trained from the same start by the same number of similar steps


def test_torchrun_fsdp_trains_checkpoints_and_resumes(tmp_path, synthetic_cache):
    # FSDP2 with bf16 mixed precision (bf16 weights gathered, fp32 gradients reduced),
    # activation checkpointing of every block and an EMA of the sharded weights.
    out = tmp_path / "fsdp"
    sections = {
        "train": {"steps": 2, "distributed": "fsdp", "ema": 0.9, "checkpoint_every": 0, "log_every": 1,
                  "precision": "bf16", "activation_checkpointing": True}
    }  # fmt: skip
    recipe = _recipe_file(tmp_path, out, synthetic_cache, **sections)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for steps in (2, 3):  # the second run resumes the first and goes one step further
        done = subprocess.run(
            [*torchrun, "-m", "varkit", "run", str(recipe), f"train.steps={steps}"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-4000:]
    assert "resuming from step 2" in done.stderr
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    step_dir = ck.latest_checkpoint(out)
    assert step_dir.name == "step-0000003"
    state = ck.load_trainer_state(step_dir)
    assert state["optimizer"]["state"], "the gathered optimizer state is empty"
    import varkit

    assert varkit.load(out).generate([0], seed=0).shape == (1, 3, 16, 16)  # the EMA weights, whole
