"""benchmarks/gpu.py: the dry run of every section on the CPU, and its bookkeeping.

Nothing here is timed. The dry run checks that the one GPU command keeps working as the
engine changes (the official side included, when the official code is beside the
checkout); the fast tests check that results survive a section that fails or a run cut
short.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from varkit.build import build_model, build_tokenizer
from varkit.recipe import from_dict

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
SECTIONS = ["environment", "train", "generation", "scale_vs_token", "memory"]


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu as module

    return module


@pytest.mark.slow
def test_dry_run_runs_every_section_on_the_cpu(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import _official
    finally:
        sys.path.remove(str(BENCH))
    reference, why = _official.reference_dir()
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu.py"),
            "--dry-run",
            "--threads",
            "1",
            "--budget-s",
            "1e9",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    payload = json.loads(out.read_text())
    sections = payload["sections"]
    assert list(sections) == SECTIONS
    assert all(s["status"] == "ok" for s in sections.values()), {
        k: s.get("error") for k, s in sections.items()
    }
    assert {"auto", "sdpa", "math"} <= set(sections["environment"]["attention_kernels"])

    train = sections["train"]["entries"]
    assert train["varkit sdpa"]["images_per_s"] > 0 and train["varkit auto compiled"]["images_per_s"] > 0
    assert "CUDA" in train["varkit flex"]["reason"]
    generation = sections["generation"]["batches"]
    assert set(generation) == {"1", "2"} and all(
        row["varkit eager"]["total_s"] > 0 for row in generation.values()
    )
    if reference is None:
        assert train["official"]["status"] == "skipped" and why in train["official"]["reason"]
    else:
        # Both sides hold the same weights: the logits agree before anything is timed.
        assert sections["train"]["logits"]["relative"] < 1e-4
        assert train["official"]["step_s"] > 0 and train["varkit sdpa"]["speedup_vs_official"] > 0
        assert all(row["official"]["decode_s"] > 0 for row in generation.values())
    rows = sections["scale_vs_token"]["rows"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["token_over_scale"] > 0 for r in rows)
    assert set(sections["memory"]["depths"]) == {"d2", "d3"}
    assert "| varkit sdpa |" in proc.stdout  # the markdown summary


def test_results_are_written_after_each_section_and_failures_kept(gpu, tmp_path):
    out = tmp_path / "gpu.json"
    run = gpu.Run(gpu.argparse.Namespace(dry_run=True, device=None, out=str(out), reference=None, budget_s=1e9,
                                         peak_tflops=None, threads=0))  # fmt: skip
    run.section("environment", lambda: {"answer": 1})
    assert json.loads(out.read_text())["sections"]["environment"]["answer"] == 1

    def broken():
        raise RuntimeError("the GPU caught fire")

    run.section("train", broken)
    saved = json.loads(out.read_text())["sections"]
    assert saved["environment"]["status"] == "ok"
    assert saved["train"]["status"] == "failed" and "caught fire" in saved["train"]["error"]
    run.args.budget_s = 0
    run.section("memory", lambda: pytest.fail("a section past the budget must not start"))
    assert json.loads(out.read_text())["sections"]["memory"]["status"] == "skipped"


def test_official_side_is_skipped_with_a_reason_without_the_code(gpu, tmp_path):
    folder, why = gpu.official.reference_dir(tmp_path / "nowhere")
    assert folder is None and "nowhere" in why and "VARKIT_VAR_REFERENCE" in why


def test_official_count_of_d16_is_the_papers(gpu):
    """0.93 TFLOP per training image: dense attention, AdaLN once per image."""
    validated = from_dict(gpu.scale_recipe(gpu.FULL, 16))
    with torch.device("meta"):
        model = build_model(validated, build_tokenizer(validated, device="meta"), device="meta")
    assert gpu.official_flops_per_image(model) / 1e12 == pytest.approx(gpu.OFFICIAL_D16_TFLOP, abs=0.005)
