"""Built-in samplers: ``topk_topp`` (VAR's default), ``greedy`` and ``gumbel``.

A sampler turns one step's logits ``(b, l, v)`` into codes ``(b, l)`` and decides the
classifier-free guidance ``t`` of each step. The generation loop hands it the
conditional and unconditional logits (``Sampler.sample_guided``); ``topk_topp`` and
``gumbel`` do guidance ``(1 + t) · cond - t · uncond``, temperature, top-k and top-p in
one pass over them and draw codes by an exponential race (`exponential_race`),
which needs no host synchronisation and has static shapes. Every random draw comes
from the ``torch.Generator`` passed in, so the same seed gives the same codes.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v

from varkit.base import Sampler
from varkit.hookspecs import hookimpl


@attrs.frozen(kw_only=True)
class GuidanceConfig:
    """Classifier-free guidance options shared by the built-in samplers."""

    #: Guidance strength at the last step; VAR's FIDs use 1.5-2. 0 turns guidance off.
    cfg: float = attrs.field(default=1.5, validator=v.ge(0.0))
    #: "linear" ramps t = cfg·s/(S-1) from 0 at the first step (VAR: the coarse scales
    #: need diversity, the fine ones fidelity); "constant" uses cfg at every step.
    guidance: Literal["linear", "constant"] = attrs.field(
        default="linear", validator=v.in_(("linear", "constant"))
    )


def guidance_scale(config: GuidanceConfig, step: int, num_steps: int) -> float:
    """The guidance ``t`` of ``step`` out of ``num_steps`` under ``config``."""
    if config.guidance == "constant" or num_steps == 1:
        return float(config.cfg)
    return float(config.cfg) * step / (num_steps - 1)


def _check_top_p(instance, attribute, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"top_p must lie in [0, 1] (0 or 1 turns it off), got {value}")


@attrs.frozen(kw_only=True)
class TopKTopPConfig(GuidanceConfig):
    """Options of ``topk_topp`` (and of the codes that ``gumbel`` draws)."""

    #: Keep the k most likely codes (VAR: 900 of 4096); 0 keeps all.
    top_k: int = attrs.field(default=900, validator=v.ge(0))
    #: Then keep the smallest set of those whose mass reaches p (VAR: 0.96); 0 or 1 is off.
    top_p: float = attrs.field(default=0.96, validator=_check_top_p)
    #: Logits are divided by it before top-k/top-p; 1 samples the model as trained.
    temperature: float = attrs.field(default=1.0, validator=v.gt(0.0))


def filter_top_k_top_p(
    logits: torch.Tensor, *, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits that survive top-k then top-p, without sorting the whole vocabulary.

    Args:
        logits: ``(n, v)`` float.
        top_k: keep this many (0: all).
        top_p: then keep the smallest prefix, most likely first, whose probability
            (renormalised over the kept codes) reaches ``top_p``; 0 or 1: all.

    Returns:
        ``(values, index)``: the candidate logits ``(n, k)`` with the dropped ones set to
        -inf and, when a top-k or top-p cut was made, the vocabulary index ``(n, k)`` of
        each candidate (None when ``values`` is the whole vocabulary in order).
    """
    vocab = logits.shape[-1]
    use_p = 0.0 < top_p < 1.0
    k = top_k if 0 < top_k < vocab else vocab
    if k == vocab and not use_p:
        return logits, None
    # topk returns its k values sorted, which is all the ordering top-p needs.
    values, index = logits.topk(k, dim=-1, sorted=True)  # (n, k), descending
    if use_p:
        probs = values.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the more likely candidates
        values = values.masked_fill(mass_before >= top_p, float("-inf"))  # the first always stays
    return values, index


def guided_logits(
    cond: torch.Tensor, uncond: torch.Tensor | None, *, t: float, temperature: float
) -> torch.Tensor:
    """``((1 + t) · cond - t · uncond) / temperature`` in float32, in one elementwise pass.

    ``cond`` and ``uncond`` are ``(..., v)``; ``uncond`` may be None when ``t`` is 0.
    Guidance is written as ``lerp(uncond, cond, 1 + t)``, one kernel instead of three;
    the temperature divides in place.
    """
    cond = cond.float()
    if t == 0:
        return cond if temperature == 1 else cond / temperature
    if uncond is None:
        raise ValueError(f"guidance t={t} needs the unconditional logits")
    logits = torch.lerp(uncond.float(), cond, 1.0 + t)
    return logits if temperature == 1 else logits.div_(temperature)


