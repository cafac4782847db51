"""Sampling to disk: plans, per-image seeds, chunks, resume, ranks, the npz layout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from eval_helpers import subprocess_env
from PIL import Image

from varkit.cli import main
from varkit.errors import EvaluationError, VarkitError
from varkit.loading import format_classes, load_checkpoint, resolve_classes
from varkit.pipeline import Pipeline
from varkit.sampling import (
    CHUNK_DIR,
    SamplePlan,
    generate_chunk,
    image_seed,
    sample_to_dir,
    write_samples_npz,
)


@pytest.fixture(scope="module")
def pipe(tiny_run):
    return Pipeline.from_loaded(load_checkpoint(tiny_run))


def test_classes_parse_ranges_and_lists():
    assert resolve_classes("0-999", None, 1000) == list(range(1000))
    assert resolve_classes("3, 5-7,1", None, 10) == [3, 5, 6, 7, 1]
    assert resolve_classes(None, None, 4) == resolve_classes("all", None, 4) == [0, 1, 2, 3]
    assert format_classes(range(1000)) == "0-999" and format_classes([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    for text, message in [
        ("0-10", "outside 0-9"),
        ("a", "neither a class index nor a range"),
        ("5-2", "runs backwards"),
        ("1,1-3", "more than once"),
        (",", "names no class"),
    ]:
        with pytest.raises(VarkitError, match=message):
            resolve_classes(text, None, 10)


def test_plans_count_images_per_class_and_refuse_uneven_splits():
    plan = SamplePlan.make(range(1000), num=50_000, batch_size=64)
    assert plan.per_class == 50 and plan.num == 50_000 and plan.num_chunks == 782
    assert plan.chunk(781) == range(49_984, 50_000)
    assert plan.labels(range(48, 52)).tolist() == [0, 0, 1, 1]
    assert SamplePlan.make(range(3), per_class=2, num=6).per_class == 2
    with pytest.raises(EvaluationError, match="does not split evenly over 3 classes"):
        SamplePlan.make(range(3), num=10)
    with pytest.raises(EvaluationError, match="disagrees"):
        SamplePlan.make(range(3), num=9, per_class=2)
    with pytest.raises(EvaluationError, match="--num N"):
        SamplePlan.make(range(3))


def test_image_seeds_are_distinct_and_stable():
    seeds = {image_seed(0, n) for n in range(10_000)}
    assert len(seeds) == 10_000
    assert image_seed(7, 3) == image_seed(7, 3) != image_seed(8, 3)
    torch.Generator().manual_seed(max(seeds))  # every seed fits a torch generator


def test_an_image_depends_on_its_seed_not_on_its_batch(pipe):
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    seeds = [image_seed(0, n) for n in range(7)]
    sampler = pipe.sampler
    whole = generate_chunk(pipe.model, pipe.tokenizer, sampler, labels, seeds)
    in_threes = np.concatenate(
        [
            generate_chunk(pipe.model, pipe.tokenizer, sampler, labels[i : i + 3], seeds[i : i + 3])
            for i in (0, 3, 6)
        ]
    )
    assert whole.dtype == np.uint8 and whole.shape == (7, 16, 16, 3)
    assert np.array_equal(whole, in_threes)
    reordered = generate_chunk(pipe.model, pipe.tokenizer, sampler, labels.flip(0), seeds[::-1])
    assert np.array_equal(whole, reordered[::-1])
    assert not np.array_equal(whole[0], whole[4])  # same class, other seed


def test_sample_set_layout_protocol_grid_and_pngs(pipe, tmp_path):
    plan = SamplePlan.make([0, 2, 3], per_class=3, seed=5, batch_size=4)
    out = tmp_path / "s"
    target = sample_to_dir(
        pipe.model, pipe.tokenizer, pipe.sampler, out, plan, source={"path": "x"}, png=True, grid=True
    )
    with np.load(target) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1", "labels"]
        arr, labels = npz["arr_0"], npz["labels"]
        assert arr.dtype == np.uint8 and arr.shape == (9, 16, 16, 3)
        assert labels.tolist() == [0, 0, 0, 2, 2, 2, 3, 3, 3] == npz["arr_1"].tolist()
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"{c:04d}_{i:03d}.png" for c in (0, 2, 3) for i in range(3)]
    assert np.array_equal(np.asarray(Image.open(out / "images" / "0002_001.png")), arr[4])
    assert np.asarray(Image.open(out / "grid.png")).shape == (3 * 18 + 2, 3 * 18 + 2, 3)
    assert not (out / CHUNK_DIR).exists() and not list(out.glob(".tmp-*"))
    record = json.loads((out / "protocol.json").read_text())
    protocol = record["protocol"]
    assert record["complete"] and record["resolution"] == [16, 16]
    assert protocol["sampler"] == {
        "name": "topk_topp",
        "options": {"cfg": 1.5, "guidance": "linear", "top_k": 16, "top_p": 0.9, "temperature": 1.0},
    }
    assert protocol["classes"] == "0,2-3" and protocol["per_class"] == 3 and protocol["num"] == 9
    assert protocol["seed"] == 5 and protocol["dtype"] == "fp32" and protocol["device"] == "cpu"
    assert protocol["checkpoint"]["path"] == "x" and protocol["checkpoint"]["model_sha256"].startswith(
        "sha256:"
    )
    assert {"varkit", "torch", "cpu", "world_size"} <= set(record["environment"])
    assert record["throughput"]["images"] == 9
    # the same arguments again: the set is complete, nothing is redrawn
    mtime = target.stat().st_mtime_ns
    sample_to_dir(pipe.model, pipe.tokenizer, pipe.sampler, out, plan, source={"path": "x"})
    assert target.stat().st_mtime_ns == mtime


def test_grid_is_capped(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr("varkit.sampling.GRID_MAX_CLASSES", 2)
    monkeypatch.setattr("varkit.sampling.GRID_MAX_PER_CLASS", 2)
    plan = SamplePlan.make(range(3), per_class=3, batch_size=9)
    out = tmp_path / "g"
    sample_to_dir(pipe.model, pipe.tokenizer, pipe.sampler, out, plan, grid=True)
    assert np.asarray(Image.open(out / "grid.png")).shape == (2 * 18 + 2, 2 * 18 + 2, 3)


def test_another_protocol_in_the_folder_is_refused(pipe, tmp_path):
    plan = SamplePlan.make([0, 1], per_class=2, batch_size=2)
    out = tmp_path / "s"
    sample_to_dir(pipe.model, pipe.tokenizer, pipe.sampler, out, plan)
    other = pipe.make_sampler(cfg=3.0)
    with pytest.raises(
        EvaluationError, match=r"another protocol \(sampler.options.cfg: 1.5 on disk, 3.0 now"
    ):
        sample_to_dir(pipe.model, pipe.tokenizer, other, out, plan)
    with pytest.raises(EvaluationError, match="is a file"):
        sample_to_dir(pipe.model, pipe.tokenizer, pipe.sampler, out / "samples.npz", plan)


def test_resume_draws_only_the_missing_chunks(pipe, tmp_path, monkeypatch):
    plan = SamplePlan.make(range(4), per_class=3, batch_size=5)  # chunks of 5, 5, 2
    whole = tmp_path / "whole"
    expected = sample_to_dir(pipe.model, pipe.tokenizer, pipe.sampler, whole, plan).read_bytes()

    # a run that stops after its first chunk, leaving a half-written file behind
    out = tmp_path / "resumed"
    calls = []

    def failing(*args, **kwargs):
        if calls:
            (out / CHUNK_DIR / ".tmp-chunk-000001.npy.123").write_bytes(b"half")
            raise KeyboardInterrupt
        calls.append(1)
        return generate_chunk(*args, **kwargs)

    monkeypatch.setattr("varkit.sampling.generate_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        sample_to_dir(pipe.model, pipe.tokenizer, pipe.sampler, out, plan)
    assert sorted(p.name for p in (out / CHUNK_DIR).iterdir()) == [
        ".tmp-chunk-000001.npy.123",
        "chunk-000000.npy",
    ]
    assert not (out / "samples.npz").exists()

    drawn = []
    monkeypatch.setattr(
        "varkit.sampling.generate_chunk", lambda *a, **k: drawn.append(len(a[3])) or generate_chunk(*a, **k)
    )
    target = sample_to_dir(pipe.model, pipe.tokenizer, pipe.sampler, out, plan, png=True)
    assert drawn == [5, 2]  # chunk 0 was on disk
    assert target.read_bytes() == expected
    assert len(list((out / "images").glob("*.png"))) == 12  # chunk 0's too, drawn before --png


def test_assembly_holds_one_chunk_at_a_time(tmp_path):
    chunks, rows, size = 20, 10, 64
    paths = []
    for c in range(chunks):
        path = tmp_path / f"chunk-{c}.npy"
        np.save(path, np.full((rows, size, size, 3), c, dtype=np.uint8))
        paths.append(path)
    chunk_bytes = rows * size * size * 3
    tracemalloc.start()
    shape = write_samples_npz(tmp_path / "samples.npz", paths, np.arange(chunks * rows))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert shape == (chunks * rows, size, size, 3)
    assert peak < 3 * chunk_bytes < chunks * chunk_bytes / 4  # never the whole array
    with np.load(tmp_path / "samples.npz") as npz:
        assert np.array_equal(npz["arr_0"][::rows, 0, 0, 0], np.arange(chunks))
    with zipfile.ZipFile(tmp_path / "samples.npz") as zf:
        assert {info.date_time for info in zf.infolist()} == {
            (1980, 1, 1, 0, 0, 0)
        }  # same samples, same bytes


# ------------------------------------------------------------------------ processes

#: 40 images in 20 chunks of 2: two ranks take 10 chunks each.
ARGS = ("--classes", "0-3", "--per-class", "10", "--batch-size", "2", "--seed", "11", "--device", "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(run, out):
    return [sys.executable, "-m", "varkit", "sample", str(run), "--out", str(out), *ARGS]


def _sample_here(run, out) -> None:
    """``varkit sample`` in this process, on one thread like the subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["sample", str(run), "--out", str(out), *ARGS]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process(tiny_run, tmp_path_factory) -> bytes:
    """The bytes of samples.npz drawn by one process."""
    out = tmp_path_factory.mktemp("one") / "s"
    _sample_here(tiny_run, out)
    return (out / "samples.npz").read_bytes()


def test_one_and_two_ranks_write_the_same_bytes(tiny_run, one_process, tmp_path):
    two = tmp_path / "two"
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            _command(tiny_run, two),
            env=subprocess_env(
                RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in range(2)
    ]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    assert (two / "samples.npz").read_bytes() == one_process
    assert json.loads((two / "protocol.json").read_text())["environment"]["world_size"] == 2


def test_a_killed_run_resumes_to_the_same_file(tiny_run, one_process, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(tiny_run, out), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while len(list((out / CHUNK_DIR).glob("chunk-*.npy"))) < 2 and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((out / CHUNK_DIR).glob("chunk-*.npy")))
    assert proc.returncode == -signal.SIGKILL and 2 <= done < 20, done
    assert not (out / "samples.npz").exists()

    drawn = []
    monkeypatch.setattr(
        "varkit.sampling.generate_chunk", lambda *a, **k: drawn.append(1) or generate_chunk(*a, **k)
    )
    _sample_here(tiny_run, out)
    assert len(drawn) == 20 - done  # the chunks on disk were kept
    assert (out / "samples.npz").read_bytes() == one_process
