"""Built-in attention backends: ``auto``, ``math``, ``sdpa``, ``flex`` and ``xformers``.

Every backend implements `varkit.AttentionBackend.attend` with inputs
``(b, nh, l, hd)`` and must agree with ``math``, the plain reference, to float rounding
(``tests/plugins/test_attention_contract.py`` checks every registered backend that is
available). A mask is what the backend's `varkit.AttentionBackend.prepare` made
of the unit's `varkit.masks.BlockCausal` when the model was built (training over
the full sequence), a bare ``BlockCausal`` (a direct call), or None (a cached
generation step: every query sees every cached key).

How each one skips the work the mask hides:

- ``sdpa``: plain causal layouts (``token``) take ``is_causal=True``, SDPA's flash
  path. Layouts whose later steps are long (``scale``) are split exactly: the leading
  small steps in one masked call, then one call per step whose queries see every key
  up to the step's end, so those calls need no mask and run flash attention on exactly
  the visible pairs (`varkit.masks.BlockCausal.split`). Other layouts (``patch``:
  many short steps) pass the boolean ``(l, l)`` mask, which rules flash out.
- ``flex``: a block mask built once per layout, so the compiled kernel skips every
  tile above the block-causal staircase whatever the layout.
- ``auto`` (the default): ``flex`` for block-causal layouts on CUDA when torch has flex
  attention, ``sdpa`` for everything else (causal layouts, cached steps, the CPU).
"""

from __future__ import annotations

import functools
import importlib.util
import math

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v

from varkit.base import AttentionBackend
from varkit.hookspecs import hookimpl
from varkit.masks import BlockCausal, PreparedMask, Segment

Mask = BlockCausal | PreparedMask | None


class MathAttention(AttentionBackend):
    """The plain reference: explicit ``softmax(q k^T * scale + mask) v``.

    Scores, softmax and the weighted sum are computed in float32 whatever the input
    dtype, so it is the yardstick for every fused backend.
    """

    name = "math"

    def attend(self, q, k, v, *, mask: Mask, scale: float) -> torch.Tensor:
        with torch.autocast(q.device.type, enabled=False):  # autocast would lower einsum
            scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale  # (b, nh, lq, lk)
            if mask is not None:
                scores = scores.masked_fill(~mask.dense(q.device), float("-inf"))
            weights = scores.softmax(dim=-1)
            return torch.einsum("bhqk,bhkd->bhqd", weights, v.float()).to(q.dtype)

    def kernel(self, mask, *, device, dtype=torch.float32, head_dim=64) -> str:
        return "explicit float32 softmax(q kᵀ) v over every (query, key) pair" + (
            "" if mask is None else ", the mask as a dense (l, l) matrix"
        )


# ------------------------------------------------------------------------------- sdpa


class SplitMask(PreparedMask):
    """A block-causal mask split into exact calls: the segments, and the head's small mask."""

    def __init__(self, layout: BlockCausal, segments: tuple[Segment, ...]):
        super().__init__(layout, dense=False)
        self.segments = segments
        head = segments[0]
        self.register_buffer(
            "head_visible", self.ids[: head.end, None] >= self.ids[None, : head.end], persistent=False
        )  # (p, p): the mask restricted to the leading steps

    def extra_repr(self) -> str:
        return f"{self.layout!r}, {len(self.segments)} calls"


@attrs.frozen(kw_only=True)
class SDPAConfig:
    """Options of the ``sdpa`` backend."""

    #: Split a block-causal layout into exact unmasked calls (flash attention) when every
    #: step after the leading ones holds at least this many positions; 0 never splits.
    split_min: int = attrs.field(default=64, validator=[v.instance_of(int), v.ge(0)])


