"""The generation loop: one for every prediction unit, sampler and tokenizer.

Each step runs the transformer on the step's inputs with a preallocated KV cache,
applies classifier-free guidance, lets the sampler pick codes, and lets the unit turn
those codes (and their embeddings) into the next step's inputs. The unit and the
tokenizer decide what a step is; this loop never asks which unit it runs.

Guidance doubles the batch: rows ``[0, b)`` carry the labels and rows ``[b, 2b)`` the
"no class" index ``model.config.num_classes``, and the step's logits become
``(1 + t) · cond - t · uncond`` with ``t = sampler.guidance_scale(step, num_steps)``.
When ``t`` is 0 at every step the batch is not doubled at all.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from varkit.base import Sampler, Tokenizer
from varkit.errors import VarkitError

log = logging.getLogger(__name__)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise VarkitError(
            f"labels must be class indices of shape (b,) and integer dtype, got {tuple(labels.shape)} "
            f"{labels.dtype}"
        )
    if labels.numel() == 0:
        raise VarkitError("labels is empty: pass one class index per image to generate")
    low, high = torch.stack(torch.aminmax(labels)).tolist()  # one device sync
    if low < 0 or high > num_classes:
        raise VarkitError(
            f"labels must lie in [0, {num_classes}] ({num_classes} is 'no class'), got values in [{low}, {high}]"
        )


def generate_codes(
    model,
    tokenizer: Tokenizer,
    sampler: Sampler,
    labels: torch.Tensor,
    *,
    generator: torch.Generator,
    dtype: torch.dtype | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Generate one code pyramid per label.

    Args:
        model: an :class:`~varkit.model.transformer.ARModel` (its ``unit`` decides
            the steps). It runs in eval mode here and is put back in its mode after.
        tokenizer: the tokenizer whose codes the model predicts.
        sampler: picks codes from each step's logits and sets the guidance.
        labels: class indices ``(b,)`` on the model's device; ``num_classes``
            generates unconditionally.
        generator: the source of every random draw; the same seed gives the same codes.
        dtype: autocast dtype of the transformer (e.g. ``torch.bfloat16`` on GPU);
            None runs it in its own dtype. The tokenizer's feature arithmetic always
            runs in float32, outside autocast.

    Returns:
        ``(codes, f_hat)``: the code maps ``[(b, h_k, w_k)]`` (int64) and the feature
        map ``(b, c, hK, wK)`` they decode from. Both are ordinary tensors (not
        inference tensors), so they can feed training code afterwards.
    """
    with torch.inference_mode():
        codes, f_hat = _generate(model, tokenizer, sampler, labels, generator=generator, dtype=dtype)
    # Clones made outside inference mode are normal tensors that autograd may save.
    return [c.clone() for c in codes], f_hat.clone()


def _generate(model, tokenizer, sampler, labels, *, generator, dtype):
    unit = model.unit
    num_classes = model.config.num_classes
    _check_labels(labels, num_classes)
    device = labels.device
    b = labels.shape[0]
    num_steps = len(unit.step_lengths)
    guidance = [float(sampler.guidance_scale(step, num_steps)) for step in range(num_steps)]
    doubled = any(t != 0 for t in guidance)
    if doubled:
        labels = torch.cat([labels, torch.full_like(labels, num_classes)])  # (2b,)
    cache = model.new_cache(labels.shape[0], dtype=dtype, device=device)
    codebook = None

    was_training = model.training
    model.eval()
    try:
        state = unit.start_generation(b, tokenizer)
        inputs = None  # (b, l_s, c); step 0 starts from the class embedding
        for step in range(num_steps):
            if inputs is not None and doubled:
                inputs = torch.cat([inputs, inputs])  # both halves see the same codes
            with _autocast(device, dtype):
                logits = model.forward_step(inputs, labels, cache, step)  # (b or 2b, l_s, v)
            logits = logits.float()
            if doubled:
                cond, uncond = logits.chunk(2)
                t = guidance[step]
                logits = cond if t == 0 else (1 + t) * cond - t * uncond
            codes = sampler.sample(logits, step=step, num_steps=num_steps, generator=generator)  # (b, l_s)
            weights = sampler.soft_weights(logits, step=step, num_steps=num_steps, generator=generator)
            if weights is None:
                emb = tokenizer.embed(codes)  # (b, l_s, c)
            else:  # smooth mode: a mixture of codebook rows instead of the sampled code
                if codebook is None:
                    codebook = tokenizer.codebook.float()
                emb = weights.float() @ codebook  # (b, l_s, v) @ (v, c)
            inputs = unit.generation_step(state, step, codes, emb, tokenizer)
        f_hat = unit.finish_generation(state, tokenizer)
        return unit.generated_codes(state), f_hat
    finally:
        model.train(was_training)


def generate_images(
    model,
    tokenizer: Tokenizer,
    sampler: Sampler,
    labels: torch.Tensor,
    *,
    generator: torch.Generator,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Generate one image per label: :func:`generate_codes`, then the tokenizer's decoder.

    Arguments as :func:`generate_codes`. The decoder runs in float32.

    Returns:
        Images ``(b, 3, H, W)`` in [0, 1] (float32).
    """
    with torch.inference_mode():
        _, f_hat = _generate(model, tokenizer, sampler, labels, generator=generator, dtype=dtype)
        images = tokenizer.features_to_image(f_hat.float())  # (b, 3, H, W) in [-1, 1]
        images = ((images.float() + 1) / 2).clamp(0, 1)
    return images.clone()
