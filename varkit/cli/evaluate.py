"""``varkit eval``: validation metrics of a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from varkit.cli.common import device_or_default
from varkit.errors import VarkitError
from varkit.evaluate import evaluate, write_report
from varkit.pipeline import load


def add_commands(sub: argparse._SubParsersAction, commands: dict) -> None:
    p = sub.add_parser(
        "eval",
        help="validation loss, accuracy and codebook usage of a run",
        description="Teacher-forced cross-entropy, perplexity and accuracy (overall and per step group) "
        "and the tokenizer's reconstruction error and codebook usage on the recipe's validation images "
        "(data.val_shards, or the synthetic val split). For FID, sample with `varkit sample` and give "
        "samples.npz to an evaluator.",
    )
    p.add_argument(
        "checkpoint",
        help="pretrained directory (`varkit import`, save_pretrained), run or checkpoint directory, "
        "or Hub repository id",
    )
    p.add_argument("--max-images", type=int, help="stop after this many validation images (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    p.add_argument("--out", help="also write the metrics to this JSON file")
    commands["eval"] = _eval


def _eval(args: argparse.Namespace) -> int:
    if args.max_images is not None and args.max_images < 1:
        raise VarkitError(f"--max-images must be at least 1, got {args.max_images}")
    pipe = load(args.checkpoint, device=device_or_default(args.device), ema=not args.no_ema)
    metrics = evaluate(
        pipe,
        batch_size=args.batch_size,
        max_images=args.max_images,
    )
    width = max(map(len, metrics))
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.out:
        write_report(metrics, Path(args.out))
    return 0
