"""The run directory of ``varkit run``: who may use it, with which recipe.

`RunDirectory` opens ``out_dir`` for one run: it creates it (one clear error
when it cannot: a file in the way, no permission, a full disk), takes ``run.lock`` so
that a second run on the same directory stops at once naming the holder, and checks
the recipe against the one stored with the newest checkpoint. ``recipe.yaml`` is
written by `RunDirectory.started`, once the first stage has set up, so a run
that fails at start-up leaves nothing that refuses the corrected recipe.

A run directory belongs to one recipe. A recipe that differs from the stored one in
anything but `ALLOWED_CHANGES` is refused unless ``force``: those keys change
how long a run goes, how it reports, how it samples or how fast it runs, not what it
trains.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from pathlib import Path
from typing import Any

import attrs

from varkit import recipe as recipe_mod
from varkit.checkpoint import RECIPE, latest_checkpoint, os_error_message, write_text_atomic
from varkit.config_types import unstructure
from varkit.errors import TrainingError

try:  # file locks that the kernel drops when the holder dies (POSIX)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

#: The lock file of a run directory.
LOCK = "run.lock"

#: Recipe keys (and whole sections) that may differ between a run directory and the
#: recipe that resumes it. ``train.steps``/``epochs`` extend or shorten a run (the lr
#: schedule follows the new length from the resumed step on).
ALLOWED_CHANGES = (
    "out_dir",
    "sampler",
    "attention",
    "tokenizer.weights",
    "data.workers",
    "data.cache_dir",
    *(
        f"{stage}.{key}"
        for stage in ("train", "tokenizer_train")
        for key in (
            "steps",
            "epochs",
            "log_every",
            "checkpoint_every",
            "checkpoint_minutes",
            "keep_checkpoints",
            "sample_every",
            "sample_classes",
            "sample_per_class",
            "tensorboard",
            "compile",
            "activation_checkpointing",
        )
    ),
)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _section_defaults() -> dict[str, Any]:
    """Every option of the non-plugin sections at its default, flattened (``train.ema``)."""
    defaults = {}
    for section, cls in recipe_mod.SECTION_TYPES.items():
        try:
            defaults.update(_flatten(unstructure(cls()), section))
        except (TypeError, ValueError):  # a section without defaults for every field
            continue
    return defaults


def recipe_differences(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key that differs outside `ALLOWED_CHANGES`.

    A key one side lacks compares as its default: a recipe stored before an option
    existed ran with what is now its default, and options a stage never used
    (`varkit.recipe.train.RETIRED_TOKENIZER_TRAIN_KEYS`) are not compared.
    """
    retired = {f"tokenizer_train.{key}" for key in recipe_mod.RETIRED_TOKENIZER_TRAIN_KEYS}
    old, cur = _flatten(stored), _flatten(new)
    defaults = _section_defaults()
    problems = []
    for key in sorted((set(old) | set(cur)) - retired):
        if any(key == a or key.startswith(a + ".") for a in ALLOWED_CHANGES):
            continue
        a = old.get(key, defaults.get(key, "<unset>"))
        b = cur.get(key, defaults.get(key, "<unset>"))
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b:
            problems.append(f"{key}: {a!r} -> {b!r}")
    return problems


def stored_recipe(out: Path) -> tuple[dict[str, Any], Path] | None:
    """The recipe stored with the newest complete checkpoint of the run at ``out``
    (the AR stage's, else the tokenizer stage's), and its file; None before the first."""
    for sub in (out, out / "tokenizer"):
        step_dir = latest_checkpoint(sub / "checkpoints")
        if step_dir is not None:
            file = step_dir / RECIPE
            return recipe_mod.read_stored(file), file
    return None


