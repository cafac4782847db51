"""``varkit edit``: files written, and every bad input one paragraph with exit status 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from varkit.build import build_model, build_tokenizer
from varkit.checkpoint import save_checkpoint
from varkit.cli import main
from varkit.recipe import from_dict

#: A tiny scale-unit model on 16 px images: msvq scales 1, 2, 4 (4 px per code).
RECIPE = {
    "out_dir": "unused",
    "tokenizer": {
        "name": "msvq",
        "image_size": 16,
        "ch": 16,
        "ch_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "norm_groups": 8,
        "level_attention": False,
        "mid_attention": False,
        "vocab_size": 64,
        "code_dim": 8,
        "schedule": "1,2,4",
    },
    "unit": {"name": "scale"},
    "sampler": {"name": "topk_topp", "cfg": 1.5, "top_k": 8, "top_p": 0.9},
    "model": {"depth": 1, "width": 32, "heads": 2, "num_classes": 4},
    "data": {"resolution": 16, "num_classes": 4, "synthetic": {"num_classes": 4}},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A checkpoint of a freshly initialised tiny model (editing needs no trained weights)."""
    torch.manual_seed(0)
    recipe = from_dict(RECIPE)
    tokenizer = build_tokenizer(recipe)
    model = build_model(recipe, tokenizer)
    root = tmp_path_factory.mktemp("edit-run")
    weights = {"model": model.state_dict(), "tokenizer": tokenizer.state_dict()}
    save_checkpoint(root / "checkpoints", 1, weights=weights, trainer_state={}, recipe=RECIPE)
    return root


@pytest.fixture
def files(tmp_path):
    g = np.random.default_rng(0)
    paths = {}
    for name in ("a", "b"):
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(g.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(paths[name])
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    paths["mask"] = tmp_path / "mask.png"
    Image.fromarray(mask).save(paths["mask"])
    paths["grid_mask"] = tmp_path / "grid_mask.png"
    Image.fromarray(mask[::4, ::4]).save(paths["grid_mask"])  # the 4×4 code grid
    return paths


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_one_image_one_seed_writes_the_result_and_a_grid(run_dir, files, tmp_path, capsys):
    out = tmp_path / "out" / "edited.png"
    code, stdout, err = run_cli(
        capsys, "edit", run_dir, "--image", files["a"], "--box", "0.25,0.25,0.75,0.75", "--out", out,
        "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert np.asarray(Image.open(out)).shape == (16, 16, 3)
    grid = out.with_name("edited-grid.png")
    assert np.asarray(Image.open(grid)).shape == (18 + 2, 3 * 18 + 2, 3)  # input, mask, result
    assert stdout.split() == [str(out), str(grid)]


def test_several_images_and_seeds(run_dir, files, tmp_path, capsys):
    out = tmp_path / "edited.png"
    code, _, err = run_cli(
        capsys, "edit", run_dir, "--image", files["a"], files["b"], "--mask", files["mask"],
        "--seeds", "3,4", "--class", "2", "--keep-until-step", "1", "--out", out, "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    names = sorted(p.name for p in tmp_path.glob("edited-*seed*.png"))
    assert names == ["edited-0-seed3.png", "edited-0-seed4.png", "edited-1-seed3.png", "edited-1-seed4.png"]
    assert np.asarray(Image.open(tmp_path / "edited-grid.png")).shape == (2 * 18 + 2, 4 * 18 + 2, 3)
    # A mask on the code grid is the same edit as the pixel mask it was cut from.
    again = tmp_path / "again.png"
    code, _, err = run_cli(
        capsys, "edit", run_dir, "--image", files["a"], files["b"], "--mask", files["grid_mask"],
        "--seeds", "4", "--class", "2", "--keep-until-step", "1", "--out", again, "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "edited-1-seed4.png")),
        np.asarray(Image.open(tmp_path / "again-1-seed4.png")),
    )


def _bad(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        Image.fromarray(content).save(path)
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (lambda f, t: ["--mask", _bad(t, "small.png", np.zeros((10, 12), np.uint8))],
         "the mask is 10x12 but must have the image's size 16x16 or the code grid's 4x4"),
        (lambda f, t: ["--mask", _bad(t, "empty.png", b"")], "is an empty file"),
        (lambda f, t: ["--mask", _bad(t, "junk.png", b"not a png")], "cannot be read as an image"),
        (lambda f, t: ["--mask", _bad(t, "black.png", np.zeros((16, 16), np.uint8))], "marks nothing to regenerate"),
        (lambda f, t: ["--box", "0.5,0.5,0.2,1"], "must satisfy 0 <= y0 < y1 <= 1"),
        (lambda f, t: ["--box", "a,b,c,d"], "a box is four numbers"),
        (lambda f, t: ["--box", "0,0,1,1", "--class", "4"], "--class 4 is outside 0..3 of this model"),
        (lambda f, t: ["--box", "0,0,1,1", "--keep-until-step", "9"], "keep_until_step=9 is outside 0..3"),
        (lambda f, t: ["--mask", f["mask"], "--outpaint"], "--outpaint goes with --box"),
        (lambda f, t: ["--box", "0,0,1,1", "--seeds", "x"], "--seeds 'x' must be comma-separated integers"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_one_paragraph(run_dir, files, tmp_path, capsys, extra, message):
    out = tmp_path / "out.png"
    code, _, err = run_cli(
        capsys,
        "edit",
        run_dir,
        "--image",
        files["a"],
        *extra(files, tmp_path),
        "--out",
        out,
        "--device",
        "cpu",
    )
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("varkit: error: ")  # the paragraph is the last line
    assert not out.exists()


def test_masks_of_different_sizes_are_refused(run_dir, files, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "edit", run_dir, "--image", files["a"], files["b"], "--mask", files["mask"], files["grid_mask"],
        "--out", tmp_path / "o.png", "--device", "cpu",
    )  # fmt: skip
    assert code == 2
    assert "the masks have different shapes [(4, 4), (16, 16)]" in err


def test_image_of_another_resolution_is_refused(run_dir, tmp_path, capsys):
    big = _bad(tmp_path, "big.png", np.zeros((32, 32, 3), np.uint8))
    code, _, err = run_cli(
        capsys,
        "edit",
        run_dir,
        "--image",
        big,
        "--box",
        "0,0,1,1",
        "--out",
        tmp_path / "o.png",
        "--device",
        "cpu",
    )
    assert code == 2
    assert "the images are 32x32 px but this model's tokenizer works on 16x16 px" in err


def test_a_unit_that_cannot_edit_exits_2(run_dir, files, tmp_path, capsys, monkeypatch):
    from varkit.base import PredictionUnit
    from varkit_plugins.units.scale import NextScale

    monkeypatch.setattr(NextScale, "keep_positions", PredictionUnit.keep_positions)
    code, _, err = run_cli(
        capsys, "edit", run_dir, "--image", files["a"], "--box", "0,0,1,1", "--out", tmp_path / "o.png",
        "--device", "cpu",
    )  # fmt: skip
    assert code == 2
    assert "unit 'scale' cannot edit images" in err
