"""The class-conditional transformer that every prediction unit drives.

By default the model is VAR's (arXiv 2404.02905): a stack of AdaLN blocks whose scales,
shifts and gates come from the class embedding, attention with l2-normalised queries
and keys and a learned per-head temperature, and an AdaLN head. Its options are
orthogonal and give LlamaGen's GPT (arXiv 2406.06525) as well:

| option | VAR | LlamaGen |
| --- | --- | --- |
| ``conditioning`` | ``adaln``: the class modulates every block | ``prefix``: ``class_tokens`` class tokens start the sequence |
| ``norm`` | ``layernorm`` | ``rmsnorm`` |
| ``mlp`` | ``gelu`` | ``swiglu`` (hidden ``2/3·4d`` rounded up to ``mlp_multiple_of``) |
| ``bias`` | q/v, projection, MLP, input and head biases | none |
| ``attn_l2_norm`` | on | off (softmax scale ``hd^-0.5``) |
| ``init_std``, ``scale_residual_init``, ``head_init`` | ``sqrt(1/3d)``, on, 0.02 | 0.02, off, 0 |

It never looks at which unit it serves: the sequence layout (``unit.step_lengths``),
the mask (``unit.mask()``), the start and position embeddings, the rotary tables and
whether a position is fed code features or the codes themselves all come from the
unit, which is a submodule (``model.unit``) because it owns those embeddings. The attention backend prepares the
mask once, when the model is built (``model.attn_mask``, a module of buffers), so the
training forward builds no mask and no step ids: it compiles as one graph.

Shapes use the varkit glossary: ``b`` batch, ``l`` positions, ``nh`` heads, ``hd``
head dim, ``d`` width, ``c`` code channels, ``v`` vocabulary.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from varkit import validators as V
from varkit.base import AttentionBackend, PredictionUnit
from varkit.errors import VarkitError
from varkit.masks import BlockCausal, PreparedMask
from varkit.model.kv_cache import KVCache, VisibleKeys

#: Upper bound of the learned attention temperature ``exp(scale_mul)`` (VAR: 100).
MAX_SCALE_MUL = math.log(100.0)
#: Initial learned attention temperature ``exp(scale_mul)`` (VAR: 4).
INIT_SCALE_MUL = math.log(4.0)


def _derived_width(value: int, config: ModelConfig) -> int:
    return value or 64 * config.depth


def _derived_heads(value: int, config: ModelConfig) -> int:
    return value or max(1, config.width // 64)


def _derived_drop_path(value: float | None, config: ModelConfig) -> float:
    return 0.1 * config.depth / 24 if value is None else float(value)


def _heads_divide_width(config: ModelConfig, attribute, heads: int) -> None:
    if config.width % heads:
        raise ValueError(
            f"model.width {config.width} is not divisible by model.heads {heads}; pick heads dividing it"
        )


@attrs.frozen(kw_only=True)
class ModelConfig:
    """Options of the AR transformer (recipe section ``model``); VAR's values by default.

    ``width``, ``heads`` and ``drop_path`` may be left at their "derive it" values
    (0, 0, null); each is resolved from the fields before it as the config is built
    (converters that see the config), so ``config.width`` is always the real width and
    a saved recipe records what was built.
    """

    #: Number of AdaLN blocks; VAR names its models by it (d16, d20, d24, d30).
    depth: int = attrs.field(default=16, validator=V.positive)
    #: Model width d; 0 means VAR's 64·depth.
    width: int = attrs.field(
        default=0, converter=attrs.Converter(_derived_width, takes_self=True), validator=V.positive
    )
    #: Attention heads; 0 means width // 64 (VAR: heads of 64 channels).
    heads: int = attrs.field(
        default=0,
        converter=attrs.Converter(_derived_heads, takes_self=True),
        validator=[V.positive, _heads_divide_width],
    )
    #: MLP hidden width over model width (VAR: 4).
    mlp_ratio: float = attrs.field(default=4.0, validator=V.positive)
    #: Classes of the conditioning; index ``num_classes`` is "no class" (ImageNet: 1000).
    num_classes: int = attrs.field(default=1000, validator=V.positive)
    #: Chance of replacing a label by "no class" in training, for guidance (VAR: 0.1).
    class_dropout: float = attrs.field(default=0.1, validator=V.probability)
    #: Drop-path rate of the last block, rising linearly from 0; null means VAR's 0.1·depth/24.
    drop_path: float | None = attrs.field(
        default=None,
        converter=attrs.Converter(_derived_drop_path, takes_self=True),
        validator=V.probability,
    )
    #: Dropout after the attention projection and in the MLP (VAR trains without it).
    dropout: float = attrs.field(default=0.0, validator=V.probability)
    #: One AdaLN linear for all blocks plus a learned per-block offset (VAR's release: off).
    shared_adaln: bool = False
    #: l2-normalised q and k with a learned per-head temperature, softmax scale 1 (VAR: on).
    attn_l2_norm: bool = True
    #: LayerNorm epsilon (VAR: 1e-6).
    norm_eps: float = attrs.field(default=1e-6, validator=V.positive)
    #: Multiplier of the AdaLN gate rows at init, so each block starts near identity
    #: (VAR's ``alng``: 1e-3 for d16/d20, 1e-4 for d24, 1e-5 for d30).
    adaln_gamma_init: float = attrs.field(default=1e-3, validator=V.non_negative)
    #: Multiplier of the output head's weights at init: near-uniform first logits (VAR: 0.02;
    #: LlamaGen: 0, a zero head).
    head_init: float = attrs.field(default=0.02, validator=V.non_negative)

    # -- architecture options (VAR's values by default; LlamaGen's in brackets) ---------
    #: How the class conditions the model: "adaln" modulates every block with it (VAR);
    #: "prefix" puts ``class_tokens`` class tokens at the start of the sequence and uses
    #: plain norms with learned gains (LlamaGen).
    conditioning: Literal["adaln", "prefix"] = attrs.field(
        default="adaln", validator=attrs.validators.in_(("adaln", "prefix"))
    )
    #: Class tokens in front of the sequence with ``conditioning: prefix`` (LlamaGen's
    #: ``cls_token_num``; its class-conditional models use 1). The last one is the unit's
    #: step 0; the others are extra positions whose outputs are not predictions.
    class_tokens: int = attrs.field(default=1, validator=V.positive)
    #: Normalisation in the blocks and before the head: "layernorm" (VAR) or "rmsnorm" (LlamaGen).
    norm: Literal["layernorm", "rmsnorm"] = attrs.field(
        default="layernorm", validator=attrs.validators.in_(("layernorm", "rmsnorm"))
    )
    #: MLP of the blocks: "gelu" (Linear, tanh-GELU, Linear; VAR) or "swiglu" (a SiLU-gated
    #: unit with 2/3 of the hidden width, as in Llama and LlamaGen).
    mlp: Literal["gelu", "swiglu"] = attrs.field(
        default="gelu", validator=attrs.validators.in_(("gelu", "swiglu"))
    )
    #: The MLP hidden width is rounded up to a multiple of this (VAR: 1, no rounding; LlamaGen: 256).
    mlp_multiple_of: int = attrs.field(default=1, validator=V.positive)
    #: Biases in the linears: q/v biases, attention projection, MLP, input and head (VAR: on;
    #: LlamaGen: off, no bias anywhere).
    bias: bool = True
    #: Dropout of the input embeddings, the class tokens included (LlamaGen's token dropout: 0.1).
    token_dropout: float = attrs.field(default=0.0, validator=V.probability)
    #: Std of the initial linears and embeddings; null means VAR's ``sqrt(1 / (3 d))``
    #: (LlamaGen: 0.02).
    init_std: float | None = attrs.field(default=None, validator=V.positive)
    #: Divide the initial attention-output and MLP-output weights by ``sqrt(2 · depth)`` so
    #: the residual stream does not grow with depth (VAR: on; LlamaGen: off).
    scale_residual_init: bool = True

    def __attrs_post_init__(self):
        # width, heads and drop_path are resolved by their converters; what remains are
        # checks between options.
        if self.conditioning == "adaln" and self.class_tokens != 1:
            raise ValueError(
                f"model.class_tokens is {self.class_tokens} but conditioning is 'adaln', which uses one "
                "class embedding; set conditioning: prefix for a prefix of class tokens"
            )
        if self.conditioning == "prefix" and self.shared_adaln:
            raise ValueError(
                "model.shared_adaln needs conditioning: adaln (prefix conditioning has no AdaLN)"
            )

    @property
    def head_dim(self) -> int:
        """Channels per attention head ``hd``."""
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of each block's MLP.

        ``width · mlp_ratio`` for GELU; for SwiGLU 2/3 of it (its three matrices then
        hold as many parameters as GELU's two), as Llama and LlamaGen do. Either is
        rounded up to a multiple of ``mlp_multiple_of``.
        """
        hidden = round(self.width * self.mlp_ratio)
        if self.mlp == "swiglu":
            hidden = int(2 * hidden / 3)
        return -(-hidden // self.mlp_multiple_of) * self.mlp_multiple_of

    @property
    def prefix(self) -> int:
        """Positions in front of the unit's sequence: the class tokens beyond the first."""
        return self.class_tokens - 1 if self.conditioning == "prefix" else 0


# ----------------------------------------------------------------------------- pieces


def _modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """AdaLN: ``x (b, l, d)`` scaled by ``1 + scale`` and shifted, ``scale, shift (b, 1, d)``."""
    return x * (1 + scale) + shift


def _norm(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """LayerNorm or RMSNorm of ``x (b, l, d)`` over ``d`` without affine parameters.

    RMSNorm runs in float32 and returns ``x``'s dtype (as LlamaGen's does under autocast).
    """
    if kind == "rmsnorm":
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


class Norm(nn.Module):
    """LayerNorm or RMSNorm with a learned gain (and, for LayerNorm with biases, a shift)."""

    def __init__(self, width: int, *, kind: str, eps: float, bias: bool):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.empty(width))
        self.bias = nn.Parameter(torch.empty(width)) if bias and kind == "layernorm" else None

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.weight.shape[0]}, eps={self.eps:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _norm(x, self.kind, self.eps) * self.weight
        return out if self.bias is None else out + self.bias


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs ``(x[..., i], x[..., i + hd/2])`` of ``x (b, nh, l, hd)`` by angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class DropPath(nn.Module):
    """Drops a residual branch for whole samples in training (stochastic depth)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        # One draw per sample, rescaled so the expected branch is unchanged (the rescale on
        # the (b, 1, ..., 1) draw: one pass over x, not two).
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)
        return x * mask


class Attention(nn.Module):
    """Multi-head self-attention with VAR's biases and optional l2-normalised q and k.

    ``qkv`` has no bias of its own: with ``bias``, queries and values get learned
    biases and keys none (a key bias shifts every score of a query equally, so softmax
    ignores it); without, there is none at all (LlamaGen).
    """

    def __init__(self, width: int, heads: int, *, l2_norm: bool, dropout: float, bias: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.l2_norm = l2_norm
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.empty(width)) if bias else None
        self.v_bias = nn.Parameter(torch.empty(width)) if bias else None
        # Per-head log temperature; only with l2-normalised q and k, whose scores would
        # otherwise be stuck in [-1, 1].
        self.scale_mul = nn.Parameter(torch.empty(heads)) if l2_norm else None
        self.proj = nn.Linear(width, width, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        backend: AttentionBackend,
        mask: BlockCausal | PreparedMask | None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """``x (b, l, d) -> (b, l, d)``; with a cache, keys/values are appended to it first."""
        b, l, d = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(b, l, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, nh, l, hd)
        if self.l2_norm:
            temperature = self.scale_mul.clamp(max=MAX_SCALE_MUL).exp().view(1, -1, 1, 1)
            q = F.normalize(q, dim=-1) * temperature
            k = F.normalize(k, dim=-1)
            scale = 1.0
        else:
            scale = self.head_dim**-0.5
        if rotary is not None:
            q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (b, nh, length + l, hd): every position so far
        # normalize, exp and rotation promote q and k to float32 under autocast while v
        # stays in the autocast dtype: every backend gets one dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        out = backend.attend(q, k, v, mask=mask, scale=scale)  # (b, nh, l, hd)
        return self.drop(self.proj(out.transpose(1, 2).reshape(b, l, d)))


class MLP(nn.Module):
    """Linear -> tanh-GELU -> Linear, with dropout after each."""

    def __init__(self, width: int, hidden: int, *, dropout: float, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, width, bias=bias)
        self.drop = nn.Dropout(dropout)

    @property
    def out(self) -> nn.Linear:
        """The linear that writes into the residual stream."""
        return self.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x), approximate="tanh"))))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) · up(x))`` with dropout on the output (Llama's MLP, LlamaGen's)."""

    def __init__(self, width: int, hidden: int, *, dropout: float, bias: bool = True):
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=bias)
        self.up = nn.Linear(width, hidden, bias=bias)
        self.down = nn.Linear(hidden, width, bias=bias)
        self.drop = nn.Dropout(dropout)

    @property
    def out(self) -> nn.Linear:
        """The linear that writes into the residual stream."""
        return self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    """One transformer block, conditioned by AdaLN or (prefix conditioning) not at all.

    AdaLN: with modulation ``(gamma1, gamma2, scale1, scale2, shift1, shift2)`` from the
    class, ``x += gamma1 · attn(N(x)·(1+scale1)+shift1)`` then
    ``x += gamma2 · mlp(N(x)·(1+scale2)+shift2)``, the norm N without affine parameters.
    Prefix conditioning (the class is a token of the sequence): ``x += attn(norm1(x))``
    then ``x += mlp(norm2(x))``, the norms with learned gains.

    In training an AdaLN block computes its own modulation from the class (inside
    ``forward``, so that FSDP gathers the block's weights once per pass); generation
    computes every block's once, at step 0, and passes it to each later step.
    """

    def __init__(self, config: ModelConfig, *, drop_path: float):
        super().__init__()
        d = config.width
        self.norm_eps, self.norm_kind = config.norm_eps, config.norm
        self.attn = Attention(
            d, config.heads, l2_norm=config.attn_l2_norm, dropout=config.dropout, bias=config.bias
        )
        mlp = SwiGLU if config.mlp == "swiglu" else MLP
        self.mlp = mlp(d, config.mlp_hidden, dropout=config.dropout, bias=config.bias)
        self.drop_path = DropPath(drop_path)
        self.adaln = self.adaln_offset = self.norm1 = self.norm2 = None
        if config.conditioning == "prefix":
            self.norm1 = Norm(d, kind=config.norm, eps=config.norm_eps, bias=config.bias)
            self.norm2 = Norm(d, kind=config.norm, eps=config.norm_eps, bias=config.bias)
        elif config.shared_adaln:
            # Learned per-block offset added to the shared modulation (6, d).
            self.adaln_offset = nn.Parameter(torch.empty(6, d))
        else:
            self.adaln = nn.Linear(d, 6 * d)  # applied to SiLU(class embedding)

    def modulation(self, cond: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        """``(b, 1, 6, d)`` from SiLU(class embedding) ``(b, d)`` or the shared ``(b, 1, 6, d)``.

        Called from outside ``forward`` by generation (FSDP registers it as a forward
        method); ``forward`` itself uses the unwrapped `_adaln`.
        """
        return self._adaln(cond, shared)

    def _adaln(self, cond: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        if self.adaln is None:
            return shared + self.adaln_offset
        return self.adaln(cond).unflatten(-1, (6, -1)).unsqueeze(1)

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor | None = None,
        *,
        cond: torch.Tensor | None = None,
        shared: torch.Tensor | None = None,
        **attn_kwargs,
    ) -> torch.Tensor:
        """``x (b, l, d) -> (b, l, d)``.

        Args:
            x: the residual stream.
            modulation: the block's AdaLN modulation ``(b, 1, 6, d)`` when computed
                already (generation); None computes it here from ``cond`` (prefix
                conditioning: unused).
            cond: SiLU of the class embedding ``(b, d)`` (with ``modulation`` None).
            shared: the shared AdaLN output ``(b, 1, 6, d)`` (``shared_adaln`` only).
            attn_kwargs: passed to `Attention` (backend, mask, rotary, cache, layer).
        """
        if self.norm1 is not None:  # prefix conditioning
            x = x + self.drop_path(self.attn(self.norm1(x), **attn_kwargs))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        if modulation is None:
            modulation = self._adaln(cond, shared)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation.unbind(2)  # each (b, 1, d)
        h = _modulate(_norm(x, self.norm_kind, self.norm_eps), scale1, shift1)
        x = x + self.drop_path(self.attn(h, **attn_kwargs) * gamma1)
        h = _modulate(_norm(x, self.norm_kind, self.norm_eps), scale2, shift2)
        return x + self.drop_path(self.mlp(h) * gamma2)


# ------------------------------------------------------------------------------ model


class ARModel(nn.Module):
    """Class-conditional AR transformer over a prediction unit's sequence.

    Args:
        config: the architecture.
        unit: the prediction unit; becomes the submodule ``unit`` (it owns the start,
            position and step embeddings).
        attention: the attention backend used for training and for cached steps.
        vocab_size: codes ``v`` the head predicts.
        code_dim: channels ``c`` of the unit's input features.

    The input of step 0 is the (last) class token plus the unit's start embedding; a
    unit that feeds features (``unit.input_codes`` false, VAR) has them projected by
    ``word_embed``, a ``Linear(c, d)``; a unit that feeds codes (LlamaGen) has them
    looked up in ``word_embed``, an ``Embedding(v, d)`` of the model's own.

    Parameters are built on the meta device and initialised once, explicitly, on the
    current default device (`reset_parameters`), so large depths build quickly and
    ``with torch.device("meta"): ARModel(...)`` allocates nothing.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        unit: PredictionUnit,
        attention: AttentionBackend,
        vocab_size: int,
        code_dim: int,
    ):
        super().__init__()
        self.config = config
        self.vocab_size, self.code_dim = vocab_size, code_dim
        self.unit = unit
        self.step_lengths = tuple(unit.step_lengths)
        #: Class tokens in front of the unit's sequence (prefix conditioning with more than one).
        self.prefix = config.prefix
        #: First position of each step in the model's sequence (the prefix belongs to step 0),
        #: and the sequence length at the end.
        ends = [self.prefix + sum(self.step_lengths[: s + 1]) for s in range(len(self.step_lengths))]
        self.step_starts = (0, *ends)
        d = config.width
        self.input_codes = bool(getattr(unit, "input_codes", False))
        self._check_rotary(unit, config.head_dim)
        device = torch.get_default_device()
        # Drop-path rates rise linearly from 0 at the first block to config.drop_path.
        rates = [config.drop_path * i / max(1, config.depth - 1) for i in range(config.depth)]
        adaln = config.conditioning == "adaln"
        with torch.device("meta"):  # nothing is allocated or initialised twice
            # Last row: "no class". With prefix conditioning a class is class_tokens tokens.
            self.class_embed = nn.Embedding(config.num_classes + 1, d * config.class_tokens)
            if self.input_codes:
                self.word_embed = nn.Embedding(vocab_size, d)
            else:
                self.word_embed = nn.Linear(code_dim, d, bias=config.bias)
            self.token_drop = nn.Dropout(config.token_dropout)
            self.shared_adaln = nn.Linear(d, 6 * d) if config.shared_adaln else None
            self.blocks = nn.ModuleList(Block(config, drop_path=r) for r in rates)
            # The head's norm: AdaLN (scale and shift from the class) or a learned gain.
            self.head_adaln = nn.Linear(d, 2 * d) if adaln else None
            self.head_norm = (
                None if adaln else Norm(d, kind=config.norm, eps=config.norm_eps, bias=config.bias)
            )
            self.head = nn.Linear(d, vocab_size, bias=config.bias)
        for name, child in self.named_children():
            if name != "unit":
                child.to_empty(device=device)
        self.reset_parameters()
        self.attention = attention  # prepares the training mask (model.attn_mask)

    # -- attention -------------------------------------------------------------------
    @property
    def attention(self) -> AttentionBackend:
        """The attention backend of training and of cached steps.

        Setting it asks the new backend to prepare the unit's mask (``attn_mask``, a
        submodule of buffers, built where the model's parameters are).
        """
        return self._attention

    @attention.setter
    def attention(self, backend: AttentionBackend) -> None:
        device = self.head.weight.device
        with torch.device(device):
            prepared = backend.prepare(self._mask())
        self._attention = backend
        self.attn_mask = prepared

    def attention_kernels(
        self, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> dict[str, str]:
        """Which kernel runs the training forward and the cached generation steps, in words."""
        kw = {"device": device, "dtype": dtype, "head_dim": self.config.head_dim}
        return {
            "training": self.attention.kernel(self.attn_mask.layout, **kw),
            "cached steps": self.attention.kernel(None, **kw),
        }

    @staticmethod
    def _check_rotary(unit: PredictionUnit, head_dim: int) -> None:
        """Refuse at build time a unit whose rotary tables cannot fit the heads."""
        try:
            tables = unit.rotary_tables(head_dim)
        except ValueError as exc:
            raise VarkitError(
                f"unit {unit.name!r} cannot rotate heads of {head_dim} channels: {exc}; "
                "change model.width or model.heads"
            ) from None
        expected = (unit.seq_len, head_dim // 2)
        if tables is not None and (head_dim % 2 or any(tuple(t.shape) != expected for t in tables)):
            raise VarkitError(
                f"unit {unit.name!r} gives rotary tables {[tuple(t.shape) for t in tables]} for heads of "
                f"{head_dim} channels; the model needs an even head dim and tables {expected}"
            )

    # -- init ---------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The initialisation of every parameter outside the unit (VAR's by default).

        Linears and embeddings: truncated normal with std ``init_std`` (VAR's
        ``sqrt(1/(3d))`` when null; truncated at ±2 in absolute value, as VAR does and
        as the units' embeddings are: with a std near 0.02 the cut never bites), zero
        biases. Head weights × ``head_init``. AdaLN output weights × 0.5, except the
        gate rows (gamma1, gamma2), which are × ``adaln_gamma_init`` so each block starts
        close to the identity. With ``scale_residual_init``, attention ``proj`` and MLP
        output weights ÷ ``sqrt(2·depth)`` so the residual stream's variance does not
        grow with depth. Norm gains 1, shifts 0; q/v biases zero; attention temperature
        ``exp(scale_mul)`` = 4.
        """
        cfg = self.config
        d = cfg.width
        std = cfg.init_std if cfg.init_std is not None else math.sqrt(1 / (3 * d))
        for name, module in self.named_modules():
            if name == "unit" or name.startswith("unit."):
                continue
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std, a=-2.0, b=2.0)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Norm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.head.weight.mul_(cfg.head_init)
        if self.head_adaln is not None:
            self.head_adaln.weight.mul_(0.5)
        adalns = (
            [self.shared_adaln] if cfg.shared_adaln else [b.adaln for b in self.blocks if b.adaln is not None]
        )
        for lin in adalns:
            lin.weight[: 2 * d].mul_(cfg.adaln_gamma_init)
            lin.weight[2 * d :].mul_(0.5)
        for block in self.blocks:
            if cfg.scale_residual_init:
                block.attn.proj.weight.div_(math.sqrt(2 * cfg.depth))
                block.mlp.out.weight.div_(math.sqrt(2 * cfg.depth))
            if block.attn.q_bias is not None:
                nn.init.zeros_(block.attn.q_bias)
                nn.init.zeros_(block.attn.v_bias)
            if block.attn.scale_mul is not None:
                block.attn.scale_mul.fill_(INIT_SCALE_MUL)
            if block.adaln_offset is not None:
                nn.init.trunc_normal_(block.adaln_offset, std=std, a=-2.0, b=2.0)
                block.adaln_offset[:2].mul_(cfg.adaln_gamma_init)

    # -- pieces shared by training and generation ------------------------------------
    def _shared_modulation(self, cond: torch.Tensor) -> torch.Tensor | None:
        """The shared AdaLN output ``(b, 1, 6, d)`` from SiLU(class embedding), or None."""
        if self.shared_adaln is None:
            return None
        return self.shared_adaln(cond).unflatten(-1, (6, -1)).unsqueeze(1)

    def _head_modulation(self, cond: torch.Tensor) -> torch.Tensor | None:
        """The head's AdaLN ``(b, 1, 2, d)`` from SiLU(class embedding) ``(b, d)``; None
        with prefix conditioning."""
        if self.head_adaln is None:
            return None
        return self.head_adaln(cond).unflatten(-1, (2, -1)).unsqueeze(1)

    def _modulations(self, cond: torch.Tensor) -> list[torch.Tensor | None]:
        """AdaLN modulation of every block ``(b, 1, 6, d)`` and of the head ``(b, 1, 2, d)``.

        Generation's: computed once at step 0 and reused by every step. With prefix
        conditioning there is none: a None for every block and the head.
        """
        if self.head_adaln is None:
            return [None] * (len(self.blocks) + 1)
        cond = F.silu(cond)  # (b, d)
        shared = self._shared_modulation(cond)
        mods = [block.modulation(cond, shared) for block in self.blocks]
        mods.append(self._head_modulation(cond))
        return mods

    def _logits(self, x: torch.Tensor, modulation: torch.Tensor | None) -> torch.Tensor:
        """Final norm and head: ``(b, l, d) -> (b, l, v)`` float32."""
        if modulation is None:
            x = self.head_norm(x.float())
        else:
            scale, shift = modulation.unbind(2)
            x = _modulate(_norm(x.float(), self.config.norm, self.config.norm_eps), scale, shift)
        # With weights in bfloat16 and no autocast (pipe.to(dtype=...)), x is float32 here.
        return self.head(x.to(self.head.weight.dtype)).float()

    def _class_tokens(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class embedding ``(b, class_tokens · d)`` and the sequence's start ``(b, prefix + l_0, d)``.

        The last class token plus the unit's start embedding is step 0's input; the other
        class tokens (prefix conditioning) come before it.
        """
        cond = self.class_embed(labels)  # (b, n·d)
        tokens = cond.unflatten(-1, (self.config.class_tokens, -1))  # (b, n, d)
        start = tokens[:, -1:] + self.unit.start_embedding()  # (b, l_0, d)
        if self.prefix:
            start = torch.cat((tokens[:, :-1], start), dim=1)
        return cond, start

    def _positions(self) -> torch.Tensor:
        """Position embeddings of the model's sequence ``(1, prefix + l, d)`` (none on the prefix)."""
        pos = self.unit.position_embedding()  # (1, l, d)
        if self.prefix:
            pos = torch.cat((pos.new_zeros(1, self.prefix, pos.shape[-1]), pos), dim=1)
        return pos

    def _mask(self):
        """The training mask; the extra class tokens see each other and step 0, as step 0 does."""
        if not self.prefix:
            return self.unit.mask()
        return BlockCausal((self.prefix + self.step_lengths[0], *self.step_lengths[1:]))

    def _rotary(self, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        tables = self.unit.rotary_tables(self.config.head_dim)  # cos, sin (l, hd/2), or None
        if tables is None:
            return None
        out = []
        for t in tables:
            t = t.to(device=device, dtype=torch.float32)
            if self.prefix:  # the extra class tokens are placed where step 0 is
                t = torch.cat((t[:1].expand(self.prefix, -1), t), dim=0)
            out.append(t[start:end])
        return out[0], out[1]

    def _embed_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """The unit's inputs (features ``(b, n, c)`` or codes ``(b, n)``) -> ``(b, n, d)``."""
        if self.input_codes:
            return self.word_embed(inputs)
        return self.word_embed(inputs.to(self.word_embed.weight.dtype))

    def _check_features(self, inputs: torch.Tensor, batch: int, length: int, what: str) -> None:
        if self.input_codes:
            if inputs.ndim != 2 or tuple(inputs.shape) != (batch, length) or inputs.is_floating_point():
                raise VarkitError(
                    f"{what} must be codes (b, l) = ({batch}, {length}) of an integer dtype, got "
                    f"{tuple(inputs.shape)} {inputs.dtype}; this model's unit feeds codes "
                    "(unit.teacher_forcing / unit.generation_step build them)"
                )
            return
        if inputs.ndim != 3 or tuple(inputs.shape) != (batch, length, self.code_dim):
            raise VarkitError(
                f"{what} must be (b, l, c) = ({batch}, {length}, {self.code_dim}), got {tuple(inputs.shape)}; "
                "build them with the model's unit (unit.teacher_forcing / unit.generation_step)"
            )

    # -- training ------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of the whole sequence.

        Args:
            inputs: the unit's inputs of steps 1.. (``unit.teacher_forcing(codes,
                tokenizer)``): features ``(b, l - l_0, c)``, or codes ``(b, l - l_0)``
                for a unit that feeds codes.
            labels: class indices ``(b,)`` in ``[0, num_classes]``; in training mode each
                is replaced by "no class" with probability ``class_dropout``.

        Returns:
            Logits ``(b, l, v)`` in float32 (the extra class tokens predict nothing).
        """
        b = labels.shape[0]
        l0, seq_len = self.step_lengths[0], self.unit.seq_len
        self._check_features(inputs, b, seq_len - l0, "inputs")
        if self.training and self.config.class_dropout > 0:
            drop = torch.rand(b, device=labels.device) < self.config.class_dropout
            labels = torch.where(drop, self.config.num_classes, labels)
        cond, start = self._class_tokens(labels)  # (b, n·d), (b, prefix + l_0, d)
        words = self._embed_inputs(inputs)  # (b, l - l_0, d)
        x = torch.cat((start.to(words.dtype), words), dim=1) + self._positions()  # (b, prefix + l, d)
        x = self.token_drop(x)
        cond = F.silu(cond)  # each AdaLN block computes its modulation from it
        shared = self._shared_modulation(cond)
        head = self._head_modulation(cond)
        rotary = self._rotary(0, self.step_starts[-1], x.device)
        for block in self.blocks:
            x = block(x, cond=cond, shared=shared, backend=self.attention, mask=self.attn_mask, rotary=rotary)
        return self._logits(x[:, self.prefix :], head)

    # -- generation ------------------------------------------------------------------------
    def new_cache(
        self,
        batch: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        static: bool = False,
    ) -> KVCache:
        """A preallocated KV cache for generating ``batch`` sequences (dtype/device: the model's).

        ``static=True`` makes a cache for static-shape steps (``forward_step(...,
        position=...)``), which read the positions not yet written under a mask: it
        starts zeroed.
        """
        ref = self.head.weight
        return KVCache(
            depth=self.config.depth,
            batch=batch,
            heads=self.config.heads,
            max_len=self.step_starts[-1],
            head_dim=self.config.head_dim,
            dtype=dtype or ref.dtype,
            device=device or ref.device,
            zeroed=static,
        )

    def forward_step(
        self,
        inputs: torch.Tensor | None,
        labels: torch.Tensor,
        cache: KVCache,
        step: int,
        *,
        position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of step ``step`` given the cache of the steps before.

        Args:
            inputs: the step's inputs, features ``(b, l_s, c)`` or codes ``(b, l_s)``; None
                at step 0, whose input is the class embedding plus ``pos_start``.
            labels: class indices ``(b,)`` (no dropout here: pass ``num_classes`` for
                the unconditional half of guidance).
            cache: from `new_cache`; step 0 needs it empty and stores in it the
                AdaLN modulation of ``labels`` and the position embedding and rotary
                tables, reused by the later steps.
            step: which step, ``0 <= step < len(unit.step_lengths)``, in order.
            position: for a static-shape step, the step's first position as a 0-dim int64
                tensor on the model's device (equal to ``model.step_starts[step]``).
                Positions are then gathered by index, the cache is written at those
                indices and attention masks the positions after the step instead of
                slicing them off: every step of one length runs the same kernels on
                the same shapes, so one captured CUDA graph serves them all. Needs a
                cache made with ``new_cache(..., static=True)``. None (the default)
                slices by the Python position.

        Returns:
            Logits ``(b, l_s, v)`` in float32.
        """
        if not 0 <= step < len(self.step_lengths):
            raise VarkitError(f"step {step} is outside the unit's {len(self.step_lengths)} steps")
        start, end = self.step_starts[step], self.step_starts[step + 1]
        if cache.length != start:
            raise VarkitError(
                f"step {step} starts at position {start} but the cache holds {cache.length}; "
                "run the steps in order from 0 with a fresh cache (model.new_cache or cache.reset())"
            )
        b = labels.shape[0]
        if step == 0:
            if inputs is not None:
                raise VarkitError("step 0 takes no inputs (its input is the class embedding); pass None")
            cond, x = self._class_tokens(labels)  # x: (b, prefix + l_0, d)
            # Constant over the generation: computed once, sliced by every step.
            cache.modulation = self._modulations(cond)
            cache.positions = self._positions()  # (1, prefix + l, d)
            cache.rotary = self._rotary(0, self.step_starts[-1], cond.device)
        else:
            if inputs is None:
                raise VarkitError(f"step {step} needs its inputs ({b}, {end - start}, ...)")
            self._check_features(inputs, b, end - start, f"inputs of step {step}")
            x = self._embed_inputs(inputs)  # (b, l_s, d)
        backend = self.attention
        if position is None:
            x = x + cache.positions[:, start:end]
            rotary = None if cache.rotary is None else tuple(t[start:end] for t in cache.rotary)
            skipped = getattr(cache, "skipped", None)  # a cache of another kind may not track it
            if skipped is not None:  # a step before ran on some positions only
                backend = VisibleKeys(~skipped[:end])
        else:
            index = position + torch.arange(
                end - start, device=position.device
            )  # (l_s,) this step's positions
            x = x + cache.positions.index_select(1, index)
            rotary = None if cache.rotary is None else tuple(t.index_select(0, index) for t in cache.rotary)
            visible = torch.arange(cache.max_len, device=position.device) <= index[-1]  # (max_len,)
            backend = VisibleKeys(visible)
            cache.write_index = index
        try:
            for i, (block, mod) in enumerate(zip(self.blocks, cache.modulation, strict=False)):
                x = block(x, mod, backend=backend, mask=None, rotary=rotary, cache=cache, layer=i)
        finally:
            cache.write_index = None
        cache.advance(end - start)
        if step == 0:
            x = x[:, self.prefix :]
        return self._logits(x, cache.modulation[-1])

    def forward_steps(
        self, inputs: torch.Tensor | None, labels: torch.Tensor, cache: KVCache, first: int, last: int
    ) -> torch.Tensor:
        """Logits of steps ``first .. last - 1`` in one pass, given the cache of the steps before.

        What a generation strategy runs to verify several drafted steps at once or to
        fill a cache from codes generated elsewhere (teacher forcing into the cache).
        Each position sees the cache, its own step and the steps before it in the span,
        as in `forward`; the span's keys and values are appended to the cache. One step
        (``last == first + 1``) is exactly `forward_step`.

        Args:
            inputs: the inputs of the span's steps after step 0, features ``(b, n, c)``
                or codes ``(b, n)`` (what ``unit.generation_step`` returned for each, in
                order); None when the span is step 0 alone.
            labels: class indices ``(b,)``.
            cache: holding exactly the steps before ``first``.
            first: the span's first step.
            last: one past its last step, ``first < last <= len(unit.step_lengths)``.

        Returns:
            Logits ``(b, l_first + ... + l_{last-1}, v)`` in float32 (the extra class
            tokens of prefix conditioning predict nothing).
        """
        if not 0 <= first < last <= len(self.step_lengths):
            raise VarkitError(
                f"steps [{first}, {last}) are not a span of the unit's {len(self.step_lengths)} steps"
            )
        if last == first + 1:
            return self.forward_step(inputs, labels, cache, first)
        start, end = self.step_starts[first], self.step_starts[last]
        if cache.length != start:
            raise VarkitError(
                f"step {first} starts at position {start} but the cache holds {cache.length}; "
                "a span continues the cache where the steps before it ended"
            )
        b = labels.shape[0]
        words_start = self.step_starts[max(first, 1)]
        parts = []
        if first == 0:
            cond, x0 = self._class_tokens(labels)  # (b, prefix + l_0, d)
            cache.modulation = self._modulations(cond)
            cache.positions = self._positions()
            cache.rotary = self._rotary(0, self.step_starts[-1], cond.device)
            parts.append(x0)
        if inputs is None:
            raise VarkitError(f"steps [{first}, {last}) need their inputs ({b}, {end - words_start}, ...)")
        self._check_features(inputs, b, end - words_start, f"inputs of steps [{max(first, 1)}, {last})")
        words = self._embed_inputs(inputs)  # (b, n, d)
        parts.append(words)
        x = torch.cat([p.to(words.dtype) for p in parts], dim=1) + cache.positions[:, start:end]
        rotary = None if cache.rotary is None else tuple(t[start:end] for t in cache.rotary)
        # Query i sees the cache and every position up to the end of its own step.
        ends = torch.tensor(self.step_starts[first + 1 : last + 1], device=x.device)
        step_end = torch.repeat_interleave(ends, ends.diff(prepend=ends.new_tensor([start])))  # (n,)
        visible = torch.arange(end, device=x.device)[None, :] < step_end[:, None]  # (n, end)
        if cache.skipped is not None:
            visible = visible & ~cache.skipped[None, :end]
        backend = VisibleKeys(visible)
        for i, (block, mod) in enumerate(zip(self.blocks, cache.modulation, strict=False)):
            x = block(x, mod, backend=backend, mask=None, rotary=rotary, cache=cache, layer=i)
        cache.advance(end - start)
        if first == 0:
            x = x[:, self.prefix :]
        return self._logits(x, cache.modulation[-1])

    def forward_positions(
        self, inputs: torch.Tensor, labels: torch.Tensor, cache: KVCache, step: int, index: torch.Tensor
    ) -> torch.Tensor:
        """Logits of some positions of step ``step`` (``step >= 1``): the others are skipped.

        Only the positions ``index`` of the step are run: their queries see the cache and
        each other, their keys and values are written to the cache at their places. The
        skipped positions hold no keys (they are zeroed and marked in ``cache.skipped``);
        every later step masks them. What a token-pruning strategy runs.

        Args:
            inputs: the step's inputs at every position, features ``(b, l_s, c)`` or codes
                ``(b, l_s)``.
            labels: class indices ``(b,)``.
            cache: holding exactly the steps before ``step``.
            step: the step, ``1 <= step < len(unit.step_lengths)``.
            index: ``(n,)`` int64, increasing positions of the step to run, in ``[0, l_s)``.

        Returns:
            Logits ``(b, n, v)`` in float32 of the positions ``index``.
        """
        if not 1 <= step < len(self.step_lengths):
            raise VarkitError(f"step {step}: only steps 1 .. {len(self.step_lengths) - 1} can skip positions")
        start, end = self.step_starts[step], self.step_starts[step + 1]
        if cache.length != start:
            raise VarkitError(f"step {step} starts at position {start} but the cache holds {cache.length}")
        b = labels.shape[0]
        self._check_features(inputs, b, end - start, f"inputs of step {step}")
        where = start + index  # (n,) positions in the sequence
        x = self._embed_inputs(inputs.index_select(1, index)) + cache.positions.index_select(1, where)
        rotary = None if cache.rotary is None else tuple(t.index_select(0, where) for t in cache.rotary)
        if cache.skipped is None:
            cache.skipped = torch.zeros(cache.max_len, dtype=torch.bool, device=x.device)
        cache.skipped[start:end] = True
        cache.skipped[where] = False
        # Attention reads the whole cache under a mask; what it masks must be finite.
        cache.kv[:, :, :, :, start:].zero_()
        visible = torch.arange(cache.max_len, device=x.device) < end
        backend = VisibleKeys(visible & ~cache.skipped)
        cache.write_index = where
        try:
            for i, (block, mod) in enumerate(zip(self.blocks, cache.modulation, strict=False)):
                x = block(x, mod, backend=backend, mask=None, rotary=rotary, cache=cache, layer=i)
        finally:
            cache.write_index = None
        cache.advance(end - start)
        return self._logits(x, cache.modulation[-1])

    # -- training helpers ---------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters trained without weight decay.

        The unit's parameters (start, position and step embeddings), every bias and norm
        gain, the attention temperatures ``scale_mul`` and the shared-AdaLN offsets.
        """
        leaves = ("bias", "q_bias", "v_bias", "scale_mul", "adaln_offset")
        names = set()
        for name, param in self.named_parameters():
            if name.startswith("unit.") or name.rsplit(".", 1)[-1] in leaves or param.ndim < 2:
                names.add(name)
        return names

    def flops_per_image(self, *, training: bool) -> float:
        """Matmul FLOPs (2 per multiply-add) of one image's full sequence.

        Counted from the architecture: the input, qkv, projection, MLP and head
        linears at every position (the extra class tokens included; a code lookup
        costs none), attention scores and weighted sums over the block-causal mask's
        visible pairs only, and the AdaLN linears once per image (they see the class,
        not the positions). Element-wise work is left out. Training (forward and
        backward) counts 3× the forward.
        """
        cfg = self.config
        d, hidden, depth = cfg.width, cfg.mlp_hidden, cfg.depth
        lengths = (self.prefix + self.step_lengths[0], *self.step_lengths[1:])
        seq_len = sum(lengths)
        pairs = sum(n * end for n, end in zip(lengths, self.step_starts[1:], strict=True))
        mlp_mats = 3 if cfg.mlp == "swiglu" else 2
        per_block = 2 * seq_len * (3 * d * d + d * d + mlp_mats * d * hidden) + 2 * 2 * pairs * d
        adaln = 0
        if cfg.conditioning == "adaln":
            adaln = 2 * d * 6 * d * (1 if cfg.shared_adaln else depth) + 2 * d * 2 * d
        embed = 0 if self.input_codes else 2 * (self.unit.seq_len - self.step_lengths[0]) * self.code_dim * d
        head = 2 * self.unit.seq_len * d * self.vocab_size
        forward = depth * per_block + adaln + embed + head
        return float(3 * forward if training else forward)
