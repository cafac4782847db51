"""``varkit eval``: teacher-forced validation metrics of a run on held-out images.

For the AR model: the mean cross-entropy (nats per token), its perplexity and the
top-1 accuracy over every position, and the same per step group (per scale for VAR),
computed on centre-cropped validation images encoded by the run's tokenizer, with the
true labels and without class dropout. For the tokenizer: the L1 reconstruction error
in [-1, 1] pixel units and the share of the codebook each scale uses on those images.
Sample-quality metrics that need a pretrained Inception network (FID, IS) read
``samples.npz`` from ``varkit sample`` in the evaluator of the user's choice.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from varkit.checkpoint import write_text_atomic
from varkit.data import build_eval_loader
from varkit.errors import DataError
from varkit.model.loss import StepGroups, ar_loss

log = logging.getLogger(__name__)


@torch.inference_mode()
def evaluate(
    pipe,
    *,
    batch_size: int = 32,
    max_images: int | None = None,
) -> dict[str, float]:
    """Validation metrics of a loaded model.

    Args:
        pipe: what holds the ``tokenizer``, ``model`` and ``recipe`` (a
            `varkit.pipeline.Pipeline` or a `varkit.loading.Loaded`); it
            runs where its model is.
        batch_size: images per forward pass.
        max_images: stop after this many validation images (None: all of them).

    Returns:
        ``images``, ``loss``, ``perplexity``, ``accuracy``, ``loss/<group>``,
        ``accuracy/<group>``, ``rec_l1`` and ``usage/<k>`` (share of the codes used at
        scale ``k``).
    """
    tokenizer, model, unit = pipe.tokenizer, pipe.model, pipe.model.unit
    device = next(model.parameters()).device
    loader = build_eval_loader(pipe.recipe.data, batch_size=batch_size)
    groups = StepGroups(unit.step_lengths, torch.device(device))
    loss_sum = torch.zeros(len(groups.names), dtype=torch.float64, device=device)
    hit_sum = torch.zeros_like(loss_sum)
    used = [torch.zeros(tokenizer.vocab_size, dtype=torch.bool, device=device) for _ in tokenizer.schedule]
    rec_sum, images_seen = 0.0, 0
    total = loader.samples if max_images is None else min(max_images, loader.samples or max_images)
    bar = tqdm(total=total, desc="eval", unit="img")
    for batch in loader:
        batch = batch.to(device)
        images, labels = batch.images, batch.labels
        if max_images is not None:
            images, labels = images[: max_images - images_seen], labels[: max_images - images_seen]
        codes = tokenizer.encode(images)
        rec_sum += (tokenizer.decode(codes) - images).abs().mean(dim=(1, 2, 3)).sum().item()
        for k, code in enumerate(codes):
            used[k][code.flatten()] = True
        logits = model(unit.teacher_forcing(codes, tokenizer), labels)
        targets = unit.targets(codes)
        loss_sum += groups.reduce(ar_loss(logits, targets, 0.0).double().sum(0))
        hit_sum += groups.reduce((logits.argmax(-1) == targets).double().sum(0))
        images_seen += len(labels)
        bar.update(len(labels))
        if max_images is not None and images_seen >= max_images:
            break
    bar.close()
    if images_seen == 0:
        raise DataError(
            f"no validation images were read from {pipe.recipe.data.val_shards or 'the synthetic val split'}"
        )
    positions = groups.sizes * images_seen
    loss = loss_sum.sum().item() / positions.sum().item()
    out: dict[str, float] = {
        "images": images_seen,
        "loss": loss,
        "perplexity": math.exp(loss),
        "accuracy": hit_sum.sum().item() / positions.sum().item(),
        "rec_l1": rec_sum / images_seen,
    }
    for name, group_loss, hits, n in zip(
        groups.names, loss_sum.tolist(), hit_sum.tolist(), positions.tolist()
    ):
        out[f"loss/{name}"] = group_loss / n
        out[f"accuracy/{name}"] = hits / n
    for k, mask in enumerate(used):
        out[f"usage/{k}"] = mask.float().mean().item()
    return out


def write_report(metrics: dict[str, float], path: Path) -> None:
    """Write ``metrics`` as JSON (atomically)."""
    write_text_atomic(path, json.dumps(metrics, indent=2) + "\n")
