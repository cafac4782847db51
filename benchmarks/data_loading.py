"""Data loading speed: ImageNet-sized JPEGs to 256×256 training tensors, and code shards.

Measures, in one run on this machine:

1. images/s of one process turning JPEG bytes into a (3, 256, 256) float tensor in
   [-1, 1] with VAR's augmentation, the plain way (PIL decode, Lanczos resize of the
   whole image, crop, to tensor) beside varkit's path (JPEG draft decoding, Lanczos of
   the crop box alone, one copy into the batch, float conversion per batch);
2. the training stream (``build_train_stream``) over shards of the same JPEGs with
   1 and 2 DataLoader workers;
3. samples/s of a code-shard stream (VAR's 680 codes per image, 10 crops, uint16).

The JPEGs are made here: smooth coloured noise plus shapes plus fine grain, ~500×375,
saved at quality 90 (70-110 KB, like ImageNet's photos). Some are larger (up to
1000×750) as a share of ImageNet is, and those are where draft decoding helps.

Usage: .venv/bin/python benchmarks/data_loading.py [--images 96] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import cpu_model
from PIL import Image, ImageDraw

from varkit.data import DataConfig, build_train_stream, transforms
from varkit.data.codes import CodeLayout
from varkit.data.folder import write_image_folder
from varkit.data.shards import ShardSink

VAR_SCHEDULE = ((1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (8, 8), (10, 10), (13, 13), (16, 16))


def photo(w: int, h: int, rng: np.random.Generator) -> bytes:
    """A JPEG that compresses like a photo: smooth colour fields, shapes, grain."""
    coarse = rng.integers(0, 256, (h // 48 + 2, w // 48 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = rng.integers(0, w), rng.integers(0, h)
        r = rng.integers(10, max(w, h) // 4)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
    px = np.asarray(img).astype(np.int16) + rng.normal(0, 13, (h, w, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_folder(root: Path, n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    blobs = []
    for i in range(n):
        big = i % 8 == 7  # one in eight larger, as ImageNet has many
        w, h = (1000, 750) if big else (500, 375)
        if rng.random() < 0.3:
            w, h = h, w  # some portraits
        data = photo(w, h, rng)
        blobs.append(data)
        folder = root / f"n{i % 4:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i}.JPEG").write_bytes(data)
    return blobs


def bench_single(blobs: list[bytes], repeats: int, resolution: int = 256) -> tuple[float, float]:
    """Best-of-``repeats`` images/s of the plain path and of varkit's path, interleaved."""
    rng = np.random.default_rng(0)
    us = [tuple(rng.random(2)) for _ in blobs]
    plain_best = fast_best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for data, u in zip(blobs, us):
            transforms.plain_crop(data, resolution=resolution, crop_ratio=1.125, u=u)
        plain_best = max(plain_best, len(blobs) / (time.perf_counter() - t))
        t = time.perf_counter()
        batch = []
        for data, u in zip(blobs, us):
            batch.append(transforms.decode_crop(data, resolution=resolution, crop_ratio=1.125, u=u))
            if len(batch) == 32:
                transforms.to_model_range(np.stack(batch))
                batch = []
        if batch:
            transforms.to_model_range(np.stack(batch))
        fast_best = max(fast_best, len(blobs) / (time.perf_counter() - t))
    return plain_best, fast_best


def bench_stream(config: DataConfig, batches: int, batch_size: int) -> float:
    """Samples/s of a training stream after its first batch (worker start-up excluded),
    including the conversion of image batches to float (``batch.images``, on the CPU here;
    a GPU run converts after ``batch.to(device)``)."""
    it = iter(build_train_stream(config, batch_size=batch_size, seed=0))
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
        _ = next(it).images
    return batches * batch_size / (time.perf_counter() - t)


def write_code_shards(directory: Path, n: int) -> str:
    layout = CodeLayout(schedule=VAR_SCHEDULE, vocab_size=4096, crops=10)
    rng = np.random.default_rng(0)
    sink = ShardSink(directory, prefix="codes", max_samples=n // 8)
    for i in range(n):
        codes = rng.integers(0, 4096, (10, layout.length), dtype=np.uint16)
        sink.write(f"{i:07d}", {"u16": codes.astype("<u2").tobytes(), "cls": str(i % 1000).encode()})
    return sink.close(layout.meta()).pattern


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codes", type=int, default=16000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"Pillow {Image.__version__}; {time.strftime('%Y-%m-%d')}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        blobs = make_folder(tmp / "jpegs", args.images)
        sizes = np.array([len(b) for b in blobs[::1]]) / 1024
        normal = np.array([len(b) for i, b in enumerate(blobs) if i % 8 != 7]) / 1024
        print(
            f"{len(blobs)} JPEGs: 500×375 ones {normal.min():.0f}-{normal.max():.0f} KB "
            f"(median {np.median(normal):.0f}); all {sizes.min():.0f}-{sizes.max():.0f} KB"
        )

        small = [b for i, b in enumerate(blobs) if i % 8 != 7]
        plain, fast = bench_single(small, args.repeats)
        print(
            f"one process, 500×375 only: plain {plain:.0f} img/s, varkit {fast:.0f} img/s, × {fast / plain:.2f}"
        )
        plain, fast = bench_single(blobs, args.repeats)
        print(
            f"one process, mix with 1/8 at 1000×750: plain {plain:.0f} img/s, varkit {fast:.0f} img/s, "
            f"× {fast / plain:.2f}"
        )

        summary = write_image_folder(tmp / "jpegs", tmp / "shards", progress=False, shard_bytes=1 << 20)
        for workers in (0, 1, 2):
            config = DataConfig(
                source="shards",
                train_shards=summary.pattern,
                workers=workers,
                num_classes=4,
                shuffle_buffer=64,
            )
            rate = bench_stream(config, batches=max(args.images * 2 // 32, 4), batch_size=32)
            per = f" ({rate / workers:.0f} per worker)" if workers else " (in the training process)"
            print(f"train stream, workers={workers}: {rate:.0f} img/s{per}")

        pattern = write_code_shards(tmp / "codes", args.codes)
        size = os.path.getsize(pattern.replace("{000000..000007}", "000000")) / (args.codes // 8) / 1024
        for workers in (0, 2):
            config = DataConfig(source="codes", codes=pattern, workers=workers, num_classes=1000)
            rate = bench_stream(config, batches=args.codes // 2 // 256, batch_size=256)
            print(
                f"code stream (680 codes, 10 crops, {size:.1f} KB/image), workers={workers}: {rate:.0f} samples/s"
            )


if __name__ == "__main__":
    main()
