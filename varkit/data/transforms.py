"""VAR's image augmentation, decoded the fast way.

VAR resizes the shorter side to ``crop_ratio × resolution`` with Lanczos, then crops a
``resolution``-square (random for training, centred for evaluation) and maps pixels
to [-1, 1]. `decode_crop` gives the same pixels (to within one grey level)
with less work than the plain sequence in `plain_crop`:

- JPEG draft decoding (``Image.draft``) lets libjpeg decode at 1/2, 1/4 or 1/8 scale,
  but only while the decoded image stays ``DRAFT_GAP`` times larger than the resized
  one, so Lanczos still does the final, visible part of the reduction.
- The crop is resized alone (``Image.resize(box=...)``) instead of resizing the whole
  image and throwing most of it away; Lanczos reads the same source pixels either way.
- Pixels go once from PIL's buffer into the batch array; the float conversion happens
  once per batch (`to_model_range`).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

#: Draft decoding stops this many times above the resized size (PIL's thumbnail
#: default): the JPEG DCT scaling does the coarse part, Lanczos the last factor of 2+.
DRAFT_GAP = 2.0
#: Lanczos after a box reduction keeps this margin (PIL: 3 is indistinguishable
#: from a plain Lanczos); only images over 3× the resized size are reduced first.
REDUCING_GAP = 3.0


def short_side(resolution: int, crop_ratio: float) -> int:
    """VAR's resize target: the shorter side becomes ``round(crop_ratio · resolution)``."""
    return round(crop_ratio * resolution)


#: What decoding an unreadable, truncated or oversized image raises: such a sample is skipped.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Size after resizing the shorter side to ``short_side`` (torchvision's rounding)."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def crop_offsets(size: tuple[int, int], resolution: int, u: tuple[float, float] | None) -> tuple[int, int]:
    """Top-left ``(x, y)`` of the crop in the resized image.

    ``u`` holds two uniforms in [0, 1) for a random crop; None centres the crop.
    """
    w, h = size
    if u is None:
        return round((w - resolution) / 2.0), round((h - resolution) / 2.0)
    return int(u[0] * (w - resolution + 1)), int(u[1] * (h - resolution + 1))


def open_image(data: bytes, *, short_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode image bytes into an RGB image; returns it and the original ``(w, h)``.

    With ``short_side`` (the shorter side after resizing), a JPEG is decoded at the
    smallest DCT scale that keeps it ``DRAFT_GAP`` times above the resized size.

    Raises:
        OSError, ValueError, Image.DecompressionBombError: unreadable or truncated data.
    """
    img = Image.open(io.BytesIO(data))
    size = img.size
    if short_side is not None and img.format == "JPEG":
        w, h = resized_size(*size, short_side)
        img.draft("RGB", (int(w * DRAFT_GAP), int(h * DRAFT_GAP)))
    img.load()  # decode now: truncated data raises here, not later
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img, size


def decode_crop(
    data: bytes,
    *,
    resolution: int,
    crop_ratio: float,
    u: tuple[float, float] | None = None,
    flip: bool = False,
) -> np.ndarray:
    """Image bytes -> one augmented crop ``(resolution, resolution, 3)`` uint8.

    Args:
        data: encoded image (JPEG, PNG, WebP).
        resolution: side of the square crop.
        crop_ratio: the shorter side is resized to ``round(crop_ratio * resolution)``.
        u: two uniforms in [0, 1) placing a random crop; None for the centre crop.
        flip: mirror the crop horizontally.
    """
    img, size = open_image(data, short_side=short_side(resolution, crop_ratio))
    return crop(img, size, resolution=resolution, crop_ratio=crop_ratio, u=u, flip=flip)


def crop(
    img: Image.Image,
    original_size: tuple[int, int],
    *,
    resolution: int,
    crop_ratio: float,
    u: tuple[float, float] | None = None,
    flip: bool = False,
) -> np.ndarray:
    """One crop ``(resolution, resolution, 3)`` uint8 of an image from `open_image`.

    The geometry follows the original size, so a draft-decoded image gives the same
    crop as a fully decoded one.
    """
    size = resized_size(*original_size, short_side(resolution, crop_ratio))
    x, y = crop_offsets(size, resolution, u)
    # source pixels per resized pixel, in the decoded image's own pixels
    sx, sy = img.width / size[0], img.height / size[1]
    box = (x * sx, y * sy, (x + resolution) * sx, (y + resolution) * sy)
    out = img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def to_model_range(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images ``(b, h, w, 3)`` -> float32 ``(b, 3, h, w)`` in [-1, 1], on their device.

    Called where the pixels are used: after the copy to the GPU, the copy carries a
    quarter of the bytes of float32.
    """
    # transpose the bytes (a quarter of the float traffic), then convert contiguously
    if isinstance(batch, np.ndarray):  # (read-only crops come out as a writable copy)
        src = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
    else:
        src = batch.permute(0, 3, 1, 2).contiguous()  # (b, 3, h, w) uint8
    return src.to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)


def plain_crop(
    data: bytes, *, resolution: int, crop_ratio: float, u=None, flip: bool = False
) -> torch.Tensor:
    """The plain path, for comparison: decode, Lanczos-resize all, crop, to a tensor.

    Returns ``(3, resolution, resolution)`` float32 in [-1, 1].
    """
    img = Image.open(io.BytesIO(data)).convert("RGB")
    size = resized_size(*img.size, short_side(resolution, crop_ratio))
    img = img.resize(size, Image.Resampling.LANCZOS)
    x, y = crop_offsets(size, resolution, u)
    img = img.crop((x, y, x + resolution, y + resolution))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255.0)
    return t.sub(0.5).div(0.5)
