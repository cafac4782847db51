"""Generation: the one loop for every unit, zero-shot editing, and CUDA graphs of its steps.

- `varkit.generation.loop`: `varkit.generation.loop.Generation` (the step
  loop and its phases), `generate_codes`, `generate_images`.
- `varkit.generation.editing`: inpainting, outpainting and class-conditional
  editing (`edit_codes`, `edit_images`, `box_mask`).
- `varkit.generation.graphs`: the CUDA-graph step runner (``cuda_graphs=True``).
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
