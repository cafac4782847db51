"""Sets of images to score: a ``samples.npz``, a folder of images, webdataset shards, or
the batches of a data loader. Each is read in uint8 batches ``(b, H, W, 3)``, never
whole, and hashed as it is read, so a report can name exactly which pixels it scored.

An ``.npz`` in ADM's layout (``arr_0``: uint8 ``(N, H, W, 3)``) may also carry FID
statistics (``mu``/``sigma``, and ``mu_s``/``sigma_s`` for sFID, as ADM's reference
batches such as ``VIRTUAL_imagenet256_labeled.npz`` do): these are used as they are.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from varkit.data.shards import IMAGE_EXTS, expand, iter_samples, open_shards
from varkit.data.transforms import DECODE_ERRORS
from varkit.errors import DataError, EvaluationError

log = logging.getLogger(__name__)

#: Statistics an ADM reference batch may carry, by name.
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
#: File suffixes of a folder of images.
FOLDER_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's reference-batch crop: halve with a box filter while the shorter side is at
    least ``2 · size``, resize bicubically so that it is ``size``, take the centre square.

    Returns:
        ``(size, size, 3)`` uint8.
    """
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


class ImageSet:
    """Images to score, read in batches.

    Attributes:
        kind: ``npz``, ``folder``, ``shards`` or ``loader``.
        path: what the user named (a path or a pattern) or a description.
        count: images the set will yield (None when unknown before reading).
        resolution: ``(H, W)`` of every image (None for statistics without images).
        stats: FID statistics the set provides (``mu``, ``sigma``, ``mu_s``, ``sigma_s``).
    """

    kind = "images"

    def __init__(self, path: str, *, limit: int | None = None, center_crop: int | None = None):
        self.path = path
        self.limit = limit
        self.center_crop = center_crop
        self.count: int | None = None
        self.resolution: tuple[int, int] | None = None
        self.stats: dict[str, np.ndarray] = {}
        self.skipped = 0
        self._digest = hashlib.sha256()
        self._read = 0

    def _batches(self, batch_size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 batches ``(b, H, W, 3)`` of at most ``batch_size`` images, in order.

        Raises:
            EvaluationError: an image's size differs from the set's.
        """
        self._digest, self._read = hashlib.sha256(), 0
        for batch in self._batches(batch_size):
            if self.limit is not None:
                batch = batch[: self.limit - self._read]
            if len(batch) == 0:
                break
            if self.resolution is not None and tuple(batch.shape[1:3]) != self.resolution:
                raise EvaluationError(
                    f"{self.path}: image {self._read} is {batch.shape[2]}×{batch.shape[1]} but the set's "
                    f"images are {self.resolution[1]}×{self.resolution[0]}; every image must have one size"
                )
            self._digest.update(np.ascontiguousarray(batch).data)
            self._read += len(batch)
            yield batch
            if self.limit is not None and self._read >= self.limit:
                break
        if self._read == 0 and not self.stats:
            raise EvaluationError(f"{self.path} yielded no images")

    @property
    def images_read(self) -> int:
        return self._read

    def describe(self) -> dict[str, Any]:
        """Where the images came from, how many and which (after `batches` ran)."""
        out: dict[str, Any] = {"path": self.path, "kind": self.kind, "images": self._read}
        if self.resolution is not None:
            out["resolution"] = list(self.resolution)
        if self._read:
            out["pixels_sha256"] = self._digest.hexdigest()
        if self.limit is not None:
            out["limit"] = self.limit
        if self.center_crop is not None:
            out["center_crop"] = f"ADM's: box halving, bicubic to {self.center_crop}, centre square"
        if self.skipped:
            out["skipped_unreadable"] = self.skipped
        if self.stats:
            digest = hashlib.sha256()
            for key in sorted(self.stats):
                digest.update(key.encode())
                digest.update(np.ascontiguousarray(self.stats[key]).data)
            out["statistics"] = sorted(self.stats)
            out["statistics_sha256"] = digest.hexdigest()
        return out

    def _decode(self, data: bytes | Path, name: str) -> np.ndarray | None:
        """One image as uint8 ``(H, W, 3)`` (ADM-cropped when asked); None when unreadable."""
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
                if self.center_crop is not None:
                    return adm_center_crop(image, self.center_crop)
                return np.asarray(image.convert("RGB"))
        except DECODE_ERRORS as exc:
            log.warning("%s: skipping %s, which cannot be decoded (%s)", self.path, name, exc)
            self.skipped += 1
            return None

    def _stack(self, images: Iterable[np.ndarray | None], batch_size: int) -> Iterator[np.ndarray]:
        batch: list[np.ndarray] = []
        for img in images:
            if img is None:
                continue
            if self.resolution is None:
                self.resolution = img.shape[:2]
            if img.shape[:2] != self.resolution:
                raise EvaluationError(
                    f"{self.path}: image {self._read + len(batch)} is {img.shape[1]}×{img.shape[0]} but the "
                    f"set's images are {self.resolution[1]}×{self.resolution[0]}; every image must have one "
                    "size (for a reference of real images, --center-crop brings them to the samples' size)"
                )
            batch.append(img)
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)


class NpzSet(ImageSet):
    """An ``.npz`` with ``arr_0`` (uint8 ``(N, H, W, 3)``), read member-wise without loading it whole."""

    kind = "npz"

    def __init__(self, path: str, **kwargs):
        super().__init__(path, **kwargs)
        file = Path(path)
        if not file.is_file():
            raise EvaluationError(f"{path} does not exist")
        try:
            with zipfile.ZipFile(file) as zf:
                names = set(zf.namelist())
                if "arr_0.npy" in names:
                    with zf.open("arr_0.npy") as f:
                        shape, dtype = _npy_header(f, path)
                    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
                        raise EvaluationError(
                            f"{path}: arr_0 is {dtype} {shape}; expected uint8 images (N, H, W, 3) as "
                            "`varkit sample` and ADM's evaluator write them"
                        )
                    self.count = shape[0]
                    self.resolution = (shape[1], shape[2])
                else:
                    self.count = 0
            with np.load(file) as npz:
                self.stats = {k: npz[k] for k in STAT_KEYS if k in npz.files}
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise EvaluationError(f"{path} is not a readable .npz file ({exc})") from None
        if self.count == 0 and not ("mu" in self.stats and "sigma" in self.stats):
            keys = ", ".join(sorted(n.removesuffix(".npy") for n in names)) or "none"
            raise EvaluationError(
                f"{path} has no arr_0 (its arrays: {keys}); a sample set or reference .npz holds its images "
                "as arr_0, uint8 (N, H, W, 3), and may add FID statistics as mu and sigma"
            )
        if self.center_crop is not None and self.count and self.resolution != (self.center_crop,) * 2:
            raise EvaluationError(
                f"{path} holds {self.resolution[1]}×{self.resolution[0]} images; --center-crop applies to "
                "folders and shards of real images, not to an .npz: write its images at the samples' size"
            )

    def _batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if not self.count:
            return
        h, w = self.resolution
        image_bytes = h * w * 3
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            _npy_header(f, self.path)
            for start in range(0, self.count, batch_size):
                n = min(batch_size, self.count - start)
                data = f.read(n * image_bytes)
                if len(data) != n * image_bytes:
                    raise EvaluationError(f"{self.path}: arr_0 ends after {start} images of {self.count}")
                yield np.frombuffer(data, dtype=np.uint8).reshape(n, h, w, 3)


def _npy_header(f, path: str) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise EvaluationError(f"{path}: arr_0 has an .npy header of unknown version {version}")
    if fortran:
        raise EvaluationError(
            f"{path}: arr_0 is stored in Fortran order; save it in C order (numpy's default)"
        )
    return tuple(shape), dtype


class FolderSet(ImageSet):
    """Every image file under a folder (recursively), in sorted path order."""

    kind = "folder"

    def __init__(self, path: str, **kwargs):
        super().__init__(path, **kwargs)
        root = Path(path)
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in FOLDER_SUFFIXES and p.is_file())
        if not self.files:
            raise EvaluationError(
                f"{path} holds no images ({', '.join(sorted(FOLDER_SUFFIXES))}); give a folder of images, a "
                "samples.npz or a shard pattern"
            )
        self.count = len(self.files) if self.limit is None else min(self.limit, len(self.files))
        if self.center_crop is not None:
            self.resolution = (self.center_crop, self.center_crop)
        else:
            with Image.open(self.files[0]) as first:
                self.resolution = (first.height, first.width)

    def _batches(self, batch_size: int) -> Iterator[np.ndarray]:
        yield from self._stack((self._decode(f, str(f)) for f in self.files), batch_size)


class ShardSet(ImageSet):
    """The images of webdataset shards (``jpg``/``png``/``webp`` members), in shard order."""

    kind = "shards"

    def __init__(self, path: str, *, urls: list[str] | None = None, **kwargs):
        super().__init__(path, **kwargs)
        try:
            shards = open_shards(path, field="image set") if urls is None else None
        except DataError as exc:
            raise EvaluationError(str(exc)) from None
        self.urls = list(urls) if urls is not None else list(shards.urls)
        total = shards.total if shards is not None else None
        self.count = total if self.limit is None or total is None else min(total, self.limit)
        if self.center_crop is not None:
            self.resolution = (self.center_crop, self.center_crop)
        else:  # the first image's size, so that a mismatch is refused before any scoring
            images = self._images()
            first = next((img for img in images if img is not None), None)
            images.close()
            if first is None:
                raise EvaluationError(f"{path} holds no readable images")
            self.resolution = first.shape[:2]

    def _images(self) -> Iterator[np.ndarray | None]:
        for url in self.urls:
            try:
                for key, members in iter_samples(url):
                    ext = next((e for e in IMAGE_EXTS if e in members), None)
                    if ext is not None:
                        yield self._decode(members[ext], f"{url}:{key}.{ext}")
            except DataError as exc:
                raise EvaluationError(str(exc)) from None

    def _batches(self, batch_size: int) -> Iterator[np.ndarray]:
        yield from self._stack(self._images(), batch_size)


class LoaderSet(ImageSet):
    """The uint8 ``pixels`` of a data loader's batches (e.g. ``varkit.data.build_eval_loader``)."""

    kind = "loader"

    def __init__(self, description: str, loader: Iterable, *, resolution: int, count: int | None, **kwargs):
        super().__init__(description, **kwargs)
        self.loader = loader
        self.resolution = (resolution, resolution)
        self.count = count if self.limit is None or count is None else min(count, self.limit)

    def _batches(self, batch_size: int) -> Iterator[np.ndarray]:
        pending: list[np.ndarray] = []
        size = 0
        for batch in self.loader:
            pending.append(batch.pixels.cpu().numpy())
            size += len(pending[-1])
            while size >= batch_size:
                joined = np.concatenate(pending)
                yield joined[:batch_size]
                pending, size = [joined[batch_size:]], size - batch_size
        if size:
            yield np.concatenate(pending)


def _is_pattern(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec or "{" in spec or "::" in spec or spec.endswith(".tar")


def open_image_set(
    spec: str | os.PathLike, *, limit: int | None = None, center_crop: int | None = None
) -> ImageSet:
    """The image set ``spec`` names: an ``.npz``, a folder of images, a folder of ``.tar``
    shards, or a shard path or pattern (``val-{000000..000009}.tar``, ``pipe:...``).

    Args:
        spec: what the user gave.
        limit: read at most this many images.
        center_crop: bring every image to this square size the way ADM built its
            reference batches (folders and shards only).

    Raises:
        EvaluationError: nothing readable is there, with what was expected.
    """
    if limit is not None and limit < 1:
        raise EvaluationError(f"an image limit must be at least 1, got {limit}")
    text = os.fspath(spec)
    kwargs = {"limit": limit, "center_crop": center_crop}
    if _is_pattern(text):
        if not ("://" in text or text.startswith("pipe:")) and not expand(text):
            raise EvaluationError(f"{text} names no shards")
        return ShardSet(text, **kwargs)
    path = Path(text)
    if path.is_dir():
        images = any(p.suffix.lower() in FOLDER_SUFFIXES for p in path.rglob("*"))
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if tars and not images:
            return ShardSet(text, urls=tars, **kwargs)
        return FolderSet(text, **kwargs)
    if path.suffix == ".npz":
        return NpzSet(text, **kwargs)
    if not path.exists():
        raise EvaluationError(
            f"{text} does not exist; give a samples.npz (e.g. from `varkit sample`), a folder of images, or "
            "a shard pattern"
        )
    raise EvaluationError(
        f"{text} is neither an .npz, a folder of images nor a .tar shard; give a samples.npz (e.g. from "
        "`varkit sample`), a folder of images, or a shard pattern"
    )
