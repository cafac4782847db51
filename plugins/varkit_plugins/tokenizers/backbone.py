"""The convolutional encoder and decoder shared by the ``msvq`` and ``vq`` tokenizers.

This is the VQGAN / latent-diffusion "vq-f16" layout that VAR's VQ-VAE uses: one level
per entry of ``ch_mult`` with ``num_res_blocks`` residual blocks each (the decoder has
one more per level), single-head self-attention at the lowest resolution and in the
middle, GroupNorm and SiLU. Module names follow the official VAR checkpoint so that its
state dict loads as it is (``encoder.down.{i}.block.{j}.conv1`` and so on).

Shapes: images ``(b, 3, H, W)``, latents ``(b, c, h, w)`` with ``h = H / downsample``.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from varkit import validators as V
from varkit.base import Tokenizer, TokenizerLosses
from varkit_plugins.tokenizers.losses import PatchDiscriminator, PerceptualLoss, adaptive_weight, hinge_d_loss
from varkit_plugins.tokenizers.quantize import (
    code_histograms,
    perplexity_from_histograms,
    usage_from_histograms,
    usage_from_hit_ema,
)


def _to_tuple(value):
    return tuple(value) if isinstance(value, list) else value


def _ch_mult(instance, attribute, value) -> None:
    if not value or any(m <= 0 for m in value):
        raise ValueError(f"ch_mult is {value}; give one positive multiplier per level, e.g. [1, 1, 2, 2, 4]")


def _odd(instance, attribute, value) -> None:
    if value <= 0 or value % 2 == 0:
        raise ValueError(f"{attribute.name} is {value}; use an odd kernel size such as 1 or 3")


# Not slotted: the tokenizers' Configs derive from two such field sets.
@attrs.frozen(kw_only=True, slots=False)
class BackboneFields:
    """Options of the conv encoder/decoder, shared by the tokenizers' Configs.

    The defaults are VAR's ``vae_ch160v4096z32`` (ImageNet 256, 16× downsampling).
    """

    #: Height of the images in pixels (VAR: 256); with ``image_width`` unset, also the width.
    image_size: int = attrs.field(default=256, validator=V.positive)
    #: Width of the images in pixels; null for square images (VAR's case).
    image_width: int | None = attrs.field(default=None, validator=V.positive)
    #: Channels of the first level (VAR: 160); every level has ``ch · ch_mult[i]``.
    ch: int = attrs.field(default=160, validator=V.positive)
    #: Channel multiplier per level; ``2 ** (levels - 1)`` is the downsampling (VAR: 16).
    ch_mult: tuple[int, ...] = attrs.field(default=(1, 1, 2, 2, 4), converter=_to_tuple, validator=_ch_mult)
    #: Residual blocks per encoder level; the decoder has one more (VAR: 2, decoder 3).
    num_res_blocks: int = attrs.field(default=2, validator=V.positive)
    #: Self-attention after each block of the lowest-resolution level (VAR: on).
    level_attention: bool = True
    #: Self-attention between the two middle blocks (VAR: on).
    mid_attention: bool = True
    #: GroupNorm groups (VAR: 32); every level's channels must divide by it.
    norm_groups: int = attrs.field(default=32, validator=V.positive)
    #: Dropout inside the residual blocks (VAR: 0; tokenizers overfit little).
    dropout: float = attrs.field(default=0.0, validator=V.non_negative)
    #: Encoder output channels; null means ``code_dim`` (VAR: 32 = code_dim).
    z_channels: int | None = attrs.field(default=None, validator=V.positive)
    #: Kernel of ``quant_conv`` / ``post_quant_conv`` (VAR: 3; LlamaGen: 1).
    quant_conv_kernel: int = attrs.field(default=3, validator=_odd)
    #: Channels of a code embedding ``c`` (VAR: 32).
    code_dim: int = attrs.field(default=32, validator=V.positive)
    #: Number of codes ``v`` (VAR: 4096).
    vocab_size: int = attrs.field(default=4096, validator=V.positive)

    def _check_backbone(self) -> None:
        widths = sorted({self.ch * m for m in self.ch_mult})
        bad = [w for w in widths if w % self.norm_groups]
        if bad:
            raise ValueError(
                f"norm_groups {self.norm_groups} does not divide the level widths {bad} "
                f"(ch {self.ch} × ch_mult {list(self.ch_mult)}); choose norm_groups dividing {math.gcd(*widths)}"
            )
        d = self.downsample
        if self.image_size % d or self.image_w % d:
            raise ValueError(
                f"images of {self.image_size}x{self.image_w} px do not divide into the "
                f"{d}× downsampling of {len(self.ch_mult)} levels; use sizes that are multiples of {d}"
            )

    # -- derived -------------------------------------------------------------
    @property
    def image_w(self) -> int:
        """The image width in pixels."""
        return self.image_width if self.image_width is not None else self.image_size

    @property
    def downsample(self) -> int:
        """Pixels per latent position along each axis, ``2 ** (levels - 1)``."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent(self) -> tuple[int, int]:
        """The latent grid ``(h, w)``."""
        return self.image_size // self.downsample, self.image_w // self.downsample

    @property
    def encoder_channels(self) -> int:
        """Channels of the encoder output (before ``quant_conv``)."""
        return self.z_channels if self.z_channels is not None else self.code_dim


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm as VAR uses it (eps 1e-6, affine)."""
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """Pre-norm residual block: two 3×3 convs, a 1×1 shortcut when the width changes."""

    def __init__(self, c_in: int, c_out: int, *, groups: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all ``h·w`` positions, with a residual.

    qkv and the output projection are 1×1 convs (VAR's names ``qkv``, ``proj_out``);
    the softmax scale is ``c^-0.5``.
    """

    def __init__(self, channels: int, *, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        qkv = rearrange(self.qkv(self.norm(x)), "b (three d) h w -> three b (h w) d", three=3)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (b, h*w, d), scale d^-0.5
        return x + self.proj_out(rearrange(out, "b (h w) d -> b d h w", h=h, w=w))


class Downsample(nn.Module):
    """Stride-2 3×3 conv after zero padding of one pixel right and bottom (halves h, w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest ×2 then a 3×3 conv (doubles h, w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks, their attention blocks, a resampler."""

    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Middle(nn.Module):
    """Residual block, attention (or identity), residual block at the lowest resolution."""

    def __init__(self, channels: int, cfg: BackboneFields):
        super().__init__()
        self.block_1 = ResBlock(channels, channels, groups=cfg.norm_groups, dropout=cfg.dropout)
        self.attn_1 = SelfAttention(channels, groups=cfg.norm_groups) if cfg.mid_attention else nn.Identity()
        self.block_2 = ResBlock(channels, channels, groups=cfg.norm_groups, dropout=cfg.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Images ``(b, 3, H, W)`` -> features ``(b, z, H/d, W/d)`` with ``d = 2 ** (levels - 1)``."""

    def __init__(self, cfg: BackboneFields):
        super().__init__()
        g, levels = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            c_out = cfg.ch * mult
            lowest = i == levels - 1
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c_in, c_out, groups=g, dropout=cfg.dropout))
                c_in = c_out
                if lowest and cfg.level_attention:
                    attn.append(SelfAttention(c_out, groups=g))
            level = Level(blocks, attn)
            if not lowest:
                level.downsample = Downsample(c_out)
            self.down.append(level)
        self.mid = Middle(c_in, cfg)
        self.norm_out = group_norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.encoder_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features ``(b, z, h, w)`` -> images ``(b, 3, h·d, w·d)`` (not clamped)."""

    def __init__(self, cfg: BackboneFields):
        super().__init__()
        g, levels = cfg.norm_groups, len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.encoder_channels, c_in, 3, padding=1)
        self.mid = Middle(c_in, cfg)
        # built lowest level first, stored finest first (``up.0`` is the full resolution).
        up: list[Level] = []
        for i in reversed(range(levels)):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(c_in, c_out, groups=g, dropout=cfg.dropout))
                c_in = c_out
                if i == levels - 1 and cfg.level_attention:
                    attn.append(SelfAttention(c_out, groups=g))
            level = Level(blocks, attn)
            if i != 0:
                level.upsample = Upsample(c_out)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@torch.no_grad()
