"""The embedded synthetic dataset: coloured shapes whose class fixes shape and colour.

Each image is one saturated shape on a dull, low-saturation background with a soft
gradient; the shape's position, size and the background vary at random. Class ``k``
always has the colour of hue ``HUES[k]`` and the shape ``SHAPES[k]``, so a generated
image follows its class when both are right, which `classify` checks without
any trained network.

The images are generated deterministically (one seeded generator per image) and
written once as real webdataset shards (PNG + ``cls``) into the cache; every later run
streams them through the same pipeline as ImageNet.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from varkit.data import transforms
from varkit.data.config import DataConfig, SyntheticConfig
from varkit.data.folder import CLASSES_NAME
from varkit.data.shards import INDEX_NAME, ShardSink, write_json_atomic
from varkit.errors import DataError

log = logging.getLogger(__name__)

#: Class names, in class-index order: colour and shape.
CLASS_NAMES = (
    "red circle",
    "orange square",
    "yellow triangle",
    "lime diamond",
    "green plus",
    "cyan ring",
    "azure bar",
    "blue star",
    "violet cross",
    "magenta half-disc",
)
#: Hue (degrees) of each class's colour; neighbours are at least 28° apart.
HUES = (0.0, 30.0, 58.0, 95.0, 135.0, 180.0, 210.0, 240.0, 275.0, 310.0)
#: Shape of each class.
SHAPES = ("circle", "square", "triangle", "diamond", "plus", "ring", "bar", "star", "cross", "half_disc")
#: Bumped when the generator changes, so that old cache entries are not reused.
GENERATOR_VERSION = 1
#: Shards per split: enough that 2 ranks × 2 workers each read whole shards.
TRAIN_SHARDS = 8
VAL_SHARDS = 2
#: Shapes are drawn this many times larger, then box-reduced: smooth, deterministic edges.
SUPERSAMPLE = 4
#: Background saturation stays below this; `classify` reads pixels above
#: ``FOREGROUND_SATURATION`` as the shape.
BACKGROUND_SATURATION = 0.12
FOREGROUND_SATURATION = 0.4


# ------------------------------------------------------------------------ drawing


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> Image.Image:
    """An ``L`` mask ``size × size`` of ``shape`` centred at ``(cx, cy)`` with half-extent ``r``."""
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        q = 0.85 * r  # about the circle's area, so size does not give the class away
        d.rectangle((cx - q, cy - q, cx + q, cy + q), fill=255)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=255)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)], fill=255)
    elif shape == "plus":
        a = r / 3
        d.rectangle((cx - r, cy - a, cx + r, cy + a), fill=255)
        d.rectangle((cx - a, cy - r, cx + a, cy + r), fill=255)
    elif shape == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        q = 0.55 * r
        d.ellipse((cx - q, cy - q, cx + q, cy + q), fill=0)
    elif shape == "bar":
        d.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=255)
    elif shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        d.polygon([(cx + q * np.cos(t), cy - q * np.sin(t)) for q, t in zip(radii, angles)], fill=255)
    elif shape == "cross":
        a = r * 0.28
        for sx in (1, -1):  # two thick diagonals
            d.polygon(
                [
                    (cx - sx * r, cy - r + a),
                    (cx - sx * r + sx * a, cy - r),
                    (cx + sx * r, cy + r - a),
                    (cx + sx * r - sx * a, cy + r),
                ],
                fill=255,
            )
    elif shape == "half_disc":
        d.pieslice((cx - r, cy - r / 2, cx + r, cy + 1.5 * r), 180, 360, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def render(label: int, size: int, rng: np.random.Generator, *, margin: int = 0) -> np.ndarray:
    """One image of class ``label``: ``(size, size, 3)`` uint8.

    ``margin`` pixels on every side stay free of the shape (a random crop may cut them).
    """
    # dull background: low saturation, mid value, a soft linear gradient
    hue, sat, val = rng.random(), rng.uniform(0.0, BACKGROUND_SATURATION), rng.uniform(0.3, 0.7)
    base = np.array(colorsys.hsv_to_rgb(hue, sat, val))
    angle, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.12)
    ramp = np.linspace(-1.0, 1.0, size)
    grad = amp * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])  # (h, w)
    bg = np.clip(base[None, None, :] + grad[:, :, None], 0.0, 1.0)
    # the class's shape and colour, at a random size and place
    r = rng.uniform(0.2, 0.32) * (size - 2 * margin)
    lo, hi = margin + r, size - margin - r
    cx, cy = rng.uniform(lo, max(lo, hi)), rng.uniform(lo, max(lo, hi))
    s = SUPERSAMPLE
    mask = _shape_mask(SHAPES[label], size * s, cx * s, cy * s, r * s).reduce(s)
    alpha = np.asarray(mask, dtype=np.float64)[:, :, None] / 255.0
    fg = np.array(colorsys.hsv_to_rgb(HUES[label] / 360.0, 1.0, rng.uniform(0.8, 1.0)))
    img = bg * (1.0 - alpha) + fg[None, None, :] * alpha
    return np.round(img * 255.0).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_split(
    out: str | os.PathLike,
    *,
    split: str,
    count_per_class: int,
    num_classes: int,
    size: int,
    margin: int,
    seed: int,
    shards: int,
) -> None:
    """Write one split (``train`` or ``val``) as ``{split}-000000.tar`` ... into ``out``.

    Image ``i`` has class ``i % num_classes`` (classes interleave, so every shard holds
    all of them) and its own generator seeded by ``(seed, split, i)``.
    """
    total = count_per_class * num_classes
    sink = ShardSink(out, prefix=split, max_samples=-(-total // shards))
    split_id = {"train": 0, "val": 1}[split]
    for i in range(total):
        label = i % num_classes
        rng = np.random.default_rng([seed, split_id, i])
        sink.write(
            f"{i:07d}", {"png": _png(render(label, size, rng, margin=margin)), "cls": str(label).encode()}
        )
    sink.close({"kind": "images", "classes": num_classes, "synthetic": True})


# -------------------------------------------------------------------------- cache


def cache_root(config: DataConfig) -> Path:
    """``data.cache_dir``, else ``$VARKIT_CACHE``, else ``~/.cache/varkit``."""
    root = config.cache_dir or os.environ.get("VARKIT_CACHE") or Path.home() / ".cache" / "varkit"
    return Path(root).expanduser()


def _entry_name(synthetic: SyntheticConfig, size: int, margin: int) -> str:
    fields = {
        "version": GENERATOR_VERSION,
        "size": size,
        "margin": margin,
        "classes": synthetic.num_classes,
        "train": synthetic.images_per_class,
        "val": synthetic.val_images_per_class,
        "seed": synthetic.seed,
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return f"shapes-{size}px-{synthetic.num_classes}c-{digest}"


def ensure_synthetic(config: DataConfig) -> dict[str, str]:
    """Generate the synthetic shards into the cache unless they are there already.

    Writing goes to a temporary directory that is renamed into place, so a reader never
    sees a half-written set; when two processes race, one rename wins and the other's
    copy (byte-identical) is dropped.

    Returns:
        ``{"train": pattern, "val": pattern, "dir": directory}``.
    """
    # the size VAR's resize gives, so that resizing the stored images changes nothing
    size = transforms.short_side(config.resolution, config.crop_ratio)
    margin = size - config.resolution  # the most a random crop cuts from one side
    synthetic = config.synthetic
    root = cache_root(config) / "synthetic"
    final = root / _entry_name(synthetic, size, margin)
    if not (final / INDEX_NAME).is_file():
        if config.cache_dir and "cache_dir" in config.untrusted:
            raise DataError(
                f"data.cache_dir of the recipe stored with this checkpoint would have varkit write the "
                f"synthetic dataset into {final}; a stored recipe does not choose where files are written. "
                f"Pass the directory on the command line (e.g. `varkit eval RUN data.cache_dir=DIR`), or "
                "data.cache_dir=null for the default cache ($VARKIT_CACHE, else ~/.cache/varkit)"
            )
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        log.info(
            "writing the synthetic dataset (%d px, %d classes) to %s", size, synthetic.num_classes, final
        )
        try:
            for split, count, shards in (
                ("train", synthetic.images_per_class, TRAIN_SHARDS),
                ("val", synthetic.val_images_per_class, VAL_SHARDS),
            ):
                write_split(
                    tmp,
                    split=split,
                    count_per_class=count,
                    num_classes=synthetic.num_classes,
                    size=size,
                    margin=margin,
                    seed=synthetic.seed,
                    shards=shards,
                )
            write_json_atomic(
                tmp / CLASSES_NAME, {name: i for i, name in enumerate(CLASS_NAMES[: synthetic.num_classes])}
            )
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / INDEX_NAME).is_file():
                    raise
                # another process finished first; its shards are the same bytes
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return {"train": _pattern(final, "train"), "val": _pattern(final, "val"), "dir": str(final)}


def _pattern(directory: Path, split: str) -> str:
    names = sorted(directory.glob(f"{split}-*.tar"))
    return str(directory / f"{split}-{{000000..{len(names) - 1:06d}}}.tar")


# --------------------------------------------------------------------- classifier


def _hsv(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue (degrees), saturation and value ``(b, h, w)`` of RGB images ``(b, 3, h, w)`` in [0, 1]."""
    r, g, b = images.unbind(1)
    mx, _ = images.max(1)
    mn, _ = images.min(1)
    delta = mx - mn
    safe = delta.clamp_min(1e-6)
    hue = torch.where(
        mx == r, ((g - b) / safe) % 6.0, torch.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    return hue * 60.0, delta / mx.clamp_min(1e-6), mx


def _extent(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index ``(b,)`` along the last axis of ``counts`` ``(b, n)`` that holds a
    tenth of the fullest row's pixels (so a few stray pixels do not widen the box)."""
    keep = counts >= (0.1 * counts.amax(1, keepdim=True)).clamp_min(1.0)
    n = counts.shape[1]
    idx = torch.arange(n, dtype=torch.float64)
    first = torch.where(keep, idx, torch.full_like(idx, n)).amin(1)
    last = torch.where(keep, idx, torch.full_like(idx, -1)).amax(1)
    return first, last


def shape_features(mask: torch.Tensor) -> torch.Tensor:
    """Shape features ``(b, 4)`` of boolean masks ``(b, H, W)``.

    Fill ratio of the bounding box, log aspect (width / height), vertical centroid in
    the box (0 top, 1 bottom) and how full the central 30 % of the box is.
    Empty masks give NaN rows.
    """
    m = mask.double()
    b, H, W = m.shape
    y0, y1 = _extent(m.sum(2))
    x0, x1 = _extent(m.sum(1))
    ys = torch.arange(H, dtype=torch.float64).view(1, H, 1)
    xs = torch.arange(W, dtype=torch.float64).view(1, 1, W)
    v = lambda t: t.view(b, 1, 1)  # noqa: E731
    inside = (ys >= v(y0)) & (ys <= v(y1)) & (xs >= v(x0)) & (xs <= v(x1))
    h, w = y1 - y0 + 1, x1 - x0 + 1
    fg = m * inside
    area = fg.sum((1, 2))
    fill = area / (h * w)
    cy = ((fg * ys).sum((1, 2)) / area - y0 + 0.5) / h
    near = ((xs - v((x0 + x1) / 2)).abs() <= v(0.15 * w)) & ((ys - v((y0 + y1) / 2)).abs() <= v(0.15 * h))
    centre = ((m * near).sum((1, 2)) / (0.3 * w * 0.3 * h).clamp_min(1.0)).clamp(max=1.0)
    out = torch.stack([fill, torch.log(w / h), cy, centre], 1)
    return torch.where((area > 0).view(b, 1), out, torch.full_like(out, float("nan")))


#: How far each shape feature may stray from its class's value, per unit of distance
#: (fill ratio, log aspect, vertical centroid, centre fill).
_SHAPE_SCALE = torch.tensor([0.12, 0.3, 0.08, 0.35], dtype=torch.float64)
#: Largest shape distance (a sum of squares in those units) that still counts as the
#: class's shape at 32 px; it scales with 32 / side (small images have rougher edges),
#: never below 1. Held-out images at 32 px stay below 2.3, at 16 px mostly below 6.
SHAPE_TOLERANCE = 3.0


@cache
def _prototypes() -> torch.Tensor:
    """Shape features ``(classes, 4)`` of every class's shape, measured on a large rendering."""
    masks = [np.asarray(_shape_mask(shape, 512, 256, 256, 200)) > 127 for shape in SHAPES]
    return shape_features(torch.from_numpy(np.stack(masks)))


def classify(images: torch.Tensor, *, use_shape: bool = True) -> torch.Tensor:
    """The synthetic class of each image, from the colour and shape of its foreground.

    The foreground is every pixel more saturated than any background can be. Its mean
    hue (weighted by saturation) picks the class of the nearest hue. With ``use_shape``
    the foreground must also have that class's shape (fill ratio, aspect, vertical
    centroid, hole in the middle, within ``SHAPE_TOLERANCE`` scaled to the size), else
    the image gets -1: a cyan disc (cyan is the ring's colour) is no class, so a generated image follows its class only when both
    its colour and its shape are right. An image without foreground gets -1.

    Args:
        images: ``(b, 3, H, W)`` in [0, 1] (16 px and up).
        use_shape: require the class's shape as well as its colour.

    Returns:
        ``(b,)`` int64 class indices, -1 for none.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"classify wants images (b, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    x = images.detach().float().cpu().clamp(0.0, 1.0)
    hue, sat, val = _hsv(x)
    fg = (sat > FOREGROUND_SATURATION) & (val > 0.25)
    weight = (sat * fg).double().flatten(1)
    rad = torch.deg2rad(hue.double()).flatten(1)
    mean = torch.rad2deg(torch.atan2((weight * rad.sin()).sum(1), (weight * rad.cos()).sum(1))) % 360.0
    dh = (mean[:, None] - torch.tensor(HUES, dtype=torch.float64)[None]).abs()
    out = torch.minimum(dh, 360.0 - dh).argmin(1)
    if use_shape:
        features = shape_features(fg)
        dist = (((features - _prototypes()[out]) / _SHAPE_SCALE) ** 2).sum(1)
        tolerance = max(SHAPE_TOLERANCE * 32 / min(x.shape[-2:]), 1.0)
        out = torch.where(dist <= tolerance, out, torch.full_like(out, -1))
    found = fg.flatten(1).sum(1) >= 4
    return torch.where(found, out, torch.full_like(out, -1))
