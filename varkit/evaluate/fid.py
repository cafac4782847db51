"""FID, sFID, Inception Score and precision/recall of a sample set against a reference,
and the report ``varkit metrics`` writes (``metrics.json``).

The network is ``varkit.evaluate.inception.Inception`` (torch-fidelity's
TensorFlow-compatible Inception), the arithmetic ``varkit.evaluate.scores``
(float64). A reference that carries FID statistics (ADM's reference batches) is
compared through those statistics as they are; its images, when present, still serve
precision and recall.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from tqdm.auto import tqdm

from varkit.checkpoint import write_text_atomic
from varkit.errors import EvaluationError
from varkit.evaluate.image_sets import ImageSet, NpzSet
from varkit.evaluate.inception import Inception
from varkit.evaluate.scores import (
    IS_SPLIT_SIZE,
    PR_NEIGHBOURS,
    FeatureStats,
    frechet_distance,
    frechet_distance_of_features,
    inception_score,
    precision_recall,
)
from varkit.sampling import PROTOCOL_FILE, SAMPLES_FILE, environment

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
#: How each metric is printed, in order.
TABLE = (
    ("fid", "FID"),
    ("sfid", "sFID"),
    ("inception_score", "IS"),
    ("precision", "precision"),
    ("recall", "recall"),
)


@attrs.define
class Features:
    """Inception features of one image set (float32 rows in the set's order)."""

    pool: np.ndarray
    logits: np.ndarray
    spatial: np.ndarray | None = None


def extract(images: ImageSet, net: Inception, *, spatial: bool = False, desc: str = "inception") -> Features:
    """Run every image of ``images`` through ``net``, one batch at a time."""
    parts: dict[str, list[np.ndarray]] = {"pool": [], "logits": [], "spatial": []}
    bar = tqdm(total=images.count, desc=desc, unit="img", disable=not sys.stderr.isatty(), dynamic_ncols=True)
    for batch in images.batches(net.batch_size):
        for key, value in net(batch, spatial=spatial).items():
            parts[key].append(value)
        bar.update(len(batch))
    bar.close()
    if not parts["pool"]:
        raise EvaluationError(f"{images.path} yielded no images")
    return Features(
        pool=np.concatenate(parts["pool"]),
        logits=np.concatenate(parts["logits"]),
        spatial=np.concatenate(parts["spatial"]) if spatial else None,
    )


def _provided(reference: ImageSet, mean_key: str, cov_key: str, dim: int) -> FeatureStats | None:
    if mean_key not in reference.stats or cov_key not in reference.stats:
        return None
    mean, cov = reference.stats[mean_key].astype(np.float64), reference.stats[cov_key].astype(np.float64)
    if mean.shape != (dim,) or cov.shape != (dim, dim):
        raise EvaluationError(
            f"{reference.path}: {mean_key}/{cov_key} have shapes {mean.shape}/{cov.shape}, not ({dim},)/({dim}, {dim}) "
            "of this network's features"
        )
    return FeatureStats(mean=mean, cov=cov)


def fid_against(samples: np.ndarray, reference: np.ndarray | FeatureStats) -> float:
    """FID of sample features ``(n, d)`` against reference features or given statistics."""
    if isinstance(reference, FeatureStats):
        return frechet_distance(FeatureStats.of(samples), reference)
    return frechet_distance_of_features(samples, reference)


def check_resolutions(samples: ImageSet, reference: ImageSet) -> None:
    """Refuse a reference of another resolution than the samples (where both are known)."""
    if (
        samples.resolution is None
        or reference.resolution is None
        or samples.resolution == reference.resolution
    ):
        return
    (sh, sw), (rh, rw) = samples.resolution, reference.resolution
    raise EvaluationError(
        f"the reference {reference.path} holds {rw}×{rh} images but the samples {samples.path} are {sw}×{sh}; "
        "Inception resizes both to 299×299, so images of different sizes are not comparable: use a reference "
        f"at {sw}×{sh} (e.g. ADM's VIRTUAL_imagenet{sw}_labeled.npz), or --center-crop for a folder or "
        "shards of real images"
    )


def score(
    samples: ImageSet,
    reference: ImageSet,
    net: Inception,
    *,
    sfid: bool = False,
    pr: bool = True,
    k: int = PR_NEIGHBOURS,
) -> tuple[dict[str, float], dict[str, str]]:
    """Every metric of ``samples`` against ``reference``.

    Returns:
        ``(metrics, notes)``: ``fid``, ``inception_score``, ``inception_score_std`` and,
        as asked and possible, ``sfid``, ``precision``, ``recall``; notes say where the
        reference statistics came from and why a metric was left out.
    """
    check_resolutions(samples, reference)
    notes: dict[str, str] = {}
    gen = extract(samples, net, spatial=sfid, desc="samples")
    dim_pool = gen.pool.shape[1]
    given = _provided(reference, "mu", "sigma", dim_pool)
    given_s = _provided(reference, "mu_s", "sigma_s", gen.spatial.shape[1]) if sfid else None
    want_images = given is None or (sfid and given_s is None) or pr
    ref = None
    if want_images and reference.count != 0:
        ref = extract(reference, net, spatial=sfid and given_s is None, desc="reference")
    elif want_images:
        notes["reference_images"] = f"{reference.path} holds statistics but no images"

    metrics: dict[str, float] = {}
    if given is None and ref is None:
        raise EvaluationError(f"{reference.path} holds neither images nor FID statistics (mu, sigma)")
    metrics["fid"] = fid_against(gen.pool, given if given is not None else ref.pool)
    notes["fid_reference"] = "the reference's mu and sigma, as given" if given is not None else "its images"
    if sfid:
        if given_s is None and (ref is None or ref.spatial is None):
            notes["sfid"] = "left out: the reference has neither images nor mu_s/sigma_s"
        else:
            metrics["sfid"] = fid_against(gen.spatial, given_s if given_s is not None else ref.spatial)
            notes["sfid_reference"] = (
                "the reference's mu_s and sigma_s, as given" if given_s is not None else "its images"
            )
    metrics["inception_score"], metrics["inception_score_std"] = inception_score(gen.logits)
    if pr:
        if ref is None:
            notes["precision_recall"] = "left out: the reference has no images"
        else:
            metrics["precision"], metrics["recall"] = precision_recall(ref.pool, gen.pool, k)
    return metrics, notes


def default_report_path(samples: str | os.PathLike) -> Path:
    """Where ``metrics.json`` goes beside a sample set: ``samples.npz`` -> ``metrics.json``
    in its folder (``other.npz`` -> ``other.metrics.json``); a folder -> inside it; shards
    -> beside the first."""
    text = os.fspath(samples)
    path = Path(text)
    if path.is_dir():
        return path / METRICS_FILE
    if path.suffix == ".npz":
        return path.with_name(METRICS_FILE if path.name == SAMPLES_FILE else f"{path.stem}.{METRICS_FILE}")
    if "://" in text or text.startswith("pipe:"):
        return Path.cwd() / METRICS_FILE
    return Path(text.split("::")[0].split("{")[0]).parent / METRICS_FILE


def check_report_path(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A path a JSON report can be written to; raise before any work when it cannot."""
    path = Path(path)
    if path.is_dir():
        raise EvaluationError(f"{flag} {path} is a directory; give the path of a .json file to write")
    if path.parent.exists() and not path.parent.is_dir():
        raise EvaluationError(f"{flag} {path}: {path.parent} is a file, not a directory")
    if path.parent.is_dir() and not os.access(path.parent, os.W_OK):
        raise EvaluationError(f"{flag} {path}: the directory {path.parent} is not writable")
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON atomically (parents created); nothing is left behind on failure."""
    path = check_report_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
    return path


def samples_protocol(samples: ImageSet) -> dict[str, Any] | None:
    """The ``protocol.json`` beside a ``samples.npz`` written by ``varkit sample``, if any."""
    if not isinstance(samples, NpzSet):
        return None
    file = Path(samples.path).with_name(PROTOCOL_FILE)
    try:
        return json.loads(file.read_text()) if file.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def evaluate_samples(
    samples: ImageSet,
    reference: ImageSet,
    net: Inception,
    *,
    sfid: bool = False,
    pr: bool = True,
) -> dict[str, Any]:
    """``score`` with everything a reader needs to trust the numbers: the report.

    Returns:
        ``metrics``, ``samples`` and ``reference`` (paths, counts, pixel digests),
        ``protocol`` (the samples' ``protocol.json`` when there is one), ``evaluator``
        (network, weights digest, definitions), ``notes``, ``environment`` and ``seconds``.
    """
    t0 = time.perf_counter()
    metrics, notes = score(samples, reference, net, sfid=sfid, pr=pr)
    report: dict[str, Any] = {
        "metrics": metrics,
        "samples": samples.describe(),
        "reference": reference.describe(),
        "protocol": samples_protocol(samples),
        "evaluator": {
            **net.describe(),
            "arithmetic": "float64 (numpy)",
            "fid": "Fréchet distance of Inception pool_3 features (2048), unbiased covariances",
            "sfid": "the same on mixed_6/conv, first 7 channels (2023), as ADM",
            "inception_score_split": IS_SPLIT_SIZE,
            "precision_recall_k": PR_NEIGHBOURS,
        },
        "notes": notes,
        "environment": environment(net.device, 1),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if not net.published:
        report["notes"]["weights"] = (
            "the Inception weights are not the published file: these numbers are not comparable with "
            "published ones"
        )
    return report


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as an aligned two-column table."""
    rows = []
    for key, label in TABLE:
        if key not in metrics:
            continue
        value = f"{metrics[key]:.4f}"
        if key == "inception_score" and "inception_score_std" in metrics:
            value += f" ± {metrics['inception_score_std']:.4f}"
        rows.append((label, value))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
