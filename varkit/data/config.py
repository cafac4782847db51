"""Recipe options of the data layer, and the table of data sources that ``data.source`` names.

A data source is one row of `SOURCES`: what the recipe must give for it, how
many classes the model embeds, which shards each split reads and, when the source has
one, a classifier of generated images. A new source is a module that calls
`register_source`; nothing else in varkit names the sources.

These classes read no data, so a recipe validates before any data is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from varkit import validators as V
from varkit.errors import DataError, did_you_mean

#: Fields whose values, when they come from a recipe stored with a checkpoint rather
#: than from the user, are refused where they would run a command (a ``pipe:`` shard
#: pattern) or choose where files are written (``cache_dir``).
GUARDED_FIELDS = ("train_shards", "val_shards", "codes", "cache_dir")


@attrs.frozen(kw_only=True)
class DataSource:
    """One data source: a row of the table that ``data.source`` picks from.

    Attributes:
        name: what recipes write (``data.source: NAME``).
        summary: one line for listings and errors.
        yields: what training batches hold: ``images`` or ``codes``.
        resolve: ``(config, split, tokenizer) -> varkit.data.sources.Source``, the shards
            of ``split`` (``train`` or ``val``); evaluation reads images, so ``val``
            resolves to image shards whatever ``yields`` is.
        check: ``config -> [problem, ...]``, what the recipe lacks for this source.
        classes: ``config -> int``, the number of classes the model embeds.
        classifiers: named classifiers of generated images ``(b, 3, H, W)`` in [0, 1]
            returning ``(b,)`` class indices (-1: none); evaluation reports the share
            of samples each assigns to their class as ``sample_<name>_accuracy``.
        patterns: the DataConfig fields holding shard patterns this source reads, with
            the kind each must hold (``varkit validate`` checks that they resolve).
    """

    name: str
    summary: str
    yields: str = attrs.field(validator=attrs.validators.in_(("images", "codes")))
    resolve: Callable[..., Any]
    check: Callable[[Any], list[str]] = lambda config: []
    classes: Callable[[Any], int] = lambda config: config.num_classes
    classifiers: Mapping[str, Callable[..., Any]] = attrs.field(factory=dict)
    patterns: Mapping[str, str] = attrs.field(factory=dict)


#: The data sources by name; `register_source` adds one.
SOURCES: dict[str, DataSource] = {}


def register_source(source: DataSource) -> DataSource:
    """Add a data source to the table (a name registered twice is an error)."""
    existing = SOURCES.get(source.name)
    if existing is not None and existing is not source:
        raise DataError(
            f"data source {source.name!r} is registered twice ({existing.summary!r} and {source.summary!r})"
        )
    SOURCES[source.name] = source
    return source


def data_source(name: str) -> DataSource:
    """The table's row for ``name``.

    Raises:
        DataError: no source has that name (the message lists those that exist).
    """
    if name not in SOURCES:
        raise DataError(_unknown(name))
    return SOURCES[name]


def _unknown(name: str) -> str:
    return (
        f"data.source {name!r} is not a data source{did_you_mean(str(name), SOURCES)}; "
        f"the sources are: {', '.join(sorted(SOURCES))}"
    )


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
    seed: int = attrs.field(default=0)

    @seed.validator
    def _check_seed(self, attribute, value):
        if not 0 <= value < 2**63:
            raise ValueError(f"synthetic.seed is {value}; a seed is an integer in [0, 2^63)")

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

    ``source`` names a row of the table of data sources (`SOURCES`); the built-in
    ones are ``synthetic`` (the embedded default, written to the cache on first use),
    ``shards`` (webdataset tar shards of ``jpg``/``png``/``webp`` plus ``cls``, e.g.
    ImageNet written by ``varkit shards``) and ``codes`` (shards of tokenizer codes
    written by ``varkit shards --tokenize``; training then skips decoding and encoding
    altogether).
    """

    #: Which stream feeds training (a name in the table of data sources); the synthetic
    #: set needs no download.
    source: str = "synthetic"
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
    #: Not a recipe key: the fields of `GUARDED_FIELDS` whose values come from a
    #: recipe stored with a checkpoint (``varkit.recipe.from_dict(..., stored=True)``)
    #: rather than from the user; the data layer refuses to run their ``pipe:``
    #: commands or to write into their ``cache_dir``.
    untrusted: frozenset[str] = attrs.field(
        factory=frozenset, converter=frozenset, eq=False, metadata={"recipe": False}
    )

    def __attrs_post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(_unknown(self.source))
        problems = SOURCES[self.source].check(self)
        if problems:
            raise ValueError("; ".join(problems))
        if self.crop_ratio < 1.0:
            raise ValueError(
                f"data.crop_ratio is {self.crop_ratio} but must be at least 1 "
                "(1 resizes the shorter side to the resolution itself; VAR uses 1.125)"
            )
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(
                f"data.samples_per_epoch is {self.samples_per_epoch}; give a positive count or null"
            )

    @property
    def classes(self) -> int:
        """The number of classes the model should embed for this source."""
        return SOURCES[self.source].classes(self)
