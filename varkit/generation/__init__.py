"""Generation: the one loop for every unit, and CUDA graphs of its steps.

- :mod:`varkit.generation.loop`: :class:`~varkit.generation.loop.Generation` (the step
  loop and its phases), :func:`generate_codes`, :func:`generate_images`.
- :mod:`varkit.generation.graphs`: the CUDA-graph step runner (``cuda_graphs=True``).
"""

from __future__ import annotations

from varkit.generation.loop import (
    EagerSteps,
    Generation,
    StepRunner,
    decode_images,
    generate_codes,
    generate_images,
)

__all__ = [
    "EagerSteps",
    "Generation",
    "StepRunner",
    "decode_images",
    "generate_codes",
    "generate_images",
]
