"""Every registered attention backend that is available agrees with ``math``."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from varkit.masks import BlockCausal, PreparedMask
from varkit.plugins import registry
from varkit_plugins import attention
from varkit_plugins.attention import AutoAttention, FlexAttention, MathAttention, SDPAttention

BACKENDS = [entry for entry in registry() if entry.kind == "attention"]
AVAILABLE = [entry.name for entry in BACKENDS if entry.available()[0]]


def test_builtin_backends_registered():
    assert {"auto", "math", "sdpa", "flex", "xformers"} <= {e.name for e in BACKENDS}
    assert "math" in AVAILABLE and "sdpa" in AVAILABLE and "auto" in AVAILABLE


@pytest.mark.parametrize("name", [e.name for e in BACKENDS])
def test_available_reports_a_reason(name):
    ok, why = registry().entry("attention", name).available()
    assert ok or why, "an unavailable backend must say why"


def _qkv(b, nh, lq, lk, hd, dtype=torch.float32):
    g = torch.Generator().manual_seed(lq * 1000 + lk)
    shape_q, shape_k = (b, nh, lq, hd), (b, nh, lk, hd)
    return (
        torch.randn(shape_q, generator=g).to(dtype),
        torch.randn(shape_k, generator=g).to(dtype),
        torch.randn(shape_k, generator=g).to(dtype),
    )


def _reference(q, k, v, mask, scale):
    """Attention written out position by position, independent of every backend."""
    out = torch.empty_like(q, dtype=torch.float64)
    ids = None if mask is None else mask.step_ids()
    for i in range(q.shape[2]):
        visible = torch.ones(k.shape[2], dtype=torch.bool) if ids is None else ids <= ids[i]
        scores = (q[:, :, i : i + 1].double() @ k[:, :, visible].double().transpose(-1, -2)) * scale
        out[:, :, i] = (scores.softmax(-1) @ v[:, :, visible].double())[:, :, 0]
    return out


def test_math_matches_position_by_position_reference():
    mask = BlockCausal((1, 3, 2, 4))
    q, k, v = _qkv(2, 3, 10, 10, 8)
    torch.testing.assert_close(
        MathAttention().attend(q, k, v, mask=mask, scale=0.4).double(),
        _reference(q, k, v, mask, 0.4),
        atol=1e-5,
        rtol=1e-5,
    )


def test_math_mask_hides_later_steps():
    mask = BlockCausal((2, 2))
    q, k, v = _qkv(1, 1, 4, 4, 4)
    out = MathAttention().attend(q, k, v, mask=mask, scale=1.0)
    v2 = v.clone()
    v2[:, :, 2:] += 100.0  # values of step 1 must not reach step 0
    out2 = MathAttention().attend(q, k, v2, mask=mask, scale=1.0)
    torch.testing.assert_close(out[:, :, :2], out2[:, :, :2])
    assert not torch.allclose(out[:, :, 2:], out2[:, :, 2:])


steps = st.lists(st.integers(1, 6), min_size=1, max_size=6)


@pytest.mark.parametrize("name", AVAILABLE)
@settings(max_examples=15, deadline=None)
@given(lengths=steps, heads=st.integers(1, 3), scale=st.floats(0.05, 2.0))
def test_backend_matches_math_block_causal(name, lengths, heads, scale):
    backend = registry().get("attention", name)()
    mask = BlockCausal(lengths)
    q, k, v = _qkv(2, heads, mask.seq_len, mask.seq_len, 16)
    expected = MathAttention().attend(q, k, v, mask=mask, scale=scale)
    torch.testing.assert_close(
        backend.attend(q, k, v, mask=mask, scale=scale), expected, atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("name", AVAILABLE)
@settings(max_examples=15, deadline=None)
@given(lengths=steps, heads=st.integers(1, 3))
def test_backend_matches_math_with_its_prepared_mask(name, lengths, heads):
    """What a model hands the backend: its own preparation of the mask, built once."""
    backend = registry().get("attention", name)()
    mask = BlockCausal(lengths)
    prepared = backend.prepare(mask)
    assert isinstance(prepared, PreparedMask) and prepared.layout == mask
    q, k, v = _qkv(2, heads, mask.seq_len, mask.seq_len, 16)
    torch.testing.assert_close(
        backend.attend(q, k, v, mask=prepared, scale=0.3),
        MathAttention().attend(q, k, v, mask=mask, scale=0.3),
        atol=1e-5,
        rtol=1e-4,
    )


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=7), split_min=st.integers(1, 10))
def test_sdpa_split_into_unmasked_calls_is_exact(lengths, split_min):
    """The per-step split (VAR's scales on flash attention) computes what the dense mask does."""
    backend = SDPAttention(SDPAttention.Config(split_min=split_min))
    mask = BlockCausal(lengths)
    q, k, v = _qkv(2, 2, mask.seq_len, mask.seq_len, 16)
    expected = MathAttention().attend(q, k, v, mask=mask, scale=0.7)
    for given_mask in (mask, backend.prepare(mask)):
        torch.testing.assert_close(
            backend.attend(q, k, v, mask=given_mask, scale=0.7), expected, atol=1e-5, rtol=1e-4
        )


def test_sdpa_splits_vars_scales_and_keeps_other_layouts_whole():
    backend = SDPAttention()
    var = BlockCausal([n * n for n in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)])
    segments = backend.prepare(var).segments
    assert [(s.start, s.end, s.masked) for s in segments] == [
        (0, 91, True), (91, 155, False), (155, 255, False), (255, 424, False), (424, 680, False)
    ]  # fmt: skip
    assert backend.segments(BlockCausal([4] * 64)) is None  # patch: many short steps
    assert backend.segments(BlockCausal([1] * 16)) is None  # token: is_causal instead
    assert SDPAttention(SDPAttention.Config(split_min=0)).segments(var) is None
    assert "split into 5 exact calls" in backend.kernel(var, device="cpu")


