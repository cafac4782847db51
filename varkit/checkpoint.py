"""The checkpoint layout of varkit runs, written atomically.

A run directory holds::

    out_dir/
      recipe.yaml                      the resolved recipe of the run
      checkpoints/
        latest                         text: the name of the newest complete step dir
        step-0001000/
          model.safetensors            AR weights
          ema.safetensors              EMA of the AR weights (when the run keeps one)
          tokenizer.safetensors        the frozen tokenizer, so a checkpoint stands alone
          trainer.pt                   optimizer, grad scaler, RNG and data state, step
          recipe.yaml                  the resolved recipe
      tokenizer/checkpoints/...        the tokenizer stage, same layout
                                       (tokenizer.safetensors, discriminator.safetensors)

A step directory is written under a temporary name, every file fsynced, then renamed
into place; ``latest`` is replaced with ``os.replace`` afterwards and old step
directories are pruned last. A crash at any moment therefore leaves ``latest`` naming
a complete checkpoint (or no ``latest`` at all before the first one).
``trainer.pt`` holds only tensors and plain Python data: it loads with
``torch.load(weights_only=True)``.

A step directory damaged afterwards (a file cut short by a copy, a full disk, a bad
sector) is found by `checkpoint_problem` from the files' own structure (the
safetensors header against the file size, the zip directory at the end of
``trainer.pt``, ``recipe.yaml`` parsing), without reading the tensors:
`latest_checkpoint` then skips it with a warning naming it and what is wrong,
and pruning removes it rather than counting it among the kept checkpoints.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from varkit.errors import CheckpointError

log = logging.getLogger(__name__)

LATEST = "latest"
TRAINER = "trainer.pt"
RECIPE = "recipe.yaml"
_STEP_RE = re.compile(r"step-(\d+)\Z")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


def step_dir_name(step: int) -> str:
    """``step-0001000`` for step 1000 (zero-padded so names sort by step)."""
    return f"step-{step:07d}"


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete step directories under ``ckpt_root`` as ``(step, path)``, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _is_step_dir(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("*.safetensors")) or (path / TRAINER).is_file())


def _safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's structure, or None (the tensors are not read)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{file.name} is {size} bytes, too short for a safetensors header"
            (length,) = struct.unpack("<Q", head)
            if 8 + length > size:
                return f"{file.name} is cut short: its header alone needs {8 + length} bytes, the file has {size}"
            header = json.loads(f.read(length))
    except (OSError, ValueError) as exc:
        return f"{file.name} has an unreadable header ({exc})"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"{file.name} is cut short: {size} of {expected} bytes"
    return None


def checkpoint_problem(step_dir: str | os.PathLike) -> str | None:
    """Why ``step_dir`` is not a complete training checkpoint, or None when it is.

    Checks, without loading any tensor: every ``*.safetensors`` file's header and size,
    that ``trainer.pt`` exists and is a whole zip archive (its directory sits at the
    very end, so a file cut short has none), and that ``recipe.yaml`` holds a mapping.
    """
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return "it is not a directory"
    files = sorted(step_dir.glob("*.safetensors"))
    if not files:
        return "it holds no weights (*.safetensors)"
    for file in files:
        problem = _safetensors_problem(file)
        if problem:
            return problem
    trainer = step_dir / TRAINER
    if not trainer.is_file():
        return f"it has no {TRAINER}"
    try:
        with zipfile.ZipFile(trainer) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        return f"{TRAINER} is cut short or damaged ({exc})"
    try:
        recipe = yaml.safe_load((step_dir / RECIPE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return f"{RECIPE} cannot be read ({type(exc).__name__})"
    if not isinstance(recipe, dict):
        return f"{RECIPE} does not hold a recipe"
    return None


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint at ``path``, or None when there is none.

    In a ``checkpoints/`` directory that is the one ``latest`` names, unless
    `checkpoint_problem` finds it damaged: then the newest complete step
    directory, with a warning naming each damaged one skipped.

    Args:
        path: a run directory (holding ``checkpoints/``), a ``checkpoints/`` directory,
            or a step directory (returned as it is; so is any directory holding
            ``*.safetensors``, such as the output of ``varkit import``).
    """
    path = Path(path)
    if not path.is_dir():
        return None
    if _is_step_dir(path):
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    candidates = [p for _, p in reversed(list_checkpoints(root))]
    latest = root / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if _STEP_RE.match(name) and (root / name).is_dir():
            candidates.remove(root / name)
            candidates.insert(0, root / name)
        else:
            log.warning("%s names %r, which is not a checkpoint; using the newest complete one", latest, name)
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        log.warning(
            "checkpoint %s is incomplete (%s); falling back to the newest complete checkpoint before it",
            candidate,
            problem,
        )
    return None


def checkpoint_step(step_dir: str | os.PathLike) -> int | None:
    """The step of a ``step-N`` directory, or None for another name."""
    match = _STEP_RE.match(Path(step_dir).name)
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------------ writing


def _as_os_error(exc: Exception, file: Path) -> OSError:
    """A failed write reported by safetensors or torch.save (their own error types) as an OSError.

    safetensors names the OS error code in its message; torch's zip writer says only
    that the write failed, so a device with under 1 MiB free is taken as full.
    """
    match = re.search(r"code: (\d+)", str(exc))
    if match:
        code = int(match.group(1))
    else:
        try:
            full = shutil.disk_usage(file.parent).free < 2**20
        except OSError:
            full = False
        code = errno.ENOSPC if full else errno.EIO
    return OSError(code, os.strerror(code), str(file))


