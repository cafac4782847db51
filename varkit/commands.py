"""The ``run``, ``validate``, ``sample`` and ``import`` subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from varkit.errors import VarkitError

log = logging.getLogger(__name__)

OVERRIDE_HELP = (
    "overrides key.path=value, read as YAML (e.g. train.steps=20 sampler.name=greedy out_dir=/tmp/run)"
)


def add_commands(sub: argparse._SubParsersAction, commands: dict) -> None:
    p = sub.add_parser(
        "run",
        help="train what a recipe describes (tokenizer, then AR model), then sample",
        description="Train what a recipe describes. On an existing out_dir of the same recipe, resume "
        "from its latest checkpoint. Runs under torchrun as well: "
        "`torchrun --nproc_per_node N -m varkit run RECIPE`.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    p.add_argument("--print", action="store_true", help="print the fully resolved recipe and exit")
    p.add_argument(
        "--force", action="store_true", help="use out_dir even if it holds a run of another recipe"
    )
    commands["run"] = _run

    p = sub.add_parser(
        "validate",
        help="check a recipe and report every problem at once",
        description="Run the same validation as `run` without training; one `file:line: key.path: message` "
        "line per problem; exit status 2 when there is any.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    commands["validate"] = _validate

    p = sub.add_parser(
        "sample",
        help="generate images from a run or checkpoint",
        description="Generate images: one PNG per image, a grid, and samples.npz (arr_0: uint8 NxHxWx3, "
        "labels: N) in the layout common FID evaluators read.",
    )
    p.add_argument("checkpoint", help="run directory, checkpoint directory, or `varkit import` output")
    p.add_argument("--classes", default="0,1,2,3", help="comma-separated class indices (default 0,1,2,3)")
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

    p = sub.add_parser(
        "eval",
        help="validation loss, accuracy and codebook usage of a run",
        description="Teacher-forced cross-entropy, perplexity and accuracy (overall and per step group) "
        "and the tokenizer's reconstruction error and codebook usage on the recipe's validation images "
        "(data.val_shards, or the synthetic val split). For FID, sample with `varkit sample` and give "
        "samples.npz to an evaluator.",
    )
    p.add_argument("checkpoint", help="run directory, checkpoint directory, or `varkit import` output")
    p.add_argument("--max-images", type=int, help="stop after this many validation images (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    p.add_argument("--out", help="also write the metrics to this JSON file")
    commands["eval"] = _eval

    p = sub.add_parser(
        "import",
        help="convert foreign checkpoints (the official VAR release) to varkit checkpoints",
        description="Read foreign checkpoint files with torch.load(weights_only=True) and write a varkit "
        "checkpoint directory (safetensors + resolved recipe) that `varkit sample` and varkit.load use.",
    )
    isub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    q = isub.add_parser("var", help="the official VAR release (vae_ch160v4096z32.pth + var_dN.pth)")
    q.add_argument("--vae", required=True, help="path of vae_ch160v4096z32.pth")
    q.add_argument(
        "--var", required=True, help="path of var_d16.pth / var_d20.pth / var_d24.pth / var_d30.pth"
    )
    q.add_argument("--out", required=True, help="output checkpoint directory")
    commands["import"] = _import


def _run(args: argparse.Namespace) -> int:
    from varkit import recipe as recipe_mod

    recipe = recipe_mod.load(args.recipe, args.overrides)
    if args.print:
        sys.stdout.write(recipe.to_yaml())
        return 0
    from varkit.train import run

    out = run(recipe, force=args.force)
    log.info("done: %s", out)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from varkit import recipe as recipe_mod

    try:
        recipe_mod.load(args.recipe, args.overrides)
    except VarkitError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{args.recipe}: ok")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from varkit.sampling import sample_to_dir

    try:
        classes = [int(c) for c in args.classes.split(",") if c.strip()]
    except ValueError:
        raise VarkitError(
            f"--classes {args.classes!r} must be comma-separated integers, e.g. 0,1,2"
        ) from None
    if not classes or args.per_class < 1:
        raise VarkitError("give at least one class and --per-class >= 1")
    out = sample_to_dir(
        args.checkpoint,
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
        device=_device(args.device),
        ema=not args.no_ema,
    )
    print(out)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from varkit.evaluate import evaluate, write_report

    if args.max_images is not None and args.max_images < 1:
        raise VarkitError(f"--max-images must be at least 1, got {args.max_images}")
    metrics = evaluate(
        args.checkpoint,
        batch_size=args.batch_size,
        max_images=args.max_images,
        device=_device(args.device),
        ema=not args.no_ema,
    )
    width = max(map(len, metrics))
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.out:
        write_report(metrics, Path(args.out))
    return 0


def _import(args: argparse.Namespace) -> int:
    from varkit.official import import_var

    out = import_var(args.vae, args.var, args.out)
    print(out)
    return 0


def _device(name: str | None) -> str:
    """The --device given, else cuda when available (decided when a command runs, not when
    the parser is built: `varkit --help` need not initialise CUDA)."""
    if name is not None:
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
