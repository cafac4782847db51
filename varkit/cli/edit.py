"""``varkit edit``: zero-shot inpainting, outpainting and class-conditional editing of images."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from varkit.cli.common import device_or_default
from varkit.errors import DataError, VarkitError
from varkit.generation import editing
from varkit.images import save_grid, to_uint8
from varkit.pipeline import load

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction, commands: dict) -> None:
    p = sub.add_parser(
        "edit",
        help="inpaint, outpaint or change the class of images with a trained model",
        description="Zero-shot editing: regenerate images where a mask or box says and keep their own codes "
        "elsewhere (no training). Writes the edited images and, beside them, OUT-grid.png with one row per "
        "image: the input, what is regenerated (greyed) and the result of each seed.",
        epilog="examples: varkit edit RUN --image in.png --box 0.25,0.25,0.75,0.75 --out out.png   "
        "(inpaint the centre);  ... --box 0.25,0.25,0.75,0.75 --outpaint  (regenerate around the centre);  "
        "... --box 0,0,1,1 --class 3 --keep-until-step 3  (redraw as class 3, keeping the coarse scales)",
    )
    p.add_argument("checkpoint", help="run directory, checkpoint directory, or `varkit import` output")
    p.add_argument("--image", nargs="+", required=True, help="image file(s) at the tokenizer's resolution")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--mask",
        nargs="+",
        help="mask file(s): white regenerates, black keeps; the image's size or the code grid's; "
        "one for every image, or one per image",
    )
    where.add_argument(
        "--box",
        metavar="Y0,X0,Y1,X1",
        help="y0,x0,y1,x1 in fractions of the height and width: regenerate inside it (0,0,1,1: everything)",
    )
    p.add_argument(
        "--outpaint", action="store_true", help="with --box: keep inside the box, regenerate outside"
    )
    p.add_argument(
        "--class", dest="label", type=int, metavar="N", help="generate under this class (default: no class)"
    )
    p.add_argument(
        "--keep-until-step",
        type=int,
        metavar="K",
        default=0,
        help="also keep every code of the steps before this one (class editing: the coarse scales)",
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one result each (default 0)")
    p.add_argument(
        "--out", required=True, help="output PNG; with several images or seeds, OUT-<n>-seed<s>.png"
    )
    p.add_argument("--sampler", help="sampler name (default: the recipe's)")
    p.add_argument("--cfg", type=float, help="guidance scale")
    p.add_argument("--top-k", type=int, help="top-k (0: off)")
    p.add_argument("--top-p", type=float, help="top-p (1: off)")
    p.add_argument("--more-smooth", action="store_true", help="VAR's smooth mode (gumbel sampler)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    commands["edit"] = _edit


def _read_image(path: str, what: str) -> Image.Image:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{what} {path} does not exist")
    if file.stat().st_size == 0:
        raise DataError(f"{what} {path} is an empty file; give a PNG or JPEG image")
    try:
        with Image.open(file) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(
            f"{what} {path} cannot be read as an image ({exc}); give a PNG or JPEG image"
        ) from None


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise VarkitError(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise VarkitError("--seeds is empty: give at least one seed, e.g. --seeds 0")
    return seeds


def _box(text: str) -> editing.Box:
    return editing.check_box(text.split(","))


def _save_png(image: torch.Tensor, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(to_uint8(image[None])[0]).save(tmp, format="PNG")
    os.replace(tmp, path)


def _edit(args: argparse.Namespace) -> int:
    seeds = _seeds(args.seeds)
    if args.outpaint and args.box is None:
        raise VarkitError("--outpaint goes with --box (a mask file says itself what to regenerate)")
    box = _box(args.box) if args.box is not None else None
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise VarkitError(f"--out {args.out} must name a .png file")
    if args.mask and len(args.mask) not in (1, len(args.image)):
        raise VarkitError(
            f"{len(args.mask)} masks for {len(args.image)} images: give one mask, or one per image"
        )
    images = [_read_image(path, "image") for path in args.image]
    masks = [_read_image(path, "mask") for path in args.mask] if args.mask else None

    pipe = load(args.checkpoint, device=device_or_default(args.device), ema=not args.no_ema)
    tokenizer = pipe.tokenizer
    num_classes = pipe.model.config.num_classes
    if args.label is not None and not 0 <= args.label < num_classes:
        raise VarkitError(
            f"--class {args.label} is outside 0..{num_classes - 1} of this model; leave --class out to edit "
            "with no class"
        )
    pixels = editing.as_images(images, tokenizer)  # (n, 3, H, W); refuses another resolution
    n = pixels.shape[0]
    if box is not None:
        mask = editing.box_mask(box, editing.image_size(tokenizer), outpaint=args.outpaint)
    else:
        mask = editing.as_edit_mask(masks, batch=n, tokenizer=tokenizer)
        empty = [args.mask[i] for i in range(len(masks)) if not (mask[i] > 0).any()]
        if empty:
            raise VarkitError(
                f"mask {empty[0]} marks nothing to regenerate (it is black everywhere); white marks the region "
                "to regenerate"
            )
    mask = editing.as_edit_mask(mask, batch=n, tokenizer=tokenizer)

    results = []
    for seed in seeds:
        edited = pipe.edit(
            pixels,
            mask,
            args.label,
            keep_until_step=args.keep_until_step,
            cfg=args.cfg,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=seed,
            more_smooth=args.more_smooth,
            sampler=args.sampler,
        ).cpu()
        results.append(edited)

    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for s, seed in enumerate(seeds):
        for i in range(n):
            path = out if n == 1 and len(seeds) == 1 else out.with_name(f"{out.stem}-{i}-seed{seed}.png")
            _save_png(results[s][i], path)
            written.append(path)
    preview = editing.masked_preview(pixels, mask, tokenizer)
    rows = [torch.stack([pixels[i], preview[i], *(r[i] for r in results)]) for i in range(n)]
    grid = save_grid(torch.cat(rows), out.with_name(f"{out.stem}-grid.png"), nrow=2 + len(seeds))
    log.info("edited %d image(s) with %d seed(s)", n, len(seeds))
    for path in [*written, grid]:
        print(path)
    return 0
