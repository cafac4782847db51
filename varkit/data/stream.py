"""The training stream and the evaluation loader over webdataset shards.

How one epoch is read (``W`` ranks, ``K`` DataLoader workers per rank, ``K = 1`` when
``workers`` is 0; every choice below is a pure function of the seed, the epoch, the
rank and the worker, so the order is the same on every run):

- The ``W·K`` readers ("slots", ``slot = rank·K + worker``) split the shards: the
  shard list is permuted by ``(seed, epoch)`` and slot ``i`` takes every ``W·K``-th
  shard from ``i``. With fewer shards than slots, every slot reads every shard and
  keeps every ``W·K``-th sample instead, so a tiny set still feeds every worker.
  In resampled mode each slot draws shards with replacement from its own generator.
- Each slot shuffles its samples through a buffer of ``shuffle_buffer`` samples and
  draws each sample's crop (and flip) from its own generator.
- A rank yields exactly ``samples_per_epoch // (W · batch_size)`` batches per epoch
  (every rank the same number, which DDP needs): worker ``j`` makes batches
  ``j, j+K, j+2K, ...``, in the order the DataLoader hands them out. A slot that runs
  out of samples reads its shards again (another shuffle); one with samples to spare
  leaves them for a later epoch's permutation.

Exact resume: the stream's state is ``(epoch, batches consumed)``. A resumed stream
re-reads the epoch from its start and skips what was consumed: skipped samples are
read and checked (an image is decoded, at JPEG draft scale, because a bad image must
be skipped exactly as before) but neither cropped nor batched. The cost is one
decode per skipped image, spread over the workers, once per resume: seconds for the
synthetic set, up to a few minutes for a late point of an ImageNet epoch; code shards
skip at memory speed.

Creating a DataLoader iterator draws its workers' base seed from the global torch RNG
(one int64), which the training RNG shares. An uninterrupted run draws it when an
epoch's loader starts; a run resumed mid-epoch restores the RNG state saved after that
draw, so its loader for the rest of that epoch draws from a generator of its own
instead: the global RNG then sees exactly the draws of the uninterrupted run. (No
choice of the stream depends on that seed.)
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from itertools import count as counter

import attrs
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from varkit.base import Tokenizer
from varkit.data import transforms
from varkit.data.codes import CodeLayout, split_codes
from varkit.data.config import DataConfig
from varkit.data.shards import iter_samples, parse_label
from varkit.data.sources import Source, resolve_source
from varkit.errors import DataError

log = logging.getLogger(__name__)

#: Bad samples logged one by one per process before only their count is reported.
WARN_LIMIT = 10
#: Tags that keep the generators of one slot apart.
_SHARDS, _RESAMPLE, _SHUFFLE, _AUGMENT = 0, 1, 2, 3


@attrs.define
class Batch:
    """One batch of the training stream or the evaluation loader.

    Images travel as the bytes they were decoded to; ``batch.to(device).images`` moves
    those (a quarter of the float32 bytes) and converts on the device.

    Attributes:
        pixels: ``(b, R, R, 3)`` uint8, or None for a code stream.
        codes: code maps ``[(b, h_k, w_k)]`` int64 coarse to fine, or None for images.
        labels: ``(b,)`` int64 class indices.
    """

    pixels: torch.Tensor | None
    codes: list[torch.Tensor] | None
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def images(self) -> torch.Tensor | None:
        """``(b, 3, R, R)`` float32 in [-1, 1] on the batch's device (computed on each access)."""
        return None if self.pixels is None else transforms.to_model_range(self.pixels)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """The same batch on ``device``."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(
            pixels=None if self.pixels is None else move(self.pixels),
            codes=None if self.codes is None else [move(c) for c in self.codes],
            labels=move(self.labels),
        )


# ---------------------------------------------------------------------- the reader


def _share(n: int, parts: int, part: int) -> int:
    """How many of ``0 .. n-1`` are ``part`` modulo ``parts``."""
    return n // parts + (1 if part < n % parts else 0)


@attrs.define
class _PassEnd:
    """Marks the end of one pass over a slot's shards: which shards, how many samples."""

    urls: list[str] = attrs.field(factory=list)
    samples: int = 0


