"""The tokenizer stage, other units, the sample command and progress output."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import tiny_recipe

from varkit import checkpoint as ck
from varkit.model.loss import StepGroups
from varkit.train import run
from varkit.train.metrics import read_metrics
from varkit.train.progress import Progress


def test_tokenizer_stage_then_ar_stage(tmp_path, fake_stream, caplog):
    out = tmp_path / "run"
    recipe = tiny_recipe(
        out,
        tokenizer={"disc_weight": 0.1, "disc_start": 1, "disc_layers": 2, "lpips_weight": 0.0},
        tokenizer_train={"steps": 3, "batch_size": 4, "lr": 1e-3, "precision": "fp32", "log_every": 1,
                         "checkpoint_every": 2, "checkpoint_minutes": 0},
        train={"steps": 2},
    )  # fmt: skip
    run(recipe)
    tok_dir = ck.latest_checkpoint(out / "tokenizer")
    assert tok_dir == out / "tokenizer" / "checkpoints" / "step-0000003"
    records = read_metrics(out / "tokenizer" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and "grad_norm" in r and "rec" in r for r in records)
    assert "disc_loss" in records[-1] and "disc_grad_norm" in records[-1]
    recon = np.asarray(Image.open(out / "tokenizer" / "samples" / "recon-final.png"))
    assert recon.shape[0] == 2 * 18 + 2  # originals over reconstructions
    # the AR run froze exactly the trained tokenizer and ships it in its checkpoint
    trained = ck.load_weights(tok_dir, "tokenizer")
    shipped = ck.load_weights(ck.latest_checkpoint(out), "tokenizer")
    assert all(torch.equal(trained[k], shipped[k]) for k in trained)
    # running again finds both stages done
    before = read_metrics(out / "metrics.jsonl")
    with caplog.at_level(logging.INFO, logger="varkit.train"):
        run(recipe)
    assert "trained already" in caplog.text and "resuming from step 2" in caplog.text
    assert "AR: trained already" in caplog.text
    assert read_metrics(out / "metrics.jsonl") == before  # nothing redone, nothing logged twice


def test_a_tokenizer_metric_that_starts_mid_window_is_averaged_over_its_steps(
    tmp_path, fake_stream, monkeypatch
):
    from varkit_plugins.tokenizers.msvq import MSVQ

    original = MSVQ.training_losses

    def with_late_metric(self, images, *, step):
        losses = original(self, images, step=step)
        if step >= 1:  # like the discriminator's losses after disc_start
            losses.metrics["late"] = torch.tensor(2.0)
        return losses

    monkeypatch.setattr(MSVQ, "training_losses", with_late_metric)
    out = tmp_path / "run"
    recipe = tiny_recipe(
        out,
        tokenizer_train={"steps": 4, "batch_size": 4, "precision": "fp32", "log_every": 4, "grad_accum": 2},
        train={"steps": 1},
    )
    run(recipe)
    (record,) = read_metrics(out / "tokenizer" / "metrics.jsonl")
    assert record["late"] == pytest.approx(2.0)  # not 2.0 × 3/4


@pytest.mark.parametrize("unit", ["token", "patch"])
def test_other_units_train_with_the_same_loop(tmp_path, fake_stream, unit):
    out = tmp_path / "run"
    tokenizer = {"name": "vq", "image_size": 16, "ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
                 "norm_groups": 8, "level_attention": False, "mid_attention": False, "vocab_size": 64,
                 "code_dim": 8}  # fmt: skip
    run(tiny_recipe(out, tokenizer=tokenizer, unit={"name": unit}, train={"steps": 2}))
    record = next(r for r in read_metrics(out / "metrics.jsonl") if "loss" in r)
    assert np.isfinite(record["loss"])
    assert (out / "samples" / "final.png").is_file()


def test_sample_command_writes_pngs_grid_and_npz(tmp_path, fake_stream):
    from varkit.cli import main

    out = tmp_path / "run"
    run(tiny_recipe(out, train={"steps": 1, "ema": 0.5}))
    target = tmp_path / "samples"
    argv = ["sample", str(out), "--classes", "0,2", "--per-class", "3", "--out", str(target), "--png", "--grid"]  # fmt: skip
    assert main(argv) == 0
    pngs = sorted(p.name for p in (target / "images").iterdir())
    assert pngs == [f"{c:04d}_{i:03d}.png" for c in (0, 2) for i in range(3)]
    assert np.asarray(Image.open(target / "images" / pngs[0])).shape == (16, 16, 3)
    assert np.asarray(Image.open(target / "grid.png")).shape == (2 * 18 + 2, 3 * 18 + 2, 3)
    with np.load(target / "samples.npz") as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (6, 16, 16, 3)
        assert npz["labels"].tolist() == [0, 0, 0, 2, 2, 2]
        first = np.asarray(Image.open(target / "images" / "0000_000.png"))
        assert np.array_equal(npz["arr_0"][0], first)


def test_progress_logs_lines_without_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="varkit.train.progress"):
        progress = Progress("ar", total=10, start=2, tty=False)
        progress.update(3)
        progress.update(4, {"loss": 1.23456, "lr": 1e-4, "images_per_s": 12.34})
        progress.close()
    assert caplog.messages == ["ar step 4/10 loss 1.2346 lr 1.00e-04 img/s 12.3 eta 0:00:00"]


def test_progress_draws_a_bar_on_a_terminal(capsys):
    progress = Progress("ar", total=10, start=0, tty=True)
    progress.update(5, {"loss": 2.0, "lr": 1e-3, "images_per_s": 7.0})
    progress.close()
    err = capsys.readouterr().err
    assert "5/10" in err and "loss=2.0000" in err


def test_step_groups_merge_many_steps():
    few = StepGroups((1, 4, 9), torch.device("cpu"))
    assert few.names == ["s0", "s1", "s2"] and few.sizes.tolist() == [1, 4, 9]
    many = StepGroups((1,) * 40, torch.device("cpu"))
    assert len(many.names) == 14 and many.names[0] == "s0-2" and many.names[-1] == "s39"
    assert many.reduce(torch.ones(40)).sum().item() == 40