@attrs.frozen
class LockHolder:
    """Who holds a run directory's lock."""

    pid: int
    host: str
    since: str

    @classmethod
    def read(cls, path: Path) -> LockHolder | None:
        try:
            fields = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
            return cls(pid=int(fields["pid"]), host=fields["host"], since=fields.get("since", "?"))
        except (OSError, KeyError, ValueError):
            return None

    def __str__(self) -> str:
        return f"process {self.pid} on host {self.host} (since {self.since})"


class RunLock:
    """An exclusive lock on a run directory: ``flock`` on ``out_dir/run.lock``.

    The kernel releases the lock when its holder exits, however it ends (``kill -9``
    included), so a stale lock file never blocks: its text (pid, host, time) only says
    who held it. Where file locks are missing (Windows) the directory is not locked.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            TrainingError: another process holds it (named with pid and host), or the
                lock file cannot be written.
        """
        if fcntl is None:  # pragma: no cover - Windows
            log.warning("file locks are not available here: %s is not locked", self.path.parent)
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TrainingError(
                os_error_message(exc, f"locking the run directory {self.path.parent}")
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = LockHolder.read(self.path)
            who = str(holder) if holder else "another process"
            raise TrainingError(
                f"{self.path.parent} is in use by another varkit run: {who} holds {self.path}. "
                "Wait for it to finish (or stop it), or choose another out_dir"
            ) from None
        previous = LockHolder.read(self.path)
        if previous is not None:
            log.warning(
                "%s was left by %s, which ended without releasing it (killed?); taking it over",
                self.path,
                previous,
            )
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        text = f"pid={os.getpid()}\nhost={socket.gethostname()}\nsince={since}\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise TrainingError(
                os_error_message(exc, f"locking the run directory {self.path.parent}")
            ) from None
        self._fd = fd

    def release(self) -> None:
        """Release the lock (its file stays, emptied)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # the lock goes with the descriptor either way
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


class RunDirectory:
    """``out_dir`` opened for one run: created, locked, its recipe checked.

    Args:
        recipe: the run's validated recipe.
        force: continue a run directory of another recipe (the differences are logged).
    """

    def __init__(self, recipe, *, force: bool = False):
        self.recipe = recipe
        self.force = force
        self.path = Path(recipe.out_dir)
        self.lock = RunLock(self.path)
        self._recipe_written = False

    def open(self) -> None:
        """Create the directory, lock it and check the recipe against its checkpoints.

        Raises:
            TrainingError: the directory cannot be created or written, another run holds
                it, or it holds checkpoints of another recipe (and not ``force``).
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainingError(os_error_message(exc, f"creating out_dir {self.path}")) from None
        if not self.path.is_dir():
            raise TrainingError(
                f"creating out_dir {self.path} failed: it is a file, not a directory; "
                "choose another out_dir or move the file away"
            )
        self.lock.acquire()
        try:
            self._check_recipe()
        except BaseException:
            self.lock.release()
            raise

    def _check_recipe(self) -> None:
        stored = stored_recipe(self.path)
        if stored is None:
            return
        data, file = stored
        differences = recipe_differences(data, self.recipe.to_dict())
        if differences and not self.force:
            shown = "\n  ".join(differences[:12]) + ("\n  ..." if len(differences) > 12 else "")
            raise TrainingError(
                f"{self.path} holds a run of another recipe ({file}); it differs in:\n  {shown}\n"
                "Choose another out_dir, or pass --force to continue this run with the new recipe "
                "(a changed model shape then fails to load its checkpoint)"
            )
        if differences:
            log.warning(
                "--force: continuing %s with a changed recipe (%s)", self.path, "; ".join(differences)
            )

    def started(self) -> None:
        """The run has set up: store its recipe as ``recipe.yaml`` (once)."""
        if self._recipe_written:
            return
        try:
            write_text_atomic(self.path / RECIPE, self.recipe.to_yaml())
        except OSError as exc:
            raise TrainingError(os_error_message(exc, f"writing {self.path / RECIPE}")) from None
        self._recipe_written = True

    def close(self) -> None:
        self.lock.release()
