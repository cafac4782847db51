"""``vq``: a single-scale VQGAN-style VQ-VAE.

The same conv encoder/decoder as ``msvq`` and one code map on the latent grid
``[(b, h, w)]``, for raster (next-token) and next-patch prediction. With ``l2_norm``
the lookup is by cosine similarity on l2-normalised features and codes (LlamaGen's
tokenizer), which keeps more of a large codebook in use.

LlamaGen's released tokenizers (``vq_ds16_c2i.pt``, ``vq_ds8_c2i.pt``) load with
`VQ.from_release`: `llamagen_vq_config` reads the architecture off the
state dict and `convert_llamagen_vq` renames its keys to this module tree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs
import torch

from varkit.errors import CheckpointError
from varkit.hookspecs import hookimpl
from varkit.weights import check_state_dict, describe_release
from varkit_plugins.tokenizers.backbone import BackboneFields, ConvTokenizer
from varkit_plugins.tokenizers.losses import LossFields
from varkit_plugins.tokenizers.quantize import VectorQuantizer


@attrs.frozen(kw_only=True)
class VQConfig(BackboneFields, LossFields):
    """Options of ``vq``; the backbone defaults are those of VAR's VQ-VAE."""

    #: Look codes up by cosine similarity on l2-normalised vectors (LlamaGen: on).
    l2_norm: bool = False

    def __attrs_post_init__(self) -> None:
        self._check_backbone()
        self._check_losses(min(self.image_size, self.image_w))


class VQ(ConvTokenizer):
    """Single-scale VQ-VAE: ``encoder``, ``quant_conv``, ``quantize.embedding``,
    ``post_quant_conv``, ``decoder``."""

    name = "vq"
    Config = VQConfig

    def __init__(self, config: VQConfig | None = None):
        config = config if config is not None else VQConfig()
        super().__init__(config)
        self._build(
            VectorQuantizer(
                vocab_size=config.vocab_size,
                code_dim=config.code_dim,
                l2_norm=config.l2_norm,
                restart_after=config.restart_unused_after,
            )
        )

    @property
    def schedule(self) -> tuple[tuple[int, int], ...]:
        return (self.config.latent,)

    @classmethod
    def from_release(
        cls, state: Mapping[str, torch.Tensor], *, device: torch.device | str = "cpu", **overrides
    ) -> VQ:
        """A `VQ` holding a LlamaGen VQ release's weights (``vq_ds16_c2i.pt``).

        The keys are renamed by `convert_llamagen_vq` (a state dict already in
        this plugin's own layout is taken as it is); every key must be consumed and every
        shape must match. Built on the meta device, so nothing is initialised twice.

        Args:
            state: the state dict (the ``"model"`` entry of the release file).
            device: where the returned tokenizer lives.
            overrides: config fields to set instead of those read off the state dict or
                taken from the release (``image_size``: 256; ``l2_norm``: true).

        Returns:
            The tokenizer in eval mode.

        Raises:
            CheckpointError: naming the missing, unexpected and mismatched keys, or the
                release the file is when it is not LlamaGen's VQ.
        """
        own = "encoder.down.0.block.0.conv1.weight" in state
        config = _own_config(state, overrides) if own else llamagen_vq_config(state, **overrides)
        converted = dict(state) if own else convert_llamagen_vq(state)
        with torch.device("meta"):
            model = cls(config)
        check_state_dict(model, converted, what="VQ state dict")
        model.load_state_dict(converted, strict=True, assign=True)
        model.quantize.reset_bookkeeping()
        return model.to(device).eval()


@hookimpl
def varkit_register_tokenizers(register):
    register(VQ)


# ------------------------------------------------------------------ LlamaGen release

_LEVEL = re.compile(r"^(encoder|decoder)\.conv_blocks\.(\d+)\.(.*)$")


def _need(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        what = describe_release(state)
        hint = f"; it looks like {what}" if what else ""
        raise CheckpointError(
            f"the state dict lacks {key!r}: it is not a LlamaGen VQ tokenizer such as vq_ds16_c2i.pt{hint}"
        )
    return tuple(state[key].shape)


def _levels(state: Mapping[str, torch.Tensor], part: str) -> list[int]:
    return sorted({int(m.group(2)) for k in state if (m := _LEVEL.match(k)) and m.group(1) == part})


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    found = {k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)}
    return len([f for f in found if f.isdigit()])


