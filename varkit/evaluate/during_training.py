"""FID during training: a few thousand fresh samples against the validation images.

``train.eval_every`` / ``train.eval_num`` turn it on. The validation images are read
once (``data.val_shards``, or the synthetic val split, centre-cropped as ``varkit
eval`` reads them) and their Inception statistics cached in the run directory; each
evaluation then draws ``eval_num`` images, one per class in turn, with the same
per-image seeds every time, so successive numbers differ by the model alone.

FID of a few thousand samples against the validation set is biased upwards against
the 50 000-sample protocol of papers: it tracks progress within a run, it is not a
number to compare with published ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from varkit.base import Sampler, Tokenizer
from varkit.data import DataConfig, build_eval_loader
from varkit.errors import EvaluationError
from varkit.evaluate.fid import extract, fid_against
from varkit.evaluate.image_sets import LoaderSet
from varkit.evaluate.inception import Inception
from varkit.evaluate.scores import FeatureStats, inception_score
from varkit.sampling import generate_chunk, image_seed

log = logging.getLogger(__name__)

#: The cached Inception features (or statistics) of the validation images.
CACHE_FILE = "val-inception.npz"
#: Up to this many reference images the features themselves are cached (then the
#: distance is computed in their span, exactly and fast); beyond, mean and covariance.
KEEP_FEATURES_UP_TO = 2048


class TrainingFID:
    """Scores a model in training: FID and IS of ``num`` samples against the validation images.

    Args:
        data: the run's data section (its validation images are the reference).
        cache_dir: where the reference statistics are kept (a folder of the run).
        num: samples per evaluation.
        device: where sampling and the Inception network run.
        batch_size: images per generation batch and per Inception batch.
        seed: base seed of the per-image seeds (the same at every evaluation).
        inception_weights: the weights file; None takes torch-fidelity's cache.

    Raises:
        EvaluationError: the Inception network cannot be loaded (checked here, before
            any training step).
    """

    def __init__(
        self,
        data: DataConfig,
        cache_dir: str | os.PathLike,
        *,
        num: int,
        device: torch.device | str,
        batch_size: int = 32,
        seed: int = 0,
        inception_weights: str | os.PathLike | None = None,
    ):
        if num < 2:
            raise EvaluationError(f"train.eval_num is {num}; FID needs at least 2 samples")
        self.data, self.cache_dir, self.num = data, Path(cache_dir), num
        self.device, self.batch_size, self.seed = torch.device(device), batch_size, seed
        self.net = Inception(inception_weights, device=device, batch_size=batch_size)
        self._reference: np.ndarray | FeatureStats | None = None

    def _cache_key(self) -> str:
        described = json.dumps(attrs.asdict(self.data), sort_keys=True, default=str)
        return hashlib.sha256(f"{described}|{self.net.sha256}".encode()).hexdigest()

    def reference(self) -> np.ndarray | FeatureStats:
        """Features (small sets) or statistics of the validation images, cached on disk."""
        if self._reference is not None:
            return self._reference
        key = self._cache_key()
        path = self.cache_dir / CACHE_FILE
        if path.is_file():
            with np.load(path) as cached:
                if str(cached["key"]) == key:
                    self._reference = (
                        cached["pool"]
                        if "pool" in cached.files
                        else FeatureStats(mean=cached["mu"], cov=cached["sigma"])
                    )
                    return self._reference
        loader = build_eval_loader(self.data, batch_size=self.batch_size)
        images = LoaderSet(
            "the validation images", loader, resolution=self.data.resolution, count=loader.samples
        )
        pool = extract(images, self.net, desc="validation").pool
        log.info("Inception features of %d validation images (cached in %s)", len(pool), path)
        if len(pool) <= KEEP_FEATURES_UP_TO:
            self._reference, arrays = pool, {"pool": pool}
        else:
            stats = FeatureStats.of(pool)
            self._reference, arrays = stats, {"mu": stats.mean, "sigma": stats.cov}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), **arrays)
        os.replace(tmp, path)
        return self._reference

    @torch.no_grad()
    def __call__(
        self,
        model,
        tokenizer: Tokenizer,
        sampler: Sampler,
        *,
        num_classes: int,
        dtype: torch.dtype | None = None,
    ) -> dict[str, Any]:
        """``{"fid", "inception_score", "fid_images"}`` of ``num`` samples of ``model``.

        Image ``n`` has class ``n % num_classes`` and its own seed ``image_seed(seed, n)``.
        """
        reference = self.reference()
        pools, logits = [], []
        for start in range(0, self.num, self.batch_size):
            indices = range(start, min(start + self.batch_size, self.num))
            labels = torch.tensor([n % num_classes for n in indices], device=self.device)
            pixels = generate_chunk(
                model, tokenizer, sampler, labels, [image_seed(self.seed, n) for n in indices], dtype=dtype
            )
            features = self.net(pixels)
            pools.append(features["pool"])
            logits.append(features["logits"])
        pool = np.concatenate(pools)
        fid = fid_against(pool, reference)
        score, _ = inception_score(np.concatenate(logits))
        return {"fid": fid, "inception_score": score, "fid_images": self.num}