def os_error_message(exc: OSError, doing: str) -> str:
    """One paragraph for a failed write: what was being done, why it failed, what to do."""
    where = exc.filename or "the run directory"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{doing} failed: no space left on the device holding {where}. Free space there (or "
            "choose another out_dir), then run again: the run resumes from its last complete checkpoint"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "it is on a read-only file system" if exc.errno == errno.EROFS else "permission denied"
        return f"{doing} failed: cannot write {where} ({reason}); choose an out_dir you can write to"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return (
            f"{doing} failed: {where} or a folder above it is a file, not a directory; "
            "choose another out_dir or move the file away"
        )
    return f"{doing} failed: {exc.strerror or exc} ({where})"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; nothing more to do there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def dump_recipe(recipe: dict[str, Any]) -> str:
    """A resolved recipe as YAML text (keys in their given order)."""
    return yaml.safe_dump(dict(recipe), sort_keys=False, default_flow_style=None, width=100)


def plain_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no storage (what safetensors requires)."""
    out, seen = {}, set()
    for key, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr is not None and (ptr[0] in seen):
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr[0])
        out[key] = t
    return out


def save_checkpoint(
    ckpt_root: str | os.PathLike,
    step: int,
    *,
    weights: dict[str, dict[str, torch.Tensor]],
    trainer_state: dict[str, Any],
    recipe: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write ``ckpt_root/step-N/`` atomically, point ``latest`` at it, prune old ones.

    Args:
        ckpt_root: the ``checkpoints/`` directory (created when missing).
        step: optimizer steps done.
        weights: ``{"model": state_dict, "ema": ..., "tokenizer": ...}``; each becomes
            ``<name>.safetensors``.
        trainer_state: optimizer, scaler, RNG and data state (tensors and plain data
            only, so that it loads with ``weights_only=True``).
        recipe: the resolved recipe, written as ``recipe.yaml``.
        keep: how many step directories to keep (the newest).

    Returns:
        The new step directory.
    """
    if keep < 1:
        raise ValueError(f"keep is {keep}; keep at least the checkpoint being written")
    root = Path(ckpt_root)
    name = step_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{name}.{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(root)
        tmp.mkdir()
        for key, state in weights.items():
            file = tmp / f"{key}.safetensors"
            try:
                save_file(plain_tensors(state), str(file), metadata={"format": "pt", "step": str(step)})
            except SafetensorError as exc:
                raise _as_os_error(exc, file) from None
            fsync_file(file)
        with open(tmp / TRAINER, "wb") as f:
            try:
                torch.save(trainer_state, f)
            except RuntimeError as exc:  # torch's zip writer reports a failed write this way
                raise _as_os_error(exc, tmp / TRAINER) from None
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / RECIPE, "w") as f:
            f.write(dump_recipe(recipe))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        final = root / name
        if final.exists():  # the same step saved again (a resumed run's final save)
            old = root / f"{_OLD_PREFIX}{name}.{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(root)
        write_text_atomic(root / LATEST, name + "\n")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(root) if root.is_dir() else None
        kept = f" (the last complete checkpoint, {last.name}, is intact)" if last is not None else ""
        raise CheckpointError(
            os_error_message(exc, f"writing checkpoint {name} into {root}") + kept
        ) from None
    _prune(root, final, keep)
    return final


def _prune(root: Path, final: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (``final`` among them); remove the
    older ones and every damaged step directory, which never counts as kept."""
    complete = []
    for _, path in list_checkpoints(root):
        if path == final:
            complete.append(path)
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            complete.append(path)
        else:
            log.warning("removing the damaged checkpoint %s (%s)", path, problem)
            shutil.rmtree(path, ignore_errors=True)
    kept = set(complete[-keep:]) | {final}
    for path in complete:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def remove_leftovers(ckpt_root: str | os.PathLike) -> list[Path]:
    """Delete what a crashed save left behind under ``ckpt_root`` (never a complete step dir).

    Returns the paths removed. A resuming run calls it before anything else, and every
    save calls it before writing, so temporary directories never pile up.
    """
    root = Path(ckpt_root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for child in root.iterdir():
        if child.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    if removed:
        log.info("removed %d leftovers of an interrupted save in %s", len(removed), root)
    return removed


# ------------------------------------------------------------------------ reading


def load_weights(step_dir: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``step_dir/<name>.safetensors`` (on the CPU).

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    step_dir = Path(step_dir)
    file = step_dir / f"{name}.safetensors"
    if not file.is_file():
        have = sorted(p.stem for p in step_dir.glob("*.safetensors"))
        raise CheckpointError(
            f"{step_dir} has no {name}.safetensors (it holds: {', '.join(have) or 'no weights'})"
        )
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file} cannot be read ({exc}); it may be truncated") from None


def read_recipe(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The resolved recipe stored with a checkpoint (or in a run directory).

    Raises:
        CheckpointError: there is no readable ``recipe.yaml``.
    """
    file = Path(step_dir) / RECIPE
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist: {step_dir} is not a varkit checkpoint")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{file} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} does not hold a recipe mapping")
    return data


def load_trainer_state(step_dir: str | os.PathLike) -> dict[str, Any]:
    """``trainer.pt`` of a checkpoint, loaded with ``weights_only=True`` onto the CPU.

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    file = Path(step_dir) / TRAINER
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist: {step_dir} holds weights only and cannot be resumed")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have no common base class
        raise CheckpointError(f"{file} cannot be read ({exc})") from None
