"""The training stream: splitting, order, resume, bad samples, missing shards."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
from _datahelpers import jpeg_bytes, png_bytes, write_id_shards
from hypothesis import given, settings
from hypothesis import strategies as st

from varkit.data import DataConfig, SyntheticConfig, build_eval_loader, build_train_stream
from varkit.data.shards import ShardSink, expand
from varkit.errors import DataError


def _ids(batch) -> list[int]:
    return batch.codes[0].flatten().tolist()


def _id_config(pattern: str, **kw) -> DataConfig:
    return DataConfig(
        source="codes", codes=pattern, num_classes=7, **{"workers": 0, "shuffle_buffer": 16, **kw}
    )


@pytest.mark.parametrize(("shards", "per_shard"), [(8, 12), (2, 48)])  # split by shard, and by sample
def test_two_ranks_two_workers_read_every_sample_once_per_epoch(tmp_path, shards, per_shard):
    pattern = write_id_shards(tmp_path, shards=shards, per_shard=per_shard)
    config = _id_config(pattern, workers=2)
    seen: list[int] = []
    for rank in range(2):
        stream = build_train_stream(config, batch_size=4, seed=3, rank=rank, world_size=2)
        assert stream.batches_per_epoch == 12
        it = iter(stream)
        seen += [i for _ in range(12) for i in _ids(next(it))]
        assert stream.epoch == 0 and stream.batch == 12
    assert sorted(seen) == list(range(96))


def test_order_is_fixed_by_the_seed(tmp_path):
    pattern = write_id_shards(tmp_path, shards=4, per_shard=10)

    def first(seed, workers):
        it = iter(build_train_stream(_id_config(pattern, workers=workers), batch_size=5, seed=seed))
        return [_ids(next(it)) for _ in range(8)]  # crosses into epoch 1

    a = first(0, 2)
    assert a == first(0, 2)
    assert a != first(1, 2)
    assert sorted(i for batch in a for i in batch) == list(range(40))  # epoch 0 is a permutation


def _resume_matches(pattern, *, workers, stop, more, **kw):
    config = _id_config(pattern, workers=workers, **kw)
    whole = iter(build_train_stream(config, batch_size=3, seed=5))
    expected = [_ids(next(whole)) for _ in range(stop + more)]
    first = build_train_stream(config, batch_size=3, seed=5)
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = first.state_dict()
    resumed = build_train_stream(config, batch_size=3, seed=5)
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert [_ids(next(it)) for _ in range(more)] == expected[stop:]


@settings(max_examples=12, deadline=None)
@given(stop=st.integers(0, 30), more=st.integers(1, 8), resampled=st.booleans())
def test_resume_gives_the_same_next_batches_in_process(tmp_path_factory, stop, more, resampled):
    directory = tmp_path_factory.mktemp("ids")
    pattern = write_id_shards(directory, shards=3, per_shard=7)  # 21 samples: 7 batches of 3
    _resume_matches(pattern, workers=0, stop=stop, more=more, resampled=resampled)


@pytest.mark.parametrize(("workers", "stop"), [(2, 3), (1, 4), (2, 8)])
def test_resume_gives_the_same_next_batches_with_workers(tmp_path, workers, stop):
    pattern = write_id_shards(tmp_path, shards=5, per_shard=5)  # 25 samples: 8 batches of 3
    _resume_matches(pattern, workers=workers, stop=stop, more=6)


def test_resume_of_augmented_images_is_exact(tmp_path):
    """Synthetic images with random crops and flips, two workers, across an epoch end."""
    config = DataConfig(
        resolution=16,
        hflip=True,
        workers=2,
        cache_dir=str(tmp_path),
        synthetic=SyntheticConfig(images_per_class=4, val_images_per_class=1),
    )
    whole = iter(build_train_stream(config, batch_size=8, seed=1))  # 40 samples: 5 batches
    expected = [next(whole) for _ in range(9)]
    first = build_train_stream(config, batch_size=8, seed=1)
    it = iter(first)
    for _ in range(7):
        next(it)
    resumed = build_train_stream(config, batch_size=8, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert resumed.epoch == 1
    for want, got in zip(expected[7:], iter(resumed)):
        assert torch.equal(want.images, got.images) and torch.equal(want.labels, got.labels)


def _bad_shard(directory) -> str:
    """Three bad samples first, then ten good ones, in one shard."""
    sink = ShardSink(directory, prefix="bad")
    good = jpeg_bytes(np.full((12, 12, 3), 128, np.uint8))
    sink.write("truncated", {"jpg": good[: len(good) // 2], "cls": b"1"})
    sink.write("no_cls", {"png": png_bytes(np.zeros((12, 12, 3), np.uint8))})
    sink.write("out_of_range", {"png": png_bytes(np.zeros((12, 12, 3), np.uint8)), "cls": b"3"})
    for i in range(10):
        sink.write(f"good{i}", {"jpg": good, "cls": str(i % 3).encode()})
    return sink.close().pattern


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_samples_are_skipped_and_counted(tmp_path, workers, caplog):
    pattern = _bad_shard(tmp_path)
    config = DataConfig(
        source="shards",
        train_shards=pattern,
        val_shards=pattern,
        num_classes=3,
        resolution=8,
        shuffle_buffer=0,
        workers=workers,
        samples_per_epoch=10,
    )
    stream = build_train_stream(config, batch_size=5, seed=0)
    it = iter(stream)
    batches = [next(it), next(it)]
    assert all(b.images.shape == (5, 3, 8, 8) for b in batches)
    assert stream.skipped == Counter({"unreadable image": 1, "no cls": 1, "class out of range": 1})
    assert stream.skipped_total == 3
    assert stream.state_dict()["skipped"] == dict(stream.skipped)

    loader = build_eval_loader(config, batch_size=4)
    assert sum(len(b) for b in loader) == 10
    assert sum(loader.skipped.values()) == 3


def test_missing_pattern_names_it_and_suggests_varkit_shards(tmp_path):
    pattern = str(tmp_path / "train-{000000..000009}.tar")
    with pytest.raises(DataError, match=r"varkit shards") as info:
        build_train_stream(DataConfig(source="shards", train_shards=pattern), batch_size=2, seed=0)
    assert pattern in str(info.value)


def test_partly_missing_pattern_lists_what_is_missing(tmp_path):
    pattern = write_id_shards(tmp_path, shards=3, per_shard=2)
    os.remove(expand(pattern)[1])
    with pytest.raises(DataError, match=r"1 of the 3 shards") as info:
        build_train_stream(_id_config(pattern), batch_size=2, seed=0)
    assert "ids-000001.tar" in str(info.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_that_disappears_is_reported(tmp_path, workers):
    pattern = write_id_shards(tmp_path, shards=4, per_shard=4)
    stream = build_train_stream(_id_config(pattern, workers=workers), batch_size=2, seed=0)
    os.remove(expand(pattern)[2])
    with pytest.raises(DataError, match=r"ids-000002.tar.*moved or deleted") as info:
        for _ in iter(stream):
            pass
    assert "Traceback" not in str(info.value)


def test_a_truncated_shard_is_reported(tmp_path):
    pattern = write_id_shards(tmp_path, shards=1, per_shard=20)
    path = expand(pattern)[0]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 + 100)
    stream = build_train_stream(_id_config(pattern, samples_per_epoch=20), batch_size=2, seed=0)
    with pytest.raises(DataError, match=r"ids-000000.tar could not be read to the end.*truncated"):
        for _ in iter(stream):
            pass


def test_pipe_urls_are_read(image_folder, tmp_path):
    from types import SimpleNamespace

    from varkit.data.folder import write_image_folder

    s = write_image_folder(image_folder[0], tmp_path / "images", progress=False)
    piped = f"pipe:cat {s.pattern}"
    config = DataConfig(
        source="shards", train_shards=piped, samples_per_epoch=15, num_classes=3, resolution=8, workers=0
    )
    batch = next(iter(build_train_stream(config, batch_size=15, seed=0)))
    assert sorted(batch.labels.tolist()) == [0] * 6 + [1] * 5 + [2] * 4

    # code shards over a pipe have no index beside them: the tokenizer gives the layout
    write_id_shards(tmp_path, shards=2, per_shard=3)
    piped = f"pipe:cat {tmp_path}/ids-{{000000..000001}}.tar"
    tokenizer = SimpleNamespace(schedule=((1, 1),), vocab_size=1 << 16)
    stream = build_train_stream(
        _id_config(piped, samples_per_epoch=6), batch_size=6, seed=0, tokenizer=tokenizer
    )
    assert sorted(_ids(next(iter(stream)))) == list(range(6))


def test_pipe_without_a_count_asks_for_samples_per_epoch(tmp_path):
    write_id_shards(tmp_path, shards=1, per_shard=3)
    piped = f"pipe:cat {tmp_path}/ids-000000.tar"
    with pytest.raises(DataError, match="samples_per_epoch"):
        build_train_stream(DataConfig(source="shards", train_shards=piped), batch_size=2, seed=0)


def test_codes_source_rejects_image_shards(image_folder, tmp_path):
    from varkit.data.folder import write_image_folder

    s = write_image_folder(image_folder[0], tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="holds images, not codes"):
        build_train_stream(DataConfig(source="codes", codes=s.pattern), batch_size=2, seed=0)
