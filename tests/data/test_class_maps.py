"""`varkit shards` for a second split: the same class indices, or a clear refusal."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from _datahelpers import png_bytes

from varkit.cli import main
from varkit.data.shards import expand, iter_samples


def _folder(root: Path, classes: dict[str, int]) -> Path:
    """Class folders holding ``n`` 8×8 PNGs each."""
    rng = np.random.default_rng(len(classes))
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{name}_{i}.png").write_bytes(
                png_bytes(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
            )
    return root


def _labels(pattern: str) -> dict[str, int]:
    """``{key: class}`` of every sample of a shard pattern."""
    return {key: int(m["cls"]) for url in expand(pattern) for key, m in iter_samples(url)}


def shards(capsys, *argv) -> tuple[int, str]:
    code = main(["shards", *map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out + err


def _pattern(text: str) -> str:
    return re.search(r"^pattern  (\S+)$", text, re.M).group(1)


def test_a_val_split_with_a_subset_of_classes_keeps_the_train_indices(tmp_path, capsys):
    train = _folder(tmp_path / "train", {"n001": 2, "n002": 2, "n003": 2})
    val = _folder(tmp_path / "val", {"n001": 1, "n003": 1})
    out = tmp_path / "shards"
    assert shards(capsys, train, out)[0] == 0
    # without the class map, val alone would be {n001: 0, n003: 1}: refused, with the fix named
    code, text = shards(capsys, val, out, "--prefix", "val")
    assert code == 2 and f"--class-map {out / 'classes.json'}" in text and "disagree on class indices" in text
    code, text = shards(capsys, val, out, "--prefix", "val", "--class-map", out / "classes.json")
    assert code == 0, text
    assert "classes  2 of the 3 in the mapping" in text and "data.num_classes=3" in text
    assert sorted(_labels(_pattern(text)).values()) == [0, 2]  # n003 is 2, as in train
    assert json.loads((out / "classes.json").read_text()) == {"n001": 0, "n002": 1, "n003": 2}


def test_a_folder_with_a_class_the_map_lacks_is_refused(tmp_path, capsys):
    train = _folder(tmp_path / "train", {"n001": 1, "n002": 1})
    val = _folder(tmp_path / "val", {"n001": 1, "n004": 1})
    assert shards(capsys, train, tmp_path / "out")[0] == 0
    code, text = shards(capsys, val, tmp_path / "vout", "--class-map", tmp_path / "out" / "classes.json")
    assert code == 2 and "class folders n004 not in the class map (2 classes)" in text


@pytest.mark.parametrize("layout", ["csv", "one_per_line"])
def test_a_flat_val_folder_with_a_labels_file(tmp_path, capsys, layout):
    """ImageNet's raw val layout: every image in one folder, the classes in a labels file."""
    train = _folder(tmp_path / "train", {"n001": 1, "n002": 1, "n003": 1})
    out = tmp_path / "shards"
    assert shards(capsys, train, out)[0] == 0
    val = tmp_path / "val"
    val.mkdir()
    truth = {
        "ILSVRC2012_val_00000001": "n003",
        "ILSVRC2012_val_00000002": "n001",
        "ILSVRC2012_val_00000003": "n003",
    }
    for stem in truth:
        (val / f"{stem}.JPEG").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    labels = tmp_path / "labels.txt"
    if layout == "csv":  # Kaggle's LOC_val_solution.csv: the synset opens the second field
        rows = [f"{stem},{synset} 1 2 3 4 {synset} 5 6 7 8" for stem, synset in truth.items()]
        labels.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    else:  # one synset per line, in sorted file order
        labels.write_text("\n".join(truth[s] for s in sorted(truth)) + "\n")
    code, text = shards(
        capsys,
        val,
        out,
        "--prefix",
        "val",
        "--labels",
        labels,
        "--class-map",
        out / "classes.json",
        "--no-shuffle",
    )
    assert code == 0, text
    got = {k.split("/")[-1]: v for k, v in _labels(_pattern(text)).items()}
    assert got == {"ILSVRC2012_val_00000001": 2, "ILSVRC2012_val_00000002": 0, "ILSVRC2012_val_00000003": 2}
    assert "recipe   data.val_shards='" in text


def test_a_labels_file_missing_an_image(tmp_path, capsys):
    val = tmp_path / "val"
    val.mkdir()
    for stem in ("a", "b"):
        (val / f"{stem}.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    (tmp_path / "labels.csv").write_text("a,n001\n")
    code, text = shards(capsys, val, tmp_path / "out", "--labels", tmp_path / "labels.csv")
    assert code == 2 and "no class for 1 of the 2 images" in text and "b.png" in text


def test_an_output_inside_the_input_is_refused(tmp_path, capsys):
    src = _folder(tmp_path / "train", {"n001": 1, "n002": 1})
    code, text = shards(capsys, src, src / "out")
    assert code == 2 and "is inside the image folder" in text and "Traceback" not in text
    assert not (src / "out").exists()  # nothing for a second run to read as a class


def test_an_output_that_is_a_file_is_refused(tmp_path, capsys):
    src = _folder(tmp_path / "train", {"n001": 1})
    target = tmp_path / "file.tar"
    target.write_bytes(b"x")
    code, text = shards(capsys, src, target)
    assert code == 2 and "is a file; give a directory" in text
