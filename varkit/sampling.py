"""Sampling to disk: PNG files, a grid, and ``samples.npz`` for FID evaluators."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from varkit.errors import VarkitError
from varkit.images import save_grid, to_uint8

log = logging.getLogger(__name__)


def sample_to_dir(
    pipe,
    out: Path,
    *,
    classes: list[int],
    per_class: int,
    sampler: str | None = None,
    cfg: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    more_smooth: bool = False,
    seed: int = 0,
    batch_size: int = 32,
) -> Path:
    """Generate ``per_class`` images of each class with ``pipe`` (a
    :class:`varkit.pipeline.Pipeline`) into ``out``.

    Writes ``out/images/{class:04d}_{i:03d}.png``, ``out/grid.png`` (a row per class)
    and ``out/samples.npz`` with ``arr_0`` (uint8 N×H×W×3) and ``labels`` (N,).
    Image ``i`` of the whole list is generated with seed ``seed + batch index``, so
    the same arguments give the same files.
    """
    num_classes = pipe.model.config.num_classes
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise VarkitError(f"classes {bad} are outside 0..{num_classes - 1} of this model")
    labels = torch.tensor([c for c in classes for _ in range(per_class)])
    chunks = []
    for i, start in enumerate(tqdm(range(0, len(labels), batch_size), desc="sampling", unit="batch")):
        batch = labels[start : start + batch_size]
        chunks.append(
            pipe.generate(
                batch,
                cfg=cfg,
                top_k=top_k,
                top_p=top_p,
                seed=seed + i,
                more_smooth=more_smooth,
                sampler=sampler,
            ).cpu()
        )
    images = torch.cat(chunks)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    arr = to_uint8(images)
    for n, (img, label) in enumerate(zip(arr, labels.tolist())):
        Image.fromarray(img).save(out / "images" / f"{label:04d}_{n % per_class:03d}.png")
    save_grid(arr, out / "grid.png", nrow=per_class)
    tmp = out / "samples.tmp.npz"
    np.savez(tmp, arr_0=arr, labels=labels.numpy())
    os.replace(tmp, out / "samples.npz")
    log.info("wrote %d images of %d classes to %s", len(labels), len(classes), out)
    return out
