"""The varkit command: every bad input is one paragraph and exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from varkit.cli import build_parser, main

HERE = Path(__file__).parent / "recipes"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_subcommand_has_help(capsys):
    _parser, commands = build_parser()
    for name in commands:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert "usage: varkit " + name in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and "varkit 0." in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", str(HERE / "missing.yaml")], "recipe file not found"),
        (["run", str(HERE / "bad_yaml.yaml")], "YAML syntax error"),
        (["run", str(HERE / "base.yaml"), "sampler.name=topk"], "unknown sampler 'topk'"),
        (["run", str(HERE / "base.yaml"), "model.depht=3"], "unknown key 'depht' (did you mean 'depth'?)"),
        (["run", str(HERE / "base.yaml"), "model.depth=deep"], "model.depth: expected int, got 'deep' (str)"),
        (["validate", str(HERE / "bad_keys.yaml")], "train.steps: expected int"),
    ],
)
def test_bad_input_exits_2_with_a_message(capsys, args, message):
    code, _out, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_validate_reports_every_problem_one_line_each(capsys):
    code, _out, err = run_cli(capsys, "validate", str(HERE / "bad_keys.yaml"))
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 3
    assert all(line.startswith(str(HERE / "bad_keys.yaml") + ":") for line in lines)


def test_print_shows_the_resolved_recipe(capsys):
    import yaml

    code, out, _err = run_cli(capsys, "run", str(HERE / "child.yaml"), "--print", "train.steps=5")
    assert code == 0
    data = yaml.safe_load(out)
    assert data["train"]["steps"] == 5 and data["model"]["depth"] == 3 and data["sampler"]["top_k"] == 50


def test_plugins_lists_kind_name_distribution_availability(capsys):
    code, out, _err = run_cli(capsys, "plugins")
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    assert ["attention", "backend", "sdpa", "varkit", "yes"] in rows
    assert any(r[:3] == ["attention", "backend", "flex"] and r[4] == "no:" for r in rows)


def test_plugins_says_which_attention_kernel_runs(capsys):
    code, out, _err = run_cli(capsys, "plugins", "--kind", "attention", "--device", "cpu")
    assert code == 0
    kernels = out.split("attention kernels on cpu", 1)[1]
    sdpa = kernels.split("\n  sdpa\n", 1)[1]
    assert "SDPA split into 5 exact calls" in sdpa.splitlines()[0]  # VAR's scales
    assert "is_causal" in sdpa.splitlines()[2]  # token
    assert "\n  auto\n" in kernels and "\n  flex\n" not in kernels  # flex needs CUDA


def test_real_process_exit_code_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "varkit", "run", str(HERE / "base.yaml"), "unit.name=scael"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "unknown prediction unit 'scael' (did you mean 'scale'?)" in proc.stderr
    assert "Traceback" not in proc.stderr