class SDPAttention(AttentionBackend):
    """``torch.nn.functional.scaled_dot_product_attention`` (CPU and GPU).

    Plain causal masks use ``is_causal=True`` (no mask tensor at all). A block-causal
    layout whose later steps are long (VAR's scales) is split exactly into one masked
    call for the leading small steps and one unmasked call per later step (each step's
    queries see every key up to its end), so that SDPA can pick flash attention and
    computes only the visible pairs. Other layouts pass the boolean ``(l, l)`` matrix,
    which broadcasts over batch and heads (no float ``(b, nh, l, l)`` bias is built).
    """

    name = "sdpa"
    Config = SDPAConfig

    def segments(self, mask: BlockCausal) -> tuple[Segment, ...] | None:
        """The exact split this backend runs ``mask`` as, or None for one call."""
        if self.config.split_min <= 0 or mask.is_causal:
            return None
        return mask.split(self.config.split_min)

    def prepare(self, mask: BlockCausal) -> PreparedMask:
        segments = self.segments(mask)
        if segments is not None:
            return SplitMask(mask, segments)
        return PreparedMask(mask, dense=not mask.is_causal)

    def attend(self, q, k, v, *, mask: Mask, scale: float) -> torch.Tensor:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if mask.is_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        if isinstance(mask, SplitMask):
            segments, head = mask.segments, mask.head_visible
        else:
            segments = self.segments(mask.layout)
            head = None if segments is None else mask.dense(q.device)[: segments[0].end, : segments[0].end]
        if segments is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(q.device), scale=scale)
        outs = []
        for seg in segments:
            q_seg, k_seg, v_seg = q[:, :, seg.start : seg.end], k[:, :, : seg.end], v[:, :, : seg.end]
            seg_mask = head if seg.masked else None
            outs.append(F.scaled_dot_product_attention(q_seg, k_seg, v_seg, attn_mask=seg_mask, scale=scale))
        return torch.cat(outs, dim=2)  # (b, nh, l, hd)

    def kernel(self, mask, *, device, dtype=torch.float32, head_dim=64) -> str:
        if mask is None:
            return f"SDPA {sdpa_choice(device, dtype, head_dim, 16, 64)} (cached step, no mask)"
        seq = mask.seq_len
        if mask.is_causal:
            return (
                f"SDPA {sdpa_choice(device, dtype, head_dim, seq, seq, causal=True, grad=True)} (is_causal)"
            )
        segments = self.segments(mask)
        if segments is None:
            dense = mask.dense(device)
            chosen = sdpa_choice(device, dtype, head_dim, seq, seq, mask=dense, grad=True)
            return f"SDPA {chosen} with a dense (l, l) boolean mask (every pair computed)"
        head = segments[0]
        head_kernel = sdpa_choice(
            device, dtype, head_dim, head.end, head.end, mask=head.masked or None, grad=True
        )
        last = segments[-1]
        rest_kernel = sdpa_choice(device, dtype, head_dim, last.end - last.start, last.end, grad=True)
        work = sum((s.end - s.start) * s.end for s in segments) / seq**2
        return (
            f"SDPA split into {len(segments)} exact calls: positions 0-{head.end - 1} "
            f"{'with their mask' if head.masked else 'unmasked'} ({head_kernel}), then one unmasked call per "
            f"step ({rest_kernel}); {work:.0%} of the dense (l, l) work"
        )


_SDPA_NAMES = {
    "FLASH_ATTENTION": "flash",
    "EFFICIENT_ATTENTION": "memory-efficient",
    "CUDNN_ATTENTION": "cuDNN",
    "MATH": "math (unfused)",
    "OVERRIDEABLE": "overrideable",
}


def sdpa_choice(
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    lq: int,
    lk: int,
    *,
    mask: torch.Tensor | bool | None = None,
    causal: bool = False,
    grad: bool = False,
) -> str:
    """The kernel SDPA dispatches to for inputs of this kind, as torch itself decides it.

    ``mask`` True stands for a boolean ``(lq, lk)`` mask. Probed with two heads of
    zeros on ``device``; on the CPU "flash" is torch's CPU flash-attention kernel.
    """
    try:
        device = torch.device(device)
        q = torch.zeros(1, 2, lq, head_dim, device=device, dtype=dtype, requires_grad=grad)
        k = torch.zeros(1, 2, lk, head_dim, device=device, dtype=dtype, requires_grad=grad)
        if mask is True:
            mask = torch.ones(lq, lk, dtype=torch.bool, device=device)
        attn_mask = mask.to(device) if isinstance(mask, torch.Tensor) else None
        choice = torch._fused_sdp_choice(q, k, k, attn_mask=attn_mask, dropout_p=0.0, is_causal=causal)
        name = torch.nn.attention.SDPBackend(choice).name
    except Exception as exc:  # a probe must never stop a run; say why it could not tell
        return f"kernel unknown ({type(exc).__name__})"
    label = _SDPA_NAMES.get(name, name.lower())
    return f"{label} on CPU" if device.type == "cpu" else label


# ------------------------------------------------------------------------------- flex


def flex_importable() -> bool:
    """Whether this torch has ``torch.nn.attention.flex_attention``."""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def flex_compilable() -> bool:
    """Whether flex attention's fused kernel can be built here (CUDA, and Triton to build it)."""
    return flex_importable() and torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


