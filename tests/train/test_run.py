"""End-to-end AR runs in this process on a tiny recipe: resume, errors, outputs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from train_helpers import tiny_recipe, tiny_recipe_dict

from varkit import checkpoint as ck
from varkit.errors import CheckpointError, TrainingError
from varkit.train import run
from varkit.train.loop import TrainingLoop
from varkit.train.metrics import read_metrics


def _weights(run_dir, name="model"):
    return ck.load_weights(ck.latest_checkpoint(run_dir), name)


def test_resumed_run_equals_uninterrupted_run(tmp_path, fake_stream, monkeypatch, caplog):
    sections = {"train": {"ema": 0.9, "grad_accum": 2, "warmup_steps": 2, "weight_decay_end": 0.1}}
    final = run(tiny_recipe(tmp_path / "a", **sections))
    assert final.name == "step-0000006"

    original = TrainingLoop._save

    def save_then_crash(self):
        path = original(self)
        if self.step == 3:
            raise KeyboardInterrupt  # killed right after the first checkpoint
        return path

    monkeypatch.setattr(TrainingLoop, "_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_recipe(tmp_path / "b", **sections))
    monkeypatch.setattr(TrainingLoop, "_save", original)
    assert ck.latest_checkpoint(tmp_path / "b").name == "step-0000003"
    with caplog.at_level(logging.INFO, logger="varkit.train"):
        run(tiny_recipe(tmp_path / "b", **sections))
    assert "resuming from step 3" in caplog.text

    for name in ("model", "ema", "tokenizer"):
        a, b = _weights(tmp_path / "a", name), _weights(tmp_path / "b", name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"
    losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # the killed run's lines were replaced
    assert len(losses(tmp_path / "b")) == 6


def test_rerun_after_a_crash_before_the_first_checkpoint_keeps_no_stale_metrics(
    tmp_path, fake_stream, monkeypatch
):
    def crash(self):
        raise KeyboardInterrupt  # killed before the first checkpoint was written

    monkeypatch.setattr(TrainingLoop, "_save", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_recipe(tmp_path))
    assert ck.latest_checkpoint(tmp_path) is None
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]  # lines were written
    monkeypatch.undo()
    run(tiny_recipe(tmp_path))  # starts again from step 0
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_cli_trains_twice_in_one_process(tmp_path, fake_stream):
    # A notebook or a test calls ``varkit run`` more than once: the second call must find
    # the same entry point (importing the implementation once must not shadow it).
    from varkit.cli import main

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "a")))
    assert main(["run", str(path)]) == 0
    assert main(["run", str(path), f"out_dir={tmp_path / 'b'}"]) == 0
    assert ck.latest_checkpoint(tmp_path / "b").name == "step-0000006"


def test_outputs_of_a_run(tmp_path, fake_stream):
    out = tmp_path / "run"
    run(tiny_recipe(out, train={"sample_every": 4, "keep_checkpoints": 1}))
    assert (out / "recipe.yaml").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == ["step-0000006"]
    step_dir = out / "checkpoints" / "step-0000006"
    assert {p.name for p in step_dir.iterdir()} == {
        "model.safetensors",
        "tokenizer.safetensors",
        "trainer.pt",
        "recipe.yaml",
    }
    state = ck.load_trainer_state(step_dir)
    assert state["step"] == 6 and len(state["rng"]) == 1 and state["data"] == [{"index": 6}]
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    first = steps[0]
    for key in ("loss", "acc", "lr", "weight_decay", "grad_norm", "images_per_s", "tokens_per_s", "epoch"):
        assert isinstance(first[key], float), key
    assert {"loss/s0", "loss/s1", "loss/s2", "acc/s0", "acc/s2"} <= first.keys()
    # the mean over positions weights each step by its length (1, 4, 16 positions)
    per_step = np.array([first["loss/s0"], first["loss/s1"], first["loss/s2"]])
    assert first["loss"] == pytest.approx((per_step * [1, 4, 16]).sum() / 21, rel=1e-5)
    assert first["tokens_per_s"] == pytest.approx(first["images_per_s"] * 21)
    accuracy = [r for r in records if "sample_class_accuracy" in r]
    assert len(accuracy) == 1 and 0.0 <= accuracy[0]["sample_class_accuracy"] <= 1.0
    for name in ("step-0000004.png", "final.png"):
        grid = np.asarray(Image.open(out / "samples" / name))
        assert grid.shape == (2 * 18 + 2, 2 * 18 + 2, 3)  # 2 classes × 2 images of 16 px, 2 px padding


def test_tensorboard_events_mirror_metrics_jsonl(tmp_path, fake_stream):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    run(tiny_recipe(out, train={"tensorboard": True}))
    events = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"ar/loss", "ar/lr", "ar/grad_norm", "ar/loss/s0", "ar/sample_class_accuracy"} <= set(
        events.Tags()["scalars"]
    )
    logged = [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    written = [(e.step, e.value) for e in events.Scalars("ar/loss")]
    assert [s for s, _ in written] == [s for s, _ in logged]
    assert [v for _, v in written] == pytest.approx([v for _, v in logged], rel=1e-6)


def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path, fake_stream, monkeypatch):
    import varkit.train.ar as ar

    calls = []
    real = ar.ar_loss

    def poisoned(logits, targets, label_smoothing):
        calls.append(1)
        loss = real(logits, targets, label_smoothing)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(ar, "ar_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"NaN or infinite at step 5.*step-0000003"):
        run(tiny_recipe(out))
    assert ck.latest_checkpoint(out).name == "step-0000003"
    assert [s for s, _ in ck.list_checkpoints(out / "checkpoints")] == [3]


def test_nan_is_caught_before_a_checkpoint_even_between_log_lines(tmp_path, fake_stream, monkeypatch):
    import varkit.train.ar as ar

    real = ar.ar_loss
    calls = []

    def poisoned(logits, targets, label_smoothing):
        calls.append(1)
        return real(logits, targets, label_smoothing) * (float("inf") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(ar, "ar_loss", poisoned)
    with pytest.raises(TrainingError, match="at step 2; no checkpoint was written yet"):
        run(tiny_recipe(tmp_path / "run", train={"log_every": 50}))
    assert ck.latest_checkpoint(tmp_path / "run" / "checkpoints") is None


def test_another_recipe_is_refused_unless_forced(tmp_path, fake_stream):
    out = tmp_path / "run"
    run(tiny_recipe(out, train={"steps": 3}))
    # allowed: a longer run, other reporting; resumes from step 3
    final = run(tiny_recipe(out, train={"steps": 4, "log_every": 2, "sample_per_class": 1}))
    assert final.name == "step-0000004"
    changed = tiny_recipe(out, train={"steps": 5}, model={"width": 64, "heads": 2})
    with pytest.raises(TrainingError, match=r"another recipe(.|\n)*model\.width: 32 -> 64(.|\n)*--force"):
        run(changed)
    with pytest.raises(CheckpointError) as info:
        run(changed, force=True)
    assert "head.weight" in str(info.value) or "blocks.0" in str(info.value)


def test_out_dir_without_recipe_yaml_is_checked_against_its_checkpoint(tmp_path, fake_stream):
    out = tmp_path / "run"
    run(tiny_recipe(out, train={"steps": 3}))
    (out / "recipe.yaml").unlink()
    with pytest.raises(TrainingError, match=r"model\.depth"):
        run(tiny_recipe(out, model={"depth": 2}))


def test_bf16_autocast_and_label_smoothing_train_on_cpu(tmp_path, fake_stream):
    out = tmp_path / "run"
    run(tiny_recipe(out, train={"precision": "bf16", "label_smoothing": 0.1, "steps": 2, "grad_clip": 0.0}))
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_recipe_dict_round_trips_through_run_dir(tmp_path, fake_stream):
    from varkit import recipe as recipe_mod

    out = tmp_path / "run"
    recipe = tiny_recipe(out, train={"steps": 1})
    run(recipe)
    stored = recipe_mod.from_dict(ck.read_recipe(out))
    assert stored == recipe
    assert tiny_recipe_dict(out)["out_dir"] == str(out)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_is_bit_exact_with_data_loader_workers(tmp_path, synthetic_cache, monkeypatch, workers):
    # The real synthetic stream (DataLoader workers >= 1 create their iterator lazily, and
    # creating one draws from the global RNG that the resumed run has just restored).
    sections = {
        "data": {"workers": workers, "cache_dir": str(synthetic_cache)},
        "train": {"steps": 5, "checkpoint_every": 2},
        "model": {"class_dropout": 0.5},
    }
    run(tiny_recipe(tmp_path / "a", **sections))

    original = TrainingLoop._save

    def save_then_crash(self):
        path = original(self)
        if self.step == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(TrainingLoop, "_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_recipe(tmp_path / "b", **sections))
    monkeypatch.setattr(TrainingLoop, "_save", original)
    run(tiny_recipe(tmp_path / "b", **sections))

    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[key], b[key]) for key in a), "the resumed run trained on other draws"
    losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
