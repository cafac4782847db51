"""The training loop driven by a tiny fake Stage: accumulation, windows, cadence, resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from varkit import checkpoint as ck
from varkit.errors import TrainingError
from varkit.recipe.train import StageConfig
from varkit.train.distributed import DistEnv
from varkit.train.ema import EMA
from varkit.train.loop import MetricWindow, TrainingLoop
from varkit.train.metrics import read_metrics
from varkit.train.optim import build_adamw, param_groups
from varkit.train.stage import OptimizerSlot, Precision, Stage


class Batch(tuple):
    """(x, y) whose length is its number of images."""

    def __len__(self) -> int:
        return self[0].shape[0]


class Samples:
    """Sample ``i`` is a pure function of ``i``: x ``(4,)``, y ``(1,)``."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.index = 0  # samples handed out
        self.samples_per_epoch = 64

    @staticmethod
    def sample(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, generator=g)
        return x, x.sum(0, keepdim=True) * 0.5 + 1.0

    def __iter__(self):
        while True:
            xs, ys = zip(*(self.sample(self.index + j) for j in range(self.batch_size)))
            self.index += self.batch_size
            yield Batch((torch.stack(xs), torch.stack(ys)))

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


class FakeStage(Stage):
    """Linear regression with dropout (draws from the global RNG, as class dropout does)."""

    name = "fake"
    title = "fake"
    guarded = ("loss",)

    def __init__(self, root, *, config: StageConfig, ema: float | None = None, eval_every: int = 0, **hooks):
        self.config, self.root, self.seed, self.env = config, root, 0, DistEnv()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Dropout(0.2), nn.Linear(4, 1))
        self.spare = nn.Linear(2, 2)  # a second optimizer whose parameters never get gradients
        self.stream = Samples(config.micro_batch(1))
        self.stream_iter = None
        self.total = config.total_steps(self.stream.samples_per_epoch)
        self.ema_decay, self.eval_every, self.hooks = ema, eval_every, hooks
        self.precision = Precision("fp32", torch.device("cpu"))
        self.calls: dict[str, list] = {"forward_backward": [], "preview": [], "evaluate": [], "initial": []}

    def modules(self):
        return {"model": self.model, "spare": self.spare}

    def load_initial_weights(self):
        self.calls["initial"].append(True)

    def distribute(self):
        self.net = self.model
        self.ema = EMA(self.model, self.ema_decay) if self.ema_decay else None

    def optimizer_slots(self):
        cfg = self.config
        self.slot = OptimizerSlot(
            optimizer=build_adamw(param_groups(self.model, cfg.weight_decay), cfg, torch.device("cpu")),
            params=list(self.model.parameters()),
            module=self.model,
            scaler=self.precision.scaler(),
            clip=cfg.grad_clip,
        )
        spare = OptimizerSlot(
            name="spare",
            optimizer=torch.optim.SGD(self.spare.parameters(), lr=1.0),
            params=list(self.spare.parameters()),
            module=self.spare,
            scaler=self.precision.scaler(),
        )
        return [self.slot, spare]

    def forward_backward(self, batch, *, step):
        x, y = batch
        per_sample = (self.net(x) - y).pow(2).squeeze(1)  # (b,)
        if "poison" in self.hooks and step == self.hooks["poison"]:
            per_sample = per_sample * float("nan")
        (per_sample.mean() / self.config.grad_accum).backward()
        stats = {"loss": per_sample.detach().sum()}
        if step >= 2:  # a metric that starts mid-run, like a discriminator's
            stats["late"] = torch.tensor(3.0) * len(batch)
        self.calls["forward_backward"].append((step, len(batch), per_sample.detach().sum().item()))
        return stats

    def preview(self, tag, *, final):
        self.calls["preview"].append((tag, final))
        return {"previewed": tag} if final else None

    def evaluate(self, step, *, final):
        self.calls["evaluate"].append((step, final))
        return {"score": float(step)}


def _config(**kw) -> StageConfig:
    base = {
        "steps": 5,
        "batch_size": 4,
        "lr": 0.05,
        "precision": "fp32",
        "log_every": 2,
        "checkpoint_every": 2,
        "checkpoint_minutes": 0,
        "keep_checkpoints": 10,
        "warmup_steps": 0,
        "weight_decay": 0.0,
    }
    return StageConfig(**(base | kw))


def _run(stage: FakeStage):
    return TrainingLoop(stage, recipe={"seed": 0}).run()


