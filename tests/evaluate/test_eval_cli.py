"""``varkit sample`` and ``varkit eval``: every bad argument is one paragraph and exit status 2,
before anything heavy runs; ``--sampler-option`` reaches the sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from eval_helpers import tiny_checkpoint

from varkit.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-p", "2"], "--top-p is 2.0; it must lie in [0, 1]"),
        (["--top-k", "-5"], "--top-k is -5; it must be >= 0"),
        (["--cfg", "-3"], "--cfg is -3.0; give a finite guidance scale >= 0"),
        (["--cfg", "nan"], "--cfg is nan; give a finite guidance scale >= 0"),
        (["--batch-size", "0"], "--batch-size is 0; it must be at least 1"),
        (["--num", "10"], "--num 10 does not split evenly over 4 classes"),
        (["--num", "8", "--per-class", "3"], "--num 8 disagrees with --per-class 3"),
        (["--classes", "0-9"], "class 9 is outside 0-3 of this model"),
        (
            ["--sampler-option", "top_q=3"],
            "sampler 'topk_topp' has no option 'top_q'; its options are: cfg, guidance",
        ),
        (["--sampler-option", "top_k=many"], "--sampler-option top_k: expected int, got 'many'"),
        (["--sampler-option", "cfg=2", "--cfg", "2"], "--cfg and --sampler-option cfg are both given"),
        (["--sampler", "nope"], "unknown sampler 'nope'"),
        (["--seed", "-1"], "--seed is -1; give a seed >= 0"),
    ],
)
def test_bad_sampling_arguments_exit_2(tiny_run, tmp_path, capsys, args, message):
    base = ["--per-class", "1"] if "--num" not in args else []
    code, _out, err = run_cli(
        capsys, "sample", tiny_run, "--out", tmp_path / "s", "--device", "cpu", *base, *args
    )
    assert code == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()  # refused before anything was loaded or written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_cuda_without_cuda_exits_2(tiny_run, tmp_path, capsys):
    code, _out, err = run_cli(
        capsys, "sample", tiny_run, "--out", tmp_path / "s", "--per-class", "1", "--device", "cuda"
    )
    assert code == 2 and "--device cuda but CUDA is not available here" in err and "--device cpu" in err


def test_out_that_is_a_file_and_a_run_that_is_not_a_run_exit_2(tiny_run, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    code, _out, err = run_cli(
        capsys, "sample", tiny_run, "--out", file, "--per-class", "1", "--device", "cpu"
    )
    assert code == 2 and f"--out {file} is a file" in err
    code, _out, err = run_cli(capsys, "sample", tmp_path, "--out", tmp_path / "s", "--per-class", "1")
    assert code == 2 and "no checkpoint found" in err
    code, _out, err = run_cli(capsys, "sample", tiny_run, "--out", tmp_path / "s", "--device", "cpu")
    assert code == 2 and "say how many images to draw" in err


def test_sampler_options_reach_the_sampler_and_the_protocol(tiny_run, tmp_path, capsys):
    out = tmp_path / "s"
    code, stdout, err = run_cli(
        capsys, "sample", tiny_run, "--out", out, "--classes", "1,3", "--per-class", "2", "--device", "cpu",
        "--sampler-option", "temperature=0.5", "--sampler-option", "guidance=constant", "--top-k", "4", "--grid",
    )  # fmt: skip
    assert code == 0, err
    assert stdout.strip() == str(out / "samples.npz")
    protocol = json.loads((out / "protocol.json").read_text())["protocol"]
    assert protocol["sampler"]["options"] == {
        "cfg": 1.5,  # the recipe's, kept
        "guidance": "constant",
        "top_k": 4,
        "top_p": 0.9,
        "temperature": 0.5,
    }
    assert protocol["checkpoint"]["weights"] == "model" and protocol["checkpoint"]["path"].endswith(
        "step-0000001"
    )
    with np.load(out / "samples.npz") as npz:
        assert npz["labels"].tolist() == [1, 1, 3, 3]
    assert (out / "grid.png").is_file() and not (out / "images").exists()
    # another sampler by name, with its own options
    code, _out, err = run_cli(
        capsys, "sample", tiny_run, "--out", tmp_path / "g", "--per-class", "1", "--device", "cpu", "--sampler", "greedy",
        "--sampler-option", "cfg=0",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "g" / "protocol.json").read_text())["protocol"]["sampler"] == {
        "name": "greedy",
        "options": {"cfg": 0.0, "guidance": "linear"},
    }


def test_eval_out_that_is_a_directory_exits_2_and_leaves_nothing(tiny_run, tmp_path, capsys):
    code, _out, err = run_cli(capsys, "eval", tiny_run, "--out", tmp_path)
    assert code == 2 and f"--out {tmp_path} is a directory" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no report, no temporary file
    code, _out, err = run_cli(capsys, "eval", tiny_run, "--ref", "x.npz")
    assert code == 2 and "--ref only apply with --fid" in err


def test_eval_fid_checks_its_arguments_before_sampling(tiny_run, tmp_path, capsys):
    code, _out, err = run_cli(capsys, "eval", tiny_run, "--fid", "--num", "4")
    assert code == 2 and "--fid needs --ref" in err
    code, _out, err = run_cli(
        capsys,
        "eval",
        tiny_run,
        "--fid",
        "--num",
        "4",
        "--ref",
        tmp_path / "none.npz",
        "--samples-dir",
        tmp_path / "s",
    )
    assert code == 2 and "none.npz does not exist" in err
    assert not (tmp_path / "s").exists()
    code, _out, err = run_cli(capsys, "eval", tmp_path / "norun", "--fid", "--num", "4", "--ref", "val")
    assert code == 2 and "no checkpoint found" in err


def test_eval_ref_val_never_runs_a_command_from_the_stored_recipe(tmp_path, capsys):
    run = tiny_checkpoint(
        tmp_path / "run",
        data={
            "source": "shards",
            "train_shards": "x.tar",
            "val_shards": f"pipe:touch {tmp_path / 'ran'}; cat a.tar",
        },
    )
    code, _out, err = run_cli(capsys, "eval", run, "--fid", "--num", "4", "--ref", "val", "--device", "cpu")
    assert code == 2 and "varkit runs `pipe:` patterns only when you give them yourself" in err
    assert not (tmp_path / "ran").exists() and not (run / "eval").exists()
