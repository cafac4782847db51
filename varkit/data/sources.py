"""The built-in data sources, what a resolved source is, and how a sample of each format is read.

Each source is a row of the table in `varkit.data.config` (``register_source``);
``resolve_source`` looks the recipe's ``data.source`` up there, so the stream never
names a source. A resolved `Source` carries the shards and the
`ImageFormat` or `CodeFormat` that reads one sample of them and stacks a
batch.

Shard patterns and the cache directory of a recipe stored with a checkpoint are not
the user's word: ``resolve_source`` refuses their ``pipe:`` commands (webdataset runs
them in a shell) unless the user gives the pattern on the command line.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import torch

from varkit.base import Tokenizer
from varkit.data import transforms
from varkit.data.codes import CODE_DTYPES, CodeLayout
from varkit.data.config import DataConfig, DataSource, data_source, register_source
from varkit.data.shards import IMAGE_EXTS, ShardSet, expand, is_local, open_shards
from varkit.data.synthetic import classify, ensure_synthetic
from varkit.errors import DataError

# ------------------------------------------------------------------------- formats


@attrs.frozen(kw_only=True)
class ImageFormat:
    """Samples holding an image (``jpg``/``jpeg``/``png``/``webp``): VAR's resize and crop."""

    resolution: int
    crop_ratio: float
    hflip: bool
    yields = "images"

    def read(self, members: dict[str, bytes], draws: np.ndarray, *, train: bool, full: bool):
        """``(R, R, 3)`` uint8 pixels, None when ``full`` is False and the image is good,
        or the reason to skip the sample. ``draws``: crop x, crop y, flip."""
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            return "no image"
        try:
            img, size = transforms.open_image(
                members[ext], short_side=transforms.short_side(self.resolution, self.crop_ratio)
            )
            if not full:
                return None
            return transforms.crop(
                img,
                size,
                resolution=self.resolution,
                crop_ratio=self.crop_ratio,
                u=(draws[0], draws[1]) if train else None,
                flip=train and self.hflip and draws[2] < 0.5,
            )
        except transforms.DECODE_ERRORS:
            return "unreadable image"

    def collate(self, items: list[np.ndarray]) -> dict[str, Any]:
        # uint8 (b, R, R, 3): a quarter of the bytes a worker hands over (see Batch)
        return {"images": torch.from_numpy(np.stack(items)), "codes": None}


@attrs.frozen(kw_only=True)
class CodeFormat:
    """Samples holding tokenizer codes of one or more crops (``varkit shards --tokenize``)."""

    layout: CodeLayout
    yields = "codes"

    def read(self, members: dict[str, bytes], draws: np.ndarray, *, train: bool, full: bool):
        """One crop's codes ``(l,)``, None when ``full`` is False and they are good, or the
        reason to skip the sample. ``draws[2]`` picks the crop."""
        layout = self.layout
        data = members.get(layout.ext)
        if data is None:
            return f"no {layout.ext} codes"
        codes = np.frombuffer(data, dtype=CODE_DTYPES[layout.ext])
        crops = layout.crops or codes.size // layout.length
        if crops < 1 or codes.size != crops * layout.length:
            return "codes of the wrong size"
        if not full:
            return None
        pick = min(int(draws[2] * crops), crops - 1) if train else 0
        return codes[pick * layout.length : (pick + 1) * layout.length]

    def collate(self, items: list[np.ndarray]) -> dict[str, Any]:
        return {"images": None, "codes": torch.from_numpy(np.stack(items).astype(np.int64))}  # (b, l)


@attrs.frozen(kw_only=True)
class Source:
    """What a stream reads: shard urls and the format of their samples."""

    shards: ShardSet
    #: The recipe field the pattern came from (named in errors).
    field: str
    format: ImageFormat | CodeFormat

    @property
    def kind(self) -> str:
        """``images`` or ``codes``."""
        return self.format.yields

    @property
    def layout(self) -> CodeLayout | None:
        """The code layout of code shards, None for images."""
        return getattr(self.format, "layout", None)


# -------------------------------------------------------------------------- lookup


def resolve_source(config: DataConfig, *, split: str = "train", tokenizer: Tokenizer | None = None) -> Source:
    """The shards a stream reads for ``config.source`` (``split``: ``train`` or ``val``).

    Raises:
        DataError: the pattern names no shards, they hold the wrong kind of data, or a
            stored recipe's pattern is a ``pipe:`` command.
    """
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    return data_source(config.source).resolve(config, split, tokenizer)


def check_patterns(config: DataConfig) -> list[str]:
    """What is wrong with the shard patterns of ``config``'s source, reading no sample.

    Local shards must exist and hold the kind of data their field wants; ``pipe:`` and
    remote urls are not run or fetched (a stored recipe's ``pipe:`` is refused).
    ``varkit validate`` reports these.
    """
    problems = []
    for name, want in data_source(config.source).patterns.items():
        pattern = getattr(config, name)
        if not pattern:
            continue
        try:
            urls = expand(pattern)
            if urls and not all(is_local(u) for u in urls):
                check_command(config, name)
                continue
            _open(config, name, want, count=False)
        except DataError as exc:
            problems.append(str(exc))
        except ValueError as exc:  # a malformed brace pattern
            problems.append(f"data.{name} {pattern!r} is not a shard pattern: {exc}")
    return problems


