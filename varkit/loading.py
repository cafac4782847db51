"""Every way weights come into varkit, in one module.

A pretrained directory (`varkit.pretrained`: ``save_pretrained`` or ``varkit
import`` output), a Hugging Face Hub repository id holding one, a run directory (its
latest checkpoint), a checkpoint directory, or a tokenizer weights file
(``.safetensors``, or a plain ``.pth``/``.pt`` state dict read with
``weights_only=True`` such as the official ``vae_ch160v4096z32.pth`` or LlamaGen's
``vq_ds16_c2i.pt``). Fine-tuning (a recipe's ``init:``) starts a fresh model from
such weights here too: `prepare_ar_model`.

A recipe read back from a checkpoint is someone else's file: it is marked as stored
(`recipe_of`), so the data layer neither runs its ``pipe:`` commands nor writes
where it says, unless the user gives those values again.

Building modules from a recipe is `varkit.build`; checking and loading state dicts
is `varkit.weights`; reading a foreign release's own layout is `varkit.importers`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from varkit import pretrained
from varkit import recipe as recipe_mod
from varkit.base import Tokenizer
from varkit.build import build_model, build_tokenizer
from varkit.checkpoint import RECIPE, latest_checkpoint, load_weights, write_text_atomic
from varkit.config_types import unstructure
from varkit.data.config import DataConfig
from varkit.data.folder import read_classes
from varkit.data.synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from varkit.errors import CheckpointError, RecipeError, VarkitError, did_you_mean
from varkit.pretrained import ModelCard
from varkit.recipe import Recipe
from varkit.version import __version__
from varkit.weights import (
    check_state_dict,
    compare_keys,
    describe_release,
    key_differences,
    load_state,
    read_weights,
    weight_shapes,
)

log = logging.getLogger(__name__)

#: ``owner/name``: how a Hugging Face Hub repository id looks.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Files of a pretrained directory fetched from the Hub, and whether each is required.
_HUB_FILES = (
    (RECIPE, True),
    (pretrained.MODEL, True),
    (pretrained.TOKENIZER, True),
    (pretrained.CARD, False),
    (pretrained.CLASSES, False),
)


@attrs.define
class Loaded:
    """A tokenizer and an AR model with their weights, and the recipe they were built from."""

    tokenizer: Tokenizer
    model: torch.nn.Module
    recipe: Recipe
    #: The checkpoint directory or file the weights came from.
    source: Path
    #: The class names in index order, when the model's classes have names.
    class_names: tuple[str, ...] | None = None
    #: What the model card says (source, licence, metrics), when there is one.
    card: ModelCard | None = None


# ------------------------------------------------------------------- checkpoints


def load_checkpoint(path: str | os.PathLike, *, ema: bool = True, overrides: Iterable[str] = ()) -> Loaded:
    """The tokenizer, model and recipe of a local directory (on the CPU).

    Args:
        path: a pretrained directory, the ``out_dir`` of a run (its latest checkpoint
            is used), or a ``checkpoints/step-N`` directory.
        ema: use the EMA weights when the checkpoint has them.
        overrides: ``data.key=value`` applied to the stored recipe (see `recipe_of`).

    Raises:
        CheckpointError: nothing loadable at ``path`` (naming the files a pretrained
            directory lacks), or weights that do not fit.
    """
    step_dir = checkpoint_dir(path)
    recipe = recipe_of(step_dir, overrides)
    tokenizer = build_tokenizer(recipe)
    load_state(tokenizer, load_weights(step_dir, "tokenizer"), what=f"tokenizer of {step_dir}")
    model = build_model(recipe, tokenizer)
    name = "ema" if ema and (step_dir / "ema.safetensors").is_file() else "model"
    load_state(model, load_weights(step_dir, name), what=f"{name} weights of {step_dir}")
    log.info("loaded %s (%s weights)", step_dir, name)
    return Loaded(
        tokenizer=tokenizer.eval(),
        model=model.eval(),
        recipe=recipe,
        source=step_dir,
        class_names=class_names_of(step_dir, model.config.num_classes),
        card=pretrained.read_card(step_dir),
    )


def checkpoint_dir(name: str | os.PathLike, *, revision: str | None = None) -> Path:
    """The directory holding the weights of ``name``: a pretrained directory (local or a
    Hub id's snapshot), a run's latest complete checkpoint, or a checkpoint directory.

    Raises:
        CheckpointError: nothing loadable at ``name`` (naming the files a pretrained
            directory lacks).
    """
    path = resolve(name, revision=revision)
    _check_pretrained_dir(path)
    step_dir = latest_checkpoint(path)
    if step_dir is None:
        raise CheckpointError(
            f"no checkpoint found at {path}: expected a pretrained directory (recipe.yaml, model.safetensors, "
            "tokenizer.safetensors), a run directory with checkpoints/latest, or a checkpoint directory"
        )
    return step_dir


def _check_pretrained_dir(path: Path, *, need_model: bool = True) -> None:
    """Name the files that a directory meant as a pretrained one lacks."""
    if not pretrained.looks_pretrained(path):
        return
    missing = pretrained.missing_files(path, need_model=need_model)
    if not missing:
        return
    have = sorted(p.name for p in path.iterdir() if p.is_file())
    hint = ""
    if missing == [pretrained.MODEL] and (path / pretrained.TOKENIZER).is_file():
        hint = " A directory with a tokenizer only serves as tokenizer.weights, not as a model."
    raise CheckpointError(
        f"{path} is not a complete pretrained directory: it lacks {', '.join(missing)} (it holds "
        f"{', '.join(have) or 'nothing'}). Write it again with pipe.save_pretrained(DIR) or `varkit import`."
        + hint
    )


def class_names_of(step_dir: Path, num_classes: int) -> tuple[str, ...] | None:
    """The class names (``classes.json``) of a pretrained or step directory, else of the run it belongs to."""
    for directory in (step_dir, step_dir.parent.parent):
        names = pretrained.read_class_names(directory)
        if names is not None:
            if len(names) != num_classes:
                log.warning(
                    "%s names %d classes but the model has %d; class names are not used",
                    directory / pretrained.CLASSES,
                    len(names),
                    num_classes,
                )
                return None
            return names
    return None


def recipe_of(step_dir: Path, overrides: Iterable[str] = ()) -> Recipe:
    """The validated recipe stored with a checkpoint.

    The recipe is marked as stored (``varkit.recipe.from_dict(..., stored=True)``): it
    came with the checkpoint, perhaps from someone else, so the data layer will not
    run its ``pipe:`` shard commands nor write into its ``data.cache_dir``.

    Args:
        step_dir: the checkpoint directory.
        overrides: ``data.key=value`` given by the user (e.g. on the command line); a
            shard pattern or cache directory given here is the user's own choice.

    Raises:
        RecipeError: an override outside ``data.``, or a stored recipe that no longer
            validates.
    """
    overrides = list(overrides)
    other = [o for o in overrides if not o.partition("=")[0].startswith("data.")]
    if other:
        raise RecipeError(
            f"command line: {', '.join(other)}: only data.* keys can be overridden when loading a "
            "checkpoint (the rest of its recipe is what its weights were trained with)"
        )
    file = step_dir / RECIPE
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist: {step_dir} is not a varkit checkpoint")
    return recipe_mod.from_dict(
        recipe_mod.read_stored(file), source=str(file), stored=True, overrides=overrides
    )


# ------------------------------------------------------------- pretrained models


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` is no local path but reads as a Hub repository id (``owner/name``)."""
    text = str(name)
    return not Path(text).exists() and bool(_HUB_ID.match(text))


def resolve(name: str | os.PathLike, *, revision: str | None = None) -> Path:
    """The local directory of ``name``: the path itself, or a Hub repository's snapshot.

    Raises:
        CheckpointError: ``name`` exists nowhere, or the Hub cannot give its files.
    """
    path = Path(name)
    if path.exists():
        return path
    if is_hub_id(name):
        try:
            return hub_snapshot(str(name), revision=revision)
        except CheckpointError as exc:
            raise CheckpointError(
                f"there is no local directory {name}, and as a Hub repository id: {exc}"
            ) from None
    raise CheckpointError(
        f"no checkpoint found at {name}: it does not exist. Give a pretrained directory, a run or "
        "checkpoint directory, or a Hugging Face Hub repository id such as owner/name"
    )


def load_pretrained(
    name: str | os.PathLike,
    *,
    ema: bool = True,
    revision: str | None = None,
    overrides: Iterable[str] = (),
) -> Loaded:
    """A model from a pretrained directory, a run or checkpoint directory, or a Hub id.

    Args:
        name: a local directory (see `load_checkpoint`) or a Hugging Face Hub
            repository id ``owner/name`` holding a pretrained directory.
        ema: use the EMA weights of a run when it has them.
        revision: the Hub revision (branch, tag or commit); None is ``main``.
        overrides: ``data.key=value`` applied to the stored recipe (see `recipe_of`).

    Raises:
        CheckpointError: naming what is missing or does not fit.
    """
    path = resolve(name, revision=revision)
    if path.is_file():
        what = describe_release(_peek(path)) if path.suffix in (".pth", ".pt") else None
        hint = f" It looks like {what}; convert it first." if what else ""
        raise CheckpointError(f"{path} is a file; give a directory with a model.{hint}")
    return load_checkpoint(path, ema=ema, overrides=overrides)


def _peek(path: Path) -> dict[str, torch.Tensor]:
    try:
        return weight_shapes(path, "checkpoint")  # keys and shapes only
    except CheckpointError:
        return {}


def hub_snapshot(repo_id: str, *, revision: str | None = None) -> Path:
    """The local snapshot directory of a Hub repository holding a pretrained directory.

    The files come through ``huggingface_hub``, so its cache (``HF_HUB_CACHE``), its
    offline mode (``HF_HUB_OFFLINE=1``) and its token are respected: files already in
    the cache are not downloaded again, and when the Hub cannot be reached the cache
    alone is used.

    Raises:
        CheckpointError: huggingface_hub is not installed, the repository or a
            required file does not exist, or a required file is neither in the cache
            nor reachable (naming the files and how to fetch them by hand).
    """
    try:
        import huggingface_hub
        from huggingface_hub import constants as hub_constants
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise CheckpointError(
            "loading from the Hugging Face Hub needs the optional dependency: pip install 'varkit[hub]'"
        ) from None
    names = [name for name, _ in _HUB_FILES]
    required = [name for name, needed in _HUB_FILES if needed]
    at = f" at revision {revision!r}" if revision else ""
    try:
        # A fresh client: the endpoint (HF_ENDPOINT) is read now, not when huggingface_hub was imported.
        info = huggingface_hub.HfApi().model_info(repo_id, revision=revision)
    except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as exc:
        raise CheckpointError(
            f"the Hugging Face Hub has no repository {repo_id!r}{at} (or it is private or gated: log in with "
            f"`hf auth login`): {type(exc).__name__}"
        ) from None
    except hub_errors.HFValidationError as exc:
        raise CheckpointError(f"{repo_id!r} is not a valid Hub repository id: {exc}") from None
    except Exception as exc:  # offline mode, no network, the Hub down: the cache alone answers
        info, reason = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if info is not None:
        present = {s.rfilename for s in info.siblings or ()}
        absent = [name for name in required if name not in present]
        if absent:
            raise CheckpointError(
                f"Hub repository {repo_id}{at} has no {', '.join(absent)}: it is not a varkit pretrained model. "
                "Release files of VAR or LlamaGen are converted with `varkit import var|llamagen`."
            )
        try:
            return Path(huggingface_hub.snapshot_download(repo_id, revision=info.sha, allow_patterns=names))
        except (hub_errors.HfHubHTTPError, OSError) as exc:
            raise CheckpointError(f"downloading {repo_id} from the Hugging Face Hub failed: {exc}") from None
    try:
        folder = Path(
            huggingface_hub.snapshot_download(
                repo_id, revision=revision, allow_patterns=names, local_files_only=True
            )
        )
    except hub_errors.LocalEntryNotFoundError:
        folder = None
    missing = [name for name in required if folder is None or not (folder / name).is_file()]
    if missing:
        base = f"https://huggingface.co/{repo_id}/resolve/{revision or 'main'}"
        raise CheckpointError(
            f"{', '.join(missing)} of Hub repository {repo_id} {'is' if len(missing) == 1 else 'are'} not in "
            f"the local cache ({hub_constants.HF_HUB_CACHE}) and the Hub cannot be reached ({reason}). Fetch "
            f"them on a machine with a network with `hf download {repo_id}` and copy its cache here, or "
            f"download {', '.join(f'{base}/{n}' for n in missing)} by hand into one directory with the other "
            "files and pass that directory instead."
        )
    return folder


def save_pretrained(
    loaded: Loaded,
    directory: str | os.PathLike,
    *,
    card: ModelCard | None = None,
) -> Path:
    """Write a model as a pretrained directory (`varkit.pretrained`).

    Args:
        loaded: the tokenizer, model (None for a tokenizer-only directory), recipe,
            class names and card.
        directory: where to write it; an existing pretrained directory is replaced.
        card: the model card; None keeps ``loaded.card`` or describes a run.

    Returns:
        The directory.
    """
    directory = Path(directory)
    recipe = loaded.recipe.to_dict()
    recipe["out_dir"] = str(Path("runs") / directory.name)
    recipe["tokenizer"]["weights"] = None  # the tokenizer's weights are in the directory
    card = card or loaded.card or _card_of_run(loaded, title=directory.name)
    model = loaded.model
    facts: dict[str, Any] = {
        "parameters": {"tokenizer": sum(p.numel() for p in loaded.tokenizer.parameters())},
        "classes": loaded.recipe.model.num_classes,
        "class_names": loaded.class_names,
    }
    if model is not None:
        facts["parameters"]["model"] = sum(p.numel() for p in model.parameters())
        facts["steps"] = len(model.unit.step_lengths)
        facts["tokens"] = model.unit.seq_len
    text = pretrained.render_card(card, recipe=recipe, facts=facts)
    out = pretrained.write_pretrained(
        directory,
        recipe=recipe,
        tokenizer=loaded.tokenizer.state_dict(),
        model=None if model is None else model.state_dict(),
        card=text,
        class_names=loaded.class_names,
        metadata={"varkit_version": __version__},
    )
    log.info("wrote %s", out)
    return out


def _card_of_run(loaded: Loaded, *, title: str) -> ModelCard:
    """A card for a model trained by varkit: its recipe, and the metrics its run recorded."""
    metrics: dict[str, str] = {}
    source = None
    if loaded.source is not None:
        source = Path(loaded.source)
        run_dir = source.parent.parent if source.parent.name == "checkpoints" else source
        metrics = _run_metrics(run_dir / "metrics.jsonl")
        title = run_dir.name or title
    init = loaded.recipe.init.weights
    summary = (
        f"A {loaded.recipe.unit.name}-unit model trained with varkit "
        f"({loaded.recipe.model.num_classes} classes, {loaded.recipe.data.source} data)"
    )
    license_ = None
    if init:
        parent = pretrained.read_card(init) if Path(init).is_dir() else None
        summary += f", fine-tuned from {init}"
        if parent is not None and parent.license:
            license_ = parent.license
            summary += f" (whose weights are under the {parent.license} licence)"
    return ModelCard(
        title=title,
        summary=summary + ".",
        license=license_,
        source=None if source is None else str(source),
        metrics=metrics,
    )


def _run_metrics(path: Path) -> dict[str, str]:
    """The last training loss and class-following a run recorded in ``metrics.jsonl``."""
    if not path.is_file():
        return {}
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("stage") != "ar":
            continue
        step = record.get("step")
        if "loss" in record:
            found["training loss (last logged window)"] = f"{record['loss']:.4f} at step {step}"
        for key in ("sample_class_accuracy", "sample_colour_accuracy"):
            if key in record:
                found[f"{key.replace('_', ' ')} of the final samples"] = f"{record[key]:.3f} at step {step}"
    return found


# ------------------------------------------------------------------------ tokenizers


def load_tokenizer(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> Tokenizer:
    """The tokenizer of a pretrained directory (or Hub id), a run, or a checkpoint directory."""
    step_dir = _tokenizer_checkpoint(resolve(path))
    tokenizer = build_tokenizer(recipe_of(step_dir))
    load_state(tokenizer, load_weights(step_dir, "tokenizer"), what=f"tokenizer of {step_dir}")
    return tokenizer.to(device).eval()


def load_tokenizer_weights(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Load a tokenizer's weights from a file or a directory.

    ``path`` is a pretrained directory (or Hub id), a run, a checkpoint directory, a
    ``.safetensors`` file, or a plain ``.pth``/``.pt`` state dict (read with
    ``weights_only=True``; the format is read off the file's bytes, not its name): the
    official VAR release's ``vae_ch160v4096z32.pth`` loads into ``msvq`` as it is, and
    a release the tokenizer plugin reads through its ``from_release`` (LlamaGen's
    ``vq_ds16_c2i.pt`` into ``vq``) is converted. A relative path is read from the
    current directory.

    Raises:
        CheckpointError: nothing at ``path``, a file that is not weights (saying what it
            seems to be), or weights that do not fit the tokenizer (naming the keys).
    """
    path = Path(path)
    state = _tokenizer_state(path)
    if _is_weights_file(path):
        state = _release_state(tokenizer, state, path)
    load_state(tokenizer, state, what=f"tokenizer weights {path}")


def _is_weights_file(path: Path) -> bool:
    return path.is_file() or path.suffix in (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def _tokenizer_state(path: Path, *, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors (or, with ``shapes_only``, meta tensors of their shapes) of a tokenizer
    weights file or of the tokenizer checkpoint of a directory or Hub id."""
    what = "tokenizer weights"
    if _is_weights_file(path):
        if not path.exists():
            raise CheckpointError(
                f"{what} file {path} does not exist (relative paths are read from the current "
                f"directory, {Path.cwd()}); see the docs' page on the official checkpoints for where to get them"
            )
        return weight_shapes(path, what) if shapes_only else read_weights(path, what)
    step_dir = _tokenizer_checkpoint(resolve(path))
    if shapes_only:
        return weight_shapes(step_dir / "tokenizer.safetensors", f"tokenizer of {step_dir}")
    return load_weights(step_dir, "tokenizer")


def check_tokenizer_weights(recipe: Recipe) -> None:
    """Check, without loading them, that ``tokenizer.weights`` exist and fit the tokenizer.

    Reads only what the file format allows to be read cheaply (a safetensors header,
    a memory-mapped ``.pth``); the tokenizer is built on the meta device. A released
    layout that its plugin converts (``from_release``) is accepted as it is.

    Raises:
        CheckpointError: the weights are missing, unreadable, or do not fit (naming keys).
    """
    weights = recipe.tokenizer.weights
    if not weights:
        return
    path = Path(weights)
    shapes = _tokenizer_state(path, shapes_only=True)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        tokenizer = recipe.tokenizer.cls(recipe.tokenizer.config)
    try:
        check_state_dict(tokenizer, shapes, what=f"tokenizer.weights {path}")
    except CheckpointError:
        own_layout = set(tokenizer.state_dict()) <= set(shapes)  # then shapes, not layouts, differ
        if own_layout or not (_is_weights_file(path) and describe_release(shapes)):
            raise


def _release_state(
    tokenizer: Tokenizer, state: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """``state`` in the tokenizer's own layout: as it is when it fits, else through the
    plugin's reader of its release (built with the recipe's options, so they are checked)."""
    try:
        check_state_dict(tokenizer, state, what=f"tokenizer weights {path}")
        return state
    except CheckpointError as own_error:
        try:
            released = type(tokenizer).from_release(state, **unstructure(tokenizer.config))
        except NotImplementedError:
            raise own_error from None
        except CheckpointError as exc:
            what = describe_release(state)
            raise CheckpointError(
                f"tokenizer weights {path} do not fit tokenizer {tokenizer.name!r}: {exc}"
                + (f" The file looks like {what}." if what else "")
            ) from None
        return released.state_dict()


def recipe_tokenizer(recipe: Recipe, *, device: torch.device | str = "cpu") -> Tokenizer:
    """The recipe's tokenizer; with ``tokenizer.weights`` (or else ``init.weights``) set,
    those weights loaded."""
    tokenizer = build_tokenizer(recipe, device=device)
    source = tokenizer_weights_source(recipe)
    if source:
        load_tokenizer_weights(tokenizer, source)
        log.info("tokenizer weights from %s", source)
    return tokenizer


def tokenizer_weights_source(recipe: Recipe) -> str | None:
    """Where the recipe's tokenizer weights come from: ``tokenizer.weights``, else the
    pretrained model of ``init.weights`` (fine-tuning keeps its tokenizer), else None."""
    return recipe.tokenizer.weights or recipe.init.weights


def _tokenizer_checkpoint(path: Path) -> Path:
    """The checkpoint holding a tokenizer: of the run (or checkpoint) at ``path``, else of
    its tokenizer stage."""
    _check_pretrained_dir(path, need_model=False)
    step_dir = latest_checkpoint(path) or latest_checkpoint(path / "tokenizer")
    if step_dir is None:
        raise CheckpointError(f"no tokenizer checkpoint found at {path}")
    return step_dir


# ------------------------------------------------------------------- class names


def data_class_names(data: DataConfig) -> tuple[str, ...] | None:
    """The class names of a recipe's data, in index order, or None when unknown.

    The synthetic set's names; for shards or code shards, the ``classes.json`` that
    ``varkit shards`` writes beside them.
    """
    if data.source == "synthetic":
        return tuple(SYNTHETIC_CLASS_NAMES[: data.synthetic.num_classes])
    pattern = data.train_shards if data.source == "shards" else data.codes
    if not pattern or pattern.startswith("pipe:"):
        return None
    folder = Path(pattern).parent
    mapping = read_classes(folder) if folder.is_dir() else None
    if mapping is None:
        return None
    return pretrained.class_names_from_mapping(mapping, str(folder / pretrained.CLASSES))


def resolve_classes(spec: str | None, class_names: Sequence[str] | None, num_classes: int) -> list[int]:
    """Class indices of ``spec``: comma-separated indices, ranges and/or class names.

    ``"0-999"``, ``"0,5,10-19"``, ``"cat,dog"`` or ``"cat,7"``; None or ``"all"`` is
    every class. Names are matched exactly, then ignoring case, spaces and underscores
    (``red_circle`` finds ``red circle``). Each class may be named once.

    Raises:
        VarkitError: a part that is neither an index, a range nor a known name (with the
            closest one), an index outside ``0 .. num_classes - 1``, a range that runs
            backwards, a class named twice, or names for a model without class names.
    """
    if spec is None or spec.strip() == "all":
        return list(range(num_classes))
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise VarkitError(f"--classes {spec!r} names no class; give indices, ranges or names, e.g. 0,1,2")
    lookup = {}
    if class_names:
        for i, name in enumerate(class_names):
            lookup.setdefault(name, i)
            lookup.setdefault(_loose(name), i)
    out: list[int] = []
    for part in parts:
        numbers = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if numbers is not None:
            low = int(numbers.group(1))
            high = int(numbers.group(2)) if numbers.group(2) is not None else low
            if high < low:
                raise VarkitError(
                    f"--classes {spec!r}: the range {part!r} runs backwards; write it as {high}-{low}"
                )
            if high >= num_classes:
                raise VarkitError(
                    f"--classes {spec!r}: class {high} is outside 0-{num_classes - 1} of this model"
                )
            out.extend(range(low, high + 1))
            continue
        if not class_names:
            raise VarkitError(
                f"--classes {spec!r}: {part!r} is neither a class index nor a range, and this model's classes "
                "have no names (no classes.json beside its weights); give indices and ranges such as 0,5,10-19"
            )
        index = lookup.get(part, lookup.get(_loose(part)))
        if index is None:
            shown = ", ".join(class_names[:10]) + (" ..." if len(class_names) > 10 else "")
            raise VarkitError(
                f"this model has no class {part!r}{did_you_mean(part, class_names)}; its classes are: {shown}"
            )
        out.append(index)
    seen: set[int] = set()
    twice = sorted({c for c in out if c in seen or seen.add(c)})
    if twice:
        raise VarkitError(
            f"--classes {spec!r} names classes {format_classes(twice)} more than once; each class is "
            "sampled --per-class times, so name it once"
        )
    return out


def format_classes(classes: Iterable[int]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2,5"``: runs of consecutive classes as ranges."""
    parts: list[str] = []
    run: list[int] = []
    for c in classes:
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def _loose(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name).lower()


# ----------------------------------------------------------------------- fine-tuning


@attrs.frozen(kw_only=True)
class ClassRows:
    """Which row of the pretrained class embedding each class of the new model starts from."""

    #: For every new class and then "no class", the pretrained row it starts from.
    source_rows: tuple[int, ...]
    #: New classes taken from the pretrained class of the same name / index / from the map.
    kept: int
    mapped: int
    #: New classes started from the pretrained "no class" row.
    new: int


def class_rows(
    *,
    source_classes: int,
    source_names: Sequence[str] | None,
    target_classes: int,
    target_names: Sequence[str] | None,
    class_map: Mapping[str | int, str | int] | None = None,
) -> ClassRows:
    """The rule by which a fine-tuned model's class rows start (see docs/finetuning.md).

    1. When both sides have class names, a class starts from the pretrained class of the
       same name; otherwise class ``i`` starts from pretrained class ``i`` when that exists.
    2. Every other class starts from the pretrained "no class" row: it begins as the
       unconditional model and is then learnt from its own images.
    3. ``class_map`` (new class -> pretrained class, by name or index) sets rows last.
    "No class" starts from "no class".

    Raises:
        RecipeError: the class map names classes that do not exist on its side.
    """
    rows: list[int] = []
    kept = new = 0
    by_name = bool(source_names) and bool(target_names)
    source_index = {name: i for i, name in enumerate(source_names or ())}
    for t in range(target_classes):
        s = source_index.get(target_names[t]) if by_name else (t if t < source_classes else None)
        if s is None:
            rows.append(source_classes)
            new += 1
        else:
            rows.append(s)
            kept += 1
    mapped = 0
    if class_map:
        problems = []
        for key, value in class_map.items():
            t = _class_index(key, target_names, target_classes)
            s = _class_index(value, source_names, source_classes)
            if t is None:
                problems.append(
                    f"{key!r} is no class of the new model{_known(key, target_names, target_classes)}"
                )
            if s is None:
                problems.append(
                    f"{value!r} is no class of the pretrained model{_known(value, source_names, source_classes)}"
                )
            if t is None or s is None:
                continue
            if rows[t] == source_classes:
                new -= 1
            else:
                kept -= 1
            rows[t] = s
            mapped += 1
        if problems:
            raise RecipeError("init.class_map: " + "; ".join(problems))
    rows.append(source_classes)  # "no class"
    return ClassRows(source_rows=tuple(rows), kept=kept, mapped=mapped, new=new)


def _class_index(key: str | int, names: Sequence[str] | None, count: int) -> int | None:
    if isinstance(key, int) or (isinstance(key, str) and re.fullmatch(r"\d+", key)):
        index = int(key)
        return index if 0 <= index < count else None
    if names and key in names:
        return list(names).index(key)
    return None


def _known(key: str | int, names: Sequence[str] | None, count: int) -> str:
    if isinstance(key, int) or not names:
        return f" (classes are 0..{count - 1}{'' if names else ' and have no names'})"
    return did_you_mean(str(key), names)


def init_model_weights(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    rows: ClassRows,
    *,
    what: str,
) -> None:
    """Load pretrained ``state`` into a fresh ``model``, class rows through ``rows``.

    Every key must fit exactly except ``class_embed.weight``, whose rows are taken as
    `class_rows` says (its width must fit).

    Raises:
        CheckpointError: naming the keys that do not fit the recipe's model.
    """
    state = dict(state)
    source = state.pop("class_embed.weight", None)
    own = model.state_dict()
    target = own.get("class_embed.weight")
    if source is None or target is None:
        raise CheckpointError(f"{what} have no class_embed.weight: they are not a varkit AR model")
    probe = {k: v for k, v in own.items() if k != "class_embed.weight"}
    missing, unexpected, mismatched = compare_keys(probe, state, theirs="pretrained", ours="recipe")
    if source.shape[1] != target.shape[1]:
        mismatched.insert(
            0, f"class_embed.weight: pretrained width {source.shape[1]} vs recipe {target.shape[1]}"
        )
    if max(rows.source_rows) >= source.shape[0]:
        mismatched.insert(0, f"class_embed.weight: pretrained has {source.shape[0] - 1} classes")
    differences = key_differences(missing, unexpected, mismatched)
    if differences:
        raise CheckpointError(
            f"{what} do not fit the recipe's model ({differences}). The recipe's model, unit and "
            "tokenizer sections must describe the pretrained architecture: copy them from its recipe.yaml."
        )
    index = torch.tensor(rows.source_rows, dtype=torch.long)
    state["class_embed.weight"] = source[index].to(target.dtype)
    model.load_state_dict(state, strict=True)


def freeze_parameters(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set ``requires_grad=False`` on the parameters that ``patterns`` name; returns their names.

    A pattern is a dotted prefix (``blocks.0`` names ``blocks.0.*``, not ``blocks.01``)
    or a glob over full parameter names (``blocks.[0-7].*``).

    Raises:
        RecipeError: a pattern names no parameter (listing the model's top-level names).
    """
    names = [n for n, _ in model.named_parameters()]
    frozen: set[str] = set()
    unused = []
    for pattern in patterns:
        hits = [
            n for n in names if n == pattern or n.startswith(pattern + ".") or fnmatch.fnmatchcase(n, pattern)
        ]
        if not hits:
            unused.append(pattern)
        frozen.update(hits)
    if unused:
        tops = sorted({n.split(".")[0] for n in names})
        raise RecipeError(
            f"init.freeze: {', '.join(map(repr, unused))} names no parameter of the model; its parts are "
            f"{', '.join(tops)} (e.g. blocks.0, blocks.[0-3].*, word_embed)"
        )
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return sorted(frozen)


def prepare_ar_model(
    model: torch.nn.Module, recipe: Recipe, *, out_dir: str | os.PathLike, main: bool = True
) -> None:
    """What the AR stage does to its model before every run, fresh or resumed.

    Writes the data's class names into the run (``out_dir/classes.json``, on the main
    process), so that the run's checkpoints and the pretrained directories made from
    them know them, and freezes ``init.freeze``. Call it after the model holds its
    weights (`init_ar_model` or a checkpoint) and before the optimizer and the
    distributed wrapper are built.

    Raises:
        RecipeError: a freeze pattern names nothing.
    """
    names = _run_class_names(recipe)
    if main and names is not None:
        write_text_atomic(
            Path(out_dir) / pretrained.CLASSES,
            json.dumps({n: i for i, n in enumerate(names)}, indent=1) + "\n",
        )
    if recipe.init.freeze:
        frozen = freeze_parameters(model, recipe.init.freeze)
        count = sum(p.numel() for n, p in model.named_parameters() if n in set(frozen))
        log.info("frozen: %d parameter tensors (%.3gM values) by init.freeze", len(frozen), count / 1e6)


def init_ar_model(model: torch.nn.Module, recipe: Recipe) -> None:
    """Fine-tuning: load ``init.weights`` into the fresh AR model of a new run.

    Loads the pretrained transformer (`init_model_weights`, class rows by
    `class_rows`); nothing without ``init.weights``. A resumed run never calls it: its
    checkpoint holds the weights.

    Raises:
        CheckpointError: the pretrained weights do not fit the recipe's model.
        RecipeError: the class map names an unknown class.
    """
    init = recipe.init
    if not init.weights:
        return
    source = load_pretrained(init.weights, ema=init.ema)
    rows = class_rows(
        source_classes=source.model.config.num_classes,
        source_names=source.class_names,
        target_classes=recipe.model.num_classes,
        target_names=_run_class_names(recipe),
        class_map=init.class_map,
    )
    init_model_weights(model, source.model.state_dict(), rows, what=f"init.weights {init.weights}")
    log.info(
        "fine-tuning from %s: %d classes kept, %d mapped, %d new (from its 'no class' row)",
        init.weights,
        rows.kept,
        rows.mapped,
        rows.new,
    )


def _run_class_names(recipe: Recipe) -> tuple[str, ...] | None:
    """The class names of the recipe's data, when they fit the model's classes."""
    names = data_class_names(recipe.data)
    return names if names is not None and len(names) == recipe.model.num_classes else None
