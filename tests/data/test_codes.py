"""Code shards: `varkit shards --tokenize` and training from them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from varkit.base import Tokenizer
from varkit.cli import main
from varkit.data import DataConfig, build_train_stream, transforms
from varkit.data.codes import CodeLayout, crop_params, split_codes, write_code_shards
from varkit.data.shards import expand, iter_samples, read_index
from varkit.errors import DataError


class TinyTokenizer(Tokenizer):
    """Codes = grey level of area-pooled cells at 1×1 and 2×2: enough to tell crops apart."""

    name = "tiny"

    def __init__(self, vocab: int = 300):
        super().__init__(None)
        self._vocab = vocab

    @property
    def schedule(self):
        return ((1, 1), (2, 2))

    @property
    def vocab_size(self):
        return self._vocab

    def encode(self, images):
        grey = images.mean(1, keepdim=True)  # (b, 1, H, W) in [-1, 1]
        out = []
        for h, w in self.schedule:
            cell = F.adaptive_avg_pool2d(grey, (h, w))[:, 0]
            out.append(((cell + 1) / 2 * (self._vocab - 1)).round().long())
        return out


@pytest.mark.parametrize("vocab", [300, 70000])
def test_code_shards_round_trip(image_folder, tmp_path, vocab):
    root, _ = image_folder
    tok = TinyTokenizer(vocab)
    s = write_code_shards(tok, str(root), tmp_path / "codes", crops=3, resolution=12, progress=False)
    assert s.images == 15 and s.crops == 3
    index = read_index(tmp_path / "codes")
    meta = index["sets"]["train"]
    assert meta["kind"] == "codes" and meta["schedule"] == [[1, 1], [2, 2]] and meta["crops"] == 3
    ext = "u16" if vocab <= 65536 else "i32"
    assert meta["ext"] == ext
    assert json.loads((tmp_path / "codes" / "classes.json").read_text())["n01440764"] == 0

    # each stored crop is the tokenizer's codes of that crop of the image
    stored = {}
    params = crop_params(3)
    for url in expand(s.pattern):
        for key, members in iter_samples(url):
            codes = np.frombuffer(members[ext], dtype="<u2" if ext == "u16" else "<i4").reshape(3, 5)
            data = (root / f"{key.replace('_x', '.x')}.PNG").read_bytes()
            crops = np.stack(
                [
                    transforms.decode_crop(data, resolution=12, crop_ratio=1.125, u=u, flip=f)
                    for u, f in params
                ]
            )
            want = torch.cat([c.flatten(1) for c in tok.encode(transforms.to_model_range(crops))], 1)
            assert np.array_equal(codes, want.numpy())
            stored.setdefault(int(members["cls"]), []).append({tuple(row) for row in codes.tolist()})

    # training reads one of the crops per sample, as code maps
    config = DataConfig(source="codes", codes=s.pattern, num_classes=3, workers=0)
    stream = build_train_stream(config, batch_size=5, seed=0, tokenizer=tok)
    batch = next(iter(stream))
    assert batch.images is None
    assert [tuple(c.shape) for c in batch.codes] == [(5, 1, 1), (5, 2, 2)]
    assert all(c.dtype == torch.int64 for c in batch.codes)
    flat = torch.cat([c.flatten(1) for c in batch.codes], 1)
    for row, label in zip(flat.tolist(), batch.labels.tolist()):
        assert any(tuple(row) in crops for crops in stored[label]), "a stored crop of an image of that class"


def test_tokenize_cli_and_schedule_check(image_folder, tmp_path, monkeypatch, capsys):
    root, _ = image_folder
    import varkit.cli.shards

    monkeypatch.setattr(varkit.cli.shards, "load_tokenizer", lambda path, device="cpu": TinyTokenizer())
    out = tmp_path / "codes"
    code = main(
        [
            "shards",
            "--tokenize",
            "run",
            str(root),
            str(out),
            "--resolution",
            "12",
            "--crops",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "images   15 (2 crops each)" in printed
    pattern = printed.split("pattern  ")[1].split()[0]

    class Other(TinyTokenizer):
        @property
        def schedule(self):
            return ((1, 1), (3, 3))

    config = DataConfig(source="codes", codes=pattern, num_classes=3, workers=0)
    with pytest.raises(DataError, match="write them again with this tokenizer"):
        build_train_stream(config, batch_size=5, seed=0, tokenizer=Other())

    # images from code shards' source: shards written by `varkit shards` work as SRC too
    assert main(["shards", str(root), str(tmp_path / "img"), "--no-progress"]) == 0
    img_pattern = capsys.readouterr().out.split("pattern  ")[1].split()[0]
    assert (
        main(
            [
                "shards",
                "--tokenize",
                "run",
                img_pattern,
                str(tmp_path / "c2"),
                "--resolution",
                "12",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "images   15 (1 crops each)" in capsys.readouterr().out


def test_crops_out_of_range_exit_with_2(image_folder, tmp_path, monkeypatch):
    import varkit.cli.shards

    monkeypatch.setattr(varkit.cli.shards, "load_tokenizer", lambda path, device="cpu": TinyTokenizer())
    argv = ["shards", "--tokenize", "run", str(image_folder[0]), str(tmp_path / "c"), "--resolution", "12"]
    assert main([*argv, "--crops", "11"]) == 2


def test_split_codes_inverts_flattening():
    layout = CodeLayout(schedule=((1, 1), (2, 2), (3, 3)), vocab_size=10)
    flat = torch.arange(2 * layout.length).view(2, layout.length)
    maps = split_codes(flat, layout.schedule)
    assert [tuple(m.shape) for m in maps] == [(2, 1, 1), (2, 2, 2), (2, 3, 3)]
    assert torch.equal(torch.cat([m.flatten(1) for m in maps], 1), flat)


def test_files_that_differ_only_in_extension_stay_two_samples(tmp_path):
    # Keys as `varkit shards` writes them: unique, so x.png and x.jpg are not merged.
    from PIL import Image

    (tmp_path / "src" / "a").mkdir(parents=True)
    for ext in ("png", "jpg"):
        Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "src" / "a" / f"x.{ext}")
    s = write_code_shards(
        TinyTokenizer(), str(tmp_path / "src"), tmp_path / "codes", resolution=12, progress=False
    )
    keys = [key for url in expand(s.pattern) for key, _ in iter_samples(url)]
    assert s.images == 2 and len(keys) == len(set(keys)) == 2
