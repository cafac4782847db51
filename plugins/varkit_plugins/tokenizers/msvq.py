"""``msvq``: VAR's multi-scale residual VQ-VAE.

An image becomes a pyramid of code maps ``[(b, h_1, w_1), ..., (b, h_K, w_K)]`` that
all index one shared codebook. Scale ``k`` quantises what the coarser scales left
unexplained (the residual, area-downsampled to ``h_k × w_k``); its embeddings are
brought back to the latent grid (bicubic), refined by a phi conv and summed into the
feature map ``f_hat`` that the decoder turns into the image. The defaults are the
official release's ``vae_ch160v4096z32`` (ImageNet 256, 16× down, 4096 codes of 32
dims, ten scales 1..16, four phi convs), and its state dict loads as it is:
`MSVQ.from_release`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import attrs
import torch
import torch.nn.functional as F

from varkit import scales
from varkit import validators as V
from varkit.errors import CheckpointError, VarkitError
from varkit.hookspecs import hookimpl
from varkit.weights import check_state_dict
from varkit_plugins.tokenizers.backbone import BackboneFields, ConvTokenizer
from varkit_plugins.tokenizers.losses import LossFields
from varkit_plugins.tokenizers.quantize import MultiScaleQuantizer

log = logging.getLogger(__name__)

ScheduleSpec = tuple[int | tuple[int, int], ...]


def _to_schedule(value):
    """``"1,2,3x4"`` or ``[1, 2, [3, 4]]`` -> ``(1, 2, (3, 4))``; None stays None."""
    if isinstance(value, str):
        entries: list[int | tuple[int, int]] = []
        for part in value.replace(" ", "").split(","):
            if not part:
                continue
            try:
                if "x" in part:
                    h, w = part.split("x")
                    entries.append((int(h), int(w)))
                else:
                    entries.append(int(part))
            except ValueError:
                raise ValueError(
                    f'schedule {value!r}: {part!r} is not a size; write e.g. "1,2,3,4" or "1,2x3,4x6"'
                ) from None
        return tuple(entries)
    if isinstance(value, list | tuple):
        return tuple(tuple(e) if isinstance(e, list | tuple) else e for e in value)
    return value


@attrs.frozen(kw_only=True)
class MSVQConfig(BackboneFields, LossFields):
    """Options of ``msvq``. The defaults are VAR's ``vae_ch160v4096z32``."""

    #: Code-map sizes, coarse to fine, ending at the latent grid: ints for square grids,
    #: ``[h, w]`` pairs otherwise, or a string ``"1,2,3,4"``. null: VAR's 1..16 for a
    #: 16×16 latent, else a schedule of the same shape (see ``varkit.scales.default``).
    schedule: ScheduleSpec | str | None = attrs.field(default=None, converter=_to_schedule)
    #: How the phi convs are shared: "partial" (VAR: ``phi_convs`` convs spread over the
    #: scales), "shared" (one), "per_scale" (one per scale), "none" (phi is the identity).
    phi: Literal["none", "shared", "partial", "per_scale"] = "partial"
    #: Number of phi convs with ``phi: partial`` (VAR: 4).
    phi_convs: int = attrs.field(default=4, validator=V.positive)
    #: phi(h) = (1 - r)·h + r·conv(h) (VAR: r = 0.5).
    phi_ratio: float = attrs.field(default=0.5, validator=V.fraction)

    def __attrs_post_init__(self) -> None:
        self._check_backbone()
        self._check_losses(min(self.image_size, self.image_w))
        _ = self.grids  # raises on a bad schedule

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """The schedule as ``(h, w)`` grids, checked against the latent grid."""
        if self.schedule is None:
            try:
                return scales.default(self.latent)
            except VarkitError as exc:
                raise ValueError(str(exc)) from None
        try:
            grids = scales.parse(self.schedule)
        except VarkitError as exc:
            raise ValueError(str(exc)) from None
        problems = scales.validate(grids, self.latent)
        if problems:
            raise ValueError(f"schedule: {'; '.join(problems)}")
        return grids


