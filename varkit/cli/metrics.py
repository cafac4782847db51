"""``varkit metrics``: FID, IS, precision/recall (and sFID) of a sample set against a reference."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from varkit.cli.common import device_or_default
from varkit.cli.sample import check_device
from varkit.errors import EvaluationError
from varkit.evaluate.fid import (
    check_report_path,
    check_resolutions,
    default_report_path,
    evaluate_samples,
    format_table,
    write_json,
)
from varkit.evaluate.image_sets import ImageSet, open_image_set
from varkit.evaluate.inception import Inception

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction, commands: dict) -> None:
    p = sub.add_parser(
        "metrics",
        help="FID, IS and precision/recall of a sample set against a reference",
        description="Score SAMPLES against REF with torch-fidelity's TensorFlow-compatible Inception (the "
        "network of ADM's evaluator; needs `pip install 'varkit[eval]'`), in float64: FID, Inception "
        "Score, precision and recall (k=3), and sFID with --sfid. SAMPLES and REF are each a samples.npz "
        "(arr_0: uint8 NxHxWx3), a folder of images, or tar shards; a REF .npz carrying mu/sigma (ADM's "
        "VIRTUAL_imagenet256_labeled.npz) is compared through those statistics as they are. Prints a "
        "table and writes metrics.json beside SAMPLES with the samples' protocol and the digests of both "
        "sets.",
    )
    p.add_argument("samples", help="samples.npz, folder of images, or shard pattern")
    add_metric_arguments(p)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--out", help="write the report here instead of metrics.json beside SAMPLES (a .json file path)"
    )
    commands["metrics"] = _metrics


def add_metric_arguments(p: argparse.ArgumentParser, *, ref_help: str | None = None) -> None:
    """The options of scoring (shared by ``metrics`` and ``eval --fid``)."""
    p.add_argument(
        "--ref",
        required=ref_help is None,
        help=ref_help
        or "reference: an .npz (e.g. ADM's VIRTUAL_imagenet256_labeled.npz), a folder of images, "
        "or a shard pattern",
    )
    p.add_argument("--ref-num", type=int, help="use only the first N reference images (default: all)")
    p.add_argument(
        "--center-crop",
        action="store_true",
        help="bring reference images of other sizes to the samples' size as ADM built its reference "
        "batches (box halving, bicubic resize of the shorter side, centre crop)",
    )
    p.add_argument(
        "--inception-weights",
        metavar="FILE",
        help="the Inception weights file (default: torch-fidelity's cache, "
        "$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth)",
    )
    p.add_argument("--sfid", action="store_true", help="also compute sFID (ADM's spatial FID)")
    p.add_argument("--no-pr", action="store_true", help="skip precision and recall")
    p.add_argument(
        "--inception-batch-size", type=int, default=50, help="images per Inception forward pass (default 50)"
    )


def check_metric_arguments(args: argparse.Namespace) -> None:
    if args.ref_num is not None and args.ref_num < 1:
        raise EvaluationError(f"--ref-num is {args.ref_num}; it must be at least 1")
    if args.inception_batch_size < 1:
        raise EvaluationError(f"--inception-batch-size is {args.inception_batch_size}; it must be at least 1")
    check_device(args.device)


def open_reference(spec: str, samples: ImageSet, args: argparse.Namespace) -> ImageSet:
    crop = None
    if args.center_crop:
        if samples.resolution is None or samples.resolution[0] != samples.resolution[1]:
            raise EvaluationError("--center-crop needs square samples of a known size")
        crop = samples.resolution[0]
    return open_image_set(spec, limit=args.ref_num, center_crop=crop)


def score_and_report(
    samples: ImageSet, reference: ImageSet, args: argparse.Namespace, report_path: Path
) -> dict:
    """Load the Inception, score, write the report, print the table."""
    net = Inception(
        args.inception_weights, device=device_or_default(args.device), batch_size=args.inception_batch_size
    )
    report = evaluate_samples(samples, reference, net, sfid=args.sfid, pr=not args.no_pr)
    write_json(report_path, report)
    print(format_table(report["metrics"]))
    for key, note in report["notes"].items():
        if key in ("weights", "precision_recall", "sfid", "reference_images"):
            log.warning("note: %s", note)
    log.info("wrote %s", report_path)
    return report


def _metrics(args: argparse.Namespace) -> int:
    check_metric_arguments(args)
    report_path = (
        check_report_path(args.out) if args.out else check_report_path(default_report_path(args.samples))
    )
    samples = open_image_set(args.samples)
    reference = open_reference(args.ref, samples, args)
    check_resolutions(samples, reference)  # before the network loads
    score_and_report(samples, reference, args, report_path)
    return 0