def llamagen_vq_config(state: Mapping[str, torch.Tensor], **overrides) -> VQConfig:
    """The `VQConfig` of a LlamaGen VQ state dict, read off its shapes.

    Channels, multipliers, residual blocks, attention, latent channels, code dim and
    vocabulary come from the tensors. What a state dict cannot tell is the release's:
    images of 256 px (the same weights serve 384 px: set ``image_size``), GroupNorm
    with 32 groups, l2-normalised codes. ``overrides`` replace any field.

    Raises:
        CheckpointError: the state dict is not in LlamaGen's VQ layout, or encoder and
            decoder differ in a way ``vq`` cannot hold.
    """
    ch = _need(state, "encoder.conv_in.weight")[0]
    levels = _levels(state, "encoder")
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"encoder levels {levels} of the LlamaGen VQ state dict are not 0..n-1")
    ch_mult = []
    for i in levels:
        width = _need(state, f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0]
        if width % ch:
            raise CheckpointError(f"encoder level {i} has {width} channels, not a multiple of ch {ch}")
        ch_mult.append(width // ch)
    n = len(levels)
    dec_mult = [
        _need(state, f"decoder.conv_blocks.{n - 1 - i}.res.0.conv1.weight")[0] // ch for i in range(n)
    ]
    if dec_mult != ch_mult or _levels(state, "decoder") != levels:
        raise CheckpointError(
            f"the decoder's channel multipliers {dec_mult} differ from the encoder's {ch_mult}; "
            "the vq tokenizer mirrors one list"
        )
    blocks = _count(state, "encoder.conv_blocks.0.res.")
    if _count(state, "decoder.conv_blocks.0.res.") != blocks + 1:
        raise CheckpointError("the decoder levels do not have one residual block more than the encoder's")
    vocab, code_dim = _need(state, "quantize.embedding.weight")
    fields = {
        "image_size": 256,
        "ch": ch,
        "ch_mult": tuple(ch_mult),
        "num_res_blocks": blocks,
        "level_attention": _count(state, f"encoder.conv_blocks.{n - 1}.attn.") > 0,
        "mid_attention": True,
        "norm_groups": 32,
        "z_channels": _need(state, "encoder.conv_out.weight")[0],
        "quant_conv_kernel": _need(state, "quant_conv.weight")[-1],
        "code_dim": code_dim,
        "vocab_size": vocab,
        "l2_norm": True,
    }
    fields.update(overrides)
    try:
        return VQConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the VQ read off the LlamaGen state dict is not a valid vq config: {exc}"
        ) from None


def _own_config(state: Mapping[str, torch.Tensor], overrides: dict) -> VQConfig:
    try:
        return VQConfig(**overrides)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"not a valid vq config: {exc}") from None


def _attention(prefix: str, out: str, state: Mapping[str, torch.Tensor], result: dict, used: set) -> None:
    """LlamaGen's separate q, k, v 1×1 convs -> one ``qkv`` conv (q, k, v stacked on outputs)."""
    for part in ("weight", "bias"):
        keys = [f"{prefix}.{name}.{part}" for name in ("q", "k", "v")]
        for key in keys:
            _need(state, key)
        result[f"{out}.qkv.{part}"] = torch.cat([state[key] for key in keys], dim=0)
        used.update(keys)
    for name in ("norm", "proj_out"):
        for part in ("weight", "bias"):
            key = f"{prefix}.{name}.{part}"
            _need(state, key)
            result[f"{out}.{name}.{part}"] = state[key]
            used.add(key)


def convert_llamagen_vq(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LlamaGen VQ state dict renamed to the ``vq`` plugin's keys.

    | LlamaGen | varkit |
    | --- | --- |
    | ``encoder.conv_blocks.i.res.j.*`` | ``encoder.down.i.block.j.*`` |
    | ``encoder.conv_blocks.i.attn.j.{q,k,v}`` | ``encoder.down.i.attn.j.qkv`` (stacked) |
    | ``encoder.conv_blocks.i.downsample.*`` | ``encoder.down.i.downsample.*`` |
    | ``{encoder,decoder}.mid.{0,1,2}`` | ``{encoder,decoder}.mid.{block_1,attn_1,block_2}`` |
    | ``decoder.conv_blocks.j.*`` (lowest resolution first) | ``decoder.up.{n-1-j}.*`` (finest first) |
    | ``quantize.codebook_used`` | dropped (a usage statistic of training) |

    Every other key (``conv_in``, ``norm_out``, ``conv_out``, ``quant_conv``,
    ``post_quant_conv``, ``quantize.embedding``) keeps its name.

    A key that is neither mapped nor shared is passed through, so the strict load that
    follows names it as unexpected.
    """
    n = len(_levels(state, "encoder"))
    out: dict[str, torch.Tensor] = {}
    used: set[str] = {"quantize.codebook_used"}
    for part in ("encoder", "decoder"):
        for i, name in enumerate(("block_1", "attn_1", "block_2")):
            prefix = f"{part}.mid.{i}"
            if name == "attn_1":
                _attention(prefix, f"{part}.mid.attn_1", state, out, used)
                continue
            for key in [k for k in state if k.startswith(prefix + ".")]:
                out[f"{part}.mid.{name}{key[len(prefix) :]}"] = state[key]
                used.add(key)
    for key in state:
        match = _LEVEL.match(key)
        if not match or key in used:
            continue
        part, level, rest = match.group(1), int(match.group(2)), match.group(3)
        target = f"encoder.down.{level}" if part == "encoder" else f"decoder.up.{n - 1 - level}"
        if rest.startswith("attn."):
            j = rest.split(".")[1]
            _attention(f"{part}.conv_blocks.{level}.attn.{j}", f"{target}.attn.{j}", state, out, used)
            continue
        rest = re.sub(r"^res\.", "block.", rest)
        out[f"{target}.{rest}"] = state[key]
        used.add(key)
    # conv_in, norm_out, conv_out, quant_conv, post_quant_conv and the codebook keep their
    # names; anything else left over is reported as unexpected by the strict load.
    out.update({key: value for key, value in state.items() if key not in used})
    return out
