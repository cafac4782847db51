"""Image folders (one subfolder per class, ImageNet's layout, or a flat folder with a
labels file, ImageNet's validation layout) and writing them as shards.

The class index of a folder is its position among the class folder names sorted as
strings, so ImageNet's synset folders (``n01440764`` ...) get the usual indices 0-999.
The mapping is written beside the shards as ``classes.json`` (``{name: index}``); a
later call for another split reuses it with ``class_map`` so that both splits give
every class the same index, whichever classes each holds.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
from collections.abc import Iterable, Mapping
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
    #: ``{class name: class index}`` of every class the indices are drawn from (the
    #: folder's own classes, or a given map that may hold more).
    mapping: Mapping[str, int]
    #: ``(path, class index)`` of every image, classes in order, files sorted.
    files: tuple[tuple[Path, int], ...]

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names of the mapping, in index order."""
        return tuple(sorted(self.mapping, key=self.mapping.__getitem__))


def _images_in(directory: Path, *, recursive: bool) -> list[Path]:
    found = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(
        p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def _check_map(
    names: Iterable[str], class_map: Mapping[str, int] | None, root: Path, what: str
) -> dict[str, int]:
    """The mapping to use: ``class_map`` (which must hold every name) or the names sorted."""
    names = sorted(set(names))
    if class_map is None:
        return {name: i for i, name in enumerate(names)}
    unknown = [n for n in names if n not in class_map]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 5 else "")
        raise DataError(
            f"{root}: {what} {shown} not in the class map ({len(class_map)} classes); the class map must be "
            "the one of the training set (its classes.json), and this folder must hold the same classes "
            "or a subset of them"
        )
    return dict(class_map)


