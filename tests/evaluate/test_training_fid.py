"""FID during training: ``train.eval_every`` logs FID and IS against the validation images
to metrics.jsonl and TensorBoard, with the Inception weights from torch-fidelity's cache."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from eval_helpers import tiny_recipe_dict

from varkit import recipe as recipe_mod
from varkit.errors import EvaluationError
from varkit.evaluate.during_training import CACHE_FILE
from varkit.evaluate.inception import default_weights_path
from varkit.train import run
from varkit.train.metrics import read_metrics


def test_fid_is_logged_during_training(tmp_path, monkeypatch, inception_weights):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    default_weights_path().parent.mkdir(parents=True)
    shutil.copy(inception_weights, default_weights_path())  # where torch-fidelity caches it
    out = tmp_path / "run"
    data = tiny_recipe_dict(
        out,
        train={"steps": 2, "eval_every": 2, "eval_num": 4, "tensorboard": True},
        data={
            "cache_dir": str(tmp_path / "cache"),
            "synthetic": {"num_classes": 4, "images_per_class": 8, "val_images_per_class": 1},
        },
    )
    run(recipe_mod.from_dict(data))
    records = [r for r in read_metrics(out / "metrics.jsonl") if "fid" in r]
    assert len(records) == 1 and records[0]["step"] == 2 and records[0]["fid_images"] == 4
    assert np.isfinite(records[0]["fid"]) and records[0]["fid"] > 0 and records[0]["inception_score"] >= 1
    with np.load(out / "eval" / CACHE_FILE) as cached:
        assert cached["pool"].shape == (4, 2048)  # 4 classes × 1 validation image
    events = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("ar/fid")] == pytest.approx([records[0]["fid"]])


def test_training_with_fid_stops_at_once_without_inception_weights(tmp_path, monkeypatch, torch_fidelity):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    out = tmp_path / "run"
    data = tiny_recipe_dict(
        out, train={"steps": 2, "eval_every": 1}, data={"cache_dir": str(tmp_path / "cache")}
    )
    with pytest.raises(EvaluationError, match=r"weights-inception-2015-12-05-6726825d\.pth"):
        run(recipe_mod.from_dict(data))
    assert not (out / "checkpoints").exists()


def test_eval_fields_validate():
    with pytest.raises(Exception, match="eval_num"):
        recipe_mod.from_dict(tiny_recipe_dict("x", train={"eval_num": 0}))
    assert recipe_mod.from_dict(tiny_recipe_dict("x")).train.eval_every == 0  # off unless asked