def exponential_race(
    values: torch.Tensor, index: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    """One code per row of ``values`` ``(n, k)``, drawn from their softmax, without a host sync.

    Each candidate ``i`` of a row gets an independent ``E_i ~ Exp(1)``; the winner is
    ``argmax_i(values_i - log E_i)``, i.e. the smallest ``E_i / p_i``. ``E_i / p_i`` is
    exponential with rate ``p_i``, and the smallest of independent exponentials is
    ``i`` with probability ``p_i / sum(p)``: exactly the softmax, with no normalisation,
    no cumulative sum and no ``torch.multinomial`` (which reads its result back to the
    host). Shapes are static, so the draw can live in a CUDA graph. Candidates at
    ``-inf`` never win. ``index`` ``(n, k)`` maps candidates to codes (None: the
    candidates are the codes).
    """
    noise = torch.empty_like(values, dtype=torch.float32).exponential_(generator=generator)
    # An exact 0 (probability ~2^-24 per draw) would make log E = -inf and let a
    # -inf candidate tie at nan; the smallest normal float keeps the race well defined.
    noise.clamp_(min=torch.finfo(torch.float32).tiny)
    pick = (values - noise.log_()).argmax(dim=-1, keepdim=True)  # (n, 1)
    return (pick if index is None else index.gather(-1, pick)).squeeze(-1)


class TopKTopP(Sampler):
    """Guidance, temperature, top-k, then top-p on what is left, then an exponential race.

    VAR's sampler. The codes follow the same distribution as VAR's
    ``torch.multinomial`` draw (tested), but the random stream differs: a seed gives
    other images than the official code's.
    """

    name = "topk_topp"
    Config = TopKTopPConfig

    def guidance_scale(self, step: int, num_steps: int) -> float:
        return guidance_scale(self.config, step, num_steps)

    def candidates(
        self, cond: torch.Tensor, uncond: torch.Tensor | None, t: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The guided, tempered candidates of every position: ``(values, index)`` as
        `filter_top_k_top_p` returns them for ``(b·l, v)`` rows."""
        b, l, vocab = cond.shape
        flat = guided_logits(
            cond.reshape(b * l, vocab),
            None if uncond is None else uncond.reshape(b * l, vocab),
            t=t,
            temperature=self.config.temperature,
        )
        return filter_top_k_top_p(flat, top_k=self.config.top_k, top_p=self.config.top_p)

    def sample(self, logits, *, step, num_steps, generator):
        values, index = self.candidates(logits, None, 0.0)
        return exponential_race(values, index, generator).reshape(logits.shape[:2])

    def sample_guided(self, cond, uncond, *, t, step, num_steps, generator):
        values, index = self.candidates(cond, uncond, t)
        return exponential_race(values, index, generator).reshape(cond.shape[:2]), None


class Greedy(Sampler):
    """The most likely code at every position (guidance as ``topk_topp``'s)."""

    name = "greedy"
    Config = GuidanceConfig

    def guidance_scale(self, step: int, num_steps: int) -> float:
        return guidance_scale(self.config, step, num_steps)

    def sample(self, logits, *, step, num_steps, generator):
        return logits.argmax(dim=-1)


class Gumbel(TopKTopP):
    """VAR's "more smooth" mode: codes as ``topk_topp``, inputs a Gumbel-softmax mixture.

    The next step is fed ``soft_weights @ codebook`` instead of the sampled codes'
    embeddings. The softmax runs over the same top-k/top-p candidates, sharpened
    towards the fine steps: logits × (1 + r) at temperature max(0.27·(1 - 0.95·r), 0.005)
    with r = s/(S-1).
    """

    name = "gumbel"

    def soft_weights(self, logits, *, step, num_steps, generator):
        values, index = self.candidates(logits, None, 0.0)
        return self._mixture(values, index, logits.shape, step, num_steps, generator)

    def sample_guided(self, cond, uncond, *, t, step, num_steps, generator):
        values, index = self.candidates(cond, uncond, t)
        codes = exponential_race(values, index, generator).reshape(cond.shape[:2])
        return codes, self._mixture(values, index, cond.shape, step, num_steps, generator)

    @staticmethod
    def _mixture(values, index, shape, step, num_steps, generator) -> torch.Tensor:
        """Gumbel-softmax weights ``(b, l, v)`` over the candidates ``values`` ``(b·l, k)``."""
        b, l, vocab = shape
        ratio = step / (num_steps - 1) if num_steps > 1 else 1.0
        tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
        noise = -torch.empty_like(values).exponential_(generator=generator).log()  # Gumbel(0, 1)
        weights = F.softmax((values * (1 + ratio) + noise) / tau, dim=-1)  # (b·l, k)
        if index is not None:
            weights = values.new_zeros(b * l, vocab).scatter_(-1, index, weights)
        return weights.reshape(b, l, vocab)


@hookimpl
def varkit_register_samplers(register):
    register(TopKTopP)
    register(Greedy)
    register(Gumbel)
