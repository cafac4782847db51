"""The benchmark scripts run end to end on tiny models and write their JSON.

Nothing here is timed: the point is that the scripts keep working as the engine
changes, and that the official-style baseline they compare against computes what
varkit computes (same logits, same codes, same sampling distribution).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script as a module (they import ``_common`` from their folder)."""
    monkeypatch.syspath_prepend(str(BENCH))
    threads = torch.get_num_threads()
    yield importlib.import_module
    torch.set_num_threads(threads)  # the scripts set their own thread count


# One thread: a tiny model's ops are too small to share, and two threads on a busy
# machine spend their time waiting for each other.
FAST = ["--quick", "--threads", "1", "--reps", "1", "--big-reps", "1"]


def test_model_speed_quick_runs_in_fresh_subprocesses(tmp_path):
    out = tmp_path / "model_speed.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "model_speed.py"), *FAST, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(out.read_text())
    assert payload["memory_isolated"] is True
    assert {r["mode"] for r in payload["results"]} == {"train", "generate"}
    for r in payload["results"]:
        assert r["images_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["images_per_s"] * r["seq_len"])
        assert r["peak_mib"] >= 0
    assert payload["machine"]["threads"] == 1 and payload["machine"]["torch"] == torch.__version__
    assert "| train |" in proc.stdout  # the markdown table


def test_official_style_quick(bench, tmp_path):
    out = tmp_path / "official.json"
    payload = bench("official_style").main([*FAST, "--in-process", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    (result,) = payload["results"]
    names = [row["comparison"] for row in result["rows"]]
    assert len(names) == 4 and all(row["ratio"] > 0 for row in result["rows"])
    check = result["check"]
    assert check["same_codes_concat_cache"] is True
    assert check["max_abs_logit_diff_dense_mask"] < 1e-4
    assert check["max_abs_prob_diff_full_sort"] < 1e-5
    assert set(result["memory_mib"]) == {
        "train/varkit",
        "train/official-style",
        "generate/varkit",
        "generate/official-style",
    }


def test_units_generation_quick(bench, tmp_path):
    out = tmp_path / "units.json"
    payload = bench("units_generation").main([*FAST, "--out", str(out)])
    assert out.is_file()
    rows = {r["unit"]: r for r in payload["results"]}
    assert set(rows) == {"scale", "token", "patch k=2", "patch k=4"}
    assert rows["scale"]["time_vs_scale"] == 1.0
    # Same final grid: the cell units' steps are the grid's cells.
    grid = rows["token"]["grid"]
    cells = grid[0] * grid[1]
    assert [rows[u]["steps"] for u in ("token", "patch k=2", "patch k=4")] == [cells, cells // 4, cells // 16]
    assert rows["scale"]["grid"] == grid


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (5, 0.0), (10, 0.5), (64, 0.96), (3, 1.0)])
def test_full_sort_sampler_keeps_the_same_candidates(bench, top_k, top_p):
    """The whole-vocabulary baseline and varkit's top-k-first filter give one distribution."""
    from varkit_plugins.samplers import filter_top_k_top_p

    official = bench("official_style")
    logits = torch.randn(32, 64, generator=torch.Generator().manual_seed(top_k)) * 3
    values, index = filter_top_k_top_p(logits, top_k=top_k, top_p=top_p)
    ours = (
        values.softmax(-1)
        if index is None
        else torch.zeros_like(logits).scatter_(-1, index, values.softmax(-1))
    )
    theirs = official.full_sort_probs(logits, top_k=top_k, top_p=top_p)
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-5)


def test_concat_cache_is_swapped_for_one_model_only(bench):
    official = bench("official_style")
    harness = official.Harness(1, 2, quick=True, device=torch.device("cpu"), dtype=None)
    with official.concat_cache(harness.model) as model:
        assert isinstance(model.new_cache(2), official.ConcatKVCache)
    assert type(harness.model.new_cache(2)).__name__ == "KVCache"


def test_generation_steps_quick(bench, tmp_path):
    out = tmp_path / "steps.json"
    payload = bench("generation_steps").main([*FAST, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    variants = {(r["section"].split(",")[0], r["what"]) for r in payload["results"]}
    assert ("sampler", "race (topk_topp)") in variants and ("generation", "static-shape steps") in variants
    assert all(r["ms"] > 0 for r in payload["results"])


def test_the_replaced_sampling_rule_draws_from_the_same_distribution(bench):
    """The benchmark's "before" side samples what topk_topp samples (only the draw differs)."""
    official = bench("generation_steps")
    from varkit_plugins.samplers import TopKTopP

    config = TopKTopP.Config(top_k=3, top_p=0.0, cfg=0.0)
    logits = torch.tensor([[[2.0, 1.0, 0.5, -1.0, -3.0]]]).expand(1, 20_000, 5)
    g = torch.Generator().manual_seed(0)
    before, _ = official.MultinomialTopKTopP(config).sample_guided(
        logits, None, t=0.0, step=0, num_steps=1, generator=g
    )
    after, _ = TopKTopP(config).sample_guided(logits, None, t=0.0, step=0, num_steps=1, generator=g)
    freq = [torch.bincount(c.flatten(), minlength=5).float() / c.numel() for c in (before, after)]
    assert freq[0][3:].sum() == 0 and freq[1][3:].sum() == 0
    torch.testing.assert_close(freq[0], freq[1], atol=0.02, rtol=0)


def test_strategies_quick(bench, tmp_path):
    out = tmp_path / "strategies.json"
    payload = bench("strategies").main(["--quick", "--threads", "1", "--reps", "1", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert results == json.loads(json.dumps(payload["results"]))

    def row(setting, strategy):
        (found,) = [r for r in results if r["setting"] == setting and r["strategy"].startswith(strategy)]
        return found

    assert {r["strategy"].split()[0].rstrip(",") for r in results} == {
        "plain",
        "prune_tokens",
        "collaborative",
        "jacobi",
    }
    for window in ("jacobi w≤16 adaptive", "jacobi w=16 fixed"):
        greedy = row("token d1 random, greedy", window)
        assert greedy["same_codes_as_plain"] and greedy["passes"] <= greedy["steps"]
    assert row("scale d1 random", "prune_tokens")["positions_run_share"] < 1
    assert row("scale d1 random", "collaborative")["passes_by_model"] == {"model": 3, "draft": 2}
    assert row("scale d1 random", "plain d1")["passes_by_model"] == {"model": 4}
