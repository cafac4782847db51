"""The GPU kernels of training attention: flex compiled, the SDPA split on flash, a compiled
training step. Skipped without CUDA; the CPU tests check the same arithmetic unfused."""

from __future__ import annotations

import pytest
import torch
from helpers.fake_tokenizer import FakeConfig, FakeTokenizer

from varkit.masks import BlockCausal
from varkit.model import ARModel, ModelConfig
from varkit.model.loss import ar_loss
from varkit.plugins import registry
from varkit_plugins.attention import AutoAttention, FlexAttention, MathAttention, SDPAttention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VAR = BlockCausal([n * n for n in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)])


def _qkv(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [
        torch.randn(2, 4, VAR.seq_len, 64, device="cuda", generator=g, dtype=dtype).requires_grad_()
        for _ in range(3)
    ]


@pytest.mark.parametrize(
    "backend",
    [SDPAttention(), FlexAttention(), AutoAttention()],
    ids=["sdpa split", "flex compiled", "auto"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_training_attention_and_its_gradients_match_math_on_cuda(backend, dtype):
    q, k, v = _qkv(dtype)
    prepared = backend.prepare(VAR).to("cuda")
    out = backend.attend(q, k, v, mask=prepared, scale=0.125)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    expected = MathAttention().attend(q, k, v, mask=VAR, scale=0.125)
    expected_grads = torch.autograd.grad(expected.float().square().sum(), (q, k, v))
    tol = {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(out.float(), expected.float(), **tol)
    for ours, theirs in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(ours.float(), theirs.float(), **tol)


def test_sdpa_runs_vars_later_scales_on_flash_in_bf16():
    text = SDPAttention().kernel(VAR, device="cuda", dtype=torch.bfloat16, head_dim=64)
    assert "split into 5 exact calls" in text and "one unmasked call per step (flash)" in text
    assert "flash" in SDPAttention().kernel(BlockCausal([1] * 256), device="cuda", dtype=torch.bfloat16)
    assert AutoAttention().kernel(VAR, device="cuda", dtype=torch.bfloat16).startswith("flex: ")


def test_compiled_training_step_matches_eager_on_cuda():
    tokenizer = FakeTokenizer(FakeConfig(schedule=(1, 2, 3, 4, 6, 8)))
    unit_cls = registry().get("unit", "scale")
    unit = unit_cls(unit_cls.Config(), tokenizer=tokenizer, width=128)
    config = ModelConfig(depth=2, width=128, heads=2, num_classes=10, drop_path=0.0, class_dropout=0.0)
    model = ARModel(config, unit=unit, attention=AutoAttention(), vocab_size=32, code_dim=8).cuda()
    tokenizer = tokenizer.cuda()
    g = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, 32, (4, h, w), generator=g).cuda() for h, w in tokenizer.schedule]
    inputs, targets = unit.teacher_forcing(codes, tokenizer).detach(), unit.targets(codes)
    labels = torch.tensor([0, 1, 2, 3], device="cuda")

    def loss():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return ar_loss(model(inputs, labels), targets).mean()

    eager = loss()
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model.compile()
    compiled = loss()
    compiled.backward()
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)
    for p, expected in zip(model.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, expected, atol=5e-2, rtol=5e-2)