def test_split_backward_matches_math():
    mask = BlockCausal((1, 4, 9, 16))
    q, k, v = (t.double().requires_grad_() for t in _qkv(2, 2, 30, 30, 8))
    grads = []
    for backend in (SDPAttention(SDPAttention.Config(split_min=4)), MathAttention()):
        out = backend.attend(q, k, v, mask=backend.prepare(mask), scale=0.5)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)  # math computes in float32


@pytest.mark.parametrize("name", AVAILABLE)
def test_backend_describes_its_kernel(name):
    backend = registry().get("attention", name)()
    for mask in (BlockCausal((1, 4, 9)), BlockCausal((1,) * 8), None):
        text = backend.kernel(mask, device="cpu", dtype=torch.float32, head_dim=16)
        assert isinstance(text, str) and text and "unknown" not in text


def test_auto_picks_sdpa_on_cpu_and_flex_for_block_layouts_on_cuda(monkeypatch):
    auto = AutoAttention()
    var = BlockCausal((1, 4, 9, 16))
    assert auto.kernel(var, device="cpu").startswith("sdpa: ")
    assert auto.kernel(None, device="cpu").startswith("sdpa: ")
    monkeypatch.setattr(attention, "flex_compilable", lambda: False)  # no Triton: sdpa everywhere
    assert not auto._wants_flex(var, torch.device("cuda"))
    monkeypatch.setattr(attention, "flex_compilable", lambda: True)
    assert auto._wants_flex(var, torch.device("cuda"))
    assert not auto._wants_flex(BlockCausal((1,) * 8), torch.device("cuda"))  # causal: flash is_causal
    assert not auto._wants_flex(None, torch.device("cuda"))
    prepared = auto.prepare(var)
    assert prepared.flex is not None and prepared.sdpa is not None


@pytest.mark.parametrize("name", AVAILABLE)
@settings(max_examples=10, deadline=None)
@given(lq=st.integers(1, 9), extra=st.integers(0, 20))
def test_backend_matches_math_cached_decoding(name, lq, extra):
    """mask None: the queries of one step against every key cached so far (lq <= lk)."""
    backend = registry().get("attention", name)()
    q, k, v = _qkv(2, 2, lq, lq + extra, 16)
    expected = MathAttention().attend(q, k, v, mask=None, scale=0.125)
    torch.testing.assert_close(
        backend.attend(q, k, v, mask=None, scale=0.125), expected, atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("name", AVAILABLE)
def test_backend_plain_causal_mask(name):
    """All steps of length one (raster next-token) is the is_causal fast path."""
    backend = registry().get("attention", name)()
    mask = BlockCausal((1,) * 12)
    assert mask.is_causal
    q, k, v = _qkv(2, 2, 12, 12, 16)
    torch.testing.assert_close(
        backend.attend(q, k, v, mask=mask, scale=0.3),
        MathAttention().attend(q, k, v, mask=mask, scale=0.3),
        atol=1e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize("name", AVAILABLE)
def test_backend_keeps_dtype(name):
    backend = registry().get("attention", name)()
    q, k, v = _qkv(1, 2, 5, 5, 16, dtype=torch.bfloat16)
    out = backend.attend(q, k, v, mask=BlockCausal((2, 3)), scale=0.25)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    expected = MathAttention().attend(q, k, v, mask=BlockCausal((2, 3)), scale=0.25)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@settings(max_examples=8, deadline=None)
@given(lengths=steps, lq=st.integers(1, 5))
def test_flex_arithmetic_on_cpu(lengths, lq):
    """flex is offered on CUDA only, but its mask and call are checked here unfused."""
    backend = FlexAttention(FlexAttention.Config(compile=False, block_size=16))
    mask = BlockCausal(lengths)
    q, k, v = _qkv(1, 2, mask.seq_len, mask.seq_len, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile"
        out = backend.attend(q, k, v, mask=mask, scale=0.5)
        prepared = backend.attend(q, k, v, mask=backend.prepare(mask), scale=0.5)
        cached = backend.attend(q[:, :, :lq], k, v, mask=None, scale=0.5)
    expected = MathAttention().attend(q, k, v, mask=mask, scale=0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(prepared, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        cached, MathAttention().attend(q[:, :, :lq], k, v, mask=None, scale=0.5), atol=1e-5, rtol=1e-4
    )


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    from varkit.errors import PluginError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PluginError, match=r"not available.*CUDA"):
        registry().get("attention", "flex")
