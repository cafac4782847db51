"""The commands shown in recipe headers and docs: quoted where the shell would expand them,
and naming shards the way ``varkit shards`` writes them."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
DOCS = sorted((REPO / "docs").glob("*.md"))
PROGRAMS = ("varkit", "torchrun", "./dev")


def header_commands(path: Path) -> list[str]:
    """The commands of a recipe's header comment, continuation lines joined."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return _commands(lines)


def doc_commands(path: Path) -> list[str]:
    """The commands of a page's ```bash blocks, continuation lines joined."""
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", path.read_text(), re.S)
    return _commands([line.strip() for block in blocks for line in block.splitlines()])


def _commands(lines: list[str]) -> list[str]:
    out, current = [], ""
    for line in lines:
        text = line.split(": ", 1)[1] if re.match(r"[A-Z][\w -]*: (varkit|torchrun) ", line) else line
        if current:
            current += " " + text.rstrip("\\").strip()
        elif text.startswith(PROGRAMS):
            current = text.rstrip("\\").strip()
        else:
            continue
        if not text.endswith("\\"):
            out.append(current)
            current = ""
    return out


def shell_words(command: str) -> int:
    """How many words bash makes of ``command`` (brace expansion included)."""
    proc = subprocess.run(
        ["bash", "-c", f"count() {{ echo $#; }}; count {command.split(' ', 1)[1]}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


ALL = [(p.name, c) for p in RECIPES for c in header_commands(p)] + [
    (p.name, c) for p in DOCS for c in doc_commands(p)
]


def test_commands_are_found():
    names = {name for name, _ in ALL}
    assert {"var_d16.yaml", "var_base.yaml", "quickstart.yaml", "data.md", "imagenet.md"} <= names


@pytest.mark.parametrize(("page", "command"), ALL)
def test_the_shell_passes_every_argument_as_written(page, command):
    """An unquoted brace pattern becomes one argument per shard: the last would win."""
    if "..." in command.split():
        pytest.skip("an elided command")
    assert shell_words(command) == len(shlex.split(command, comments=True)) - 1, (
        f"{page}: quote the brace pattern in: {command}"
    )


def _written_sets() -> set[tuple[str, str]]:
    """``(directory, prefix)`` of every shard set a documented `varkit shards` call writes
    (image shards, or code shards with ``--tokenize``)."""
    sets = set()
    for _, command in ALL:
        words = shlex.split(command, comments=True)
        if words[:2] != ["varkit", "shards"]:
            continue
        positional = [
            w
            for i, w in enumerate(words[2:], 2)
            if not w.startswith("-") and not words[i - 1].startswith("--")
        ]
        prefix = words[words.index("--prefix") + 1] if "--prefix" in words else "train"
        sets.add((positional[1].rstrip("/"), prefix))
    return sets


def test_recipe_shard_patterns_name_what_varkit_shards_writes():
    written = _written_sets()
    assert {("/data/imagenet-codes", "train"), ("/data/imagenet-shards", "val")} <= written
    patterns = [
        w.split("=", 1)[1]
        for _, c in ALL
        for w in shlex.split(c, comments=True)
        if w.startswith(("data.train_shards=", "data.val_shards=", "data.codes="))
    ]
    data = yaml.safe_load((REPO / "recipes" / "var_base.yaml").read_text())["data"]
    patterns += [data["train_shards"], data["val_shards"], data["codes"]]
    assert len(patterns) > 8
    for pattern in patterns:
        if not pattern.startswith("/data/"):
            continue  # the small walk's relative paths are checked by running it
        directory, name = pattern.rsplit("/", 1)
        match = re.fullmatch(r"([\w.-]+)-\{000000\.\.(\d{6})\}\.tar", name)
        assert match, f"{pattern}: varkit shards writes PREFIX-{{000000..NNNNNN}}.tar"
        assert (directory, match.group(1)) in written, f"{pattern}: no documented `varkit shards` writes it"


def test_the_writer_names_shards_by_prefix(tmp_path):
    from varkit.data.shards import ShardSink

    sink = ShardSink(tmp_path)
    sink.write("a", {"cls": b"0"})
    assert sink.close().pattern == f"{tmp_path}/train-{{000000..000000}}.tar"
