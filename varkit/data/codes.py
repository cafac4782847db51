"""Code shards: each image's tokenizer codes, stored so AR training reads a few KB per image.

A sample holds ``cls`` and one member with the codes of ``crops`` augmented crops,
``(crops, l)`` little-endian integers (``u16`` when the vocabulary fits in 16 bits,
``i32`` otherwise; the member's extension says which), where ``l`` is the sum of
``h_k · w_k`` over the tokenizer's schedule and each crop's code maps are flattened
coarse to fine, row-major. The schedule, the vocabulary and the crops are recorded in
``shards.json`` (``sets.<prefix>``), so the reader needs no tokenizer.

Crops follow LlamaGen's ten crops: the centre, the four corners, then the same five
mirrored; training draws one crop per sample and epoch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import numpy as np
import torch
from tqdm import tqdm

from varkit.data import transforms
from varkit.data.folder import CLASSES_NAME, iter_folder, read_classes, scan_image_folder
from varkit.data.shards import (
    IMAGE_EXTS,
    ShardSink,
    iter_samples,
    open_shards,
    parse_label,
    write_json_atomic,
)
from varkit.errors import DataError

log = logging.getLogger(__name__)

#: Member extension -> numpy dtype of stored codes.
CODE_DTYPES = {"u16": np.dtype("<u2"), "i32": np.dtype("<i4")}
#: Most crops per image: the centre, four corners and their mirror images.
MAX_CROPS = 10


def code_ext(vocab_size: int) -> str:
    """Member extension for codes of a vocabulary: ``u16`` up to 65536 codes, else ``i32``."""
    return "u16" if vocab_size <= 1 << 16 else "i32"


@attrs.frozen(kw_only=True)
class CodeLayout:
    """How codes are laid out in a code shard set."""

    #: ``(h_k, w_k)`` of each code map, coarse to fine.
    schedule: tuple[tuple[int, int], ...] = attrs.field(
        converter=lambda s: tuple(tuple(map(int, x)) for x in s)
    )
    vocab_size: int
    #: Crops stored per image.
    crops: int = 1
    #: Codes per crop ``l``: the sum of ``h_k · w_k`` (derived; read once per sample).
    length: int = attrs.field(init=False)

    @length.default
    def _length(self) -> int:
        return sum(h * w for h, w in self.schedule)

    @property
    def ext(self) -> str:
        return code_ext(self.vocab_size)

    def meta(self, **extra) -> dict:
        """The ``shards.json`` entry of a code shard set."""
        return {
            "kind": "codes",
            "schedule": [list(hw) for hw in self.schedule],
            "vocab_size": self.vocab_size,
            "crops": self.crops,
            "dtype": str(CODE_DTYPES[self.ext]),
            "ext": self.ext,
            **extra,
        }

    @classmethod
    def from_meta(cls, meta) -> CodeLayout:
        try:
            return cls(
                schedule=meta["schedule"], vocab_size=int(meta["vocab_size"]), crops=int(meta.get("crops", 1))
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"code shard index entry {dict(meta)} lacks the code layout ({exc})") from exc


def split_codes(flat: torch.Tensor, schedule: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Codes ``(b, l)`` flattened coarse to fine -> code maps ``[(b, h_k, w_k)]``."""
    sizes = [h * w for h, w in schedule]
    return [part.view(flat.shape[0], h, w) for part, (h, w) in zip(flat.split(sizes, dim=1), schedule)]


