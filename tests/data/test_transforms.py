"""VAR's augmentation: the fast path gives the plain path's pixels."""

from __future__ import annotations

import numpy as np
import torch
from _datahelpers import jpeg_bytes, png_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from varkit.data import transforms


def _photo(w, h, seed=0, noise=12, cell=8):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // cell + 1, w // cell + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))
    return np.clip(smooth.astype(int) + rng.integers(-noise, noise + 1, smooth.shape), 0, 255).astype(
        np.uint8
    )


def test_fast_path_matches_the_plain_path_on_jpeg():
    data = jpeg_bytes(_photo(500, 375, noise=0, cell=40))  # 64 px crops: decoded at 1/2 scale
    for u in (None, (0.3, 0.8)):
        fast = transforms.to_model_range(
            transforms.decode_crop(data, resolution=64, crop_ratio=1.125, u=u)[None]
        )[0]
        plain = transforms.plain_crop(data, resolution=64, crop_ratio=1.125, u=u)
        assert fast.shape == plain.shape == (3, 64, 64)
        # draft decoding filters differently from Lanczos: a few grey levels on smooth content
        diff = (fast - plain).abs() * 127.5
        assert diff.mean() < 2.0 and diff.max() < 40


def test_png_at_its_own_size_is_copied_exactly():
    px = _photo(20, 20)
    out = transforms.decode_crop(png_bytes(px), resolution=20, crop_ratio=1.0, u=(0.5, 0.5))
    assert np.array_equal(out, px)
    flipped = transforms.decode_crop(png_bytes(px), resolution=20, crop_ratio=1.0, flip=True)
    assert np.array_equal(flipped, px[:, ::-1])


@settings(max_examples=30, deadline=None)
@given(
    w=st.integers(1, 2000),
    h=st.integers(1, 2000),
    r=st.integers(1, 300),
    u=st.one_of(st.none(), st.tuples(st.floats(0, 0.999999), st.floats(0, 0.999999))),
)
def test_crops_lie_inside_the_resized_image(w, h, r, u):
    size = transforms.resized_size(w, h, r)
    assert min(size) == r
    x, y = transforms.crop_offsets(size, r, u)
    assert 0 <= x <= size[0] - r and 0 <= y <= size[1] - r


def test_model_range():
    batch = np.array([[[[0, 255, 128]]]], dtype=np.uint8)  # (1, 1, 1, 3)
    out = transforms.to_model_range(batch)
    assert out.shape == (1, 3, 1, 1)
    assert torch.allclose(out.flatten(), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]), atol=1e-6)