class FlexMask(PreparedMask):
    """A block mask for flex attention, its tensors held as buffers.

    Built once on the CPU from the layout (``create_block_mask``) and moved with the
    model; `block_mask` wraps the buffers in a ``BlockMask`` without computing
    anything, so a compiled forward reads them as inputs.
    """

    def __init__(self, layout: BlockCausal, *, block_size: int):
        super().__init__(layout, dense=False)
        from torch.nn.attention.flex_attention import BlockMask  # optional: only with flex

        built = _cpu_block_mask(layout, block_size)
        self._tensor_names = tuple(BlockMask._TENSOR_ATTRS)
        self._context = {
            name: getattr(built, name) for name in BlockMask._CONTEXT_ATTRS if name != "mask_mod"
        }
        device = self.ids.device
        for name in self._tensor_names:
            value = getattr(built, name)
            self.register_buffer(
                f"block_{name}", None if value is None else value.to(device), persistent=False
            )
        self.sparsity = built.sparsity()
        self._cached = None  # (the ids buffer it was built over, BlockMask), eager calls only

    def extra_repr(self) -> str:
        return f"{self.layout!r}, block {self._context['BLOCK_SIZE']}, sparsity {self.sparsity:.0f}%"

    def block_mask(self):
        """The ``BlockMask`` over this module's buffers, on the model's device.

        Eagerly the same object is returned until the buffers move: the compiled flex
        kernel guards on its ``mask_mod``, and a new closure at every call would
        recompile it at every call. Inside a compiled forward it is built afresh (no
        computation: the buffers are wrapped).
        """
        if not torch.compiler.is_compiling():
            cached = self._cached
            if cached is not None and cached[0] is self.ids:
                return cached[1]
        from torch.nn.attention.flex_attention import BlockMask

        ids = self.ids

        def visible(b, h, q_idx, kv_idx):
            return ids[kv_idx] <= ids[q_idx]

        tensors = {name: getattr(self, f"block_{name}") for name in self._tensor_names}
        block_mask = BlockMask(**tensors, **self._context, mask_mod=visible)
        if not torch.compiler.is_compiling():
            self._cached = (ids, block_mask)
        return block_mask


def _cpu_block_mask(layout: BlockCausal, block_size: int):
    from torch.nn.attention.flex_attention import create_block_mask

    ids = layout.step_ids("cpu")

    def visible(b, h, q_idx, kv_idx):
        return ids[kv_idx] <= ids[q_idx]

    with torch.device("cpu"):  # the model may be being built on the meta device
        return create_block_mask(
            visible, None, None, layout.seq_len, layout.seq_len, device="cpu", BLOCK_SIZE=block_size
        )


@functools.lru_cache(maxsize=32)
def _flex_block_mask(layout: BlockCausal, device: str, block_size: int):
    """A block mask for a direct call with a bare layout (eager only; models prepare theirs)."""
    return FlexMask(layout, block_size=block_size).to(device).block_mask()


@attrs.frozen(kw_only=True)
class FlexConfig:
    """Options of the ``flex`` backend."""

    #: Compile the kernel on first use; without it flex attention runs unfused.
    compile: bool = True
    #: Side of the block mask's tiles (query and key positions); flex's default is 128.
    block_size: int = attrs.field(default=128, validator=[v.instance_of(int), v.ge(16)])


class FlexAttention(AttentionBackend):
    """``torch.nn.attention.flex_attention`` with a block mask built from the step ids.

    The block mask lets the fused kernel skip every tile above the block-causal
    staircase. Offered on CUDA only: on CPU torch runs it unfused (slower than
    ``sdpa``) and cannot differentiate it, which the tests still use to check the
    arithmetic.
    """

    name = "flex"
    Config = FlexConfig

    def __init__(self, config=None):
        super().__init__(config)
        self._kernel = None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if not flex_importable():
            return False, "this torch has no flex attention (torch >= 2.5 does); use sdpa"
        if not torch.cuda.is_available():
            return False, "flex attention needs a CUDA device (none found); use sdpa"
        if importlib.util.find_spec("triton") is None:
            return False, "flex attention's kernel is compiled with Triton, which is not installed; use sdpa"
        return True, ""

    def _flex(self):
        # Imported and compiled on first use: registering the plugin stays cheap.
        if self._kernel is None:
            from torch.nn.attention.flex_attention import flex_attention

            self._kernel = (
                torch.compile(flex_attention, dynamic=False) if self.config.compile else flex_attention
            )
        return self._kernel

    def prepare(self, mask: BlockCausal) -> PreparedMask:
        return FlexMask(mask, block_size=self.config.block_size)

    def attend(self, q, k, v, *, mask: Mask, scale: float) -> torch.Tensor:
        if mask is None:
            # A cached generation step: every query sees every key, and each step has a new
            # (lq, lk), which would recompile the compiled kernel at every step.
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if isinstance(mask, FlexMask):
            block_mask = mask.block_mask()
        else:
            block_mask = _flex_block_mask(mask.layout, str(q.device), self.config.block_size)
        return self._flex()(q, k, v, block_mask=block_mask, scale=scale)

    def kernel(self, mask, *, device, dtype=torch.float32, head_dim=64) -> str:
        if mask is None:
            return f"SDPA {sdpa_choice(device, dtype, head_dim, 16, 64)} (cached step, no mask)"
        if not flex_importable():
            return "flex attention is not in this torch"
        fused = self.config.compile and torch.device(device).type == "cuda"
        how = "compiled Triton kernel" if fused else "unfused (not compiled: every pair computed)"
        tiles = FlexMask(mask, block_size=self.config.block_size).sparsity
        return f"flex attention, {how}; block mask of {self.config.block_size}-position tiles skips {tiles:.0f}% of them"


