"""Sampling to disk at scale: ``samples.npz`` for FID evaluators, resumable, on any number of processes.

The images of a sample set are numbered ``n = 0 .. N-1`` in class-major order (image
``n`` has class ``classes[n // per_class]``) and cut into chunks of ``batch_size``
images, each generated as one batch. Every image is drawn with its own
``torch.Generator``, seeded by ``image_seed`` from ``(seed, n)``; together with the
fixed chunks this makes the pixels independent of how many processes share the work.
Under ``torchrun`` the chunks still missing are dealt round-robin to the ranks.

A finished chunk is written atomically as ``chunks/chunk-NNNNNN.npy`` (uint8) and no
process holds more than one chunk of images; a killed run started again with the
same arguments skips the chunks on disk. The end product is assembled chunk by chunk
into ``samples.npz`` in the layout of the ADM evaluator (``arr_0``: uint8
``(N, H, W, 3)``; ``labels``: int64 ``(N,)``, also stored as ``arr_1`` where ADM's
sampling scripts put labels), beside ``protocol.json``, which records everything that
decides the pixels and the machine that made them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from varkit.base import Sampler, Tokenizer
from varkit.checkpoint import write_text_atomic
from varkit.config_types import unstructure
from varkit.errors import EvaluationError
from varkit.generation import generate_images
from varkit.images import save_grid, to_uint8
from varkit.loading import format_classes
from varkit.version import __version__

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.npz"
PROTOCOL_FILE = "protocol.json"
CHUNK_DIR = "chunks"
#: Version of the layout of ``protocol.json``.
FORMAT = "varkit-samples/1"
#: Autocast dtypes by their command-line name; fp32 runs the model in its own dtype.
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: A grid shows at most this many classes (rows) and images per class (columns): it is
#: for looking at, and 50 000 images in one PNG are not.
GRID_MAX_CLASSES = 10
GRID_MAX_PER_CLASS = 8
#: Seconds between progress lines when stderr is not a terminal (a batch job's log).
LOG_EVERY_S = 30.0
#: The fixed timestamp of the members of ``samples.npz``: the same samples give the same bytes.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_TMP = ".tmp-"


# ------------------------------------------------------------------------ the plan


@attrs.frozen(kw_only=True)
class SamplePlan:
    """Which images a sample set holds and how they are cut into chunks.

    Attributes:
        classes: the classes, in order; image ``n`` has class ``classes[n // per_class]``.
        per_class: images of each class.
        seed: the base seed; image ``n`` is drawn with ``image_seed`` ``(seed, n)``.
        batch_size: images per chunk, each chunk generated as one batch.
    """

    classes: tuple[int, ...]
    per_class: int
    seed: int = 0
    batch_size: int = 32

    @classmethod
    def make(
        cls,
        classes: Sequence[int],
        *,
        num: int | None = None,
        per_class: int | None = None,
        seed: int = 0,
        batch_size: int = 32,
    ) -> SamplePlan:
        """A plan of ``num`` images in all or ``per_class`` images of each class (or both, when they agree).

        Raises:
            EvaluationError: neither count is given, a count or the batch size is not
                positive, ``num`` does not split evenly over the classes, the two
                counts disagree, or the seed is negative.
        """
        k = len(classes)
        if k == 0:
            raise EvaluationError("no classes to sample; give --classes, e.g. 0-999")
        if num is None and per_class is None:
            raise EvaluationError("say how many images to draw: --num N (in all) or --per-class N")
        if num is not None and num < 1:
            raise EvaluationError(f"--num is {num}; it must be at least 1")
        if per_class is not None and per_class < 1:
            raise EvaluationError(f"--per-class is {per_class}; it must be at least 1")
        if num is not None and per_class is None:
            if num % k:
                raise EvaluationError(
                    f"--num {num} does not split evenly over {k} classes ({num / k:.2f} per class); give a "
                    f"multiple of {k} (e.g. {k * max(1, num // k)}), or --per-class instead"
                )
            per_class = num // k
        elif num is not None and num != per_class * k:
            raise EvaluationError(
                f"--num {num} disagrees with --per-class {per_class} × {k} classes = {per_class * k}; "
                "give one of the two"
            )
        if batch_size < 1:
            raise EvaluationError(f"--batch-size is {batch_size}; it must be at least 1")
        if seed < 0:
            raise EvaluationError(f"--seed is {seed}; give a seed >= 0")
        return cls(classes=tuple(classes), per_class=per_class, seed=seed, batch_size=batch_size)

    @property
    def num(self) -> int:
        """Images in the set."""
        return len(self.classes) * self.per_class

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num / self.batch_size)

    def chunk(self, c: int) -> range:
        """The image indices of chunk ``c``."""
        return range(c * self.batch_size, min((c + 1) * self.batch_size, self.num))

    def labels(self, indices: Iterable[int]) -> np.ndarray:
        """The class of each image index, int64."""
        return np.array([self.classes[n // self.per_class] for n in indices], dtype=np.int64)


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s generator: a 64-bit hash of ``(seed, index)``.

    numpy's ``SeedSequence`` mixes the pair, so neighbouring images draw from unrelated
    streams and no image's seed collides with another set's base seed.
    """
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


# ------------------------------------------------------------------------ generation


class PerImageDraws(Sampler):
    """A sampler whose draws for batch row ``i`` come from ``generators[i]``.

    The generation loop hands its sampler one generator for the whole batch, so what
    a row draws would depend on the rows beside it; here each row draws from its own
    generator, so an image depends on its own seed only. Guidance and every other
    decision stay the wrapped sampler's.
    """

    name = "per_image_draws"

    def __init__(self, sampler: Sampler, generators: Sequence[torch.Generator]):
        super().__init__(sampler.config)
        self.sampler = sampler
        self.generators = list(generators)

    def guidance_scale(self, step: int, num_steps: int) -> float:
        return self.sampler.guidance_scale(step, num_steps)

    def _rows(self, logits: torch.Tensor) -> list[tuple[torch.Tensor, torch.Generator]]:
        if logits.shape[0] != len(self.generators):
            raise ValueError(f"logits hold {logits.shape[0]} rows for {len(self.generators)} generators")
        return [(logits[i : i + 1], g) for i, g in enumerate(self.generators)]

    def sample(self, logits, *, step, num_steps, generator):
        rows = self._rows(logits)
        return torch.cat(
            [self.sampler.sample(r, step=step, num_steps=num_steps, generator=g) for r, g in rows]
        )

    def soft_weights(self, logits, *, step, num_steps, generator):
        weights = [
            self.sampler.soft_weights(r, step=step, num_steps=num_steps, generator=g)
            for r, g in self._rows(logits)
        ]
        return None if weights[0] is None else torch.cat(weights)


def generate_chunk(
    model,
    tokenizer: Tokenizer,
    sampler: Sampler,
    labels: torch.Tensor,
    seeds: Sequence[int],
    *,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Generate one image per label, image ``i`` drawn from a generator seeded with ``seeds[i]``.

    Args:
        model: the AR model; ``labels`` live on its device.
        tokenizer: its tokenizer.
        sampler: the sampler (wrapped in ``PerImageDraws``).
        labels: class indices ``(b,)``.
        seeds: one seed per label (``image_seed``).
        dtype: autocast dtype of the transformer (None: its own dtype).

    Returns:
        ``(b, H, W, 3)`` uint8 pixels.
    """
    generators = [torch.Generator(device=labels.device).manual_seed(s) for s in seeds]
    images = generate_images(
        model, tokenizer, PerImageDraws(sampler, generators), labels, generator=generators[0], dtype=dtype
    )
    return to_uint8(images)


# ------------------------------------------------------------------------ the record


def weights_digest(module: torch.nn.Module) -> str:
    """``sha256:<hex>`` of a module's state dict: every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def sampling_protocol(
    model,
    tokenizer: Tokenizer,
    sampler: Sampler,
    plan: SamplePlan,
    *,
    dtype: str,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What decides the pixels of a sample set, as recorded in ``protocol.json``.

    Args:
        model, tokenizer, sampler: what generates (digests of the weights are taken).
        plan: classes, counts, seed and chunking.
        dtype: ``fp32``, ``bf16`` or ``fp16``.
        source: where the weights came from (path, EMA or raw), recorded as given.
    """
    device = next(model.parameters()).device
    return {
        "checkpoint": {
            **(source or {}),
            "model_sha256": weights_digest(model),
            "tokenizer_sha256": weights_digest(tokenizer),
        },
        "sampler": {"name": sampler.name, "options": unstructure(sampler.config)},
        "seed": plan.seed,
        "seeds": "image n is drawn with its own torch.Generator seeded by varkit.sampling.image_seed(seed, n)",
        "classes": format_classes(plan.classes),
        "per_class": plan.per_class,
        "num": plan.num,
        "order": "class-major: image n has class classes[n // per_class]",
        "batch_size": plan.batch_size,
        "dtype": dtype,
        "device": device.type,
    }


def environment(device: torch.device, world_size: int) -> dict[str, Any]:
    """Versions and hardware of this process (recorded, never compared)."""
    info: dict[str, Any] = {
        "varkit": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "world_size": world_size,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_protocol(out: str | os.PathLike) -> dict[str, Any] | None:
    """The ``protocol.json`` in ``out``, or None when there is none."""
    path = Path(out) / PROTOCOL_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvaluationError(
            f"{path} cannot be read ({exc}); it is not a varkit sample set, or it was damaged: sample into "
            "a new --out"
        ) from None


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            out += _differences(old.get(key), new.get(key), where)
        return out
    return [] if old == new else [f"{path}: {old!r} on disk, {new!r} now"]


def _comparable(protocol: Any) -> Any:
    """What must match to resume: everything but where the checkpoint lies (its digests
    say whether it is the same)."""
    if not isinstance(protocol, dict) or not isinstance(protocol.get("checkpoint"), dict):
        return protocol
    checkpoint = {k: v for k, v in protocol["checkpoint"].items() if k != "path"}
    return {**protocol, "checkpoint": checkpoint}


def _check_resume(out: Path, protocol: dict[str, Any]) -> dict[str, Any] | None:
    """The record on disk when it describes the same samples; raise when it does not."""
    if out.exists() and not out.is_dir():
        raise EvaluationError(
            f"--out {out} is a file; give a directory for the samples (it is created if missing)"
        )
    record = read_protocol(out)
    if record is None:
        if (out / SAMPLES_FILE).exists():
            raise EvaluationError(
                f"{out} holds a {SAMPLES_FILE} without {PROTOCOL_FILE}, so nothing says how it was made; "
                "sample into a new --out, or move that file away"
            )
        return None
    diff = _differences(_comparable(record.get("protocol")), _comparable(protocol))
    if diff:
        raise EvaluationError(
            f"{out} holds samples of another protocol ({'; '.join(diff[:6])}); run again with the same "
            "arguments to resume or reuse them, or sample into a new --out"
        )
    return record


# ------------------------------------------------------------------------ chunks on disk


def chunk_path(out: Path, c: int) -> Path:
    return out / CHUNK_DIR / f"chunk-{c:06d}.npy"


def _chunk_done(path: Path, count: int) -> bool:
    """Whether ``path`` holds a complete chunk of ``count`` images (its header says so)."""
    if not path.is_file():
        return False
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[0] == count and arr.shape[3] == 3


def _save_atomic(path: Path, write) -> None:
    tmp = path.with_name(f"{_TMP}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_leftovers(directory: Path) -> None:
    if directory.is_dir():
        for child in directory.iterdir():
            if child.name.startswith(_TMP):
                child.unlink(missing_ok=True)


def png_name(label: int, i: int, per_class: int) -> str:
    """``images/`` file name of the ``i``-th image of class ``label``: ``CCCC_III.png``."""
    width = max(3, len(str(per_class - 1)))
    return f"{label:04d}_{i:0{width}d}.png"


def _png_of(plan: SamplePlan, n: int) -> str:
    return png_name(plan.classes[n // plan.per_class], n % plan.per_class, plan.per_class)


def _write_pngs(out: Path, plan: SamplePlan, indices: range, pixels: np.ndarray) -> None:
    folder = out / "images"
    folder.mkdir(exist_ok=True)
    for n, img in zip(indices, pixels):
        _save_atomic(folder / _png_of(plan, n), lambda f, img=img: Image.fromarray(img).save(f, format="PNG"))


# ------------------------------------------------------------------------ samples.npz


def _write_npy_member(
    zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype, parts: Iterable[np.ndarray]
):
    """One ``.npy`` member of an npz, written part by part (rows of ``shape`` in order)."""
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    dtype = np.dtype(dtype)
    rows = 0
    with zf.open(info, "w", force_zip64=True) as f:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for part in parts:
            if part.dtype != dtype or part.shape[1:] != shape[1:]:
                raise ValueError(
                    f"{name}: a part of {part.shape} {part.dtype} in an array of {shape} {dtype}"
                )
            f.write(np.ascontiguousarray(part).data)
            rows += part.shape[0]
    if rows != shape[0]:
        raise ValueError(f"{name}: {rows} rows written of {shape[0]}")


def write_samples_npz(path: Path, chunks: Sequence[Path], labels: np.ndarray) -> tuple[int, ...]:
    """Assemble chunk files (in order) into ``path`` (atomically), holding one chunk at a time.

    Returns:
        The shape of ``arr_0``.
    """
    first = np.load(chunks[0], mmap_mode="r")
    shape = (len(labels), *first.shape[1:])
    tmp = path.with_name(f"{_TMP}{path.name}.{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_npy_member(zf, "arr_0.npy", shape, np.uint8, (np.load(c) for c in chunks))
        for name in ("labels.npy", "arr_1.npy"):
            _write_npy_member(zf, name, labels.shape, np.int64, [labels])
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return shape


def _grid_pixels(out: Path, plan: SamplePlan) -> tuple[np.ndarray, int]:
    """The first images of the first classes (capped), read from the chunks; and the columns."""
    cols = min(plan.per_class, GRID_MAX_PER_CLASS)
    picked = []
    for k in range(min(len(plan.classes), GRID_MAX_CLASSES)):
        for j in range(cols):
            n = k * plan.per_class + j
            picked.append(np.load(chunk_path(out, n // plan.batch_size), mmap_mode="r")[n % plan.batch_size])
    return np.stack(picked), cols


# ------------------------------------------------------------------------ progress


class _Progress:
    """Images done, images/s and the time left: a tqdm bar on a terminal, log lines elsewhere."""

    def __init__(self, total: int, done: int, *, enabled: bool):
        self.total, self.done, self.enabled = total, done, enabled
        self._start_done = done
        self._t0 = self._last = time.perf_counter()
        self._bar = None
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(total=total, initial=done, desc="sampling", unit="img", dynamic_ncols=True)

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        n = min(n, self.total - self.done)
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= LOG_EVERY_S or self.done == self.total:
            self._last = now
            rate = (self.done - self._start_done) / max(now - self._t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            log.info(
                "sampling %d/%d images, %.1f img/s, eta %s",
                self.done,
                self.total,
                rate,
                datetime.timedelta(seconds=round(eta)),
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ------------------------------------------------------------------------ the whole run


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def sample_to_dir(
    model,
    tokenizer: Tokenizer,
    sampler: Sampler,
    out: str | os.PathLike,
    plan: SamplePlan,
    *,
    dtype: str = "fp32",
    rank: int = 0,
    world_size: int = 1,
    source: dict[str, Any] | None = None,
    png: bool = False,
    grid: bool = False,
) -> Path:
    """Generate the images of ``plan`` into ``out`` (resuming what is there), assemble ``samples.npz``.

    Every process of a ``torchrun`` job calls it with its ``rank``; the default process
    group must exist when ``world_size > 1``. The chunks still missing are dealt
    round-robin to the ranks; rank 0 then assembles ``samples.npz``, writes the final
    ``protocol.json`` and removes the chunks (the other ranks return at once).

    Args:
        model: the AR model, on this process's device (in eval mode while sampling).
        tokenizer: its tokenizer.
        sampler: the sampler with every option set.
        out: the output directory (created when missing).
        plan: which images, seeds and chunks.
        dtype: autocast dtype of the transformer: ``fp32``, ``bf16`` or ``fp16``.
        rank: this process's rank.
        world_size: processes sharing the work.
        source: where the weights came from, recorded in ``protocol.json``.
        png: also write every image as ``images/CCCC_III.png``.
        grid: also write ``grid.png``: a row per class, at most
            ``GRID_MAX_CLASSES`` × ``GRID_MAX_PER_CLASS`` images.

    Returns:
        The path of ``samples.npz``.

    Raises:
        EvaluationError: ``out`` is a file, or holds samples of another protocol.
    """
    if dtype not in DTYPES:
        raise EvaluationError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out)
    device = next(model.parameters()).device
    protocol = sampling_protocol(model, tokenizer, sampler, plan, dtype=dtype, source=source)
    record = _check_resume(out, protocol)
    target = out / SAMPLES_FILE
    if record is not None and record.get("complete") and target.is_file():
        log.info("%s is complete already (%d images)", target, plan.num)
        return target
    if rank == 0:
        (out / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out / CHUNK_DIR)
        _remove_leftovers(out / "images")
        _remove_leftovers(out)
        if record is None:
            write_text_atomic(
                out / PROTOCOL_FILE, _dump({"format": FORMAT, "complete": False, "protocol": protocol})
            )
    _barrier(world_size)

    missing = [c for c in range(plan.num_chunks) if not _chunk_done(chunk_path(out, c), len(plan.chunk(c)))]
    todo = sum(len(plan.chunk(c)) for c in missing)
    if rank == 0:
        log.info(
            "sampling %d images of %d classes into %s: %d of %d chunks to draw on %d process(es)",
            plan.num,
            len(plan.classes),
            out,
            len(missing),
            plan.num_chunks,
            world_size,
        )
    progress = _Progress(plan.num, plan.num - todo, enabled=rank == 0)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        for c in missing[rank::world_size]:
            indices = plan.chunk(c)
            labels = torch.from_numpy(plan.labels(indices)).to(device)
            pixels = generate_chunk(
                model,
                tokenizer,
                sampler,
                labels,
                [image_seed(plan.seed, n) for n in indices],
                dtype=DTYPES[dtype],
            )
            if png:
                _write_pngs(out, plan, indices, pixels)
            _save_atomic(chunk_path(out, c), lambda f, p=pixels: np.save(f, p))
            progress.update(len(indices) * world_size)  # rank 0 reports for all: the ranks keep pace
    finally:
        model.train(was_training)
        progress.close()
    _barrier(world_size)
    seconds = time.perf_counter() - t0
    if rank != 0:
        return target

    chunks = [chunk_path(out, c) for c in range(plan.num_chunks)]
    if png:  # chunks drawn by an earlier run without --png
        for c, path in enumerate(chunks):
            indices = plan.chunk(c)
            if not all((out / "images" / _png_of(plan, n)).is_file() for n in indices):
                _write_pngs(out, plan, indices, np.load(path))
    shape = write_samples_npz(target, chunks, plan.labels(range(plan.num)))
    if grid:
        pixels, cols = _grid_pixels(out, plan)
        save_grid(pixels, out / "grid.png", nrow=cols)
    final: dict[str, Any] = {
        "format": FORMAT,
        "complete": True,
        "protocol": protocol,
        "resolution": [shape[1], shape[2]],
        "environment": environment(device, world_size),
    }
    if todo:
        final["throughput"] = {
            "images": todo,
            "seconds": round(seconds, 3),
            "images_per_s": round(todo / max(seconds, 1e-9), 3),
            "processes": world_size,
        }
    write_text_atomic(out / PROTOCOL_FILE, _dump(final))
    for path in chunks:
        path.unlink(missing_ok=True)
    (out / CHUNK_DIR).rmdir()
    log.info(
        "wrote %s: %d images of %d classes, %dx%d", target, plan.num, len(plan.classes), shape[1], shape[2]
    )
    return target


def _dump(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"
