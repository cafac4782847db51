"""Recipe options of the data layer: where images (or codes) come from and how they are augmented.

These classes import nothing heavy, so a recipe validates before any data is touched.
"""

from __future__ import annotations

from typing import Literal

import attrs

from varkit import validators as V

#: How many synthetic classes exist (``varkit.data.synthetic.CLASS_NAMES``).
MAX_SYNTHETIC_CLASSES = 10


@attrs.frozen(kw_only=True)
class SyntheticConfig:
    """The embedded synthetic dataset: coloured shapes whose class fixes shape and colour.

    The images are generated deterministically from these fields and written as
    shards into the cache on first use; changing any field makes a new cache entry.
    """

    #: Classes used, the first ``num_classes`` of ``CLASS_NAMES``; 10 (all) is
    #: enough to see class conditioning work while staying tiny.
    num_classes: int = attrs.field(default=10, validator=V.positive)
    #: Training images per class; a few hundred train a tiny model in minutes on a CPU.
    images_per_class: int = attrs.field(default=300, validator=V.positive)
    #: Validation images per class (centre-cropped, never shuffled).
    val_images_per_class: int = attrs.field(default=50, validator=V.positive)
    #: Seed of the generator; the same seed gives byte-identical shards.
    seed: int = 0

    @num_classes.validator
    def _check_classes(self, attribute, value):
        if value > MAX_SYNTHETIC_CLASSES:
            raise ValueError(
                f"synthetic.num_classes is {value} but the synthetic dataset has "
                f"{MAX_SYNTHETIC_CLASSES} classes; use at most {MAX_SYNTHETIC_CLASSES}"
            )


@attrs.frozen(kw_only=True)
class DataConfig:
    """Where training images come from, and VAR's augmentation of them.

    ``source`` picks the stream: ``synthetic`` (the embedded default, written to the
    cache on first use), ``shards`` (webdataset tar shards of ``jpg``/``png``/``webp``
    plus ``cls``, e.g. ImageNet written by ``varkit shards``) or ``codes`` (shards of
    tokenizer codes written by ``varkit shards --tokenize``; training then skips
    decoding and encoding altogether).
    """

    #: Which stream feeds training; the synthetic set needs no download.
    source: Literal["synthetic", "shards", "codes"] = "synthetic"
    #: Training shards: a path or brace pattern (``train-{000000..001023}.tar``) or a
    #: ``pipe:`` command; needed when source is ``shards``.
    train_shards: str | None = None
    #: Validation shards (same forms); evaluation reads them once, centre-cropped.
    val_shards: str | None = None
    #: Code shards written by ``varkit shards --tokenize``; needed when source is ``codes``.
    codes: str | None = None
    #: Side of the square training crops in pixels; VAR's ImageNet models use 256.
    resolution: int = attrs.field(default=256, validator=V.positive)
    #: The shorter side is resized to ``crop_ratio × resolution`` before cropping
    #: (VAR's ``mid_reso`` of 1.125), so random crops move the object a little.
    crop_ratio: float = 1.125
    #: Random horizontal flips; VAR trains without them.
    hflip: bool = False
    #: Samples held by each worker's shuffle buffer; 1000 mixes well beyond one shard
    #: member run while holding ~100 MB of ImageNet JPEG bytes.
    shuffle_buffer: int = attrs.field(default=1000, validator=V.non_negative)
    #: DataLoader worker processes per rank (0 decodes in the training process);
    #: 2 matches the small machines the tests run on, raise it on a GPU node.
    workers: int = attrs.field(default=2, validator=V.non_negative)
    #: Draw shards with replacement (webdataset's resampled mode): each rank and
    #: worker streams independently, which suits many nodes and uneven shards.
    resampled: bool = False
    #: Number of classes; a sample whose class is outside ``[0, num_classes)`` is
    #: skipped with a warning. ImageNet has 1000.
    num_classes: int = attrs.field(default=1000, validator=V.positive)
    #: Samples in one epoch over all ranks; None reads the counts that ``varkit
    #: shards`` writes beside the shards (``shards.json``) or counts local shards.
    #: Needed for ``pipe:`` shards without that index.
    samples_per_epoch: int | None = None
    #: The embedded synthetic dataset, used when source is ``synthetic``.
    synthetic: SyntheticConfig = SyntheticConfig()
    #: Where the synthetic shards are cached; None uses ``$VARKIT_CACHE`` or
    #: ``~/.cache/varkit``.
    cache_dir: str | None = None

    def __attrs_post_init__(self):
        if self.source == "shards" and not self.train_shards:
            raise ValueError(
                "data.train_shards is not set but data.source is 'shards'; give a shard "
                "pattern such as /data/imagenet/train-{000000..001023}.tar (write shards "
                "from an image folder with `varkit shards SRC OUT`)"
            )
        if self.source == "codes" and not self.codes:
            raise ValueError(
                "data.codes is not set but data.source is 'codes'; give the code-shard "
                "pattern printed by `varkit shards --tokenize RUN SRC OUT`"
            )
        if self.crop_ratio < 1.0:
            raise ValueError(
                f"data.crop_ratio is {self.crop_ratio} but must be at least 1 "
                "(1 resizes the shorter side to the resolution itself; VAR uses 1.125)"
            )
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(
                f"data.samples_per_epoch is {self.samples_per_epoch}; give a positive count or null"
            )
        if self.source == "synthetic" and self.synthetic.num_classes > self.num_classes:
            raise ValueError(
                f"data.synthetic.num_classes ({self.synthetic.num_classes}) exceeds "
                f"data.num_classes ({self.num_classes}); raise data.num_classes"
            )

    @property
    def classes(self) -> int:
        """The number of classes the model should embed for this source."""
        return self.synthetic.num_classes if self.source == "synthetic" else self.num_classes
