"""`varkit shards SRC OUT`: image folders to shards and back."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from _datahelpers import SYNSETS, jpeg_bytes

from varkit.cli import main
from varkit.data import DataConfig, build_eval_loader, build_train_stream
from varkit.data.shards import count_samples, expand, read_index


def _read_all(pattern: str, *, classes: int, resolution: int = 16) -> list[tuple[int, bytes]]:
    config = DataConfig(
        source="shards",
        train_shards=pattern,
        val_shards=pattern,
        resolution=resolution,
        crop_ratio=1.0,
        num_classes=classes,
        workers=0,
    )
    out = []
    for batch in build_eval_loader(config, batch_size=4):
        pixels = ((batch.images + 1) * 127.5).round().to(dtype=torch.uint8)  # back to bytes
        for img, label in zip(pixels.permute(0, 2, 3, 1).numpy(), batch.labels.tolist()):
            out.append((label, img.tobytes()))
    return out


def test_round_trip_gives_the_same_pixels_classes_and_mapping(image_folder, tmp_path, capsys):
    root, pixels = image_folder
    out = tmp_path / "shards"
    assert main(["shards", str(root), str(out), "--no-progress", "--shard-size", "2k"]) == 0
    printed = capsys.readouterr().out
    assert "images   15" in printed and "classes  3" in printed and "skipped  0" in printed

    mapping = json.loads((out / "classes.json").read_text())
    assert mapping == {name: i for i, name in enumerate(SYNSETS)}  # sorted synsets, not creation order

    index = read_index(out)
    pattern = re.search(r"^pattern  (\S+)$", printed, re.M).group(1)
    urls = expand(pattern)
    assert len(urls) > 1, "a 2k shard size must give several shards"
    assert sum(index["shards"][u.rsplit("/", 1)[1]]["samples"] for u in urls) == 15
    assert [count_samples(u) for u in urls] == [index["shards"][u.rsplit("/", 1)[1]]["samples"] for u in urls]

    got = sorted(_read_all(pattern, classes=3))
    want = sorted((mapping[name], px.tobytes()) for name, imgs in pixels.items() for px in imgs)
    assert got == want  # PNG: exact pixels; crop_ratio 1 on 16 px images: no resampling


def test_unreadable_files_are_skipped_and_listed(image_folder, tmp_path, capsys):
    root, _ = image_folder
    good = jpeg_bytes(np.zeros((20, 20, 3), np.uint8))
    (root / SYNSETS[0] / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (root / SYNSETS[0] / "not_an_image.jpg").write_bytes(b"hello")
    (root / SYNSETS[0] / "notes.txt").write_text("not an image suffix: ignored")
    out = tmp_path / "shards"
    assert main(["shards", str(root), str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "images   15" in printed
    assert "skipped  2 unreadable files" in printed
    assert "truncated.JPEG" in printed and "not_an_image.jpg" in printed


@pytest.mark.parametrize("make", ["missing", "file", "empty", "no_images"])
def test_bad_src_exits_with_2(tmp_path, capsys, make):
    src = tmp_path / "src"
    if make == "file":
        src.write_text("x")
    elif make == "empty":
        src.mkdir()
    elif make == "no_images":
        (src / "n01440764").mkdir(parents=True)
    assert main(["shards", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and "varkit: error:" in err


def test_shuffled_order_mixes_classes_and_follows_the_seed(image_folder, tmp_path):
    root, _ = image_folder
    from varkit.data.folder import write_image_folder
    from varkit.data.shards import iter_samples

    def labels(seed, out):
        s = write_image_folder(root, tmp_path / out, seed=seed, progress=False)
        return [m["cls"] for u in expand(s.pattern) for _, m in iter_samples(u)]

    a, b, c = labels(0, "a"), labels(0, "b"), labels(1, "c")
    assert a == b and a != c
    assert a != sorted(a)


def test_shards_feed_training(image_folder, tmp_path):
    root, _ = image_folder
    from varkit.data.folder import write_image_folder

    s = write_image_folder(root, tmp_path / "out", progress=False)
    config = DataConfig(source="shards", train_shards=s.pattern, resolution=8, num_classes=3, workers=0)
    stream = build_train_stream(config, batch_size=4, seed=0, rank=0, world_size=1)
    assert stream.samples_per_epoch == 15 and stream.batches_per_epoch == 3
    batch = next(iter(stream))
    assert batch.images.shape == (4, 3, 8, 8) and batch.codes is None
    assert batch.images.min() >= -1 and batch.images.max() <= 1


def test_count_samples_follows_the_reader_key_rule(tmp_path):
    # A member without an extension belongs to no sample: counting it would promise the
    # epoch a sample the reader never yields.
    import io
    import tarfile

    from varkit.data.shards import iter_samples

    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.cls", b"1"), ("a.png", b"x"), ("README", b"notes"), ("b.cls", b"2")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert count_samples(str(path)) == len(list(iter_samples(str(path)))) == 2
