"""``varkit run``: the tokenizer stage, then the AR stage, in one run directory.

The run directory (``out_dir``) holds ``recipe.yaml`` (the resolved recipe),
``run.lock``, the AR stage's ``checkpoints/``, ``metrics.jsonl`` and ``samples/``, and,
when the recipe trains its tokenizer, ``tokenizer/`` with the same layout. Running
again on the same ``out_dir`` resumes from the latest checkpoints; which recipe
changes a resume accepts is `varkit.train.rundir`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from varkit.build import build_tokenizer
from varkit.errors import TrainingError, VarkitError
from varkit.loading import recipe_tokenizer, tokenizer_weights_source
from varkit.train import distributed as D
from varkit.train.ar import ARStage
from varkit.train.loop import TrainingLoop
from varkit.train.rundir import RunDirectory
from varkit.train.state import seed_everything
from varkit.train.tokenizer import TokenizerStage

log = logging.getLogger(__name__)


def run(recipe, *, force: bool = False) -> Path:
    """Train what ``recipe`` describes; returns the final AR checkpoint (or the run directory).

    Under ``torchrun`` every process calls this; rank 0 alone locks the run directory,
    writes files and logs.

    Raises:
        TrainingError: the out_dir cannot be written, another run holds it, it holds
            another recipe's run, or the loss became NaN.
        CheckpointError: a checkpoint to resume from does not fit the model, or one
            cannot be written.
    """
    env = D.env_from_torchrun()
    created = D.init_distributed(env)
    run_dir = RunDirectory(recipe, force=force)
    try:
        error = None
        if env.main:
            try:
                run_dir.open()
            except VarkitError as exc:
                error = exc
        message = D.broadcast_object(str(error) if error else None, env)
        if error is not None:
            raise error
        if message is not None:
            raise TrainingError(message)

        def started() -> None:
            if env.main:
                run_dir.started()

        out = run_dir.path
        tokenizer = _tokenizer_stage(recipe, env, out, started)
        if not recipe.train.enabled:
            started()
            log.info("train.steps is 0: no AR training")
            return out
        ar = TrainingLoop(ARStage(recipe, tokenizer, env, out), recipe=recipe.to_dict())
        ar.setup()
        started()
        final = ar.run()
        return final if final is not None else out
    finally:
        if env.main:
            run_dir.close()
        if created:
            dist.destroy_process_group()


def _tokenizer_stage(recipe, env: D.DistEnv, out: Path, started):
    if tokenizer_weights_source(recipe):
        if recipe.tokenizer_train.enabled:
            log.info("tokenizer.weights (or init.weights) is set: tokenizer_train is skipped")
        seed_everything(recipe.seed)
        return recipe_tokenizer(recipe, device=env.device)
    if recipe.tokenizer_train.enabled:
        stage = TokenizerStage(recipe, env, out)
        loop = TrainingLoop(stage, recipe=recipe.to_dict())
        loop.setup()
        started()
        loop.run()
        return stage.tokenizer.eval().requires_grad_(False)
    log.warning(
        "the tokenizer has neither weights nor a training stage: the AR model learns the codes of a "
        "randomly initialised tokenizer (set tokenizer.weights or tokenizer_train.steps)"
    )
    seed_everything(recipe.seed)
    return build_tokenizer(recipe, device=env.device)
