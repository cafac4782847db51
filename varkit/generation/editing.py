"""Zero-shot editing: inpainting, outpainting and class-conditional editing, for every unit.

An edit generates as usual, except that wherever a mask keeps the image, the image's
own code replaces the sampled one before the next step is built from them (VAR,
arXiv 2404.02905, section 5; the official release has it as a notebook). Nothing is
trained; the model only ever sees codes it could have produced itself.

The arithmetic, from pixels to positions:

1. **Mask.** ``mask`` marks what to regenerate: 1 (white) regenerates, 0 (black)
   keeps the image, values between are shares. It has the image's size ``(H, W)`` or
   the code grid's ``(hK, wK)``; any other size is refused (no silent resizing).
2. **Latent keep.** A pixel mask becomes the share of each latent position's
   ``downsample × downsample`` pixels that is kept (an average); a code-grid mask is
   taken as it is: ``keep = 1 - mask``, ``(b, hK, wK)``.
3. **Positions.** The unit maps the latent keep onto the positions of its steps
   (``unit.keep_positions``): ``scale`` resizes it to every scale bilinearly and keeps
   a code where the result exceeds 0.5 (VAR's rule; scales of at most 3 codes are kept
   whole when anything is kept); ``token`` and ``patch`` keep a code where more than
   half of its latent position is kept, in their raster order.
4. **Coarse steps.** ``keep_until_step=K`` also keeps every position of steps
   ``0 .. K-1``: class-conditional editing regenerates the whole image under a new
   label while the image's coarse scales hold its layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from varkit.base import Sampler, Tokenizer
from varkit.errors import PluginError, VarkitError
from varkit.generation.loop import decode_images, generate_codes, generation_dtype

#: A box ``(y0, x0, y1, x1)`` in fractions of the image's height and width.
Box = tuple[float, float, float, float]


# ----------------------------------------------------------------------------- masks


def check_box(box: Sequence[float]) -> Box:
    """``box`` as a ``(y0, x0, y1, x1)`` tuple of fractions, or a clear error."""
    try:
        y0, x0, y1, x1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise VarkitError(
            f"a box is four numbers y0,x0,y1,x1 (fractions of the height and width), got {box!r}"
        ) from None
    if not (0.0 <= y0 < y1 <= 1.0 and 0.0 <= x0 < x1 <= 1.0):
        raise VarkitError(
            f"box {(y0, x0, y1, x1)} must satisfy 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1 (fractions of the "
            "height and width, top left to bottom right), e.g. 0.25,0.25,0.75,0.75 for the centre"
        )
    return y0, x0, y1, x1


def box_mask(box: Sequence[float], size: tuple[int, int], *, outpaint: bool = False) -> torch.Tensor:
    """An edit mask ``(h, w)`` float: 1 inside ``box`` (inpainting), or 1 outside it (``outpaint``).

    Args:
        box: ``(y0, x0, y1, x1)`` in fractions of the height and width; rows
            ``round(y0·h) .. round(y1·h) - 1`` and the columns likewise are inside.
        size: ``(h, w)``: the image's size, or the code grid's (as VAR's notebook
            draws its boxes, directly on the 16×16 grid).
        outpaint: regenerate outside the box and keep the inside.
    """
    y0, x0, y1, x1 = check_box(box)
    h, w = size
    mask = torch.zeros(h, w)
    mask[round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)] = 1.0
    if not mask.any():
        raise VarkitError(
            f"box {(y0, x0, y1, x1)} covers no pixel of a {h}x{w} grid once rounded; make it larger"
        )
    return 1.0 - mask if outpaint else mask


def full_mask(size: tuple[int, int]) -> torch.Tensor:
    """An edit mask ``(h, w)`` that regenerates everything (class-conditional editing)."""
    return torch.ones(size)


def image_size(tokenizer: Tokenizer) -> tuple[int, int]:
    """The ``(H, W)`` in pixels of the images the tokenizer encodes."""
    h, w = tokenizer.schedule[-1]
    return h * tokenizer.downsample, w * tokenizer.downsample


def pil_to_tensor(image: Image.Image, *, grey: bool = False) -> torch.Tensor:
    """A PIL image as ``(3, H, W)`` (or ``(H, W)`` with ``grey``) float in [0, 1]."""
    if grey:
        return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _stack(tensors: list[torch.Tensor], what: str) -> torch.Tensor:
    sizes = sorted({tuple(t.shape) for t in tensors})
    if len(sizes) > 1:
        raise VarkitError(f"the {what} have different shapes {sizes}; give them all at one size")
    return torch.stack(tensors)


def as_images(images, tokenizer: Tokenizer) -> torch.Tensor:
    """Images ``(b, 3, H, W)`` in [0, 1] from a tensor (``(3, H, W)`` or batched) or PIL image(s).

    Raises:
        VarkitError: not RGB images, values outside [0, 1], or a size other than the
            tokenizer's.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, list | tuple):
        if not images:
            raise VarkitError("no images to edit")
        images = _stack([pil_to_tensor(im) if isinstance(im, Image.Image) else im for im in images], "images")
    if not isinstance(images, torch.Tensor):
        raise VarkitError(f"images must be a tensor or PIL images, got {type(images).__name__}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise VarkitError(f"images must be (b, 3, H, W) RGB in [0, 1], got shape {tuple(images.shape)}")
    images = images.float()
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise VarkitError("images must lie in [0, 1] (pixels / 255); got values outside it")
    size = image_size(tokenizer)
    if tuple(images.shape[-2:]) != size:
        h, w = images.shape[-2:]
        raise VarkitError(
            f"the images are {h}x{w} px but this model's tokenizer works on {size[0]}x{size[1]} px; resize or "
            f"crop them to {size[0]}x{size[1]} first (editing keeps the image's own codes, so it cannot change "
            "the resolution)"
        )
    return images


def as_edit_mask(mask, *, batch: int, tokenizer: Tokenizer) -> torch.Tensor:
    """The edit mask ``(b, h, w)`` float in [0, 1] (1: regenerate) at the image's or the grid's size.

    ``mask`` is a tensor ``(h, w)``, ``(1 or b, h, w)`` or ``(1 or b, 1, h, w)`` (bool,
    or numbers in [0, 1]) or PIL image(s) (read as grey levels / 255).

    Raises:
        VarkitError: a size other than the image's or the code grid's, values outside
            [0, 1], or a batch that does not match the images'.
    """
    if isinstance(mask, Image.Image):
        mask = pil_to_tensor(mask, grey=True)
    elif isinstance(mask, list | tuple) and mask and isinstance(mask[0], Image.Image):
        mask = _stack([pil_to_tensor(m, grey=True) for m in mask], "masks")
    if not isinstance(mask, torch.Tensor):
        raise VarkitError(f"mask must be a tensor or PIL image(s), got {type(mask).__name__}")
    mask = mask.float()
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise VarkitError(f"mask must be (h, w), (b, h, w) or (b, 1, h, w), got shape {tuple(mask.shape)}")
    if mask.shape[0] not in (1, batch):
        raise VarkitError(f"{mask.shape[0]} masks for {batch} images: give one mask, or one per image")
    if mask.numel() and (mask.min() < 0 or mask.max() > 1):
        raise VarkitError("mask values must lie in [0, 1] (1 regenerates, 0 keeps the image)")
    pixels, grid = image_size(tokenizer), tuple(tokenizer.schedule[-1])
    if tuple(mask.shape[-2:]) not in (pixels, grid):
        h, w = mask.shape[-2:]
        raise VarkitError(
            f"the mask is {h}x{w} but must have the image's size {pixels[0]}x{pixels[1]} or the code grid's "
            f"{grid[0]}x{grid[1]}; masks are not resized, so draw it at one of those sizes"
        )
    return mask.expand(batch, *mask.shape[-2:])


def latent_keep(mask: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """The share ``(b, hK, wK)`` of each latent position that the edit keeps, from an edit mask.

    A pixel mask is averaged over each position's ``downsample × downsample`` pixels;
    a mask at the code grid's size is used as it is.
    """
    grid = tuple(tokenizer.schedule[-1])
    if tuple(mask.shape[-2:]) != grid:
        mask = F.avg_pool2d(mask[:, None], tokenizer.downsample)[:, 0]  # (b, hK, wK)
    return 1.0 - mask


def keep_positions(
    model, tokenizer: Tokenizer, mask: torch.Tensor, *, keep_until_step: int = 0
) -> torch.Tensor:
    """Where the image's codes are kept, ``(b, l)`` bool in the unit's sequence order.

    Args:
        model: the AR model (its unit maps the mask onto its steps).
        tokenizer: the model's tokenizer.
        mask: the edit mask ``(b, h, w)`` from `as_edit_mask`.
        keep_until_step: also keep every position of the steps before this one.

    Raises:
        PluginError: the unit cannot edit, or broke the ``keep_positions`` contract.
        VarkitError: ``keep_until_step`` outside ``[0, num_steps]``.
    """
    unit = model.unit
    num_steps = len(unit.step_lengths)
    if not 0 <= keep_until_step <= num_steps:
        raise VarkitError(
            f"keep_until_step={keep_until_step} is outside 0..{num_steps}: the unit {unit.name!r} has "
            f"{num_steps} steps (0 keeps no step whole, {num_steps} keeps the whole image)"
        )
    keep = latent_keep(mask.float(), tokenizer)
    positions = unit.keep_positions(keep)
    expected = (mask.shape[0], unit.seq_len)
    if tuple(positions.shape) != expected or positions.dtype != torch.bool:
        raise PluginError(
            f"unit {unit.name!r}: keep_positions returned {tuple(positions.shape)} {positions.dtype}, but the "
            f"contract is a {expected} bool tensor in the sequence order of targets()"
        )
    if keep_until_step:
        positions = positions.clone()
        positions[:, : model.step_starts[keep_until_step]] = True
    return positions


# ----------------------------------------------------------------------------- edits


@attrs.frozen
class Edited:
    """What `edit_codes` returns."""

    #: The edited code maps ``[(b, h_k, w_k)]`` (int64).
    codes: list[torch.Tensor]
    #: The feature map ``(b, c, hK, wK)`` they decode from.
    f_hat: torch.Tensor
    #: The images' own code maps (the tokenizer's encoding), ``[(b, h_k, w_k)]``.
    known: list[torch.Tensor]
    #: Where the image's code was kept, ``(b, l)`` bool in the unit's sequence order.
    keep: torch.Tensor


def edit_codes(
    model,
    tokenizer: Tokenizer,
    sampler: Sampler,
    images,
    mask,
    labels: torch.Tensor,
    *,
    generator: torch.Generator,
    keep_until_step: int = 0,
    dtype: torch.dtype | None = None,
    cuda_graphs: bool = False,
) -> Edited:
    """Edit images: regenerate them where ``mask`` says, keep their codes elsewhere.

    Args:
        model: the AR model; its unit must define ``keep_positions``.
        tokenizer: the model's tokenizer (encodes the images).
        sampler: picks the regenerated codes and sets the guidance.
        images: ``(b, 3, H, W)`` in [0, 1] (or as `as_images` takes them) at the
            tokenizer's resolution.
        mask: the edit mask, as `as_edit_mask` takes it (1 regenerates).
        labels: class indices ``(b,)`` on the model's device (``num_classes``: none).
        generator: the source of every random draw.
        keep_until_step: keep every position of the steps before this one as well.
        dtype, cuda_graphs: as `varkit.generation.loop.generate_codes`.

    Raises:
        VarkitError: bad images, mask or step (see `as_images`,
            `as_edit_mask`, `keep_positions`); PluginError: a unit that
            cannot edit.
    """
    device = labels.device
    images = as_images(images, tokenizer)
    b = images.shape[0]
    if labels.shape != (b,):
        raise VarkitError(f"{tuple(labels.shape)} labels for {b} images: give one label per image")
    mask = as_edit_mask(mask, batch=b, tokenizer=tokenizer)
    keep = keep_positions(model, tokenizer, mask.to(device), keep_until_step=keep_until_step)
    with torch.inference_mode():
        known = tokenizer.encode(images.to(device) * 2 - 1)  # [(b, h_k, w_k)]
    known = [c.clone() for c in known]
    codes, f_hat = generate_codes(
        model,
        tokenizer,
        sampler,
        labels,
        generator=generator,
        dtype=dtype,
        known=known,
        keep=keep,
        cuda_graphs=cuda_graphs,
    )
    return Edited(codes=codes, f_hat=f_hat, known=known, keep=keep)


def edit_images(
    model,
    tokenizer: Tokenizer,
    sampler: Sampler,
    images,
    mask,
    labels: torch.Tensor,
    *,
    generator: torch.Generator,
    keep_until_step: int = 0,
    dtype: torch.dtype | None = None,
    cuda_graphs: bool = False,
) -> torch.Tensor:
    """`edit_codes`, decoded: edited images ``(b, 3, H, W)`` in [0, 1] (float32)."""
    edited = edit_codes(
        model,
        tokenizer,
        sampler,
        images,
        mask,
        labels,
        generator=generator,
        keep_until_step=keep_until_step,
        dtype=dtype,
        cuda_graphs=cuda_graphs,
    )
    with torch.inference_mode():
        images = decode_images(tokenizer, edited.f_hat, dtype=generation_dtype(model, dtype))
    return images.clone()


def masked_preview(images: torch.Tensor, mask: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """The images with the regenerated region greyed, ``(b, 3, H, W)`` in [0, 1]: what an edit is asked.

    ``mask`` is an edit mask as `as_edit_mask` returns it; a code-grid mask is
    shown at the image's size (nearest).
    """
    size = images.shape[-2:]
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0]
    alpha = mask[:, None].to(images)  # (b, 1, H, W)
    return images * (1 - alpha) + 0.5 * alpha
