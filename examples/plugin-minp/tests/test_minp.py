"""The plugin's own tests: varkit's sampler contract, then what min-p itself promises.

Run them with `pytest` from this folder after `pip install -e .`.
"""

from __future__ import annotations

import torch
from varkit_minp import MinP

from varkit.testing import check_sampler


def test_min_p_keeps_the_sampler_contract():
    check_sampler(MinP)
    check_sampler(MinP, MinP.Config(min_p=0.5, cfg=3.0, temperature=0.7))


def test_codes_below_min_p_of_the_top_are_never_drawn():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.1])
    logits = probs.log().expand(1, 256, 4)
    sampler = MinP(MinP.Config(min_p=0.5))
    codes = sampler.sample(logits, step=0, num_steps=1, generator=torch.Generator().manual_seed(0))
    assert set(codes.unique().tolist()) == {0, 1}  # 0.3 >= 0.5 · 0.5, 0.1 is not
