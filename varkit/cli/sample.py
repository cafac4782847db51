"""``varkit sample``: images from a run or checkpoint, to disk."""

from __future__ import annotations

import argparse
from pathlib import Path

from varkit.cli.common import device_or_default
from varkit.errors import VarkitError
from varkit.pipeline import load
from varkit.sampling import sample_to_dir


def add_commands(sub: argparse._SubParsersAction, commands: dict) -> None:
    p = sub.add_parser(
        "sample",
        help="generate images from a run or checkpoint",
        description="Generate images: one PNG per image, a grid, and samples.npz (arr_0: uint8 NxHxWx3, "
        "labels: N) in the layout common FID evaluators read.",
    )
    p.add_argument(
        "checkpoint",
        help="pretrained directory (`varkit import`, save_pretrained), run or checkpoint directory, "
        "or Hub repository id",
    )
    p.add_argument(
        "--classes",
        default="0,1,2,3",
        help="comma-separated class indices or names (names from the model's classes.json; default 0,1,2,3)",
    )
    p.add_argument("--per-class", type=int, default=8, help="images per class (default 8)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--sampler", help="sampler name (default: the recipe's)")
    p.add_argument("--cfg", type=float, help="guidance scale")
    p.add_argument("--top-k", type=int, help="top-k (0: off)")
    p.add_argument("--top-p", type=float, help="top-p (1: off)")
    p.add_argument("--more-smooth", action="store_true", help="VAR's smooth mode (gumbel sampler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    commands["sample"] = _sample


def _sample(args: argparse.Namespace) -> int:
    if args.per_class < 1:
        raise VarkitError("give at least one class and --per-class >= 1")
    pipe = load(args.checkpoint, device=device_or_default(args.device), ema=not args.no_ema)
    classes = pipe.class_indices(args.classes)
    out = sample_to_dir(
        pipe,
        Path(args.out),
        classes=classes,
        per_class=args.per_class,
        sampler=args.sampler,
        cfg=args.cfg,
        top_k=args.top_k,
        top_p=args.top_p,
        more_smooth=args.more_smooth,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    print(out)
    return 0
