"""Image folders (one subfolder per class, ImageNet's layout) and writing them as shards.

The class index of a folder is its position among the class folder names sorted as
strings, so ImageNet's synset folders (``n01440764`` ...) get the usual indices 0-999.
The mapping is written beside the shards as ``classes.json`` (``{name: index}``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
from collections.abc import Iterable
from multiprocessing import get_context
from pathlib import Path

import attrs
from PIL import Image
from tqdm import tqdm

from varkit.data import transforms
from varkit.data.shards import ShardSink, write_json_atomic
from varkit.errors import DataError

log = logging.getLogger(__name__)

#: File name of the class mapping written beside the shards.
CLASSES_NAME = "classes.json"
#: Suffixes read as images; formats other than JPEG, PNG and WebP are stored as PNG.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
#: Formats stored as they are (their bytes are copied, never re-encoded).
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@attrs.frozen(kw_only=True)
class ImageFolder:
    """The images of a folder tree and their classes."""

    root: Path
    #: Class folder names, sorted; the index of a name is its class.
    classes: tuple[str, ...]
    #: ``(path, class index)`` of every image, classes in order, files sorted.
    files: tuple[tuple[Path, int], ...]

    @property
    def mapping(self) -> dict[str, int]:
        """``{class folder name: class index}``."""
        return {name: i for i, name in enumerate(self.classes)}


def scan_image_folder(src: str | os.PathLike) -> ImageFolder:
    """List the class folders of ``src`` and the images inside each (recursively).

    Raises:
        DataError: ``src`` is not a directory, has no class folders, or no images.
    """
    root = Path(src)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise DataError(
            f"image folder {root} {what}; give a directory with one subfolder per class "
            "(e.g. ImageNet's train/ with its n01440764/ ... folders)"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"image folder {root} has no class subfolders; put each class's images in a folder "
            "named after the class (the class index is the folder's position in sorted order)"
        )
    files = []
    for index, name in enumerate(classes):
        found = sorted(
            p
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
        )
        files.extend((p, index) for p in found)
    if not files:
        raise DataError(
            f"image folder {root} has {len(classes)} class folders but no images "
            f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return ImageFolder(root=root, classes=tuple(classes), files=tuple(files))


def read_image_file(path: Path) -> tuple[str, bytes] | str:
    """Check that an image file decodes; returns ``(ext, bytes to store)`` or why not.

    JPEG, PNG and WebP bytes are kept as they are; other formats are re-encoded as PNG.
    A JPEG is decoded at 1/8 scale: libjpeg still reads all of it, so truncation shows,
    at a fraction of the cost.
    """
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            if fmt == "JPEG":
                img.draft("RGB", (max(img.width // 8, 1), max(img.height // 8, 1)))
            img.load()
            if fmt in KEPT_FORMATS:
                return KEPT_FORMATS[fmt], data
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="PNG")
            return "png", buf.getvalue()
    except transforms.DECODE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"


@attrs.define
class FolderSummary:
    """What :func:`write_image_folder` wrote."""

    #: Brace pattern of the shards (what a recipe puts in ``data.train_shards``).
    pattern: str
    images: int
    classes: int
    shards: int
    bytes: int
    #: ``(path, reason)`` of every file that was left out.
    skipped: list[tuple[str, str]]


def _key(path: Path, folder: ImageFolder, used: set[str]) -> str:
    # webdataset keys end at the first dot of the file name, so dots become '_'
    rel = path.relative_to(folder.root).with_suffix("")
    key = re.sub(r"[^A-Za-z0-9_/-]", "_", rel.as_posix())
    unique, n = key, 1
    while unique in used:
        unique, n = f"{key}_{n}", n + 1
    used.add(unique)
    return unique


def write_image_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    prefix: str = "train",
    shard_bytes: int = 256 << 20,
    shuffle: bool = True,
    seed: int = 0,
    workers: int = 0,
    progress: bool = True,
) -> FolderSummary:
    """Write the images of an image folder as webdataset shards, plus ``classes.json``.

    Each sample holds the image bytes (``jpg``/``png``/``webp``) and its class
    (``cls``, the index as decimal text). Unreadable files are left out, listed in the
    summary and logged.

    Args:
        src: folder with one subfolder per class.
        out: output directory (created); shards are ``{prefix}-000000.tar`` ...
        prefix: shard name prefix, e.g. ``train`` or ``val``.
        shard_bytes: target size of one shard.
        shuffle: write the images in a seeded random order, so that each shard mixes
            classes (a class-sorted shard would make batches of one class).
        seed: seed of that order.
        workers: processes that read and check the images (0: this process).
        progress: show a tqdm progress bar.
    """
    folder = scan_image_folder(src)
    files = list(folder.files)
    if shuffle:
        random.Random(seed).shuffle(files)
    out = Path(out)
    sink = ShardSink(out, prefix=prefix, max_bytes=shard_bytes)
    skipped: list[tuple[str, str]] = []
    used: set[str] = set()
    bar = tqdm(total=len(files), unit="img", desc=f"shards {prefix}", disable=not progress)
    with _mapper(workers) as imap:
        for (path, label), result in zip(files, imap(read_image_file, (p for p, _ in files))):
            bar.update()
            if isinstance(result, str):
                log.warning("skipping %s: %s", path, result)
                skipped.append((str(path), result))
                continue
            ext, data = result
            sink.write(_key(path, folder, used), {ext: data, "cls": str(label).encode()})
    bar.close()
    if not sink.counts:
        raise DataError(
            f"no image of {folder.root} could be read ({len(skipped)} files tried); see the warnings"
        )
    written = sink.close({"kind": "images", "classes": len(folder.classes), "source": str(folder.root)})
    write_json_atomic(out / CLASSES_NAME, folder.mapping)
    return FolderSummary(
        pattern=written.pattern,
        images=written.samples,
        classes=len(folder.classes),
        shards=written.shards,
        bytes=written.bytes,
        skipped=skipped,
    )


class _mapper:
    """An ordered ``imap`` in this process or a pool of ``workers`` processes."""

    def __init__(self, workers: int):
        self.pool = get_context("spawn").Pool(workers) if workers > 0 else None

    def __enter__(self):
        if self.pool is None:
            return map
        return lambda fn, items: self.pool.imap(fn, items, chunksize=16)

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()


def read_classes(directory: str | os.PathLike) -> dict[str, int] | None:
    """The ``classes.json`` beside shards, or None when there is none."""
    path = Path(directory) / CLASSES_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def iter_folder(folder: ImageFolder) -> Iterable[tuple[str, bytes, int]]:
    """``(key, bytes, class)`` of every file of a folder, in its order, keyed as the shards
    that :func:`write_image_folder` writes (unique, webdataset-safe)."""
    used: set[str] = set()
    for path, label in folder.files:
        yield _key(path, folder, used), path.read_bytes(), label
