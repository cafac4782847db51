"""Built-in attention backends: ``math``, ``sdpa``, ``flex`` and ``xformers``.

Every backend implements `varkit.AttentionBackend.attend` with inputs
``(b, nh, l, hd)`` and must agree with ``math``, the plain reference, to float rounding
(``tests/plugins/test_attention_contract.py`` checks every registered backend that is
available). A mask is a `varkit.masks.BlockCausal` (training over the full
sequence) or None (a cached generation step: every query sees every cached key).
"""

from __future__ import annotations

import functools
import importlib.util
import math

import attrs
import torch
import torch.nn.functional as F

from varkit.base import AttentionBackend
from varkit.hookspecs import hookimpl
from varkit.masks import BlockCausal


class MathAttention(AttentionBackend):
    """The plain reference: explicit ``softmax(q k^T * scale + mask) v``.

    Scores, softmax and the weighted sum are computed in float32 whatever the input
    dtype, so it is the yardstick for every fused backend.
    """

    name = "math"

    def attend(self, q, k, v, *, mask: BlockCausal | None, scale: float) -> torch.Tensor:
        with torch.autocast(q.device.type, enabled=False):  # autocast would lower einsum
            scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale  # (b, nh, lq, lk)
            if mask is not None:
                scores = scores.masked_fill(~mask.dense(q.device), float("-inf"))
            weights = scores.softmax(dim=-1)
            return torch.einsum("bhqk,bhkd->bhqd", weights, v.float()).to(q.dtype)


class SDPAttention(AttentionBackend):
    """``torch.nn.functional.scaled_dot_product_attention`` (CPU and GPU).

    Plain causal masks use ``is_causal=True`` (no mask tensor at all); other
    block-causal masks pass the cached boolean ``(l, l)`` matrix, which broadcasts over
    batch and heads, so no float ``(b, nh, l, l)`` bias is ever built.
    """

    name = "sdpa"

    def attend(self, q, k, v, *, mask: BlockCausal | None, scale: float) -> torch.Tensor:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if mask.is_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(q.device), scale=scale)


class FlexAttention(AttentionBackend):
    """``torch.nn.attention.flex_attention`` with a block mask built from the step ids.

    The block mask lets the fused kernel skip every tile above the block-causal
    staircase. Offered on CUDA only: on CPU torch runs it unfused (slower than
    ``sdpa``), which the tests still use to check the arithmetic.
    """

    name = "flex"

    @attrs.frozen(kw_only=True)
    class Config:
        #: Compile the kernel on first use; without it flex attention runs unfused.
        compile: bool = True

    def __init__(self, config=None):
        super().__init__(config)
        self._kernel = None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "flex attention needs a CUDA device (none found); use sdpa"
        return True, ""

    def _flex(self):
        # Imported and compiled on first use: registering the plugin stays cheap.
        if self._kernel is None:
            from torch.nn.attention.flex_attention import flex_attention

            self._kernel = (
                torch.compile(flex_attention, dynamic=False) if self.config.compile else flex_attention
            )
        return self._kernel

    def attend(self, q, k, v, *, mask: BlockCausal | None, scale: float) -> torch.Tensor:
        if mask is None:
            # A cached generation step: every query sees every key, and each step has a new
            # (lq, lk), which would recompile the compiled kernel at every step.
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        return self._flex()(q, k, v, block_mask=_flex_block_mask(mask, str(q.device)), scale=scale)


@functools.lru_cache(maxsize=32)
def _flex_block_mask(mask: BlockCausal, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    step_ids = mask.step_ids(device)

    def visible(b, h, q_idx, kv_idx):
        return step_ids[kv_idx] <= step_ids[q_idx]

    return create_block_mask(visible, None, None, mask.seq_len, mask.seq_len, device=device)


class XFormersAttention(AttentionBackend):
    """``xformers.ops.memory_efficient_attention`` (CUDA).

    Plain causal masks use xformers' ``LowerTriangularMask``; other block-causal
    masks an additive ``(l, l)`` bias expanded (not copied) over batch and heads.
    """

    name = "xformers"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("xformers") is None:
            return False, "xformers is not installed (pip install 'varkit[gpu]')"
        if not torch.cuda.is_available():
            return False, "xformers needs a CUDA device (none found); use sdpa"
        return True, ""

    def attend(self, q, k, v, *, mask: BlockCausal | None, scale: float) -> torch.Tensor:
        import xformers.ops as xops  # optional dependency, imported only when used

        b, nh, lq, _ = q.shape
        bias = None
        if mask is not None and mask.is_causal:
            bias = xops.LowerTriangularMask()
        elif mask is not None:
            bias = _additive_bias(mask, str(q.device), q.dtype).expand(b, nh, lq, lq)
        # xformers wants (b, l, nh, hd)
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
        )
        return out.transpose(1, 2)


@functools.lru_cache(maxsize=32)
def _additive_bias(mask: BlockCausal, device: str, dtype: torch.dtype) -> torch.Tensor:
    # xformers needs the bias rows 16-byte aligned: allocate a multiple of 8 and slice.
    length = mask.seq_len
    padded = math.ceil(length / 8) * 8
    bias = torch.zeros(1, 1, length, padded, device=device, dtype=dtype)
    bias[..., :length].masked_fill_(~mask.dense(device), float("-inf"))
    return bias[..., :length]


@hookimpl
def varkit_register_attention_backends(register):
    register(MathAttention)
    register(SDPAttention)
    register(FlexAttention)
    register(XFormersAttention)