def flatten_codes(codes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Code maps ``[(b, h_k, w_k)]`` -> ``(b, l)``, coarse to fine, row-major."""
    return torch.cat([c.reshape(c.shape[0], -1) for c in codes], dim=1)


def crop_params(n: int) -> list[tuple[tuple[float, float] | None, bool]]:
    """``(u, flip)`` of the first ``n`` of the ten crops (``u`` None: centre)."""
    if not 1 <= n <= MAX_CROPS:
        raise DataError(f"--crops is {n}; give 1 to {MAX_CROPS} (centre, 4 corners, and their mirror images)")
    last = np.nextafter(1.0, 0.0)  # the largest uniform < 1: the far edge
    places = [None, (0.0, 0.0), (last, 0.0), (0.0, last), (last, last)]
    return [(places[i % 5], i >= 5) for i in range(n)]


def _image_source(src: str) -> tuple[Iterator[tuple[str, bytes | None, int | str]], int | None, dict | None]:
    """Samples ``(key, image bytes or None, class or why not)`` of an image folder or shard pattern."""
    path = Path(src)
    if path.is_dir():
        folder = scan_image_folder(path)
        return iter_folder(folder), len(folder.files), folder.mapping
    shards = open_shards(src, field="SRC")
    first = shards.urls[0]
    mapping = read_classes(Path(first).parent) if os.path.isfile(first) else None

    def from_shards():
        for url in shards.urls:
            for key, members in iter_samples(url):
                image = next((members[e] for e in IMAGE_EXTS if e in members), None)
                yield key, image, parse_label(members.get("cls"))

    return from_shards(), shards.total, mapping


@attrs.define
class CodeSummary:
    """What `write_code_shards` wrote."""

    pattern: str
    images: int
    shards: int
    bytes: int
    crops: int
    skipped: list[tuple[str, str]]


@torch.no_grad()
def write_code_shards(
    tokenizer,
    src: str,
    out: str | os.PathLike,
    *,
    crops: int = 1,
    resolution: int,
    crop_ratio: float = 1.125,
    prefix: str = "train",
    batch_size: int = 64,
    shard_bytes: int = 256 << 20,
    device: str | torch.device = "cpu",
    progress: bool = True,
    source_name: str | None = None,
) -> CodeSummary:
    """Encode every image of ``src`` (an image folder or a shard pattern) into code shards.

    Each image gives ``crops`` crops (see `crop_params`), resized and cropped as
    in training (VAR's augmentation), encoded by ``tokenizer.encode`` in batches.

    Args:
        tokenizer: any `varkit.base.Tokenizer` (only ``encode``, ``schedule``
            and ``vocab_size`` are used).
        src: image folder (class per subfolder) or image shard pattern.
        out: output directory.
        crops: crops per image, 1 to 10.
        resolution: crop side in pixels (the tokenizer's image size).
        crop_ratio: shorter side resized to ``crop_ratio × resolution`` first.
        prefix: shard name prefix.
        batch_size: images per ``encode`` call (``batch_size × crops`` crops).
        shard_bytes: target shard size.
        device: where the tokenizer runs.
        progress: show a tqdm bar.
        source_name: what to record as the tokenizer's origin in ``shards.json``.
    """
    params = crop_params(crops)
    layout = CodeLayout(schedule=tokenizer.schedule, vocab_size=tokenizer.vocab_size, crops=crops)
    samples, total, mapping = _image_source(src)
    sink = ShardSink(out, prefix=prefix, max_bytes=shard_bytes)
    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=total, unit="img", desc="codes", disable=not progress)
    pending: list[tuple[str, int, np.ndarray]] = []

    def flush():
        if not pending:
            return
        pixels = np.stack([c for _, _, crops_ in pending for c in crops_])  # (b·crops, R, R, 3)
        images = transforms.to_model_range(torch.from_numpy(pixels).to(device))
        flat = flatten_codes(tokenizer.encode(images)).cpu()  # (b·crops, l)
        if flat.shape[1] != layout.length:
            raise DataError(
                f"the tokenizer's codes hold {flat.shape[1]} positions per image but its schedule "
                f"{layout.schedule} says {layout.length}"
            )
        flat = flat.numpy().astype(CODE_DTYPES[layout.ext]).reshape(len(pending), crops, layout.length)
        for (key, label, _), codes in zip(pending, flat):
            sink.write(key, {layout.ext: codes.tobytes(), "cls": str(label).encode()})
        pending.clear()

    for key, data, label in samples:
        bar.update()
        why = None
        if data is None:
            why = "no image member"
        elif isinstance(label, str):
            why = label
        else:
            try:
                img, size = transforms.open_image(
                    data, short_side=transforms.short_side(resolution, crop_ratio)
                )
                crops_ = np.stack(
                    [
                        transforms.crop(img, size, resolution=resolution, crop_ratio=crop_ratio, u=u, flip=f)
                        for u, f in params
                    ]
                )
            except transforms.DECODE_ERRORS as exc:
                why = f"unreadable image ({type(exc).__name__}: {exc})"
        if why is not None:
            log.warning("skipping %s: %s", key, why)
            skipped.append((key, why))
            continue
        pending.append((key, label, crops_))
        if len(pending) >= batch_size:
            flush()
    flush()
    bar.close()
    if not sink.counts:
        raise DataError(f"no image of {src} could be encoded; see the warnings")
    written = sink.close(
        layout.meta(resolution=resolution, crop_ratio=crop_ratio, tokenizer=source_name or "")
    )
    if mapping is not None:
        write_json_atomic(Path(out) / CLASSES_NAME, mapping)
    return CodeSummary(
        pattern=written.pattern,
        images=written.samples,
        shards=written.shards,
        bytes=written.bytes,
        crops=crops,
        skipped=skipped,
    )
