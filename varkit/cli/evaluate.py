"""``varkit eval``: validation metrics of a run; with ``--fid``, a sample set and its FID, IS
and precision/recall in one command."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

from varkit.checkpoint import latest_checkpoint
from varkit.cli.common import device_or_default
from varkit.cli.metrics import add_metric_arguments, check_metric_arguments, open_reference, score_and_report
from varkit.cli.sample import add_sampling_arguments, check_out_dir, check_sampling_arguments, draw
from varkit.data import DataConfig, build_eval_loader
from varkit.data.sources import check_command
from varkit.errors import CheckpointError, EvaluationError
from varkit.evaluate import evaluate, write_report
from varkit.evaluate.fid import METRICS_FILE, check_report_path, write_json
from varkit.evaluate.image_sets import ImageSet, LoaderSet, open_image_set
from varkit.loading import checkpoint_dir, recipe_of
from varkit.pipeline import load

log = logging.getLogger(__name__)

#: ``--ref val``: the run's own validation images.
REF_VAL = "val"


def add_commands(sub: argparse._SubParsersAction, commands: dict) -> None:
    p = sub.add_parser(
        "eval",
        help="validation loss and accuracy of a run; with --fid, sample and score FID/IS/precision/recall",
        description="Without --fid: teacher-forced cross-entropy, perplexity and accuracy (overall and per "
        "step group) and the tokenizer's reconstruction error and codebook usage on the recipe's "
        "validation images (data.val_shards, or the synthetic val split). With --fid: draw a sample set as "
        "`varkit sample` does (resumable, under torchrun too) and score it as `varkit metrics` does, e.g. "
        "varkit eval RUN --fid --num 50000 --ref VIRTUAL_imagenet256_labeled.npz --cfg 1.5 --top-k 900 "
        "--top-p 0.96. Samples and metrics.json go to RUN/eval/<checkpoint>-fid<N>-<options digest>/ "
        "unless --samples-dir says otherwise.",
    )
    p.add_argument(
        "checkpoint",
        help="pretrained directory (`varkit import`, save_pretrained), run or checkpoint directory, "
        "or Hub repository id",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="data.key=value overrides of the stored recipe, e.g. data.val_shards='/data/val-{000000..000009}.tar' "
        "(a stored recipe's pipe: patterns and data.cache_dir are used only when given here)",
    )
    p.add_argument("--max-images", type=int, help="stop after this many validation images (default: all)")
    p.add_argument("--out", help="also write the metrics to this JSON file")
    fid = p.add_argument_group("sample quality (--fid)")
    fid.add_argument("--fid", action="store_true", help="draw samples and score them instead of the loss")
    fid.add_argument("--samples-dir", help="where the samples and metrics.json go (resumed when it exists)")
    add_sampling_arguments(fid)
    add_metric_arguments(
        fid,
        ref_help="reference for --fid: `val` (the run's validation images), an .npz such as ADM's "
        "VIRTUAL_imagenet256_labeled.npz, a folder of images, or a shard pattern",
    )
    commands["eval"] = _eval


def _eval(args: argparse.Namespace) -> int:
    out = check_report_path(args.out) if args.out else None
    if args.fid:
        return _eval_fid(args, out)
    given = [f for f, v in (("--ref", args.ref), ("--num", args.num), ("--per-class", args.per_class)) if v]
    if given:
        raise EvaluationError(f"{', '.join(given)} only apply with --fid; add --fid to sample and score")
    if args.max_images is not None and args.max_images < 1:
        raise EvaluationError(f"--max-images must be at least 1, got {args.max_images}")
    if args.batch_size < 1:
        raise EvaluationError(f"--batch-size is {args.batch_size}; it must be at least 1")
    pipe = load(
        args.checkpoint, device=device_or_default(args.device), ema=not args.no_ema, overrides=args.overrides
    )
    metrics = evaluate(
        pipe,
        batch_size=args.batch_size,
        max_images=args.max_images,
    )
    width = max(map(len, metrics))
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if out is not None:
        write_report(metrics, out)
    return 0


def default_samples_dir(args: argparse.Namespace) -> Path:
    """``RUN/eval/<checkpoint>-fid<N>-<digest of the sampling options>``: the same options
    resume the same folder, other options or a newer checkpoint get another."""
    step_dir = latest_checkpoint(Path(args.checkpoint))
    if step_dir is None:
        raise CheckpointError(
            f"no checkpoint found at {args.checkpoint}: expected a run directory with checkpoints/latest, "
            "a checkpoint directory, or the output of `varkit import`"
        )
    keys = ("classes", "num", "per_class", "seed", "sampler", "cfg", "top_k", "top_p", "more_smooth")
    chosen = {k: getattr(args, k) for k in keys} | {
        "options": sorted(args.sampler_option),
        "dtype": args.dtype,
        "ema": not args.no_ema,
    }
    digest = hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:8]
    count = args.num if args.num is not None else f"{args.per_class}pc"
    run = Path(args.checkpoint)
    base = run if step_dir != run else step_dir.parent
    return base / "eval" / f"{step_dir.name}-fid{count}-{digest}"


def _validation_data(args: argparse.Namespace) -> DataConfig:
    """The data section of the run's stored recipe, with the user's ``data.*`` overrides.

    A stored recipe is someone else's file: the data layer refuses its ``pipe:`` patterns
    and its cache directory unless the overrides give them again.
    """
    return recipe_of(checkpoint_dir(args.checkpoint), overrides=args.overrides).data


def _validation_set(args: argparse.Namespace) -> ImageSet:
    """The run's validation images, as ``varkit eval`` reads them (centre crops at the
    training resolution)."""
    data = _validation_data(args)
    loader = build_eval_loader(data, batch_size=args.batch_size)
    what = data.val_shards or "the synthetic val split"
    return LoaderSet(
        f"validation images of {args.checkpoint} ({what})",
        loader,
        resolution=data.resolution,
        count=loader.samples,
        limit=args.ref_num,
    )


def _eval_fid(args: argparse.Namespace, out: Path | None) -> int:
    if args.ref is None:
        raise EvaluationError(
            "--fid needs --ref: `val` (the run's validation images), an .npz such as ADM's "
            "VIRTUAL_imagenet256_labeled.npz, a folder of images, or a shard pattern"
        )
    if args.ref == REF_VAL and Path(REF_VAL).exists():
        raise EvaluationError(
            f"--ref {REF_VAL} is ambiguous: a path {REF_VAL!r} exists here; write ./{REF_VAL} for it, or run "
            "elsewhere to mean the run's validation images"
        )
    check_sampling_arguments(args)
    check_metric_arguments(args)
    samples_dir = Path(args.samples_dir) if args.samples_dir else default_samples_dir(args)
    check_out_dir(samples_dir, "--samples-dir")
    report_path = check_report_path(samples_dir / METRICS_FILE, "--samples-dir")
    # a bad reference fails before hours of sampling
    if args.ref == REF_VAL:
        check_command(_validation_data(args), "val_shards")
    elif not args.center_crop:
        open_image_set(args.ref, limit=args.ref_num)

    target, env = draw(args, samples_dir)
    if not env.main:
        return 0
    samples = open_image_set(target)
    reference = _validation_set(args) if args.ref == REF_VAL else open_reference(args.ref, samples, args)
    report = score_and_report(samples, reference, args, report_path)
    if out is not None:
        write_json(out, report)
    return 0