@attrs.frozen(kw_only=True)
class _Reader:
    """Everything a worker needs to read its part of an epoch (pickled into workers)."""

    source: Source
    train: bool
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    num_classes: int
    shuffle_buffer: int
    resampled: bool

    # -- samples -----------------------------------------------------------------
    def _shard_passes(self, epoch: int, slot: int, slots: int) -> Iterator[Iterator[tuple[str, int, int]]]:
        """Passes over the slot's shards: each an iterator of ``(url, keep_mod, keep_rem)``.

        In resampled mode a pass is as many shards, drawn with replacement, as the set has.
        """
        urls = self.source.shards.urls
        n = len(urls)
        if self.train and self.resampled:
            rng = np.random.default_rng([self.seed, epoch, slot, 0, _RESAMPLE])
            while True:
                yield ((urls[int(rng.integers(n))], 1, 0) for _ in range(n))
        for p in counter():
            order = (
                np.random.default_rng([self.seed, epoch, p, _SHARDS]).permutation(n)
                if self.train
                else range(n)
            )
            if n >= slots:
                yield ((urls[int(i)], 1, 0) for i in list(order)[slot::slots])
            else:
                yield ((urls[int(i)], slots, slot) for i in order)
            if not self.train:
                return

    def samples(
        self, epoch: int, slot: int, slots: int
    ) -> Iterator[tuple[str, str, dict[str, bytes]] | _PassEnd]:
        """The slot's samples ``(url, key, members)``, shuffled; endless for training.

        Each pass over the slot's shards ends with a `_PassEnd`. The shuffle
        buffer drains at the end of each pass, so a pass never mixes with the next: an
        epoch that fits in one pass sees each of the slot's samples exactly once.
        """
        rng = np.random.default_rng([self.seed, epoch, slot, _SHUFFLE])
        for shard_pass in self._shard_passes(epoch, slot, slots):
            end = _PassEnd()
            samples = self._read(shard_pass, slot, slots, end)
            if self.train and self.shuffle_buffer > 1:
                samples = _shuffled(samples, self.shuffle_buffer, rng)
            yield from samples
            yield end

    def _read(
        self, shard_pass, slot: int, slots: int, end: _PassEnd
    ) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        index = 0
        for url, mod, rem in shard_pass:
            end.urls.append(url)
            for key, members in iter_samples(url):
                index += 1
                if (index - 1) % mod == rem:
                    end.samples += 1
                    yield url, key, members
        if end.samples == 0 and self.train:
            raise DataError(
                f"{self.source.field}: reader {slot} of {slots} found no samples in its shards of "
                f"{self.source.shards.pattern!r}; the shards are empty"
            )

    # -- one sample ------------------------------------------------------------------
    def process(self, members: dict[str, bytes], draws: np.ndarray, *, full: bool):
        """One sample -> ``(array, label)``, ``(None, label)`` when ``full`` is False (only
        the checks run: resuming skips such samples), or the reason to skip it.

        ``draws`` are the sample's three uniforms (crop x, crop y, flip or crop index).
        """
        label = parse_label(members.get("cls"), self.num_classes)
        if isinstance(label, str):
            return label
        data = self.source.format.read(members, draws, train=self.train, full=full)
        if isinstance(data, str):
            return data
        return data, label

    # -- batches ---------------------------------------------------------------------
    def batches(self, epoch: int, slot: int, slots: int, *, skip: int, count: int | None) -> Iterator[dict]:
        """The slot's batches of an epoch: ``skip`` made silently, then ``count`` yielded.

        ``count`` None (evaluation) reads to the end and yields the last partial batch.

        Raises:
            DataError: in training, a pass over the slot's shards found bad samples and
                fewer good ones than one batch (without this check such a set would be
                read again and again, forever when nothing in it is readable).
        """
        rng = np.random.default_rng([self.seed, epoch, slot, _AUGMENT])
        made, items, labels = 0, [], []
        bad: Counter = Counter()
        good, bad_in_pass = 0, Counter()
        if count == 0:
            return
        for sample in self.samples(epoch, slot, slots):
            if isinstance(sample, _PassEnd):
                if self.train and bad_in_pass and good < self.batch_size:
                    raise DataError(self._too_few(sample, good, bad_in_pass, slot, slots))
                good, bad_in_pass = 0, Counter()
                continue
            url, key, members = sample
            draws = rng.random(3)  # drawn for every sample, so skipping keeps the sequence
            full = made >= skip
            result = self.process(members, draws, full=full)
            if isinstance(result, str):
                bad_in_pass[result] += 1
                if full:
                    bad[result] += 1
                    _warn(result, key, url)
                continue
            good += 1
            items.append(result[0])
            labels.append(result[1])
            if len(labels) == self.batch_size:
                if full:
                    yield self._collate(items, labels, bad)
                    bad = Counter()
                items, labels = [], []
                made += 1
                if count is not None and made == skip + count:
                    return
        if labels and count is None:
            yield self._collate(items, labels, bad)

    def _too_few(self, end: _PassEnd, good: int, bad: Counter, slot: int, slots: int) -> str:
        shards = sorted(set(end.urls))
        shown = ", ".join(shards[:3]) + (f" ... ({len(shards)} shards)" if len(shards) > 3 else "")
        reasons = ", ".join(f"{why}: {n}" for why, n in bad.most_common())
        split = "" if slots == 1 else f" (reader {slot} of {slots}: {slots} ranks × workers share the set)"
        return (
            f"{self.source.field} {self.source.shards.pattern!r}: one pass over {shown}{split} found "
            f"{good} readable samples of {end.samples}, fewer than one batch of {self.batch_size}; "
            f"skipped {reasons}. Write the shards again from the images (`varkit shards` checks every "
            "image and leaves out the bad ones), fix data.num_classes if the classes are out of range, "
            "or lower the batch size"
        )

    def _collate(self, items: list, labels: list[int], bad: Counter) -> dict:
        return {
            **self.source.format.collate(items),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "skipped": dict(bad),
        }