class MSVQ(ConvTokenizer):
    """VAR's multi-scale residual VQ-VAE (see the module docs).

    Module tree and parameter names are the official checkpoint's: ``encoder``,
    ``quant_conv``, ``quantize`` (``embedding``, ``quant_resi.qresi_ls.{i}``,
    ``ema_vocab_hit_SV``), ``post_quant_conv``, ``decoder``.
    """

    name = "msvq"
    Config = MSVQConfig

    def __init__(self, config: MSVQConfig | None = None):
        config = config if config is not None else MSVQConfig()
        super().__init__(config)
        self._grids = config.grids
        self._build(
            MultiScaleQuantizer(
                vocab_size=config.vocab_size,
                code_dim=config.code_dim,
                grids=self._grids,
                phi=config.phi,
                phi_convs=config.phi_convs,
                phi_ratio=config.phi_ratio,
                restart_after=config.restart_unused_after,
            )
        )

    @property
    def schedule(self) -> tuple[tuple[int, int], ...]:
        return self._grids

    def add_scale(self, f_hat: torch.Tensor | None, k: int, emb: torch.Tensor) -> torch.Tensor:
        """``f_hat + phi_k(up(emb))``; ``f_hat`` is float32 ``(b, c, hK, wK)``."""
        delta = self.quantize.scale_delta(emb, k)
        return delta if f_hat is None else f_hat + delta

    def next_input(self, f_hat: torch.Tensor, k: int) -> torch.Tensor:
        """``f_hat`` area-downsampled to scale ``k + 1``'s grid ``(b, c, h_{k+1}, w_{k+1})``."""
        if not 0 <= k < len(self._grids) - 1:
            raise ValueError(f"scale {k} has no next input: the schedule has {len(self._grids)} scales")
        size = self._grids[k + 1]
        if tuple(f_hat.shape[-2:]) == size:
            return f_hat
        return F.interpolate(f_hat, size=size, mode="area")

    @classmethod
    def from_release(
        cls, state: Mapping[str, torch.Tensor], *, device: torch.device | str = "cpu", **overrides
    ) -> MSVQ:
        """An `MSVQ` holding the official ``vae_ch160v4096z32.pth`` weights.

        The keys load as they are (the module tree uses the release's names); every key
        must be consumed and every shape must match. The model is built on the meta device
        and takes the checkpoint's tensors, so nothing is initialised twice.

        Args:
            state: the state dict, e.g. ``varkit.weights.read_state_dict(path, "VAE")``.
            device: where the returned tokenizer lives.
            overrides: config fields to set instead of those read off the state dict (see
                `official_vae_config`).

        Returns:
            The tokenizer in eval mode.

        Raises:
            CheckpointError: naming the missing, unexpected and mismatched keys.
        """
        config = official_vae_config(state, **overrides)
        with torch.device("meta"):
            model = cls(config)
        check_state_dict(model, state, what="VAE state dict")
        model.load_state_dict(dict(state), strict=True, assign=True)
        model.quantize.reset_bookkeeping()
        return model.to(device).eval()


@hookimpl
def varkit_register_tokenizers(register):
    register(MSVQ)


# ------------------------------------------------------------------ official release


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(
            f"the state dict lacks {key!r}: it is not a VAR multi-scale VQ-VAE such as vae_ch160v4096z32.pth"
        )
    return tuple(state[key].shape)


def _indices(state: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """The sorted ``i`` of the keys ``{prefix}{i}.…``."""
    found = set()
    for key in state:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def official_vae_config(state: Mapping[str, torch.Tensor], **overrides) -> MSVQConfig:
    """The `MSVQConfig` of an official VAR VQ-VAE state dict, read off its shapes.

    Channels, multipliers, residual blocks, attention, code dim, vocabulary, number of
    scales and phi convs come from the keys and shapes. What a state dict cannot tell
    is taken from the release: images of 256 px, GroupNorm with 32 groups and VAR's
    schedule for that many scales (1..16 for ten). ``overrides`` replace any field.

    Raises:
        CheckpointError: the state dict is not in the official layout, or the config
            read off it is not valid.
    """
    ch = _shape(state, "encoder.conv_in.weight")[0]
    levels = _indices(state, "encoder.down.")
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"encoder levels {levels} in the state dict are not 0..n-1")
    ch_mult = []
    for i in levels:
        width = _shape(state, f"encoder.down.{i}.block.0.conv1.weight")[0]
        if width % ch:
            raise CheckpointError(f"encoder.down.{i} has {width} channels, not a multiple of ch {ch}")
        ch_mult.append(width // ch)
    vocab, code_dim = _shape(state, "quantize.embedding.weight")
    z_channels = _shape(state, "encoder.conv_out.weight")[0]
    num_scales = _shape(state, "quantize.ema_vocab_hit_SV")[0]
    phi_convs = len(_indices(state, "quantize.quant_resi.qresi_ls."))
    fields = {
        "image_size": 256,
        "ch": ch,
        "ch_mult": tuple(ch_mult),
        "num_res_blocks": len(_indices(state, "encoder.down.0.block.")),
        "level_attention": bool(_indices(state, f"encoder.down.{levels[-1]}.attn.")),
        "mid_attention": "encoder.mid.attn_1.qkv.weight" in state,
        "norm_groups": 32,
        "z_channels": None if z_channels == code_dim else z_channels,
        "quant_conv_kernel": _shape(state, "quant_conv.weight")[-1],
        "code_dim": code_dim,
        "vocab_size": vocab,
        "phi": "none" if phi_convs == 0 else "shared" if phi_convs == 1 else "partial",
        "phi_convs": max(phi_convs, 1),
    }
    fields.update(overrides)
    if "schedule" not in overrides:
        size = fields["image_size"]
        width = fields.get("image_width") or size
        down = 2 ** (len(fields["ch_mult"]) - 1)
        try:
            grids = scales.default((size // down, width // down), num_scales)
        except VarkitError as exc:
            raise CheckpointError(
                f"the state dict has {num_scales} scales: {exc}; pass schedule=..."
            ) from None
        fields["schedule"] = tuple(h if h == w else (h, w) for h, w in grids)
    try:
        return MSVQConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the VQ-VAE read off the state dict is not a valid msvq config: {exc}"
        ) from None