# ------------------------------------------------------------------------------- auto


class AutoMask(PreparedMask):
    """The preparations of both backends ``auto`` may pick (``flex`` only where it can run)."""

    def __init__(self, layout: BlockCausal, *, sdpa: PreparedMask, flex: PreparedMask | None):
        super().__init__(layout, dense=False)
        self.sdpa = sdpa
        self.flex = flex


@attrs.frozen(kw_only=True)
class AutoConfig:
    """Options of the ``auto`` backend: those of the two backends it picks from."""

    #: ``sdpa``'s ``split_min``.
    split_min: int = attrs.field(default=64, validator=[v.instance_of(int), v.ge(0)])
    #: ``flex``'s ``block_size``.
    block_size: int = attrs.field(default=128, validator=[v.instance_of(int), v.ge(16)])


class AutoAttention(AttentionBackend):
    """The default: ``flex`` where it skips masked work on CUDA, ``sdpa`` everywhere else.

    Decided per call by the inputs' device: block-causal training layouts on CUDA (when
    this torch has flex attention and Triton can compile it) go to ``flex``'s compiled
    kernel; plainly causal
    layouts (``token``) to SDPA's ``is_causal`` flash path, which is faster than any
    block mask; cached generation steps and everything on the CPU to ``sdpa``.
    """

    name = "auto"
    Config = AutoConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.sdpa = SDPAttention(SDPAConfig(split_min=self.config.split_min))
        self.flex = FlexAttention(FlexConfig(block_size=self.config.block_size))

    def _wants_flex(self, layout: BlockCausal | None, device: torch.device) -> bool:
        return layout is not None and not layout.is_causal and device.type == "cuda" and flex_compilable()

    def prepare(self, mask: BlockCausal) -> PreparedMask:
        flex = None if mask.is_causal or not flex_importable() else self.flex.prepare(mask)
        return AutoMask(mask, sdpa=self.sdpa.prepare(mask), flex=flex)

    def attend(self, q, k, v, *, mask: Mask, scale: float) -> torch.Tensor:
        layout = None if mask is None else mask.layout
        if self._wants_flex(layout, q.device):
            inner = mask.flex if isinstance(mask, AutoMask) else mask
            return self.flex.attend(q, k, v, mask=inner, scale=scale)
        inner = mask.sdpa if isinstance(mask, AutoMask) else mask
        return self.sdpa.attend(q, k, v, mask=inner, scale=scale)

    def kernel(self, mask, *, device, dtype=torch.float32, head_dim=64) -> str:
        device = torch.device(device)
        chosen = self.flex if self._wants_flex(mask, device) else self.sdpa
        return f"{chosen.name}: " + chosen.kernel(mask, device=device, dtype=dtype, head_dim=head_dim)


# --------------------------------------------------------------------------- xformers


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

    def attend(self, q, k, v, *, mask: Mask, scale: float) -> torch.Tensor:
        import xformers.ops as xops  # optional dependency, imported only when used

        b, nh, lq, _ = q.shape
        bias = None
        if mask is not None and mask.is_causal:
            bias = xops.LowerTriangularMask()
        elif mask is not None:
            bias = _additive_bias(mask.layout, str(q.device), q.dtype).expand(b, nh, lq, lq)
        # xformers wants (b, l, nh, hd)
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
        )
        return out.transpose(1, 2)

    def kernel(self, mask, *, device, dtype=torch.float32, head_dim=64) -> str:
        if mask is None:
            return "xformers memory-efficient attention (cached step, no mask)"
        if mask.is_causal:
            return "xformers memory-efficient attention, LowerTriangularMask"
        return "xformers memory-efficient attention with an additive (l, l) bias (every pair computed)"


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
    register(AutoAttention)
    register(MathAttention)
    register(SDPAttention)
    register(FlexAttention)
    register(XFormersAttention)
