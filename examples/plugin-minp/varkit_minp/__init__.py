"""A min-p sampler for varkit, registered through the ``varkit`` entry point."""

from __future__ import annotations

import attrs
import torch

import varkit


def _linear_ramp(cfg: float, step: int, num_steps: int) -> float:
    return cfg * step / (num_steps - 1) if num_steps > 1 else cfg


class MinP(varkit.Sampler):
    """Keep codes with probability >= ``min_p`` × the top code's, sample among them."""

    name = "min_p"

    @attrs.frozen(kw_only=True)
    class Config:
        #: relative probability floor; 0.05-0.1 keeps diversity while cutting the tail.
        min_p: float = attrs.field(
            default=0.05, validator=attrs.validators.and_(attrs.validators.ge(0.0), attrs.validators.le(1.0))
        )
        #: classifier-free guidance, ramped linearly over steps as in VAR.
        cfg: float = 1.5
        #: softmax temperature.
        temperature: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))

    def guidance_scale(self, step: int, num_steps: int) -> float:
        return _linear_ramp(self.config.cfg, step, num_steps)

    def sample(self, logits, *, step, num_steps, generator):
        probs = torch.softmax(logits.float() / self.config.temperature, dim=-1)  # (b, l, v)
        floor = probs.amax(dim=-1, keepdim=True) * self.config.min_p
        probs = torch.where(probs >= floor, probs, torch.zeros_like(probs))
        b, l, v = probs.shape
        codes = torch.multinomial(probs.reshape(b * l, v), 1, generator=generator)
        return codes.reshape(b, l)


@varkit.hookimpl
def varkit_register_samplers(register):
    register(MinP)
