"""Training losses of the conv tokenizers: options, LPIPS, PatchGAN discriminator.

LPIPS needs VGG16 weights that varkit cannot download; a user points
``lpips_weights`` at one file holding the torchvision ``vgg16`` feature weights
(``features.{i}.weight`` / ``.bias``, as ``torchvision.models.vgg16().state_dict()``
names them) and the LPIPS linear heads (``lin{j}.model.1.weight``, as the ``lpips``
package's ``weights/v0.1/vgg.pth`` names them), e.g. both state dicts merged and saved
with ``safetensors.torch.save_file`` or ``torch.save``. Keys of neither (the VGG
classifier) are ignored. When the file is absent the perceptual loss is skipped with
one warning, and training goes on with the other losses.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from varkit import validators as V
from varkit.errors import CheckpointError

log = logging.getLogger(__name__)


# Not slotted: the tokenizers' Configs derive from two such field sets.
@attrs.frozen(kw_only=True, slots=False)
class LossFields:
    """Training options shared by the tokenizers' Configs (unused when only encoding).

    With the defaults (no LPIPS, no discriminator) the tokenizer holds exactly the
    modules it needs to encode and decode, so its state dict is the inference one.
    """

    #: Pixel reconstruction loss: l1 keeps edges sharper than l2 (VQGAN's choice).
    rec_loss: Literal["l1", "l2"] = "l1"
    #: Weight of the pixel reconstruction loss.
    rec_weight: float = attrs.field(default=1.0, validator=V.non_negative)
    #: Commitment weight beta (VQ-VAE, VAR: 0.25).
    beta: float = attrs.field(default=0.25, validator=V.non_negative)
    #: Weight of the LPIPS perceptual loss; 0 turns it off (VQGAN: 1.0 once weights exist).
    lpips_weight: float = attrs.field(default=0.0, validator=V.non_negative)
    #: File with VGG16 features + LPIPS heads (see the module docs); absent: skipped with one warning.
    lpips_weights: str | None = None
    #: Weight of the adversarial loss; 0 builds no discriminator (VQGAN: 0.1 to 0.75).
    disc_weight: float = attrs.field(default=0.0, validator=V.non_negative)
    #: Training step at which the discriminator starts (VQGAN: after the codebook settles).
    disc_start: int = attrs.field(default=0, validator=V.non_negative)
    #: Stride-2 conv layers of the PatchGAN discriminator (pix2pix: 3, 70×70 patches).
    disc_layers: int = attrs.field(default=3, validator=V.positive)
    #: Channels of the discriminator's first layer (pix2pix: 64).
    disc_ch: int = attrs.field(default=64, validator=V.positive)
    #: Scale the adversarial term by |grad nll| / |grad adv| at the decoder's last layer (VQGAN).
    disc_adaptive: bool = True
    #: Restart a code unused for this many training steps on a random current feature; 0: never.
    restart_unused_after: int = attrs.field(default=250, validator=V.non_negative)

    def _check_losses(self, image_side: int) -> None:
        if self.disc_weight > 0:
            out = image_side // 2**self.disc_layers - 2
            if out < 1:
                biggest = max(1, int(math.log2(max(1, image_side // 3))))
                raise ValueError(
                    f"images of {image_side} px are too small for a discriminator of {self.disc_layers} "
                    f"layers (no patch would be left); use disc_layers <= {biggest}"
                )


# ----------------------------------------------------------------------------- LPIPS

#: torchvision's vgg16 ``features``: convs per block; a ReLU follows every conv and a
#: max-pool ends every block, so conv ``i`` of the flat list sits at a fixed index.
_VGG16_BLOCKS = (2, 2, 3, 3, 3)


def _vgg16_conv_indices() -> list[list[int]]:
    indices, i = [], 0
    for n in _VGG16_BLOCKS:
        block = []
        for _ in range(n):
            block.append(i)
            i += 2  # conv, relu
        indices.append(block)
        i += 1  # max-pool
    return indices


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018) on VGG16 features.

    Channel widths are read off the weights, so a file with the standard layout but
    narrower convs (as the tests write) works too. Inputs are images in [-1, 1].
    """

    def __init__(self, widths: list[int]):
        super().__init__()
        conv_idx = _vgg16_conv_indices()
        layers: list[nn.Module] = []
        c_in, w = 3, iter(widths)
        for b, block in enumerate(conv_idx):
            if b > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in block:
                c_out = next(w)
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        # LPIPS taps the last ReLU of each block (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
        self.taps = [block[-1] + 1 for block in conv_idx]
        tap_widths = [widths[sum(_VGG16_BLOCKS[: b + 1]) - 1] for b in range(len(_VGG16_BLOCKS))]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in tap_widths)
        # LPIPS' input normalisation (ImageNet statistics in the [-1, 1] range).
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance ``(b,)`` between images ``x`` and ``y`` ``(b, 3, H, W)``."""
        b = x.shape[0]
        h = (torch.cat([x, y]) - self.shift) / self.scale  # one pass for both: (2b, 3, H, W)
        dist = x.new_zeros(b)
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if tap < len(self.taps) and i == self.taps[tap]:
                f = h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length per position
                diff = (f[:b] - f[b:]).square()
                dist = dist + self.lins[tap](diff).mean(dim=(1, 2, 3))
                tap += 1
        return dist


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"LPIPS weights {path} hold a {type(state).__name__}, not a state dict")
    return state


def load_lpips(path: str) -> LPIPS:
    """An LPIPS net from one weights file (see the module docs), frozen, in eval mode.

    Raises:
        CheckpointError: keys of the VGG16 features or the LPIPS heads are missing.
    """
    state = _read_weights(path)
    conv_idx = [i for block in _vgg16_conv_indices() for i in block]
    need = [f"features.{i}.{p}" for i in conv_idx for p in ("weight", "bias")]
    need += [f"lin{j}.model.1.weight" for j in range(len(_VGG16_BLOCKS))]
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(
            f"LPIPS weights {path} lack {len(missing)} keys, e.g. {', '.join(missing[:5])}; the file "
            "needs torchvision's vgg16 `features.*` and the lpips package's `lin{0..4}.model.1.weight`"
        )
    net = LPIPS([state[f"features.{i}.weight"].shape[0] for i in conv_idx])
    ours = {f"features.{i}.{p}": state[f"features.{i}.{p}"] for i in conv_idx for p in ("weight", "bias")}
    ours |= {f"lins.{j}.weight": state[f"lin{j}.model.1.weight"] for j in range(len(_VGG16_BLOCKS))}
    try:
        net.load_state_dict(ours)
    except RuntimeError as exc:
        raise CheckpointError(f"LPIPS weights {path} do not fit the VGG16 layout: {exc}") from None
    return net.eval().requires_grad_(False)


class PerceptualLoss:
    """LPIPS between reconstructions and images, built on first use.

    Deliberately not an ``nn.Module`` and not a submodule of the tokenizer: the LPIPS
    net is a frozen measuring tool, so it must stay out of the tokenizer's state dict,
    its ``parameters()`` (the optimizer, DDP) and its ``.to()``. This object owns the
    net in a dict keyed by device and loads one per device it is asked about.
    """

    def __init__(self, path: str | None):
        self.path = path
        self._nets: dict[str, LPIPS] = {}
        self._absent = False

    def available(self) -> bool:
        """Whether the weights file exists (warns once when it does not)."""
        if self._absent:
            return False
        if self.path is None or not os.path.isfile(self.path):
            self._absent = True
            log.warning(
                "LPIPS weights %s not found: the perceptual loss is skipped. Set lpips_weights to a "
                "file with VGG16 features and LPIPS heads (see docs/tokenizers.md), or lpips_weight: 0.",
                self.path,
            )
            return False
        return True

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Mean LPIPS over the batch, or None when the weights are absent."""
        if not self.available():
            return None
        key = str(x.device)
        if key not in self._nets:
            self._nets[key] = load_lpips(self.path).to(x.device)
        return self._nets[key](x.float(), y.float()).mean()


