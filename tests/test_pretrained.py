"""The pretrained-model layout: save_pretrained / from_pretrained, runs, the Hub, class names, refusals."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml

import varkit
from varkit import checkpoint as ck
from varkit import pretrained
from varkit import recipe as recipe_mod
from varkit.build import build_model, build_tokenizer
from varkit.cli import main
from varkit.errors import CheckpointError, VarkitError
from varkit.loading import Loaded, load_pretrained, resolve_classes, save_pretrained
from varkit.pipeline import Pipeline
from varkit.pretrained import ModelCard

NAMES = ("red circle", "orange square", "yellow triangle")


def tiny_recipe(unit: str = "token", **model) -> recipe_mod.Recipe:
    tokenizer = {"name": "vq", "image_size": 16, "ch": 16, "ch_mult": [1, 1, 2], "num_res_blocks": 1}
    tokenizer |= {"norm_groups": 8, "code_dim": 8, "vocab_size": 32, "mid_attention": False}
    if unit == "scale":
        tokenizer |= {"name": "msvq", "schedule": "1,2,4"}
    return recipe_mod.from_dict(
        {
            "out_dir": "runs/tiny",
            "tokenizer": tokenizer,
            "unit": {"name": unit},
            "sampler": {"name": "topk_topp", "top_k": 8, "cfg": 1.0},
            "model": {"depth": 1, "width": 32, "heads": 2, "num_classes": 3, **model},
            "data": {"resolution": 16, "num_classes": 3, "synthetic": {"num_classes": 3}},
        }
    )


def tiny_pipe(unit: str = "token", *, names=NAMES, seed: int = 0) -> Pipeline:
    torch.manual_seed(seed)
    recipe = tiny_recipe(unit)
    tokenizer = build_tokenizer(recipe)
    model = build_model(recipe, tokenizer)
    with torch.no_grad():  # off the init: a zero-ish head would hide a wrong load
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return Pipeline(tokenizer, model, recipe=recipe, class_names=names, source=Path("memory"))


def fake_run(tmp_path: Path, pipe: Pipeline, names=NAMES) -> Path:
    """A run directory as `varkit run` leaves it, with one checkpoint (no training needed)."""
    run = tmp_path / "run"
    ck.save_checkpoint(
        run / "checkpoints",
        7,
        weights={"model": pipe.model.state_dict(), "tokenizer": pipe.tokenizer.state_dict()},
        trainer_state={"step": 7},
        recipe=pipe.recipe.to_dict(),
    )
    (run / "recipe.yaml").write_text(pipe.recipe.to_yaml())
    (run / "classes.json").write_text(json.dumps({n: i for i, n in enumerate(names)}))
    (run / "metrics.jsonl").write_text(
        json.dumps({"stage": "ar", "step": 7, "loss": 2.5})
        + "\n"
        + json.dumps({"stage": "ar", "step": 7, "sample_class_accuracy": 0.9, "sample_colour_accuracy": 1.0})
        + "\n"
    )
    return run


# ------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("unit", ["token", "scale"])
def test_save_then_load_generates_the_same_images(tmp_path, unit):
    pipe = tiny_pipe(unit)
    out = pipe.save_pretrained(tmp_path / "model")
    assert {p.name for p in out.iterdir()} == set(pretrained.FILES)
    again = varkit.from_pretrained(out)
    assert again.class_names == NAMES
    for section in ("model", "unit", "sampler", "attention", "data", "train"):
        assert getattr(again.recipe, section) == getattr(pipe.recipe, section), section
    assert again.recipe.tokenizer.config == pipe.recipe.tokenizer.config
    for a, b in ((pipe.model, again.model), (pipe.tokenizer, again.tokenizer)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(pipe.generate([0, 2], seed=5), again.generate([0, 2], seed=5))
    assert torch.equal(
        pipe.generate(["red circle", "yellow triangle"], seed=5), again.generate([0, 2], seed=5)
    )


def test_run_checkpoint_and_pretrained_directories_load_through_one_call(tmp_path):
    pipe = tiny_pipe()
    run = fake_run(tmp_path, pipe)
    step_dir = ck.latest_checkpoint(run)
    from_run, from_step = varkit.from_pretrained(run), varkit.load(step_dir)
    assert from_run.class_names == NAMES == from_step.class_names  # classes.json of the run
    out = from_run.save_pretrained(tmp_path / "exported")
    exported = varkit.from_pretrained(out)
    images = [p.generate([1], seed=0) for p in (pipe, from_run, from_step, exported)]
    assert all(torch.equal(images[0], x) for x in images[1:])
    card = pretrained.read_card(out)
    assert card.source == str(step_dir)
    assert card.metrics["training loss (last logged window)"] == "2.5000 at step 7"
    text = (out / "README.md").read_text()
    assert "sample class accuracy of the final samples | 0.900 at step 7" in text
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["tokenizer"]["weights"] is None and recipe["out_dir"] == "runs/exported"


def test_the_card_says_what_a_user_needs(tmp_path):
    card = ModelCard(
        title="Tiny",
        summary="A tiny model.",
        license="mit",
        source="https://example.org/tiny.pt",
        conversion="renamed keys",
        metrics={"FID": "9.9 (paper)"},
        paper="A paper",
    )
    out = tiny_pipe().save_pretrained(tmp_path / "m", card=card)
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "varkit" and front["license"] == "mit"
    assert front["varkit"]["parameters"]["model"] == sum(p.numel() for p in tiny_pipe().model.parameters())
    for needle in ("# Tiny", "A tiny model.", "| FID | 9.9 (paper) |", "Licence of the weights: mit",
                   "Conversion: renamed keys", "varkit.from_pretrained", "```yaml", "classes | 3: red circle"):  # fmt: skip
        assert needle in text, needle
    assert pretrained.read_card(out) == card


def test_dtype_casts_the_transformer_and_generation_still_runs(tmp_path):
    out = tiny_pipe().save_pretrained(tmp_path / "m")
    pipe = varkit.from_pretrained(out, dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and next(pipe.tokenizer.parameters()).dtype == torch.float32
    images = pipe.generate([0, 1], seed=0)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32


def test_a_tokenizer_only_directory_serves_as_tokenizer_weights(tmp_path):
    pipe = tiny_pipe()
    loaded = Loaded(tokenizer=pipe.tokenizer, model=None, recipe=pipe.recipe, source=Path("x"))
    out = save_pretrained(loaded, tmp_path / "tok", card=ModelCard(title="tokenizer"))
    assert not (out / "model.safetensors").exists()
    recipe = recipe_mod.from_dict(
        {**pipe.recipe.to_dict(), "tokenizer": {**pipe.recipe.to_dict()["tokenizer"], "weights": str(out)}}
    )
    from varkit.loading import recipe_tokenizer

    tok = recipe_tokenizer(recipe)
    assert torch.equal(tok.quantize.embedding.weight, pipe.tokenizer.quantize.embedding.weight)


# ------------------------------------------------------------------------ refusals


def test_an_incomplete_pretrained_directory_names_what_it_lacks(tmp_path, capsys):
    out = tiny_pipe().save_pretrained(tmp_path / "m")
    (out / "recipe.yaml").unlink()
    with pytest.raises(CheckpointError, match=r"lacks recipe\.yaml"):
        varkit.from_pretrained(out)
    out = tiny_pipe().save_pretrained(tmp_path / "n")
    (out / "model.safetensors").unlink()
    capsys.readouterr()  # what building the pipelines logged
    assert main(["sample", str(out), "--per-class", "1", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "lacks model.safetensors" in err and err.count("\n") == 1
    assert main(["eval", str(tmp_path / "nowhere" / "x")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint found" in err and "does not exist" in err


def test_save_refuses_a_directory_that_holds_something_else(tmp_path):
    pipe = tiny_pipe()
    run = fake_run(tmp_path, pipe)
    with pytest.raises(CheckpointError, match="not a pretrained directory"):
        pipe.save_pretrained(run)
    assert ck.latest_checkpoint(run) is not None  # untouched
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(CheckpointError):
        pipe.save_pretrained(tmp_path / "notes")
    out = pipe.save_pretrained(tmp_path / "m")
    other = tiny_pipe(seed=1).save_pretrained(out)  # a pretrained directory is replaced
    assert not any(p.name.startswith((".tmp-", ".old-")) for p in tmp_path.iterdir())
    assert torch.equal(
        varkit.from_pretrained(other).generate([0], seed=0), tiny_pipe(seed=1).generate([0], seed=0)
    )


# --------------------------------------------------------------------------- classes


def test_classes_resolve_by_index_or_name():
    assert resolve_classes("0,2", NAMES, 3) == [0, 2]
    assert resolve_classes("orange square, 2", NAMES, 3) == [1, 2]
    assert resolve_classes("Yellow_Triangle", NAMES, 3) == [2]  # case, spaces and underscores are loose
    for spec, message in (
        ("3", "outside 0-2"),
        ("orange squar", "did you mean 'orange square'"),
        ("", "names no class"),
    ):
        with pytest.raises(VarkitError, match=message):
            resolve_classes(spec, NAMES, 3)
    with pytest.raises(VarkitError, match="have no names"):
        resolve_classes("cat", None, 3)


def test_sample_takes_class_names(tmp_path, capsys):
    out = tiny_pipe().save_pretrained(tmp_path / "m")
    assert json.loads((out / "classes.json").read_text()) == {n: i for i, n in enumerate(NAMES)}
    argv = ["sample", str(out), "--classes", "red_circle,yellow triangle", "--per-class", "1", "--png"]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 0
    assert sorted(os.listdir(tmp_path / "s" / "images")) == ["0000_000.png", "0002_000.png"]
    capsys.readouterr()
    assert (
        main(["sample", str(out), "--classes", "purple", "--per-class", "1", "--out", str(tmp_path / "t")])
        == 2
    )
    assert "no class 'purple'" in capsys.readouterr().err


# ------------------------------------------------------------------------------- Hub


def _fake_hub(cache: Path, repo_id: str, files: dict[str, Path], commit: str = "0" * 40) -> None:
    """A repository in huggingface_hub's cache layout (refs/main -> snapshots/<commit>/files)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, path in files.items():
        (snapshot / name).write_bytes(path.read_bytes())


