"""The class-conditional AdaLN transformer that every prediction unit drives.

The model is VAR's (arXiv 2404.02905) with its options exposed: a stack of AdaLN blocks
whose scales, shifts and gates come from the class embedding, attention with
l2-normalised queries and keys and a learned per-head temperature, and an AdaLN head.
It never looks at which unit it serves: the sequence layout (``unit.step_lengths``),
the mask (``unit.mask()``), the start and position embeddings and optional rotary
angles all come from the unit, which is a submodule (``model.unit``) because it owns
those embeddings. The attention backend prepares the mask once, when the model is
built (``model.attn_mask``, a module of buffers), so the training forward builds no
mask and no step ids: it compiles as one graph.

Shapes use the varkit glossary: ``b`` batch, ``l`` positions, ``nh`` heads, ``hd``
head dim, ``d`` width, ``c`` code channels, ``v`` vocabulary.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from varkit import validators as V
from varkit.base import AttentionBackend, PredictionUnit
from varkit.errors import VarkitError
from varkit.masks import BlockCausal, PreparedMask
from varkit.model.kv_cache import KVCache

#: Upper bound of the learned attention temperature ``exp(scale_mul)`` (VAR: 100).
MAX_SCALE_MUL = math.log(100.0)
#: Initial learned attention temperature ``exp(scale_mul)`` (VAR: 4).
INIT_SCALE_MUL = math.log(4.0)


@attrs.frozen(kw_only=True)
class ModelConfig:
    """Options of the AR transformer (recipe section ``model``); VAR's values by default.

    ``width``, ``heads`` and ``drop_path`` may be left at their "derive it" values
    (0, 0, None); the built config holds the resolved numbers, so ``config.width`` is
    always the real width and a saved recipe records what was built.
    """

    #: Number of AdaLN blocks; VAR names its models by it (d16, d20, d24, d30).
    depth: int = attrs.field(default=16, validator=V.positive)
    #: Model width d; 0 means VAR's 64·depth.
    width: int = attrs.field(default=0, validator=V.non_negative)
    #: Attention heads; 0 means width // 64 (VAR: heads of 64 channels).
    heads: int = attrs.field(default=0, validator=V.non_negative)
    #: MLP hidden width over model width (VAR: 4).
    mlp_ratio: float = attrs.field(default=4.0, validator=V.positive)
    #: Classes of the conditioning; index ``num_classes`` is "no class" (ImageNet: 1000).
    num_classes: int = attrs.field(default=1000, validator=V.positive)
    #: Chance of replacing a label by "no class" in training, for guidance (VAR: 0.1).
    class_dropout: float = attrs.field(default=0.1, validator=V.probability)
    #: Drop-path rate of the last block, rising linearly from 0; None means VAR's 0.1·depth/24.
    drop_path: float | None = attrs.field(default=None, validator=V.probability)
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
    #: Multiplier of the output head's weights at init: near-uniform first logits (VAR: 0.02).
    head_init: float = attrs.field(default=0.02, validator=V.non_negative)

    def __attrs_post_init__(self):
        # Resolve the derived values in place (frozen: through object.__setattr__), so
        # unstructure() writes the real numbers and structure() reads them back unchanged.
        width = self.width or 64 * self.depth
        heads = self.heads or max(1, width // 64)
        drop_path = 0.1 * self.depth / 24 if self.drop_path is None else float(self.drop_path)
        if width % heads:
            raise ValueError(
                f"model.width {width} is not divisible by model.heads {heads}; pick heads dividing it"
            )
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "drop_path", drop_path)

    @property
    def head_dim(self) -> int:
        """Channels per attention head ``hd``."""
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of each block's MLP."""
        return round(self.width * self.mlp_ratio)


# ----------------------------------------------------------------------------- pieces


