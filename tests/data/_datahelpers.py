"""Helpers of the data tests: image bytes and tiny shard sets."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from varkit.data.codes import CodeLayout
from varkit.data.shards import ShardSink

#: ImageNet-style synset folder names: the class index is the sorted position.
SYNSETS = ("n01440764", "n01443537", "n01484850")


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_id_shards(directory: Path, *, shards: int, per_shard: int, crops: int = 1) -> str:
    """Code shards whose single 1×1 code is the sample's id (0 .. shards·per_shard - 1)."""
    layout = CodeLayout(schedule=((1, 1),), vocab_size=1 << 16, crops=crops)
    sink = ShardSink(directory, prefix="ids", max_samples=per_shard)
    for i in range(shards * per_shard):
        codes = np.full((crops, 1), i, dtype="<u2")
        sink.write(f"{i:05d}", {"u16": codes.tobytes(), "cls": str(i % 7).encode()})
    return sink.close(layout.meta()).pattern
