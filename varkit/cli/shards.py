"""``varkit shards``: image folders to shards, images to code shards."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from varkit import recipe as recipe_mod
from varkit.cli.common import device_or_default
from varkit.data.codes import write_code_shards
from varkit.data.folder import check_output, load_class_map, write_image_folder
from varkit.errors import DataError
from varkit.loading import load_tokenizer, recipe_tokenizer

log = logging.getLogger(__name__)


def _size(text: str) -> int:
    """``256MB``, ``1GB``, ``500k`` or a plain number of bytes."""
    units = {"": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30}
    t = text.strip().lower()
    num = t.rstrip("kmgb")
    try:
        return int(float(num) * units[t[len(num) :]])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 256MB, 1GB or 500000") from None


def add_commands(sub: argparse._SubParsersAction, commands: dict) -> None:
    p = sub.add_parser(
        "shards",
        help="write webdataset shards from an image folder (or tokenizer codes with --tokenize)",
        description="Write SRC, a folder with one subfolder per class (ImageNet's layout; the class "
        "index is the folder's position in sorted order), or a flat folder of images with --labels "
        "(ImageNet's validation layout), as tar shards OUT/PREFIX-000000.tar ... with shards.json "
        "(samples per shard) and classes.json (class name -> index). Write the validation set with "
        "--class-map OUT/classes.json of the training set, so both give each class the same index. "
        "With --tokenize, encode the images of SRC (a folder or an image shard pattern) with a run's "
        "tokenizer (or the one a recipe names in tokenizer.weights) and write code shards that "
        "`data.source: codes` trains from.",
    )
    p.add_argument("src", help="image folder, or (with --tokenize) an image shard pattern")
    p.add_argument("out", help="output directory (not inside SRC)")
    p.add_argument("--prefix", default="train", help="shard name prefix (default train; e.g. val)")
    p.add_argument(
        "--class-map",
        metavar="FILE",
        help="classes.json to take class indices from (the training shards'); every class of SRC must be in it",
    )
    p.add_argument(
        "--labels",
        metavar="FILE",
        help="SRC is a flat folder of images and FILE names each one's class: `IMAGE CLASS` lines (e.g. "
        "Kaggle's LOC_val_solution.csv) or one class per line for the images in sorted order",
    )
    p.add_argument("--shard-size", type=_size, default=256 << 20, help="target shard size (default 256MB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled writing order (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="write in folder order (classes sorted)")
    p.add_argument("--workers", type=int, default=0, help="processes that read and check images (default 0)")
    p.add_argument(
        "--tokenize",
        metavar="RUN_OR_RECIPE",
        help="write code shards with this run's (or checkpoint's) tokenizer, or with the tokenizer a "
        "recipe .yaml names in tokenizer.weights (e.g. recipes/var_d16.yaml: the official VQ-VAE)",
    )
    p.add_argument("--crops", type=int, default=1, help="crops per image with --tokenize (1-10; default 1)")
    p.add_argument("--resolution", type=int, help="crop size with --tokenize (default: the tokenizer's)")
    p.add_argument(
        "--crop-ratio", type=float, default=1.125, help="shorter side / resolution (default 1.125)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per encode call (default 64)")
    p.add_argument("--device", default=None, help="tokenizer device (default cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    commands["shards"] = _shards


def _shards(args: argparse.Namespace) -> int:
    if args.tokenize:
        return _tokenize(args)
    class_map = load_class_map(args.class_map) if args.class_map else None
    s = write_image_folder(
        args.src,
        args.out,
        prefix=args.prefix,
        shard_bytes=args.shard_size,
        shuffle=not args.no_shuffle,
        seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
        class_map=class_map,
        labels=args.labels,
    )
    print(f"images   {s.images}")
    of = f" of the {s.mapped} in the mapping" if s.mapped != s.classes else ""
    print(
        f"classes  {s.classes}{of} (mapping in {Path(args.out) / 'classes.json'}; data.num_classes={s.mapped})"
    )
    print(f"shards   {s.shards}")
    print(f"bytes    {s.bytes} ({s.bytes / 2**20:.1f} MiB)")
    print(f"skipped  {len(s.skipped)} unreadable files")
    for path, why in s.skipped:
        print(f"  {path}: {why}")
    print(f"pattern  {s.pattern}")
    field = "val_shards" if args.prefix.startswith("val") else "train_shards"
    print(f"recipe   data.{field}='{s.pattern}'  (quoted: the shell must not expand the braces)")
    return 0


def _tokenizer_of(source: str, device: str):
    """The tokenizer of a run or checkpoint, or the trained one a recipe names."""
    if Path(source).suffix not in (".yaml", ".yml"):
        return load_tokenizer(source, device=device)
    recipe = recipe_mod.load(source)
    if not recipe.tokenizer.weights:
        raise DataError(
            f"{source} names no tokenizer.weights, so its tokenizer is untrained and its codes would mean "
            "nothing; set tokenizer.weights in the recipe, or pass a run whose tokenizer was trained"
        )
    return recipe_tokenizer(recipe, device=device).eval()


def _tokenize(args: argparse.Namespace) -> int:
    if Path(args.src).is_dir():
        check_output(args.src, args.out)
    device = device_or_default(args.device)
    tokenizer = _tokenizer_of(args.tokenize, device)
    resolution = args.resolution or getattr(tokenizer.config, "image_size", None)
    if not isinstance(resolution, int):
        raise DataError(f"the tokenizer of {args.tokenize} does not say its image size; give --resolution")
    s = write_code_shards(
        tokenizer,
        args.src,
        args.out,
        crops=args.crops,
        resolution=resolution,
        crop_ratio=args.crop_ratio,
        prefix=args.prefix,
        batch_size=args.batch_size,
        shard_bytes=args.shard_size,
        device=device,
        progress=not args.no_progress,
        source_name=str(args.tokenize),
    )
    print(f"images   {s.images} ({s.crops} crops each)")
    print(f"shards   {s.shards}")
    print(f"bytes    {s.bytes} ({s.bytes / max(s.images, 1) / 1024:.1f} KiB per image)")
    print(f"skipped  {len(s.skipped)} samples")
    for key, why in s.skipped:
        print(f"  {key}: {why}")
    print(f"pattern  {s.pattern}  (recipe: data.source: codes, data.codes: <pattern>)")
    return 0
