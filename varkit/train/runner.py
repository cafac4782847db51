"""``varkit run``: the tokenizer stage, then the AR stage, in one run directory.

The run directory (``out_dir``) holds ``recipe.yaml`` (the resolved recipe), the AR
stage's ``checkpoints/``, ``metrics.jsonl`` and ``samples/``, and, when the recipe
trains its tokenizer, ``tokenizer/`` with the same layout. Running again on the same
``out_dir`` resumes from the latest checkpoints.

A run directory belongs to one recipe. A recipe that differs from the stored one in
anything but :data:`ALLOWED_CHANGES` is refused unless ``force``: those keys change
how long a run goes, how it reports, how it samples or how fast it runs, not what it
trains.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml

from varkit import recipe as recipe_mod
from varkit.build import build_tokenizer
from varkit.checkpoint import RECIPE, latest_checkpoint, write_text_atomic
from varkit.errors import TrainingError, VarkitError
from varkit.loading import recipe_tokenizer, tokenizer_weights_source
from varkit.train import distributed as D
from varkit.train.ar import ARTrainer
from varkit.train.state import seed_everything
from varkit.train.tokenizer import TokenizerTrainer

log = logging.getLogger(__name__)

#: Recipe keys (and whole sections) that may differ between a run directory and the
#: recipe that resumes it. ``train.steps``/``epochs`` extend or shorten a run (the lr
#: schedule follows the new length from the resumed step on).
ALLOWED_CHANGES = (
    "out_dir",
    "sampler",
    "attention",
    "tokenizer.weights",
    "data.workers",
    "data.cache_dir",
    *(
        f"{stage}.{key}"
        for stage in ("train", "tokenizer_train")
        for key in (
            "steps",
            "epochs",
            "log_every",
            "checkpoint_every",
            "checkpoint_minutes",
            "keep_checkpoints",
            "sample_every",
            "sample_classes",
            "sample_per_class",
            "tensorboard",
            "compile",
        )
    ),
)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def recipe_differences(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key that differs outside :data:`ALLOWED_CHANGES`."""
    old, cur = _flatten(stored), _flatten(new)
    problems = []
    for key in sorted(set(old) | set(cur)):
        if any(key == a or key.startswith(a + ".") for a in ALLOWED_CHANGES):
            continue
        a, b = old.get(key, "<unset>"), cur.get(key, "<unset>")
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b:
            problems.append(f"{key}: {a!r} -> {b!r}")
    return problems


def prepare_out_dir(recipe, *, force: bool = False) -> Path:
    """Check that ``recipe`` may use its ``out_dir`` and write ``recipe.yaml`` there.

    Raises:
        TrainingError: the directory holds a run of a different recipe (and not ``force``).
    """
    out = Path(recipe.out_dir)
    stored_file = out / RECIPE
    if not stored_file.is_file():
        for sub in (out, out / "tokenizer"):
            step_dir = latest_checkpoint(sub / "checkpoints")
            if step_dir is not None:
                stored_file = step_dir / RECIPE
                break
    new = recipe.to_dict()
    if stored_file.is_file():
        stored = yaml.safe_load(stored_file.read_text()) or {}
        # Resolved again: options added to varkit since (at their defaults) are no difference.
        with contextlib.suppress(VarkitError):
            stored = recipe_mod.from_dict(stored, source=str(stored_file)).to_dict()
        differences = recipe_differences(stored, new)
        if differences and not force:
            shown = "\n  ".join(differences[:12]) + ("\n  ..." if len(differences) > 12 else "")
            raise TrainingError(
                f"{out} holds a run of another recipe; it differs in:\n  {shown}\n"
                "Choose another out_dir, or pass --force to continue this run with the new recipe "
                "(a changed model shape then fails to load its checkpoint)"
            )
        if differences:
            log.warning("--force: continuing %s with a changed recipe (%s)", out, "; ".join(differences))
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / RECIPE, recipe.to_yaml())
    return out


def run(recipe, *, force: bool = False) -> Path:
    """Train what ``recipe`` describes; returns the final AR checkpoint (or the run directory).

    Under ``torchrun`` every process calls this; rank 0 alone writes files and logs.

    Raises:
        TrainingError: the out_dir holds another recipe's run, or the loss became NaN.
        CheckpointError: a checkpoint to resume from does not fit the model.
    """
    env = D.env_from_torchrun()
    created = D.init_distributed(env)
    try:
        error = None
        if env.main:
            try:
                prepare_out_dir(recipe, force=force)
            except VarkitError as exc:
                error = exc
        message = D.broadcast_object(str(error) if error else None, env)
        if error is not None:
            raise error
        if message is not None:
            raise TrainingError(message)
        out = Path(recipe.out_dir)
        tokenizer = _tokenizer_stage(recipe, env, out)
        if not recipe.train.enabled:
            log.info("train.steps is 0: no AR training")
            return out
        final = ARTrainer(recipe, tokenizer, env, out).train()
        return final if final is not None else out
    finally:
        if created:
            dist.destroy_process_group()


def _tokenizer_stage(recipe, env: D.DistEnv, out: Path):
    if tokenizer_weights_source(recipe):
        if recipe.tokenizer_train.enabled:
            log.info("tokenizer.weights (or init.weights) is set: tokenizer_train is skipped")
        seed_everything(recipe.seed)
        return recipe_tokenizer(recipe, device=env.device)
    if recipe.tokenizer_train.enabled:
        return TokenizerTrainer(recipe, env, out).train()
    log.warning(
        "the tokenizer has neither weights nor a training stage: the AR model learns the codes of a "
        "randomly initialised tokenizer (set tokenizer.weights or tokenizer_train.steps)"
    )
    seed_everything(recipe.seed)
    return build_tokenizer(recipe, device=env.device)