# ---------------------------------------------------------------------- discriminator


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm rather than pix2pix's BatchNorm: real and fake batches pass separately,
    # and batch statistics would differ between them and between processes.
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): one real/fake logit per overlapping image patch.

    ``layers`` stride-2 4×4 convs, then two stride-1 4×4 convs; width doubles per
    layer up to 8× ``ch``. Output ``(b, 1, H / 2**layers - 2, W / 2**layers - 2)``.
    """

    def __init__(self, *, ch: int, layers: int):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = ch
        for n in range(1, layers):
            c_out = ch * min(2**n, 8)
            mods += [nn.Conv2d(c, c_out, 4, stride=2, padding=1, bias=False), _norm(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        c_out = ch * min(2**layers, 8)
        mods += [nn.Conv2d(c, c_out, 4, stride=1, padding=1, bias=False), _norm(c_out), nn.LeakyReLU(0.2)]
        mods.append(nn.Conv2d(c_out, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*mods)

    @torch.no_grad()
    def init_weights(self) -> None:
        """pix2pix's init: conv weights N(0, 0.02), norm weights N(1, 0.02), biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: real logits pushed above 1, fake below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, adv: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's balance: ``|d nll / d w| / |d adv / d w|`` at the decoder's last weight.

    Keeps the adversarial gradient at the scale of the reconstruction gradient whatever
    their raw magnitudes; clamped to [0, 1e4] and detached.
    """
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()
