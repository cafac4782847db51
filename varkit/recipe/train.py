"""The training options of a recipe: ``train:`` (AR model) and ``tokenizer_train:``.

Each stage has its own config class, so an option a stage would ignore is an unknown
key of its section: `StageConfig` holds what every stage of the training loop
uses (length, batch, optimizer, schedule, precision, checkpoints, outputs),
`TrainConfig` (``train:``) adds the AR stage's own options (EMA, compile,
DDP/FSDP, activation checkpointing, label smoothing, the sample grid) and
`TokenizerTrainConfig` (``tokenizer_train:``) is the common set alone.

The defaults are VAR's ImageNet-256 recipe (arXiv 2404.02905, its official release):
AdamW (0.9, 0.95), peak lr ``1e-4 · batch / 256``, weight decay 0.05, grad-norm clip
2.0, a warmup of 1/50 of the run from 0.005 × peak, then the ``lin0`` schedule down to
0.1 × peak. A recipe sets the length (``steps`` or ``epochs``) and the batch.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs

from varkit import validators as V

Precision = Literal["fp32", "bf16", "fp16"]
Schedule = Literal["lin0", "cos", "constant"]
#: ``train.compile``: false, true (= ``blocks``), ``blocks`` or ``model``.
Compile = bool | Literal["blocks", "model"]


def _betas(instance, attribute, value) -> None:
    if not all(0.0 <= b < 1.0 for b in value):
        raise ValueError(f"betas is {value}; both must lie in [0, 1), e.g. [0.9, 0.95]")


def _ema(instance, attribute, value) -> None:
    if value is not None and not 0.0 < value < 1.0:
        raise ValueError(f"ema is {value}; give a decay in (0, 1) such as 0.9999, or null for no EMA")


@attrs.frozen(kw_only=True)
class StageConfig:
    """What every training stage uses: length, batch, optimizer, schedule, precision, outputs.

    The run's length is ``steps`` optimizer steps, or ``epochs`` passes over the data
    when set. ``steps: 0`` without ``epochs`` skips the stage (the tokenizer stage is
    skipped unless a recipe asks for it).
    """

    # -- length and batch ------------------------------------------------------
    #: 0 with no epochs skips the stage; AR recipes set it (the quickstart: a few hundred).
    steps: int = attrs.field(default=0, validator=V.non_negative)
    #: Passes over the data instead of steps (VAR: 200-350); needs a stream that knows its size.
    epochs: float | None = attrs.field(default=None, validator=V.positive)
    #: Global batch over all processes and accumulation steps (VAR: 768 for d16-d24).
    batch_size: int = attrs.field(default=768, validator=V.positive)
    #: Micro-batches per optimizer step: the same global batch in less memory.
    grad_accum: int = attrs.field(default=1, validator=V.positive)

    # -- optimizer -------------------------------------------------------------
    #: Peak learning rate; null derives it from base_lr and the batch (VAR's rule).
    lr: float | None = attrs.field(default=None, validator=V.positive)
    #: Peak lr per 256 images of global batch (VAR's "tblr": 1e-4; 8e-5 for d24/d30).
    base_lr: float = attrs.field(default=1e-4, validator=V.positive)
    #: AdamW betas (VAR: 0.95 for beta2 keeps the large-batch updates stable).
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.95), validator=_betas)
    #: AdamW epsilon (PyTorch's default; VAR does not change it).
    eps: float = attrs.field(default=1e-8, validator=V.positive)
    #: Decoupled weight decay of matrices (VAR: 0.05); never on norms, biases, embeddings of position.
    weight_decay: float = attrs.field(default=0.05, validator=V.non_negative)
    #: Weight decay at the end of a cosine schedule from weight_decay; null keeps it constant (VAR d30: 0.08).
    weight_decay_end: float | None = attrs.field(default=None, validator=V.non_negative)
    #: Gradient-norm clip (VAR: 2.0); 0 turns clipping off.
    grad_clip: float = attrs.field(default=2.0, validator=V.non_negative)

    # -- schedule --------------------------------------------------------------
    #: Shape of the lr after warmup: lin0 (VAR: flat 5 %, then linear), cos, or constant.
    schedule: Schedule = "lin0"
    #: Warmup length in steps; null uses warmup_fraction.
    warmup_steps: int | None = attrs.field(default=None, validator=V.non_negative)
    #: Warmup as a fraction of the run (VAR: epochs/50, i.e. 0.02).
    warmup_fraction: float = attrs.field(default=0.02, validator=V.fraction)
    #: lr at the first warmup step, as a fraction of the peak (VAR: 0.005).
    warmup_start_ratio: float = attrs.field(default=0.005, validator=V.fraction)
    #: lr at the last step, as a fraction of the peak (VAR "wpe": 0.1 for d16/d20, 0.01 for d24/d30).
    final_lr_ratio: float = attrs.field(default=0.1, validator=V.fraction)

    # -- numerics --------------------------------------------------------------
    #: Autocast dtype: bf16 needs no loss scaling on current GPUs; fp16 uses a grad scaler (VAR's choice).
    precision: Precision = "bf16"

    # -- outputs ---------------------------------------------------------------
    #: Steps between metric lines (and log lines when not on a terminal).
    log_every: int = attrs.field(default=50, validator=V.positive)
    #: Steps between checkpoints; 0 only checkpoints by time and at the end.
    checkpoint_every: int = attrs.field(default=5000, validator=V.non_negative)
    #: Minutes between checkpoints, whatever the step; 0 turns the timer off (bounds the work lost to a crash).
    checkpoint_minutes: float = attrs.field(default=30.0, validator=V.non_negative)
    #: Checkpoints kept on disk; older ones are deleted once a newer one is complete.
    keep_checkpoints: int = attrs.field(default=3, validator=V.positive)
    #: Steps between previews (AR: sample grids, tokenizer: reconstructions); 0 previews only at the end.
    sample_every: int = attrs.field(default=0, validator=V.non_negative)
    #: Also write TensorBoard events (needs the `tensorboard` package).
    tensorboard: bool = False

    def __attrs_post_init__(self) -> None:
        if self.steps and self.epochs is not None:
            raise ValueError(
                f"both steps ({self.steps}) and epochs ({self.epochs}) are set; set one of them "
                "(steps: 0 to train by epochs)"
            )

    # -- derived ---------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """Whether this stage trains at all."""
        return self.steps > 0 or self.epochs is not None

    @property
    def peak_lr(self) -> float:
        """The lr after warmup: ``lr`` when set, else ``base_lr · batch_size / 256``."""
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256

    def total_steps(self, samples_per_epoch: int | None = None) -> int:
        """Optimizer steps of the run.

        Args:
            samples_per_epoch: the dataset size; needed when the run is set in epochs.

        Raises:
            ValueError: epochs are set but the dataset size is unknown.
        """
        if self.epochs is None:
            return self.steps
        if not samples_per_epoch:
            raise ValueError(
                f"the run is set as {self.epochs} epochs but the data does not know its size; "
                "set steps instead of epochs"
            )
        return max(1, math.ceil(self.epochs * samples_per_epoch / self.batch_size))

    def warmup(self, total: int) -> int:
        """Warmup steps of a run of ``total`` steps."""
        steps = self.warmup_steps if self.warmup_steps is not None else round(self.warmup_fraction * total)
        return min(steps, total)

    def micro_batch(self, world_size: int) -> int:
        """Images per process per micro-batch.

        Raises:
            ValueError: the global batch does not split evenly.
        """
        parts = world_size * self.grad_accum
        if self.batch_size % parts:
            raise ValueError(
                f"batch_size {self.batch_size} does not split into {world_size} processes × "
                f"{self.grad_accum} accumulation steps; make it a multiple of {parts}"
            )
        return self.batch_size // parts


@attrs.frozen(kw_only=True)
class TrainConfig(StageConfig):
    """The AR stage (recipe section ``train:``): the common options and the AR model's own."""

    #: Label smoothing of the AR cross-entropy (VAR: 0, it is only a flag there).
    label_smoothing: float = attrs.field(default=0.0, validator=V.fraction)
    #: EMA decay of the weights, null for none (an EMA copy costs one more model in memory).
    ema: float | None = attrs.field(default=None, validator=_ema)
    #: torch.compile before the DDP/FSDP wrap: true or ``blocks`` compiles each block on its
    #: own (gradient all-reduce overlaps the backward), ``model`` the whole model in one graph.
    compile: Compile = False
    #: DDP replicates the model; FSDP shards it (for d24/d30, which do not fit per GPU with their optimizer).
    distributed: Literal["ddp", "fsdp"] = "ddp"
    #: Recompute each block's activations in the backward instead of keeping them: about a
    #: third more compute for the memory of one block's activations instead of all of them.
    activation_checkpointing: bool = False
    #: Classes in a sample grid, spread evenly over the model's classes (one row each).
    sample_classes: int = attrs.field(default=8, validator=V.positive)
    #: Images per class in a sample grid.
    sample_per_class: int = attrs.field(default=4, validator=V.positive)
    #: Steps between FIDs of eval_num fresh samples against the validation images
    #: (logged as fid, inception_score); 0 turns it off. Needs the eval extra and the
    #: Inception weights in torch-fidelity's cache.
    eval_every: int = attrs.field(default=0, validator=V.non_negative)
    #: Samples per FID during training: a few thousand track progress in minutes on a GPU
    #: (the 50 000 of papers are for `varkit eval --fid`).
    eval_num: int = attrs.field(default=5000, validator=V.positive)

    @property
    def compile_mode(self) -> Literal["blocks", "model"] | None:
        """What ``compile`` compiles: ``blocks``, ``model``, or None for nothing."""
        if self.compile is True:
            return "blocks"
        return self.compile or None


@attrs.frozen(kw_only=True)
class TokenizerTrainConfig(StageConfig):
    """The tokenizer stage (recipe section ``tokenizer_train:``): the common options.

    The tokenizer is replicated on every process with its gradients averaged explicitly,
    trains without an EMA and is not compiled, so those AR options do not exist here.
    """


#: Options that varkit 0.1 wrote into every stored ``tokenizer_train:`` section although
#: the tokenizer stage never used them; a stored recipe that has them still loads.
RETIRED_TOKENIZER_TRAIN_KEYS = (
    "label_smoothing",
    "ema",
    "compile",
    "distributed",
    "sample_classes",
    "sample_per_class",
)
