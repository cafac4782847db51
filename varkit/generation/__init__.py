"""Generation: the one loop for every unit, zero-shot editing, and CUDA graphs of its steps.

- :mod:`varkit.generation.loop`: :class:`~varkit.generation.loop.Generation` (the step
  loop and its phases), :func:`generate_codes`, :func:`generate_images`.
- :mod:`varkit.generation.editing`: inpainting, outpainting and class-conditional
  editing (:func:`edit_codes`, :func:`edit_images`, :func:`box_mask`).
- :mod:`varkit.generation.graphs`: the CUDA-graph step runner (``cuda_graphs=True``).
"""

from __future__ import annotations

from varkit.generation.editing import Edited, box_mask, edit_codes, edit_images, full_mask
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
    "Edited",
    "Generation",
    "StepRunner",
    "box_mask",
    "decode_images",
    "edit_codes",
    "edit_images",
    "full_mask",
    "generate_codes",
    "generate_images",
]
