"""The training forward and loss trace as one graph: no graph break, for every built-in unit.

``torch._dynamo.explain`` runs the tracer only (no compiler), so this runs on the CPU in
seconds. A graph break would split the compiled training step around attention in every
block (as building masks with ``repeat_interleave`` under an ``lru_cache`` inside the
forward did).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo as dynamo
from helpers.fake_tokenizer import FakeConfig, FakeTokenizer

from varkit.model import ARModel, ModelConfig
from varkit.model.loss import ar_loss
from varkit.plugins import registry
from varkit_plugins.attention import AutoAttention, FlexAttention, SDPAttention

UNITS = {
    # unit name -> (tokenizer schedule, unit options)
    "scale": ((1, 2, 3, 4, 6, 8), {}),
    "token": ((4,), {}),
    "token rope2d": ((4,), {"position": "rope2d"}),
    "patch": ((4,), {"k": 2}),
}


def _backend(name: str):
    if name == "sdpa":
        # split_min 8 makes the scale layout split into exact unmasked calls, as VAR's does at 64.
        return SDPAttention(SDPAttention.Config(split_min=8))
    if name == "flex":
        return FlexAttention(FlexAttention.Config(compile=False))
    return AutoAttention()


def _training_step(unit_key: str, backend_name: str):
    schedule, options = UNITS[unit_key]
    tokenizer = FakeTokenizer(FakeConfig(schedule=schedule))
    cls = registry().get("unit", unit_key.split()[0])
    unit = cls(cls.Config(**options), tokenizer=tokenizer, width=32)
    model = ARModel(
        ModelConfig(depth=2, width=32, heads=2, num_classes=10, drop_path=0.1),
        unit=unit,
        attention=_backend(backend_name),
        vocab_size=tokenizer.vocab_size,
        code_dim=tokenizer.code_dim,
    ).train()
    g = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, tokenizer.vocab_size, (2, h, w), generator=g) for h, w in tokenizer.schedule]
    inputs = unit.teacher_forcing(codes, tokenizer).detach()
    targets, labels = unit.targets(codes), torch.tensor([1, 2])
    if backend_name == "flex":
        # torch has no flex-attention backward on the CPU ("FlexAttention does not support
        # backward on CPU"), and refuses even to trace it with inputs that need grad. The
        # traced forward is the same with frozen weights; on CUDA the flex backward runs.
        model.requires_grad_(False)

    def step(inputs, labels, targets):
        return ar_loss(model(inputs, labels), targets).mean()

    return model, step, (inputs, labels, targets)


CASES = [(unit, backend) for unit in ("scale", "token", "patch") for backend in ("sdpa", "flex")]
CASES += [("token rope2d", "sdpa"), ("scale", "auto")]


@pytest.mark.parametrize("unit, backend", CASES)
def test_training_forward_and_loss_trace_without_graph_breaks(unit, backend):
    model, step, args = _training_step(unit, backend)
    if unit == "scale" and backend == "sdpa":
        assert len(model.attn_mask.segments) == 4  # the split path is what gets traced
    dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # flex: "called without torch.compile"
        explained = dynamo.explain(step)(*args)
    reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1
    dynamo.reset()


def test_masks_are_buffers_that_follow_the_model_and_stay_out_of_checkpoints():
    model, _, _ = _training_step("scale", "sdpa")
    buffers = dict(model.attn_mask.named_buffers())
    assert {"ids", "head_visible"} <= set(buffers)
    assert not any(key.startswith("attn_mask.") for key in model.state_dict())
    model.to(torch.float64)
    assert model.attn_mask.ids.dtype == torch.int64 and model.attn_mask.head_visible.dtype == torch.bool
    with torch.device("meta"):
        meta = ARModel(
            ModelConfig(depth=1, width=32, heads=2, num_classes=10),
            unit=model.unit,
            attention=FlexAttention(),
            vocab_size=model.vocab_size,
            code_dim=model.code_dim,
        )
    assert meta.attn_mask.ids.is_meta and meta.attn_mask.block_kv_indices.is_meta


def test_changing_the_backend_prepares_its_mask_where_the_model_is():
    model, _, (inputs, labels, _) = _training_step("scale", "sdpa")
    model.eval()
    reference = model(inputs, labels)
    model.attention = registry().get("attention", "math")()
    assert type(model.attn_mask).__name__ == "PreparedMask" and model.attn_mask.visible is not None
    torch.testing.assert_close(model(inputs, labels), reference, rtol=1e-5, atol=1e-5)