@pytest.fixture
def hub(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub", reason="the hub extra is not installed")
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    # Nothing may reach the network: the endpoint is a closed local port.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    template = "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    connect, outside = socket.socket.connect, []

    def local_only(self, address):  # refused quietly inside the code; reported after the test
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1"):
            outside.append(address)
            raise ConnectionRefusedError(f"the tests reach no network ({address})")
        return connect(self, address)

    lookup = socket.getaddrinfo

    def local_names_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "::1", "localhost"):
            outside.append(host)
            raise socket.gaierror(f"the tests reach no network ({host})")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    monkeypatch.setattr(socket, "getaddrinfo", local_names_only)
    yield constants, cache
    assert not outside, f"tried to reach {outside}"


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "no-network"])
def test_a_hub_id_loads_from_the_cache(tmp_path, hub, monkeypatch, offline):
    constants, cache = hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    pipe = tiny_pipe()
    out = pipe.save_pretrained(tmp_path / "m")
    _fake_hub(cache, "someone/tiny-varkit", {p.name: p for p in out.iterdir()})
    loaded = varkit.from_pretrained("someone/tiny-varkit")
    assert loaded.class_names == NAMES
    assert torch.equal(loaded.generate([2], seed=1), pipe.generate([2], seed=1))


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "no-network"])
def test_a_hub_id_without_its_files_says_which_and_how_to_get_them(
    tmp_path, hub, monkeypatch, capsys, offline
):
    constants, cache = hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    out = tiny_pipe().save_pretrained(tmp_path / "m")
    _fake_hub(cache, "someone/partial", {"recipe.yaml": out / "recipe.yaml", "README.md": out / "README.md"})
    assert main(["sample", "someone/partial", "--per-class", "1", "--out", str(tmp_path / "s")]) == 2
    # huggingface_hub may log its own warning first; varkit's error is the last line, one paragraph
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("varkit: error: ")
    for needle in ("model.safetensors, tokenizer.safetensors", "not in the local cache", "hf download someone/partial",
                   "https://huggingface.co/someone/partial/resolve/main/model.safetensors"):  # fmt: skip
        assert needle in err, needle
    assert "recipe.yaml" not in err.split("Fetch")[0]  # the cached file is not reported missing


def test_load_pretrained_of_a_release_file_says_to_convert_it(tmp_path):
    path = tmp_path / "c2i_B_256.pt"
    torch.save(
        {
            "model": {
                "tok_embeddings.weight": torch.zeros(2, 2),
                "layers.0.attention.wqkv.weight": torch.zeros(6, 2),
            }
        },
        path,
    )
    with pytest.raises(CheckpointError, match="a LlamaGen GPT"):
        load_pretrained(path)
