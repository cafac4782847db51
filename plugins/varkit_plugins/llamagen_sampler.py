"""``llamagen``: LlamaGen's sampling (arXiv 2406.06525, its ``generate.py``), step for step.

Guidance as LlamaGen writes it, ``logits = uncond + cfg · (cond - uncond)`` (the
engine's ``t`` is ``cfg - 1``; a ``cfg`` of 1 or less is no guidance), the same at every
token, optionally only for the first ``cfg_interval + 1`` tokens. Then the logits are
divided by the temperature, cut to the top-k (every logit at least the k-th largest,
ties included) and to the top-p nucleus (the most likely codes up to and including the
first whose cumulative probability passes ``top_p``), and one code is drawn from the
softmax over the whole vocabulary, or the most likely one is taken with
``sample_logits: false``. Drawing over the whole vocabulary in LlamaGen's order keeps
its random stream: with the same seed on the CPU the same codes come out.

LlamaGen's FIDs use ``top_k: 0, top_p: 1.0, temperature: 1.0`` and ``cfg`` 2.0 (B, L),
1.75 (XL, XXL) or 1.65 (3B); its demo samples with ``cfg: 4.0, top_k: 2000``.
"""

from __future__ import annotations

import attrs
import torch
from attrs import validators as v

from varkit.base import Sampler
from varkit.hookspecs import hookimpl


def _top_p(instance, attribute, value):
    if not 0.0 < value <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] (1 turns it off), got {value}")


@attrs.frozen(kw_only=True)
class LlamaGenSamplerConfig:
    """Options of ``llamagen``; the defaults are LlamaGen-B's FID settings."""

    #: Guidance as LlamaGen writes it (``uncond + cfg · (cond - uncond)``); <= 1 is off.
    cfg: float = attrs.field(default=2.0, validator=v.ge(0.0))
    #: Guide only the first ``cfg_interval + 1`` tokens; -1 guides every token.
    cfg_interval: int = attrs.field(default=-1, validator=v.ge(-1))
    #: Keep the codes whose logit is at least the k-th largest; 0 keeps all.
    top_k: int = attrs.field(default=0, validator=v.ge(0))
    #: Then keep the nucleus of this much probability; 1 keeps all.
    top_p: float = attrs.field(default=1.0, validator=_top_p)
    #: Logits are divided by it first.
    temperature: float = attrs.field(default=1.0, validator=v.gt(0.0))
    #: Draw a code from the probabilities; false takes the most likely (LlamaGen's greedy).
    sample_logits: bool = True


def filter_llamagen(logits: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """LlamaGen's top-k then top-p cut of ``logits (n, v)``: the dropped ones set to -inf.

    Top-k keeps every logit at least as large as the k-th largest (ties stay). Top-p
    sorts what is left, keeps codes while the probability mass before them is at most
    ``top_p`` (the first always stays), and drops the rest.
    """
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = torch.zeros_like(cumulative, dtype=torch.bool)
        drop[..., 1:] = cumulative[..., :-1] > top_p  # the first code past top_p stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class LlamaGenSampler(Sampler):
    """LlamaGen's guidance, temperature, top-k, top-p and draw (see the module docs)."""

    name = "llamagen"
    Config = LlamaGenSamplerConfig

    def guidance_scale(self, step: int, num_steps: int) -> float:
        cfg = self.config
        if cfg.cfg <= 1.0 or (cfg.cfg_interval >= 0 and step > cfg.cfg_interval + 1):
            return 0.0
        return float(cfg.cfg) - 1.0

    def sample(self, logits, *, step, num_steps, generator):
        b, l, vocab = logits.shape
        cfg = self.config
        flat = logits.reshape(b * l, vocab).float() / max(cfg.temperature, 1e-5)
        probs = filter_llamagen(flat, top_k=cfg.top_k, top_p=cfg.top_p).softmax(dim=-1)
        if cfg.sample_logits:
            codes = torch.multinomial(probs, 1, generator=generator)
        else:
            codes = probs.topk(1, dim=-1).indices
        return codes.reshape(b, l)


@hookimpl
def varkit_register_samplers(register):
    register(LlamaGenSampler)