def check_command(config: DataConfig, name: str) -> None:
    """Refuse the ``pipe:`` urls of ``data.<name>`` when a stored recipe set it.

    A checkpoint directory from someone else must not run a shell command on this
    machine; a pattern the user gives on the command line is the user's choice.
    """
    pattern = getattr(config, name)
    if name not in config.untrusted or not pattern:
        return
    piped = [url for url in expand(pattern) if url.startswith("pipe:")]
    if piped:
        raise DataError(
            f"data.{name} of the recipe stored with this checkpoint is a shell command "
            f"({piped[0]!r}); varkit runs `pipe:` patterns only when you give them yourself. "
            f"Check the command, then pass it on the command line (e.g. `varkit eval RUN "
            f"'data.{name}=...'`), or give a pattern of local shards the same way"
        )


def _images(config: DataConfig) -> ImageFormat:
    return ImageFormat(resolution=config.resolution, crop_ratio=config.crop_ratio, hflip=config.hflip)


def _open(config: DataConfig, name: str, want: str, *, count: bool = True) -> ShardSet:
    """The shards of ``data.<name>``, refused when they hold another kind than ``want``."""
    check_command(config, name)
    pattern = getattr(config, name)
    field = f"data.{name}"
    shards = open_shards(pattern, field=field, count=count)
    if shards.meta and shards.kind != want:
        hint = (
            "point data.codes at shards written by `varkit shards --tokenize`"
            if want == "codes"
            else "these are code shards: set data.source: codes and data.codes to this pattern"
        )
        raise DataError(f"{field} {pattern!r} holds {shards.kind}, not {want}; {hint}")
    return shards


def _val_images(config: DataConfig) -> Source:
    if not config.val_shards:
        raise DataError(
            "data.val_shards is not set; evaluation needs image shards, e.g. written by "
            "`varkit shards /data/imagenet/val OUT --prefix val`"
        )
    return Source(
        shards=_open(config, "val_shards", "images"), field="data.val_shards", format=_images(config)
    )


# ----------------------------------------------------------------- built-in sources


def _resolve_synthetic(config: DataConfig, split: str, tokenizer) -> Source:
    patterns = ensure_synthetic(config)
    shards = open_shards(patterns[split], field="data.synthetic")
    return Source(shards=shards, field="data.synthetic", format=_images(config))


def _check_synthetic(config: DataConfig) -> list[str]:
    if config.synthetic.num_classes > config.num_classes:
        return [
            f"data.synthetic.num_classes ({config.synthetic.num_classes}) exceeds "
            f"data.num_classes ({config.num_classes}); raise data.num_classes"
        ]
    return []


SYNTHETIC = register_source(
    DataSource(
        name="synthetic",
        summary="coloured shapes generated into the cache on first use (needs nothing)",
        yields="images",
        resolve=_resolve_synthetic,
        check=_check_synthetic,
        classes=lambda config: config.synthetic.num_classes,
        classifiers={"class": classify, "colour": lambda images: classify(images, use_shape=False)},
    )
)


def _resolve_shards(config: DataConfig, split: str, tokenizer) -> Source:
    if split == "val":
        return _val_images(config)
    shards = _open(config, "train_shards", "images")
    return Source(shards=shards, field="data.train_shards", format=_images(config))


SHARDS = register_source(
    DataSource(
        name="shards",
        summary="image shards (jpg/png/webp + cls), e.g. ImageNet written by `varkit shards`",
        yields="images",
        resolve=_resolve_shards,
        patterns={"train_shards": "images", "val_shards": "images"},
        check=lambda config: (
            []
            if config.train_shards
            else [
                "data.train_shards is not set but data.source is 'shards'; give a shard pattern such as "
                "'/data/imagenet-shards/train-{000000..000547}.tar' (write shards from an image folder "
                "with `varkit shards SRC OUT`, which prints the pattern)"
            ]
        ),
    )
)


def _resolve_codes(config: DataConfig, split: str, tokenizer) -> Source:
    if split == "val":
        return _val_images(config)
    shards = _open(config, "codes", "codes")
    return Source(
        shards=shards, field="data.codes", format=CodeFormat(layout=_code_layout(shards, tokenizer))
    )


def _code_layout(shards: ShardSet, tokenizer) -> CodeLayout:
    field = "data.codes"
    if shards.meta.get("kind") == "codes":
        layout = CodeLayout.from_meta(shards.meta)
        if tokenizer is not None and (
            tuple(map(tuple, tokenizer.schedule)) != layout.schedule
            or tokenizer.vocab_size != layout.vocab_size
        ):
            raise DataError(
                f"{field}: the code shards hold codes of schedule {layout.schedule} and vocabulary "
                f"{layout.vocab_size}, but the tokenizer has {tuple(tokenizer.schedule)} and "
                f"{tokenizer.vocab_size}; write them again with this tokenizer (`varkit shards --tokenize`)"
            )
        return layout
    if tokenizer is None:
        raise DataError(
            f"{field} {shards.pattern!r} has no shards.json saying how its codes are laid out; keep the "
            "index that `varkit shards --tokenize` wrote beside the shards, or pass the tokenizer"
        )
    # crops are read off the first sample's size when there is no index
    return CodeLayout(schedule=tokenizer.schedule, vocab_size=tokenizer.vocab_size, crops=0)


CODES = register_source(
    DataSource(
        name="codes",
        summary="tokenizer codes written by `varkit shards --tokenize` (no decoding, no encoding)",
        yields="codes",
        resolve=_resolve_codes,
        patterns={"codes": "codes", "val_shards": "images"},
        check=lambda config: (
            []
            if config.codes
            else [
                "data.codes is not set but data.source is 'codes'; give the code-shard "
                "pattern printed by `varkit shards --tokenize RUN SRC OUT`"
            ]
        ),
    )
)