def read_labels(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """A labels file of a flat image folder: ``(classes in order, {image stem: class})``.

    Two layouts are read:

    - one line per image, ``IMAGE CLASS`` separated by a comma or spaces, extra fields
      ignored; the image is named with or without its extension, and a first line whose
      second field is not a class (``ImageId,PredictionString``) is a header. Kaggle's
      ImageNet ``LOC_val_solution.csv`` is such a file (the first word of its second
      field is the synset).
    - one class per line, for the images in sorted order (TensorFlow's
      ``imagenet_2012_validation_synset_labels.txt``); the second dict is then empty.

    Raises:
        DataError: the file is missing, empty or of neither layout.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file {path} does not exist")
    rows = [re.split(r"[,\s]+", line.strip()) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise DataError(f"labels file {path} is empty")
    if all(len(r) == 1 for r in rows):
        return [r[0] for r in rows], {}
    if any(len(r) < 2 for r in rows):
        bad = next(i for i, r in enumerate(rows) if len(r) < 2)
        raise DataError(
            f"labels file {path}: line {bad + 1} has no class; give `IMAGE CLASS` on every line, or one "
            "class per line for the images in sorted order"
        )
    if rows[0][0].lower() in ("imageid", "image", "file", "filename", "name", "path"):
        rows = rows[1:]
    by_stem = {Path(r[0]).name.split(".")[0]: r[1] for r in rows}
    return [], by_stem


def scan_image_folder(
    src: str | os.PathLike,
    *,
    class_map: Mapping[str, int] | None = None,
    labels: str | os.PathLike | None = None,
) -> ImageFolder:
    """List the images of ``src`` and their classes.

    Args:
        src: a folder with one subfolder per class (searched recursively), or, with
            ``labels``, a flat folder of images.
        class_map: ``{class name: index}`` to use instead of the sorted class names
            (e.g. the training set's ``classes.json`` for its validation set).
        labels: a labels file naming each image's class (see `read_labels`).

    Raises:
        DataError: ``src`` is not a directory, has no classes or no images, an image has
            no label, or a class is not in ``class_map``.
    """
    root = Path(src)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise DataError(
            f"image folder {root} {what}; give a directory with one subfolder per class "
            "(e.g. ImageNet's train/ with its n01440764/ ... folders)"
        )
    if labels is not None:
        return _scan_flat(root, labels, class_map)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"image folder {root} has no class subfolders; put each class's images in a folder "
            "named after the class (the class index is the folder's position in sorted order), or "
            "give a labels file for a flat folder (--labels)"
        )
    mapping = _check_map(classes, class_map, root, "class folders")
    files = []
    for name in classes:
        files.extend((p, mapping[name]) for p in _images_in(root / name, recursive=True))
    if not files:
        raise DataError(
            f"image folder {root} has {len(classes)} class folders but no images "
            f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return ImageFolder(root=root, mapping=mapping, files=tuple(sorted(files, key=lambda f: (f[1], f[0]))))


def _scan_flat(root: Path, labels: str | os.PathLike, class_map: Mapping[str, int] | None) -> ImageFolder:
    images = _images_in(root, recursive=False)
    if not images:
        raise DataError(
            f"image folder {root} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    in_order, by_stem = read_labels(labels)
    if in_order:
        if len(in_order) != len(images):
            raise DataError(
                f"labels file {labels} lists {len(in_order)} classes, one per image in sorted order, but "
                f"{root} holds {len(images)} images"
            )
        named = list(zip(images, in_order))
    else:
        missing = [p.name for p in images if p.name.split(".")[0] not in by_stem]
        if missing:
            raise DataError(
                f"labels file {labels} has no class for {len(missing)} of the {len(images)} images of "
                f"{root} (first: {missing[0]}); give a labels file of this folder"
            )
        named = [(p, by_stem[p.name.split(".")[0]]) for p in images]
    mapping = _check_map((c for _, c in named), class_map, root, "classes")
    files = sorted(((p, mapping[c]) for p, c in named), key=lambda f: (f[1], f[0]))
    return ImageFolder(root=root, mapping=mapping, files=tuple(files))


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
    """What `write_image_folder` wrote."""

    #: Brace pattern of the shards (what a recipe puts in ``data.train_shards``).
    pattern: str
    images: int
    #: Classes of the images written.
    classes: int
    shards: int
    bytes: int
    #: ``(path, reason)`` of every file that was left out.
    skipped: list[tuple[str, str]]
    #: Classes of the mapping (``classes.json``): what ``data.num_classes`` should be.
    mapped: int = 0


def _key(path: Path, folder: ImageFolder, used: set[str]) -> str:
    # webdataset keys end at the first dot of the file name, so dots become '_'
    rel = path.relative_to(folder.root).with_suffix("")
    key = re.sub(r"[^A-Za-z0-9_/-]", "_", rel.as_posix())
    unique, n = key, 1
    while unique in used:
        unique, n = f"{key}_{n}", n + 1
    used.add(unique)
    return unique


def check_output(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Refuse an output folder that is a file or lies inside the image folder.

    Inside ``src``, a second run would take the output folder for a class folder and
    shift every label after it.
    """
    out, root = Path(out), Path(src)
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file; give a directory for the shards (it is created)")
    if root.is_dir() and out.resolve().is_relative_to(root.resolve()):
        raise DataError(
            f"output {out} is inside the image folder {root}: a later run would read it as a class "
            "folder and shift every label after it. Write the shards outside the image folder"
        )
    return out


def load_class_map(path: str | os.PathLike) -> dict[str, int]:
    """A ``classes.json`` (``{name: index}``) to reuse, checked.

    Raises:
        DataError: the file is missing, not JSON, or not a map of names to distinct
            non-negative indices.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"class map {path} does not exist; give the classes.json written beside the training shards"
        )
    try:
        mapping = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"class map {path} is not JSON ({exc})") from None
    ok = isinstance(mapping, dict) and all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in mapping.items()
    )
    if not ok or len(set(mapping.values())) != len(mapping):
        raise DataError(
            f"class map {path} must map class names to distinct non-negative indices, like classes.json"
        )
    return mapping


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
    class_map: Mapping[str, int] | None = None,
    labels: str | os.PathLike | None = None,
) -> FolderSummary:
    """Write the images of an image folder as webdataset shards, plus ``classes.json``.

    Each sample holds the image bytes (``jpg``/``png``/``webp``) and its class
    (``cls``, the index as decimal text). Unreadable files are left out, listed in the
    summary and logged.

    Args:
        src: folder with one subfolder per class, or (with ``labels``) a flat folder.
        out: output directory (created); shards are ``{prefix}-000000.tar`` ...
        prefix: shard name prefix, e.g. ``train`` or ``val``.
        shard_bytes: target size of one shard.
        shuffle: write the images in a seeded random order, so that each shard mixes
            classes (a class-sorted shard would make batches of one class).
        seed: seed of that order.
        workers: processes that read and check the images (0: this process).
        progress: show a tqdm progress bar.
        class_map: ``{class name: index}`` to use, e.g. the training shards'
            ``classes.json`` when writing the validation set (every class of ``src``
            must be in it).
        labels: a labels file giving each image's class (see `read_labels`).

    Raises:
        DataError: ``out`` is a file or inside ``src``; ``out`` already holds a
            ``classes.json`` of another mapping (so indices would disagree between
            splits: pass it as ``class_map``); nothing readable.
    """
    out = check_output(src, out)
    folder = scan_image_folder(src, class_map=class_map, labels=labels)
    existing = read_classes(out) if (out / CLASSES_NAME).is_file() else None
    if existing is not None and existing != dict(folder.mapping):
        raise DataError(
            f"{out / CLASSES_NAME} already maps {len(existing)} classes, and {src} would get another mapping "
            f"({len(folder.mapping)} classes): the two splits would disagree on class indices. To give "
            f"{src} the same indices, pass --class-map {out / CLASSES_NAME}; to start afresh, write into "
            "another folder"
        )
    files = list(folder.files)
    if shuffle:
        random.Random(seed).shuffle(files)
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
    num_classes = max(folder.mapping.values()) + 1
    written = sink.close({"kind": "images", "classes": num_classes, "source": str(folder.root)})
    write_json_atomic(out / CLASSES_NAME, dict(folder.mapping))
    return FolderSummary(
        pattern=written.pattern,
        images=written.samples,
        classes=len({label for _, label in folder.files}),
        shards=written.shards,
        bytes=written.bytes,
        skipped=skipped,
        mapped=num_classes,
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
    that `write_image_folder` writes (unique, webdataset-safe)."""
    used: set[str] = set()
    for path, label in folder.files:
        yield _key(path, folder, used), path.read_bytes(), label
