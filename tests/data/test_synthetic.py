"""The synthetic shapes: determinism, the cache, and the analytic classifier."""

from __future__ import annotations

import filecmp
import multiprocessing

import numpy as np
import pytest
import torch

from varkit.data import DataConfig, SyntheticConfig, build_eval_loader
from varkit.data.synthetic import CLASS_NAMES, HUES, SHAPES, classify, ensure_synthetic, render, write_split


def _split(directory, seed):
    write_split(
        directory, split="train", count_per_class=3, num_classes=10, size=18, margin=2, seed=seed, shards=2
    )
    return sorted(p.name for p in directory.iterdir())


def test_same_seed_gives_byte_identical_shards(tmp_path):
    names = _split(tmp_path / "a", 0)
    assert names == _split(tmp_path / "b", 0) == ["shards.json", "train-000000.tar", "train-000001.tar"]
    same, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", names, shallow=False)
    assert same == names and mismatch == [] and errors == []
    _split(tmp_path / "c", 1)
    assert not filecmp.cmp(tmp_path / "a" / names[1], tmp_path / "c" / names[1], shallow=False)


def test_classes_fix_colour_and_shape():
    assert len(CLASS_NAMES) == len(HUES) == len(SHAPES) == 10
    assert len(set(SHAPES)) == 10 and len(set(HUES)) == 10
    assert all(name.split()[-1].replace("-", "_") == shape for name, shape in zip(CLASS_NAMES, SHAPES))


def _held_out(n, resolution, seed=12345):
    size, margin = round(1.125 * resolution), round(1.125 * resolution) - resolution
    crop_rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % 10
        px = render(label, size, np.random.default_rng([seed, 9, i]), margin=margin)
        x, y = crop_rng.integers(0, margin + 1, 2)
        images.append(px[y : y + resolution, x : x + resolution])
        labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255, torch.tensor(labels)


@pytest.mark.parametrize("resolution", [32, 64])
def test_classifier_accuracy_on_held_out_images(resolution):
    images, labels = _held_out(300, resolution)
    assert (classify(images) == labels).float().mean() >= 0.95
    assert (classify(images, use_shape=False) == labels).float().mean() >= 0.95


def test_classifier_uses_the_shape():
    """A class's colour on another class's shape is no class."""
    images, labels = _held_out(60, 32)
    cyan = torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1)  # the ring's colour (class 5)
    discs = images[labels == 0].clone()  # red circles
    fg = (discs.amax(1) - discs.amin(1)) > 0.5
    cyan_discs = torch.where(fg[:, None], cyan, discs)
    assert (classify(cyan_discs, use_shape=False) == 5).all()
    assert (classify(cyan_discs) == -1).all()
    assert (classify(torch.full((2, 3, 32, 32), 0.5)) == -1).all(), "a blank grey image has no class"


def test_classifier_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(b, 3, H, W\)"):
        classify(torch.zeros(3, 32, 32))


def _ensure(cache):
    config = DataConfig(
        resolution=16, cache_dir=cache, synthetic=SyntheticConfig(images_per_class=3, val_images_per_class=2)
    )
    return ensure_synthetic(config)["dir"]


def test_cache_is_written_once_and_survives_a_race(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        dirs = pool.map(_ensure, [str(tmp_path)] * 2)
    assert dirs[0] == dirs[1]
    entries = list((tmp_path / "synthetic").iterdir())
    assert len(entries) == 1, f"a temporary directory was left behind: {entries}"
    config = DataConfig(
        resolution=16,
        cache_dir=str(tmp_path),
        synthetic=SyntheticConfig(images_per_class=3, val_images_per_class=2),
    )
    loader = build_eval_loader(config, batch_size=8)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 20
    assert batches[0].images.shape[1:] == (3, 16, 16)
    images = torch.cat([b.images for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert (classify((images + 1) / 2) == labels).float().mean() >= 0.95


def test_cache_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VARKIT_CACHE", str(tmp_path / "env"))
    config = DataConfig(resolution=16, synthetic=SyntheticConfig(images_per_class=2, val_images_per_class=1))
    assert ensure_synthetic(config)["dir"].startswith(str(tmp_path / "env"))
