"""Training: the AR model and tokenizers, with exact resume and torchrun scale-out.

``run(recipe)`` is what ``varkit run`` calls (`varkit.train.runner`): it opens the
run directory (`varkit.train.rundir`) and runs the tokenizer stage
(`varkit.train.tokenizer`), then the AR stage (`varkit.train.ar`), each
through the one training loop (`varkit.train.loop`) that runs any
`varkit.train.stage.Stage`. The options of each stage are the recipe's
``train:`` and ``tokenizer_train:`` sections (`varkit.recipe.train`).
"""

from __future__ import annotations

from varkit.train.loop import TrainingLoop
from varkit.train.runner import run
from varkit.train.stage import OptimizerSlot, Stage, WindowMeans

__all__ = ["OptimizerSlot", "Stage", "TrainingLoop", "WindowMeans", "run"]
