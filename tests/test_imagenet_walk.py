"""The new user's ImageNet walk, in miniature, with the commands copied from docs/imagenet.md.

A folder laid out like raw ImageNet (train in class folders, val flat with a labels
file; four classes of generated photos of odd sizes) goes through the page's "Try it
small" block, run by bash exactly as written: shards, validate, train, sample, eval.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from varkit.data.shards import expand, iter_samples
from varkit.data.synthetic import render

REPO = Path(__file__).parents[1]
PAGE = REPO / "docs" / "imagenet.md"
SYNSETS = ("n01440764", "n01443537", "n01484850", "n01491361")


def small_walk() -> str:
    """The bash block between the page's small-walk markers."""
    text = PAGE.read_text()
    block = re.search(r"<!-- small walk.*?-->\s*```bash\n(.*?)```\s*<!-- /small walk -->", text, re.S)
    assert block, "docs/imagenet.md lost its small-walk block"
    return block.group(1)


def _jpeg(label: int, rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A photo-like JPEG of the class's shape, at an odd, non-square size."""
    pixels = render(label, 48, rng)
    buf = io.BytesIO()
    Image.fromarray(pixels).resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_imagenet_small(root: Path, *, train_per_class: int = 16, val_per_class: int = 2) -> dict[str, str]:
    """ImageNet's raw layout; returns the true synset of every val image (by file stem)."""
    rng = np.random.default_rng(0)
    sizes = [(48, 40), (40, 52), (56, 44), (44, 44)]
    for label, synset in enumerate(SYNSETS):
        folder = root / "train" / synset
        folder.mkdir(parents=True)
        for i in range(train_per_class):
            (folder / f"{synset}_{i}.JPEG").write_bytes(_jpeg(label, rng, sizes[i % 4]))
    (root / "val").mkdir()
    order = rng.permutation([label for label in range(len(SYNSETS)) for _ in range(val_per_class)])
    truth = {}
    for n, label in enumerate(order, 1):
        stem = f"ILSVRC2012_val_{n:08d}"
        (root / "val" / f"{stem}.JPEG").write_bytes(_jpeg(int(label), rng, sizes[n % 4]))
        truth[stem] = SYNSETS[label]
    rows = [f"{stem},{synset} 3 4 40 44" for stem, synset in truth.items()]
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return truth


@pytest.mark.slow
def test_the_documented_small_walk_runs_as_written(tmp_path):
    truth = make_imagenet_small(tmp_path / "imagenet-small")
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-c", "set -euo pipefail -x\n" + small_walk()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    mapping = json.loads((tmp_path / "shards" / "classes.json").read_text())
    assert mapping == {s: i for i, s in enumerate(SYNSETS)}
    val = {
        key: int(m["cls"])
        for url in expand(str(tmp_path / "shards" / "val-{000000..000000}.tar"))
        for key, m in iter_samples(url)
    }
    assert val == {
        stem: mapping[synset] for stem, synset in truth.items()
    }  # the labels file, with train's indices

    run = tmp_path / "runs" / "imagenet_small"
    assert (run / "checkpoints" / "latest").is_file() and (run / "tokenizer" / "checkpoints").is_dir()
    samples = np.load(tmp_path / "samples" / "imagenet_small" / "samples.npz")
    assert samples["arr_0"].shape == (8, 32, 32, 3) and sorted(samples["labels"].tolist()) == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    report = json.loads((run / "eval.json").read_text())
    assert report["images"] == 8 and np.isfinite(report["loss"])