def init_backbone(module: nn.Module) -> None:
    """Explicit initialisation of an encoder or decoder.

    Convs: Xavier-uniform weights and zero biases. The last conv of every residual
    branch (``conv2``) and every attention output (``proj_out``) start at zero, so each
    block starts as the identity and deep stacks train from the first step.
    GroupNorm: weight 1, bias 0.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, ResBlock):
            nn.init.zeros_(m.conv2.weight)
        elif isinstance(m, SelfAttention):
            nn.init.zeros_(m.proj_out.weight)


# ----------------------------------------------------------------- the tokenizer shell


def _conv(c_in: int, c_out: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)


class ConvTokenizer(Tokenizer):
    """What ``msvq`` and ``vq`` share: the conv nets, the quant convs and the training losses.

    Layout (state-dict names, VAR's)::

        encoder -> quant_conv -> quantize -> post_quant_conv -> decoder

    The optional PatchGAN ``discriminator`` is a submodule (it moves with ``.to()`` and
    trains under DDP) but stays out of ``state_dict()``: the tokenizer's weights are the
    inference ones whatever its loss options, so a tokenizer trained with a
    discriminator loads into a recipe without one. Save and restore it through
    ``tokenizer.discriminator.state_dict()``. The LPIPS net is no submodule at all (see
    `varkit_plugins.tokenizers.losses.PerceptualLoss`).

    Subclasses set ``self.quantize`` (a quantiser with ``quantize(f)``, ``forward(f,
    step=)`` returning `varkit_plugins.tokenizers.quantize.Quantized` and a
    ``hit_ema`` ``(K, v)``) before calling `_build`.
    """

    quantize: nn.Module

    def _build(self, quantizer: nn.Module) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.quant_conv = _conv(cfg.encoder_channels, cfg.code_dim, cfg.quant_conv_kernel)
        self.quantize = quantizer
        self.post_quant_conv = _conv(cfg.code_dim, cfg.encoder_channels, cfg.quant_conv_kernel)
        self.decoder = Decoder(cfg)
        self.discriminator = (
            PatchDiscriminator(ch=cfg.disc_ch, layers=cfg.disc_layers) if cfg.disc_weight > 0 else None
        )
        self._perceptual = PerceptualLoss(cfg.lpips_weights) if cfg.lpips_weight > 0 else None
        self.register_state_dict_post_hook(_drop_discriminator_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_discriminator_keys)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Explicit initialisation of every part (see ``init_backbone``, ``init_weights``)."""
        init_backbone(self.encoder)
        init_backbone(self.decoder)
        for conv in (self.quant_conv, self.post_quant_conv):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.quantize.init_weights()
        if self.discriminator is not None:
            self.discriminator.init_weights()

    # -- facts -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def code_dim(self) -> int:
        return self.config.code_dim

    @property
    def downsample(self) -> int:
        return self.config.downsample

    # -- codes <-> images --------------------------------------------------------
    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(b, 3, H, W)`` in [-1, 1] -> continuous features ``(b, c, hK, wK)`` to quantise."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        codes, _ = self.quantize.quantize(self.encode_features(images))
        return codes

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        return self.quantize.embed(codes)

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.codebook

    def features_to_image(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode ``f_hat`` ``(b, c, hK, wK)`` into images ``(b, 3, H, W)``, clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1.0, 1.0)

    def _check_images(self, images: torch.Tensor) -> None:
        cfg = self.config
        if (
            images.ndim != 4
            or images.shape[1] != 3
            or tuple(images.shape[-2:]) != (cfg.image_size, cfg.image_w)
        ):
            raise ValueError(
                f"{self.name} expects images (b, 3, {cfg.image_size}, {cfg.image_w}) in [-1, 1], got "
                f"{tuple(images.shape)}; resize them or set image_size (and image_width) in the tokenizer section"
            )

    # -- usage ---------------------------------------------------------------------
    def codebook_usage(self, codes: list[torch.Tensor]) -> dict[str, float]:
        """Usage statistics of some code maps ``[(b, h_k, w_k)]`` (e.g. of a validation set).

        Returns ``usage/k`` (the fraction of the vocabulary that scale ``k`` uses) and
        ``perplexity/k`` (``exp`` of the entropy of its code distribution: ``v`` when
        every code is equally used, 1 when one code takes every position) per scale.
        """
        hist = code_histograms(codes, self.vocab_size)
        out = {}
        for k, (u, p) in enumerate(
            zip(usage_from_histograms(hist).tolist(), perplexity_from_histograms(hist).tolist())
        ):
            out[f"usage/{k}"] = u
            out[f"perplexity/{k}"] = p
        return out

    # -- training ------------------------------------------------------------------
    def training_losses(self, images: torch.Tensor, *, step: int) -> TokenizerLosses:
        """Reconstruction, VQ + commitment, LPIPS and adversarial losses of one batch.

        ``generator`` is ``rec_weight·rec + codebook + beta·commit (+ lpips_weight·lpips)
        (+ disc_weight·λ·adv)`` where ``λ`` is VQGAN's adaptive weight; ``discriminator``
        is the hinge loss on the real images and the detached reconstructions, from
        ``disc_start`` on (None before). Metrics: ``rec``, ``codebook``, ``commit``,
        ``lpips``, ``g_adv``, ``disc``, ``disc_lambda``, ``restarted``, and per scale
        ``usage/k`` (fraction of codes in use by the hit EMA) and ``perplexity/k`` (of
        this batch).
        """
        cfg = self.config
        f = self.encode_features(images)
        q = self.quantize(f, step=step)
        rec = self.decoder(self.post_quant_conv(q.f_hat))  # not clamped: the loss needs the gradient
        diff = rec.float() - images.float()
        rec_loss = diff.abs().mean() if cfg.rec_loss == "l1" else diff.square().mean()
        nll = cfg.rec_weight * rec_loss
        metrics: dict[str, torch.Tensor | float] = {"rec": rec_loss.detach()}
        if self._perceptual is not None:
            lp = self._perceptual(rec, images)
            if lp is not None:
                nll = nll + cfg.lpips_weight * lp
                metrics["lpips"] = lp.detach()
        generator = nll + q.codebook_loss + cfg.beta * q.commit_loss
        metrics["codebook"] = q.codebook_loss.detach()
        metrics["commit"] = q.commit_loss.detach()
        disc_loss = None
        if self.discriminator is not None and step >= cfg.disc_start:
            with _frozen(self.discriminator):  # the generator's loss must not train the discriminator
                g_adv = -self.discriminator(rec).float().mean()
            if cfg.disc_adaptive and torch.is_grad_enabled() and rec.requires_grad:
                lam = adaptive_weight(nll, g_adv, self.decoder.conv_out.weight)
            else:
                lam = torch.ones((), device=rec.device)
            generator = generator + cfg.disc_weight * lam * g_adv
            logits_real = self.discriminator(images.detach())
            logits_fake = self.discriminator(rec.detach())
            disc_loss = hinge_d_loss(logits_real.float(), logits_fake.float())
            metrics |= {
                "g_adv": g_adv.detach(),
                "disc": disc_loss.detach(),
                "disc_lambda": lam.detach(),
            }
        metrics["restarted"] = float(q.restarted)
        positions = [images.shape[0] * c.shape[1] * c.shape[2] for c in q.codes]
        usage = usage_from_hit_ema(self.quantize.hit_ema, positions)
        perplexity = perplexity_from_histograms(q.hits)
        for k in range(len(q.codes)):
            metrics[f"usage/{k}"] = usage[k]
            metrics[f"perplexity/{k}"] = perplexity[k]
        return TokenizerLosses(generator=generator, discriminator=disc_loss, metrics=metrics)

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return [] if self.discriminator is None else list(self.discriminator.parameters())


class _frozen:
    """Within the block, ``module``'s parameters take no gradient (inputs still do)."""

    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc) -> None:
        for p in self.params:
            p.requires_grad_(True)


def _drop_discriminator_keys(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "discriminator.")]:
        del state_dict[key]


def _ignore_missing_discriminator_keys(module, incompatible_keys) -> None:
    # keys are relative to the module being loaded, which may hold the tokenizer deeper
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if ".discriminator." not in "." + k]
