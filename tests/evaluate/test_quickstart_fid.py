"""The quickstart run scored end to end: ``varkit eval RUN --fid --ref val`` samples, runs
torch-fidelity's Inception (random weights from a file: nothing is downloaded) on the
samples and the run's validation images, and writes the report. docs/evaluation.md
records the same command at --num 2000 on the full validation set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from varkit.cli import main


@pytest.mark.slow
def test_eval_fid_of_the_quickstart(quickstart_run, inception_weights, tmp_path, capsys):
    before = sorted(p.relative_to(quickstart_run) for p in quickstart_run.rglob("*"))
    samples = tmp_path / "fid"
    argv = [
        "eval", str(quickstart_run), "--fid", "--num", "40", "--ref", "val", "--ref-num", "40",
        "--inception-weights", str(inception_weights), "--samples-dir", str(samples), "--device", "cpu",
        "--out", str(tmp_path / "report.json"),
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("FID")

    report = json.loads((samples / "metrics.json").read_text())
    assert report == json.loads((tmp_path / "report.json").read_text())
    metrics = report["metrics"]
    assert metrics["fid"] > 0 and metrics["inception_score"] >= 1
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert report["samples"]["images"] == 40 and report["samples"]["resolution"] == [32, 32]
    assert report["reference"]["kind"] == "loader" and report["reference"]["images"] == 40
    assert "synthetic val split" in report["reference"]["path"] and report["reference"]["pixels_sha256"]
    protocol = report["protocol"]["protocol"]
    assert protocol["num"] == 40 and protocol["per_class"] == 4 and protocol["classes"] == "0-9"
    assert protocol["sampler"]["options"]["cfg"] == 2.0  # the quickstart recipe's sampler
    with np.load(samples / "samples.npz") as npz:
        assert npz["arr_0"].shape == (40, 32, 32, 3)
    assert sorted(p.relative_to(quickstart_run) for p in quickstart_run.rglob("*")) == before