def test_accumulated_micro_batches_make_the_same_step_as_one_batch(tmp_path):
    whole = FakeStage(tmp_path / "a", config=_config(grad_accum=1))
    split = FakeStage(tmp_path / "b", config=_config(grad_accum=2))
    whole.model[0].p = split.model[0].p = 0.0  # no dropout: the two see the same computation
    _run(whole)
    _run(split)
    assert [n for _, n, _ in split.calls["forward_backward"]] == [2] * 10
    for a, b in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_window_averages_each_metric_over_the_images_that_had_it(tmp_path):
    stage = FakeStage(tmp_path, config=_config(log_every=3, grad_accum=2))
    _run(stage)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [3, 5]
    calls = stage.calls["forward_backward"]
    for record, steps in zip(records, ([0, 1, 2], [3, 4])):
        inside = [(n, total) for step, n, total in calls if step in steps]
        assert record["loss"] == pytest.approx(sum(t for _, t in inside) / sum(n for n, _ in inside))
        assert record["late"] == pytest.approx(3.0)  # not 3.0 × 1/3: averaged over its own images
        assert record["stage"] == "fake" and record["lr"] > 0 and record["grad_norm"] > 0
        assert "spare_grad_norm" not in record  # a slot without gradients is not stepped
        assert record["epoch"] == pytest.approx(record["step"] * 4 / 64)


def test_checkpoint_preview_and_evaluation_cadence(tmp_path):
    stage = FakeStage(tmp_path, config=_config(sample_every=2), eval_every=3)
    final = _run(stage)
    assert final == tmp_path / "checkpoints" / "step-0000005"
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "checkpoints")] == [2, 4, 5]
    assert stage.calls["preview"] == [("step-0000002", False), ("step-0000004", False), ("final", True)]
    assert stage.calls["evaluate"] == [(3, False), (5, True)]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["score"] for r in records if "score" in r] == [3.0, 5.0]
    assert {"stage": "fake", "step": 5, "previewed": "final"} in records
    assert stage.calls["initial"] == [True]
    state = ck.load_trainer_state(final)
    assert {"optimizer", "scaler", "optimizer_spare", "scaler_spare", "rng", "data"} <= state.keys()


def test_resume_repeats_the_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch):
    config = _config(grad_accum=2, log_every=1)
    straight = FakeStage(tmp_path / "a", config=config, ema=0.5)
    _run(straight)

    original = TrainingLoop._save

    def save_then_crash(self):
        path = original(self)
        if self.step == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(TrainingLoop, "_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _run(FakeStage(tmp_path / "b", config=config, ema=0.5))
    monkeypatch.setattr(TrainingLoop, "_save", original)
    resumed = FakeStage(tmp_path / "b", config=config, ema=0.5)
    loop = TrainingLoop(resumed, recipe={"seed": 0})
    loop.setup()
    assert loop.step == 2 and resumed.calls["initial"] == []  # initial weights are for fresh runs only
    loop.run()
    for name in ("model", "ema"):
        a = ck.load_weights(ck.latest_checkpoint(tmp_path / "a"), name)
        b = ck.load_weights(ck.latest_checkpoint(tmp_path / "b"), name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    again = FakeStage(tmp_path / "b", config=config)
    assert _run(again) == tmp_path / "b" / "checkpoints" / "step-0000005"  # trained already
    assert again.calls["forward_backward"] == []


def test_a_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    stage = FakeStage(tmp_path, config=_config(log_every=10), poison=2)
    with pytest.raises(TrainingError, match=r"fake training stopped.*at step 3.*step-0000002"):
        _run(stage)
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "checkpoints")] == [2]


def test_mfu_from_flops_counted_on_the_first_micro_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("VARKIT_PEAK_FLOPS", "1e9")
    stage = FakeStage(tmp_path, config=_config(steps=2))
    stage.model[0].p = 0.0
    _run(stage)
    (record, *_) = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    # Linear(4, 1): 2·4 FLOPs forward and 2·4 for the weight gradient, per image
    assert record["mfu"] == pytest.approx(record["images_per_s"] * 16 / 1e9)


def test_metric_window_reduces_sums_by_their_own_counts():
    window = MetricWindow()
    window.add({"loss": torch.tensor([2.0, 4.0]), "x": torch.tensor(6.0)}, 2)
    window.add({"loss": torch.tensor([4.0, 0.0])}, 2)
    means = window.reduce(DistEnv())
    assert means["loss"].tolist() == [1.5, 1.0] and means["x"].item() == 3.0
    assert MetricWindow().reduce(DistEnv()) == {}