def _modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """AdaLN: ``x (b, l, d)`` scaled by ``1 + scale`` and shifted, ``scale, shift (b, 1, d)``."""
    return x * (1 + scale) + shift


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

    ``qkv`` has no bias of its own: queries and values get learned biases, keys none
    (a key bias shifts every score of a query equally, so softmax ignores it).
    """

    def __init__(self, width: int, heads: int, *, l2_norm: bool, dropout: float):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.l2_norm = l2_norm
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.empty(width))
        self.v_bias = nn.Parameter(torch.empty(width))
        # Per-head log temperature; only with l2-normalised q and k, whose scores would
        # otherwise be stuck in [-1, 1].
        self.scale_mul = nn.Parameter(torch.empty(heads)) if l2_norm else None
        self.proj = nn.Linear(width, width)
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

    def __init__(self, width: int, hidden: int, *, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x), approximate="tanh"))))


class Block(nn.Module):
    """One AdaLN transformer block.

    With modulation ``(gamma1, gamma2, scale1, scale2, shift1, shift2)`` from the class:
    ``x += gamma1 · attn(LN(x)·(1+scale1)+shift1)`` then
    ``x += gamma2 · mlp(LN(x)·(1+scale2)+shift2)``, LN without affine parameters.

    In training the block computes its own modulation from the class (inside
    ``forward``, so that FSDP gathers the block's weights once per pass); generation
    computes every block's once, at step 0, and passes it to each later step.
    """

    def __init__(self, config: ModelConfig, *, drop_path: float):
        super().__init__()
        d = config.width
        self.norm_eps = config.norm_eps
        self.attn = Attention(d, config.heads, l2_norm=config.attn_l2_norm, dropout=config.dropout)
        self.mlp = MLP(d, config.mlp_hidden, dropout=config.dropout)
        self.drop_path = DropPath(drop_path)
        if config.shared_adaln:
            self.adaln = None
            # Learned per-block offset added to the shared modulation (6, d).
            self.adaln_offset = nn.Parameter(torch.empty(6, d))
        else:
            self.adaln = nn.Linear(d, 6 * d)  # applied to SiLU(class embedding)
            self.adaln_offset = None

    def modulation(self, cond: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        """``(b, 1, 6, d)`` from SiLU(class embedding) ``(b, d)`` or the shared ``(b, 1, 6, d)``.

        Called from outside ``forward`` by generation (FSDP registers it as a forward
        method); ``forward`` itself uses the unwrapped :meth:`_adaln`.
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
                already (generation); None computes it here from ``cond``.
            cond: SiLU of the class embedding ``(b, d)`` (with ``modulation`` None).
            shared: the shared AdaLN output ``(b, 1, 6, d)`` (``shared_adaln`` only).
            attn_kwargs: passed to :class:`Attention` (backend, mask, rotary, cache, layer).
        """
        if modulation is None:
            modulation = self._adaln(cond, shared)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation.unbind(2)  # each (b, 1, d)
        d = x.shape[-1]
        h = _modulate(F.layer_norm(x, (d,), eps=self.norm_eps), scale1, shift1)
        x = x + self.drop_path(self.attn(h, **attn_kwargs) * gamma1)
        h = _modulate(F.layer_norm(x, (d,), eps=self.norm_eps), scale2, shift2)
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

    Parameters are built on the meta device and initialised once, explicitly, on the
    current default device (:meth:`reset_parameters`), so large depths build quickly and
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
        #: First position of each step, and the sequence length at the end.
        self.step_starts = tuple(sum(self.step_lengths[:s]) for s in range(len(self.step_lengths) + 1))
        d = config.width
        self._check_rotary(unit, config.head_dim)
        device = torch.get_default_device()
        # Drop-path rates rise linearly from 0 at the first block to config.drop_path.
        rates = [config.drop_path * i / max(1, config.depth - 1) for i in range(config.depth)]
        with torch.device("meta"):  # nothing is allocated or initialised twice
            self.class_embed = nn.Embedding(config.num_classes + 1, d)  # last row: "no class"
            self.word_embed = nn.Linear(code_dim, d)
            self.shared_adaln = nn.Linear(d, 6 * d) if config.shared_adaln else None
            self.blocks = nn.ModuleList(Block(config, drop_path=r) for r in rates)
            self.head_adaln = nn.Linear(d, 2 * d)  # -> scale, shift of the final LN
            self.head = nn.Linear(d, vocab_size)
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
            prepared = backend.prepare(self.unit.mask())
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
        """Refuse at build time a unit whose rotary angles cannot fit the heads."""
        try:
            angles = unit.rotary_angles(head_dim)
        except ValueError as exc:
            raise VarkitError(
                f"unit {unit.name!r} cannot rotate heads of {head_dim} channels: {exc}; "
                "change model.width or model.heads"
            ) from None
        expected = (unit.seq_len, head_dim // 2)
        if angles is not None and (head_dim % 2 or tuple(angles.shape) != expected):
            raise VarkitError(
                f"unit {unit.name!r} gives rotary angles {tuple(angles.shape)} for heads of {head_dim} "
                f"channels; the model needs an even head dim and angles {expected}"
            )

    # -- init ---------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """VAR's initialisation of every parameter outside the unit.

        Linears and embeddings: truncated normal with std ``sqrt(1/(3d))``, zero biases
        (truncated at ±2 in absolute value, as VAR does and as the units' embeddings
        are: with a std near 0.02 the cut never bites). Head weights × ``head_init``.
        AdaLN output weights × 0.5, except the gate rows (gamma1, gamma2), which are ×
        ``adaln_gamma_init`` so each block starts close to the identity. Attention ``proj`` and MLP ``fc2`` weights ÷
        ``sqrt(2·depth)`` so the residual stream's variance does not grow with depth.
        q/v biases zero; attention temperature ``exp(scale_mul)`` = 4.
        """
        cfg = self.config
        d = cfg.width
        std = math.sqrt(1 / (3 * d))
        for name, module in self.named_modules():
            if name == "unit" or name.startswith("unit."):
                continue
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std, a=-2.0, b=2.0)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        self.head.weight.mul_(cfg.head_init)
        self.head_adaln.weight.mul_(0.5)
        adalns = [self.shared_adaln] if cfg.shared_adaln else [b.adaln for b in self.blocks]
        for lin in adalns:
            lin.weight[: 2 * d].mul_(cfg.adaln_gamma_init)
            lin.weight[2 * d :].mul_(0.5)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * cfg.depth))
            block.mlp.fc2.weight.div_(math.sqrt(2 * cfg.depth))
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

    def _head_modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """The head's AdaLN ``(b, 1, 2, d)`` from SiLU(class embedding) ``(b, d)``."""
        return self.head_adaln(cond).unflatten(-1, (2, -1)).unsqueeze(1)

    def _modulations(self, cond: torch.Tensor) -> list[torch.Tensor]:
        """AdaLN modulation of every block ``(b, 1, 6, d)`` and of the head ``(b, 1, 2, d)``.

        Generation's: computed once at step 0 and reused by every step.
        """
        cond = F.silu(cond)  # (b, d)
        shared = self._shared_modulation(cond)
        mods = [block.modulation(cond, shared) for block in self.blocks]
        mods.append(self._head_modulation(cond))
        return mods

    def _logits(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """Final AdaLN and head: ``(b, l, d) -> (b, l, v)`` float32."""
        scale, shift = modulation.unbind(2)
        x = _modulate(F.layer_norm(x.float(), (x.shape[-1],), eps=self.config.norm_eps), scale, shift)
        return self.head(x).float()

    def _rotary(self, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        angles = self.unit.rotary_angles(self.config.head_dim)  # (l, hd/2) or None
        if angles is None:
            return None
        angles = angles[start:end].to(device=device, dtype=torch.float32)
        return angles.cos(), angles.sin()

    def _check_features(self, inputs: torch.Tensor, batch: int, length: int, what: str) -> None:
        if inputs.ndim != 3 or tuple(inputs.shape) != (batch, length, self.code_dim):
            raise VarkitError(
                f"{what} must be (b, l, c) = ({batch}, {length}, {self.code_dim}), got {tuple(inputs.shape)}; "
                "build them with the model's unit (unit.teacher_forcing / unit.generation_step)"
            )

    # -- training ------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of the whole sequence.

        Args:
            inputs: the unit's input features of steps 1.., ``(b, l - l_0, c)``
                (``unit.teacher_forcing(codes, tokenizer)``).
            labels: class indices ``(b,)`` in ``[0, num_classes]``; in training mode each
                is replaced by "no class" with probability ``class_dropout``.

        Returns:
            Logits ``(b, l, v)`` in float32.
        """
        b = labels.shape[0]
        l0, seq_len = self.step_lengths[0], self.step_starts[-1]
        self._check_features(inputs, b, seq_len - l0, "inputs")
        if self.training and self.config.class_dropout > 0:
            drop = torch.rand(b, device=labels.device) < self.config.class_dropout
            labels = torch.where(drop, self.config.num_classes, labels)
        cond = self.class_embed(labels)  # (b, d)
        start = cond.unsqueeze(1) + self.unit.start_embedding()  # (b, l_0, d)
        words = self.word_embed(inputs.to(self.word_embed.weight.dtype))  # (b, l - l_0, d)
        x = torch.cat((start.to(words.dtype), words), dim=1) + self.unit.position_embedding()  # (b, l, d)
        cond = F.silu(cond)  # each block computes its AdaLN modulation from it
        shared = self._shared_modulation(cond)
        rotary = self._rotary(0, seq_len, x.device)
        for block in self.blocks:
            x = block(x, cond=cond, shared=shared, backend=self.attention, mask=self.attn_mask, rotary=rotary)
        return self._logits(x, self._head_modulation(cond))

    # -- generation ------------------------------------------------------------------------
    def new_cache(
        self, batch: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> KVCache:
        """A preallocated KV cache for generating ``batch`` sequences (dtype/device: the model's)."""
        ref = self.head.weight
        return KVCache(
            depth=self.config.depth,
            batch=batch,
            heads=self.config.heads,
            max_len=self.step_starts[-1],
            head_dim=self.config.head_dim,
            dtype=dtype or ref.dtype,
            device=device or ref.device,
        )

    def forward_step(
        self, inputs: torch.Tensor | None, labels: torch.Tensor, cache: KVCache, step: int
    ) -> torch.Tensor:
        """Logits of step ``step`` given the cache of the steps before.

        Args:
            inputs: the step's input features ``(b, l_s, c)``; None at step 0, whose
                input is the class embedding plus ``pos_start``.
            labels: class indices ``(b,)`` (no dropout here: pass ``num_classes`` for
                the unconditional half of guidance).
            cache: from :meth:`new_cache`; step 0 needs it empty and stores in it the
                AdaLN modulation of ``labels`` and the position embedding and rotary
                angles, reused by the later steps.
            step: which step, ``0 <= step < len(unit.step_lengths)``, in order.

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
            cond = self.class_embed(labels)
            # Constant over the generation: computed once, sliced by every step.
            cache.modulation = self._modulations(cond)
            cache.positions = self.unit.position_embedding()  # (1, l, d)
            cache.rotary = self._rotary(0, self.step_starts[-1], cond.device)
            x = cond.unsqueeze(1) + self.unit.start_embedding()  # (b, l_0, d)
        else:
            if inputs is None:
                raise VarkitError(f"step {step} needs its input features (b, {end - start}, c)")
            self._check_features(inputs, b, end - start, f"inputs of step {step}")
            x = self.word_embed(inputs.to(self.word_embed.weight.dtype))  # (b, l_s, d)
        x = x + cache.positions[:, start:end]
        rotary = None if cache.rotary is None else tuple(t[start:end] for t in cache.rotary)
        for i, (block, mod) in enumerate(zip(self.blocks, cache.modulation, strict=False)):
            x = block(x, mod, backend=self.attention, mask=None, rotary=rotary, cache=cache, layer=i)
        cache.advance(end - start)
        return self._logits(x, cache.modulation[-1])

    # -- training helpers ---------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters trained without weight decay.

        The unit's parameters (start, position and step embeddings), every bias, the
        attention temperatures ``scale_mul`` and the shared-AdaLN offsets. LayerNorms
        have no parameters here.
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
        linears at every position, attention scores and weighted sums over the
        block-causal mask's visible pairs only, and the AdaLN linears once per image
        (they see the class, not the positions). Element-wise work is left out.
        Training (forward and backward) counts 3× the forward.
        """
        cfg = self.config
        d, hidden, depth = cfg.width, cfg.mlp_hidden, cfg.depth
        lengths = self.step_lengths
        seq_len = sum(lengths)
        pairs = sum(n * end for n, end in zip(lengths, self.step_starts[1:], strict=True))
        per_block = 2 * seq_len * (3 * d * d + d * d + 2 * d * hidden) + 2 * 2 * pairs * d
        adaln = 2 * d * 6 * d * (1 if cfg.shared_adaln else depth) + 2 * d * 2 * d
        embed = 2 * (seq_len - lengths[0]) * self.code_dim * d
        head = 2 * seq_len * d * self.vocab_size
        forward = depth * per_block + adaln + embed + head
        return float(3 * forward if training else forward)
