"""A small tokenizer implementing the whole :class:`varkit.Tokenizer` API, for tests.

It follows the arithmetic of a multi-scale residual tokenizer (scales added to
``f_hat`` after an upsampling and a 1×1 "phi" conv; next inputs by area
downsampling) without any encoder depth, so unit and generation tests run in
milliseconds and need no other plugin. With a one-entry schedule it is a
single-scale tokenizer.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

import varkit


@attrs.frozen(kw_only=True)
class FakeConfig:
    schedule: tuple = (1, 2, 4)
    vocab_size: int = 32
    code_dim: int = 8
    patch: int = 4


class FakeTokenizer(varkit.Tokenizer):
    """Multi-scale residual quantisation over a linear 'encoder' of ``patch``-pixel cells."""

    name = "fake"
    Config = FakeConfig

    def __init__(self, config: FakeConfig = FakeConfig()):
        super().__init__(config)
        g = torch.Generator().manual_seed(1234)
        self.codebook_weight = nn.Parameter(torch.randn(config.vocab_size, config.code_dim, generator=g))
        self.phi = nn.Conv2d(config.code_dim, config.code_dim, 1)
        self.enc = nn.Conv2d(3, config.code_dim, config.patch, stride=config.patch)
        self.dec = nn.Conv2d(config.code_dim, 3 * config.patch**2, 1)

    @property
    def schedule(self):
        return tuple((s, s) if isinstance(s, int) else tuple(s) for s in self.config.schedule)

    @property
    def vocab_size(self):
        return self.config.vocab_size

    @property
    def code_dim(self):
        return self.config.code_dim

    @property
    def downsample(self):
        return self.config.patch

    @property
    def codebook(self):
        return self.codebook_weight

    def embed(self, codes):
        return F.embedding(codes, self.codebook_weight)

    def add_scale(self, f_hat, k, emb):
        if len(self.schedule) == 1:
            return emb
        latent = self.schedule[-1]
        if tuple(emb.shape[-2:]) != latent:
            emb = F.interpolate(emb, size=latent, mode="bicubic")
        delta = 0.5 * emb + 0.5 * self.phi(emb)
        return delta if f_hat is None else f_hat + delta

    def next_input(self, f_hat, k):
        return F.interpolate(f_hat, size=self.schedule[k + 1], mode="area")

    def encode(self, images):
        residual = self.enc(images).float()
        codes, f_hat = [], None
        for k, (h, w) in enumerate(self.schedule):
            down = F.interpolate(residual, size=(h, w), mode="area")
            flat = down.permute(0, 2, 3, 1).reshape(-1, self.code_dim)
            code = torch.cdist(flat, self.codebook_weight).argmin(-1).reshape(-1, h, w)
            codes.append(code)
            new = self.add_scale(f_hat, k, self.embed(code).permute(0, 3, 1, 2))
            residual = residual - (new if f_hat is None else new - f_hat)
            f_hat = new
        return codes

    def features_to_image(self, f_hat):
        x = F.pixel_shuffle(self.dec(f_hat), self.config.patch)
        return torch.tanh(x)
