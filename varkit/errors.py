"""The error hierarchy of varkit.

Every error that a user can cause (a bad recipe, an unknown plugin, a wrong checkpoint)
is a `VarkitError`. The CLI prints these as one paragraph without a traceback
and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VarkitError(Exception):
    """Base class of the errors that varkit raises for bad input."""


class PluginError(VarkitError):
    """A plugin is unknown, unavailable, or broke the plugin contract."""


class RecipeError(VarkitError):
    """A recipe is missing, malformed, or fails validation.

    Attributes:
        problems: every problem found, as ``file: key.path: message`` lines.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class CheckpointError(VarkitError):
    """A checkpoint file is missing, truncated, or does not match the model."""


class DataError(VarkitError):
    """A data source (shard pattern, image folder) is missing or unusable."""


class TrainingError(VarkitError):
    """A training run cannot go on (non-finite loss, incompatible run directory)."""


class EvaluationError(VarkitError):
    """Sampling to disk or scoring samples cannot go on: arguments that do not fit, a
    sample set or reference that cannot be read or compared, a missing Inception network."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice most similar to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ``" (did you mean 'x'?)"`` suffix for error messages, or an empty string."""
    match = closest(name, choices)
    return f" (did you mean {match!r}?)" if match else ""
