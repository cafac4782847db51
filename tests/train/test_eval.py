"""``varkit eval``: validation metrics of a trained run."""

from __future__ import annotations

import json
import math

from train_helpers import tiny_recipe

from varkit.cli import main
from varkit.train import run


def test_eval_reports_loss_accuracy_and_usage_per_step(tmp_path, synthetic_cache, capsys):
    out = tmp_path / "run"
    run(tiny_recipe(out, data={"cache_dir": str(synthetic_cache)}, train={"steps": 2}))
    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--batch-size", "3", "--out", str(report)]) == 0
    metrics = json.loads(report.read_text())
    assert metrics["images"] == 4  # 4 classes × 1 validation image each
    assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]), rel_tol=1e-6)
    # Three scales (1, 2, 4): one group each; the overall loss is their position-weighted mean.
    sizes = {"s0": 1, "s1": 4, "s2": 16}
    weighted = sum(metrics[f"loss/{g}"] * n for g, n in sizes.items()) / sum(sizes.values())
    assert math.isclose(metrics["loss"], weighted, rel_tol=1e-6)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["rec_l1"] > 0
    assert all(0.0 < metrics[f"usage/{k}"] <= 1.0 for k in range(3))
    assert "perplexity" in capsys.readouterr().out

    assert main(["eval", str(out), "--max-images", "2", "--out", str(report)]) == 0
    assert json.loads(report.read_text())["images"] == 2


def test_eval_of_a_missing_run_exits_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
