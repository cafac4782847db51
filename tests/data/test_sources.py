"""The table of data sources, and streams over sets that hold nothing usable."""

from __future__ import annotations

import re
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from _datahelpers import png_bytes

from varkit.data import (
    SOURCES,
    DataConfig,
    DataSource,
    Source,
    build_eval_loader,
    build_train_stream,
    data_source,
    register_source,
)
from varkit.data.config import SyntheticConfig
from varkit.data.shards import ShardSink, open_shards
from varkit.data.sources import ImageFormat
from varkit.errors import DataError
from varkit.evaluate import class_following


class Hang(BaseException):
    """Not an OSError (which the image decoder would take for a bad image)."""


@contextmanager
def deadline(seconds: int):
    """Turn a hang into a test failure (the stream used to loop forever on such sets)."""

    def fail(*_):
        raise Hang(f"no answer within {seconds} s: the stream hangs")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_builtin_sources_are_rows_of_the_table():
    assert {"synthetic", "shards", "codes"} <= set(SOURCES)
    assert data_source("codes").yields == "codes" and data_source("shards").yields == "images"
    assert DataConfig(source="synthetic", synthetic=SyntheticConfig(num_classes=3)).classes == 3
    assert DataConfig(source="shards", train_shards="x.tar", num_classes=7).classes == 7


def test_unknown_source_lists_the_table_with_the_closest_name():
    with pytest.raises(ValueError, match=r"'shard' is not a data source \(did you mean 'shards'\?\)"):
        DataConfig(source="shard")
    with pytest.raises(DataError, match="the sources are: codes, shards, synthetic"):
        data_source("nope")


@pytest.fixture
def stripes_source(tmp_path):
    """A new source registered into the table for one test: 4 classes of striped images."""
    sink = ShardSink(tmp_path, prefix="stripes")
    for i in range(12):
        pixels = np.zeros((8, 8, 3), np.uint8)
        pixels[:, :, i % 3] = 255
        sink.write(f"{i:03d}", {"png": png_bytes(pixels), "cls": str(i % 3).encode()})
    pattern = sink.close().pattern

    def resolve(config, split, tokenizer):
        fmt = ImageFormat(resolution=config.resolution, crop_ratio=config.crop_ratio, hflip=False)
        return Source(shards=open_shards(pattern, field="data.stripes"), field="data.stripes", format=fmt)

    def dominant_channel(images):
        return images.mean(dim=(2, 3)).argmax(1)

    source = register_source(
        DataSource(
            name="stripes",
            summary="one colour channel per class",
            yields="images",
            resolve=resolve,
            classes=lambda config: 3,
            classifiers={"channel": dominant_channel},
        )
    )
    yield source
    SOURCES.pop("stripes")


def test_a_new_source_registers_and_streams_without_edits_elsewhere(stripes_source):
    config = DataConfig(source="stripes", resolution=8, crop_ratio=1.0, workers=0, num_classes=3)
    assert config.classes == 3
    batch = next(iter(build_train_stream(config, batch_size=4, seed=0)))
    assert batch.pixels.shape == (4, 8, 8, 3)
    images = torch.zeros(3, 3, 8, 8)
    for c in range(3):
        images[c, c] = 1.0
    report = class_following(images, torch.tensor([0, 1, 0]), config)
    assert report == {"sample_channel_accuracy": pytest.approx(2 / 3)}


def test_class_following_asks_the_table():
    assert (
        class_following(
            torch.zeros(2, 3, 16, 16), torch.tensor([0, 1]), DataConfig(train_shards="x", source="shards")
        )
        is None
    )
    report = class_following(torch.zeros(2, 3, 16, 16), torch.tensor([0, 1]), DataConfig())
    assert set(report) == {"sample_class_accuracy", "sample_colour_accuracy"}


def test_a_registered_name_cannot_be_taken_twice(stripes_source):
    with pytest.raises(DataError, match="'stripes' is registered twice"):
        register_source(DataSource(name="stripes", summary="other", yields="images", resolve=lambda *a: None))


# -------------------------------------------------------- sets with too few good samples


def _bad_shards(directory, *, good: int, bad: int) -> str:
    sink = ShardSink(directory, prefix="train", max_samples=8)
    rng = np.random.default_rng(0)
    for i in range(good + bad):
        image = png_bytes(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) if i < good else b"not an image"
        sink.write(f"{i:04d}", {"png": image, "cls": b"0"})
    return sink.close().pattern


@pytest.mark.parametrize("workers", [0, 1])
def test_a_set_without_one_readable_sample_stops_with_the_counts(tmp_path, workers):
    pattern = _bad_shards(tmp_path, good=0, bad=20)
    config = DataConfig(source="shards", train_shards=pattern, resolution=8, crop_ratio=1.0, workers=workers)
    with deadline(60), pytest.raises(DataError) as info:
        next(iter(build_train_stream(config, batch_size=4, seed=0)))
    message = str(info.value)
    assert "found 0 readable samples of 20" in message and "unreadable image: 20" in message
    assert "train-000000.tar" in message and "Traceback" not in message


def test_fewer_good_samples_than_one_batch_is_an_error(tmp_path):
    pattern = _bad_shards(tmp_path, good=3, bad=13)
    config = DataConfig(source="shards", train_shards=pattern, resolution=8, crop_ratio=1.0, workers=0)
    with deadline(60), pytest.raises(DataError, match="3 readable samples of 16, fewer than one batch of 4"):
        next(iter(build_train_stream(config, batch_size=4, seed=0)))


def test_a_tiny_clean_split_still_reads_again(tmp_path):
    """Fewer samples than a batch per pass is fine when none is bad: the reader reads again."""
    pattern = _bad_shards(tmp_path, good=3, bad=0)
    config = DataConfig(
        source="shards", train_shards=pattern, resolution=8, crop_ratio=1.0, workers=0, samples_per_epoch=8
    )
    with deadline(60):
        assert len(next(iter(build_train_stream(config, batch_size=4, seed=0)))) == 4


def test_the_documented_new_source_works(tmp_path):
    """docs/data.md's example of a new source, run with its folder pointed at tmp_path."""
    page = (Path(__file__).parents[2] / "docs" / "data.md").read_text()
    code = re.search(r"### Adding a data source.*?```python\n(.*?)```", page, re.S).group(1)
    for split in ("train", "val"):
        sink = ShardSink(tmp_path, prefix=split, max_samples=1)
        for i in range(10):
            sink.write(f"{i}", {"png": png_bytes(np.zeros((8, 8, 3), np.uint8)), "cls": b"1"})
        sink.close()
    exec(code.replace("/data/laion-subset/", f"{tmp_path}/"), {})
    try:
        config = DataConfig(source="laion_subset", resolution=8, crop_ratio=1.0, workers=0, num_classes=2)
        assert sum(len(b) for b in build_eval_loader(config, batch_size=4)) == 10
        assert len(next(iter(build_train_stream(config, batch_size=4, seed=0)))) == 4
    finally:
        SOURCES.pop("laion_subset")