_warned = Counter()


def _warn(reason: str, key: str, url: str) -> None:
    _warned["n"] += 1
    if _warned["n"] <= WARN_LIMIT:
        log.warning("skipping sample %s of %s: %s", key, url, reason)
        if _warned["n"] == WARN_LIMIT:
            log.warning("further bad samples are counted (stream.skipped), not logged one by one")


def _shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Items in a random order, through a buffer of ``size`` (webdataset's shuffle)."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class _EpochDataset(IterableDataset):
    """One rank's epoch from batch ``start`` on; each worker makes every K-th batch."""

    def __init__(self, reader: _Reader, *, epoch: int, start: int, batches: int | None):
        self.reader, self.epoch, self.start, self.batches = reader, epoch, start, batches

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        r = self.reader
        if self.batches is None:  # evaluation: workers split the shards, read to the end
            yield from r.batches(0, worker, workers, skip=0, count=None)
            return
        # after a resume at batch `start`, worker j plays the part of worker (j + start) % K,
        # so that the DataLoader's round robin hands out batch `start` first
        role = (worker + self.start) % workers
        done = _share(self.start, workers, role)
        total = _share(self.batches, workers, role)
        slot = r.rank * workers + role
        yield from r.batches(self.epoch, slot, r.world_size * workers, skip=done, count=total - done)


def _loader(
    dataset: IterableDataset, workers: int, generator: torch.Generator | None = None
) -> Iterator[dict]:
    """Batches of ``dataset``; with workers, its DataLoader draws their base seed from
    ``generator`` (None: the global torch RNG)."""
    if workers == 0:
        return iter(dataset)
    loader = DataLoader(
        dataset,
        batch_size=None,  # the dataset makes whole batches
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4,
        persistent_workers=False,
        generator=generator,
    )
    return iter(loader)


def _clean(exc: DataError) -> DataError:
    """A DataError raised in a worker, without the worker's traceback in its message."""
    text = str(exc)
    if "Original Traceback" in text:
        match = re.search(r"DataError: (.*)\Z", text.strip(), re.S)
        if match:
            return DataError(match.group(1))
    return exc


def _batch(item: dict, layout: CodeLayout | None) -> Batch:
    codes = item["codes"]
    return Batch(
        pixels=item["images"],
        codes=None if codes is None else split_codes(codes, layout.schedule),
        labels=item["labels"],
    )


# ----------------------------------------------------------------- the train stream


class TrainStream:
    """Endless batches for one rank, epoch after epoch (see the module docstring).

    Attributes:
        epoch: the epoch the next batch belongs to (counted from 0).
        batch: batches of that epoch already handed out.
        batches_per_epoch: batches per rank and epoch.
        samples_per_epoch: samples per epoch over all ranks.
        skipped: bad samples skipped so far, by reason.
    """

    def __init__(self, reader: _Reader, *, samples_per_epoch: int, workers: int):
        self._reader = reader
        self.workers = workers
        self.samples_per_epoch = samples_per_epoch
        self.batches_per_epoch = samples_per_epoch // (reader.world_size * reader.batch_size)
        if self.batches_per_epoch < 1:
            raise DataError(
                f"an epoch has {samples_per_epoch} samples, fewer than one batch on every rank "
                f"({reader.world_size} × {reader.batch_size}); lower the batch size or add data"
            )
        self.epoch = 0
        self.batch = 0
        self.skipped: Counter = Counter()
        # Set by load_state_dict mid-epoch: the next loader must not draw from the global RNG.
        self._resumed_mid_epoch = False

    @property
    def batch_size(self) -> int:
        """Samples per batch on this rank."""
        return self._reader.batch_size

    @property
    def skipped_total(self) -> int:
        """Bad samples skipped so far, all reasons together."""
        return sum(self.skipped.values())

    @property
    def layout(self) -> CodeLayout | None:
        """The code layout of a code stream (None for images)."""
        return self._reader.source.layout

    def __iter__(self) -> Iterator[Batch]:
        layout = self._reader.source.layout
        while True:
            if self.batch >= self.batches_per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
            dataset = _EpochDataset(
                self._reader, epoch=self.epoch, start=self.batch, batches=self.batches_per_epoch
            )
            generator = None
            if self._resumed_mid_epoch:  # see the module docstring
                r = self._reader
                generator = torch.Generator().manual_seed(
                    (r.seed * 1_000_003 + self.epoch * 10_007 + r.rank) % 2**63
                )
                self._resumed_mid_epoch = False
            bad_before = self.skipped_total
            try:
                for item in _loader(dataset, self.workers, generator):
                    self.batch += 1
                    self.skipped.update(item["skipped"])
                    yield _batch(item, layout)
            except DataError as exc:
                raise _clean(exc) from None
            if self.batch != self.batches_per_epoch:
                raise DataError(
                    f"epoch {self.epoch} ended after {self.batch} of {self.batches_per_epoch} batches: the "
                    "shards hold fewer readable samples than data.samples_per_epoch says"
                )
            bad = self.skipped_total - bad_before
            if bad:
                log.warning("epoch %d: skipped %d bad samples (%s)", self.epoch, bad, dict(self.skipped))
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """Where the stream is; `load_state_dict` of it continues from there exactly."""
        r = self._reader
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "skipped": dict(self.skipped),
            "seed": r.seed,
            "world_size": r.world_size,
            "batch_size": r.batch_size,
            "workers": self.workers,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict`; the next batch is the one after those consumed.

        The continuation is exact when seed, world size, batch size and workers are the
        same as when the state was saved; otherwise a warning says so and the stream
        resumes at the same fraction of the epoch.
        """
        r = self._reader
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch"])
        self.skipped = Counter(state.get("skipped", {}))
        saved = {k: state.get(k) for k in ("seed", "world_size", "batch_size", "workers")}
        now = {
            "seed": r.seed,
            "world_size": r.world_size,
            "batch_size": r.batch_size,
            "workers": self.workers,
        }
        changed = {k: (saved[k], now[k]) for k in now if saved[k] is not None and saved[k] != now[k]}
        if changed:
            log.warning(
                "data stream resumed with %s changed (saved, now): the batches differ from an "
                "uninterrupted run",
                changed,
            )
            old = (saved["world_size"] or r.world_size) * (saved["batch_size"] or r.batch_size)
            self.batch = min(self.batch * old // (r.world_size * r.batch_size), self.batches_per_epoch)
        self._resumed_mid_epoch = 0 < self.batch < self.batches_per_epoch


def build_train_stream(
    config: DataConfig,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    tokenizer: Tokenizer | None = None,
) -> TrainStream:
    """The endless training stream of one rank.

    Args:
        config: the recipe's ``data`` section.
        batch_size: samples per batch on this rank.
        seed: the run's seed; with rank, world size and workers it fixes the order.
        rank: this process's rank, 0 .. world_size - 1.
        world_size: number of ranks.
        tokenizer: for code shards without an index, gives the schedule; when given,
            code shards must match it.

    Raises:
        DataError: missing shards, an unknown epoch length, or too little data.
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in 0 .. {world_size - 1}")
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    source = resolve_source(config, split="train", tokenizer=tokenizer)
    samples = config.samples_per_epoch or source.shards.total
    if samples is None:
        raise DataError(
            f"{source.field}: the number of samples per epoch is unknown ({source.shards.pattern!r} has no "
            "shards.json beside it and cannot be counted); set data.samples_per_epoch"
        )
    reader = _reader(
        config, source, train=True, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size
    )
    stream = TrainStream(reader, samples_per_epoch=samples, workers=config.workers)
    log.info(
        "data: %s from %s, %d shards, %d samples per epoch, %d batches of %d per rank",
        source.kind,
        source.shards.pattern,
        len(source.shards.urls),
        samples,
        stream.batches_per_epoch,
        batch_size,
    )
    return stream


def _reader(config: DataConfig, source: Source, **kwargs) -> _Reader:
    return _Reader(
        source=source,
        num_classes=config.classes,
        shuffle_buffer=config.shuffle_buffer,
        resampled=config.resampled,
        **kwargs,
    )


# ---------------------------------------------------------------------- evaluation


class EvalLoader:
    """Every validation image once, centre-cropped, in a fixed order.

    Attributes:
        samples: images in the set (None when unknown).
    """

    def __init__(self, reader: _Reader, *, workers: int):
        self._reader = reader
        self.workers = workers
        self.samples = reader.source.shards.total
        self.skipped: Counter = Counter()

    def __iter__(self) -> Iterator[Batch]:
        try:
            for item in _loader(_EpochDataset(self._reader, epoch=0, start=0, batches=None), self.workers):
                self.skipped.update(item["skipped"])
                yield _batch(item, None)
        except DataError as exc:
            raise _clean(exc) from None


def build_eval_loader(config: DataConfig, *, batch_size: int) -> EvalLoader:
    """Validation images (``data.val_shards``, or the synthetic val split), centre crops.

    The last batch may be smaller. Images only, whatever ``data.source`` is.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    source = resolve_source(config, split="val")
    reader = _reader(config, source, train=False, batch_size=batch_size, seed=0)
    return EvalLoader(reader, workers=config.workers)
