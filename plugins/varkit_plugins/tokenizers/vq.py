"""``vq``: a single-scale VQGAN-style VQ-VAE.

The same conv encoder/decoder as ``msvq`` and one code map on the latent grid
``[(b, h, w)]``, for raster (next-token) and next-patch prediction. With ``l2_norm``
the lookup is by cosine similarity on l2-normalised features and codes (LlamaGen's
tokenizer), which keeps more of a large codebook in use.
"""

from __future__ import annotations

import attrs

from varkit.hookspecs import hookimpl
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


@hookimpl
def varkit_register_tokenizers(register):
    register(VQ)
