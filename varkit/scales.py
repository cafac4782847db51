"""Scale schedules: the sizes of the code maps of a multi-scale tokenizer.

A schedule is a tuple of ``(h, w)`` grids, coarse to fine; the last one is the
tokenizer's latent grid. VAR's default for a 16×16 latent is
``1, 2, 3, 4, 5, 6, 8, 10, 13, 16`` (680 tokens).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from varkit.errors import RecipeError

Grid = tuple[int, int]

#: VAR's schedule for 256 px images (16×16 latent), from the official release.
VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
#: VAR's schedule for 512 px images (32×32 latent).
VAR_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def parse(spec: Sequence[int | Sequence[int]]) -> tuple[Grid, ...]:
    """Turn ``[1, 2, (3, 4), ...]`` into ``((1, 1), (2, 2), (3, 4), ...)``.

    An int ``n`` stands for the square grid ``(n, n)``.

    Raises:
        RecipeError: an entry is neither an int nor a pair of ints.
    """
    grids = []
    for entry in spec:
        if isinstance(entry, bool):
            raise RecipeError(f"schedule entry {entry!r} is not a size; use an int or [h, w]")
        if isinstance(entry, int):
            grids.append((entry, entry))
        elif (
            isinstance(entry, Sequence)
            and len(entry) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in entry)
        ):
            grids.append((int(entry[0]), int(entry[1])))
        else:
            raise RecipeError(f"schedule entry {entry!r} is not a size; use an int or [h, w]")
    return tuple(grids)


def validate(grids: Sequence[Grid], latent: Grid | None = None) -> list[str]:
    """Every problem of a schedule, as messages (empty when it is valid).

    A schedule must be non-empty, hold positive sizes, grow in both axes from one
    scale to the next (strictly in at least one, so no two scales repeat) and end at
    the tokenizer's latent grid when ``latent`` is given.
    """
    problems = []
    if not grids:
        return ["the schedule is empty; give at least the latent grid, e.g. [16]"]
    for h, w in grids:
        if h < 1 or w < 1:
            problems.append(f"scale {h}x{w} has a size below 1")
    for (h0, w0), (h1, w1) in itertools.pairwise(grids):
        if h1 < h0 or w1 < w0 or (h1, w1) == (h0, w0):
            problems.append(f"scales must grow from coarse to fine, but {h0}x{w0} is followed by {h1}x{w1}")
    if latent is not None and tuple(grids[-1]) != tuple(latent):
        h, w = grids[-1]
        problems.append(
            f"the last scale is {h}x{w} but the tokenizer's latent grid is "
            f"{latent[0]}x{latent[1]}; end the schedule at the latent grid"
        )
    return problems


def check(grids: Sequence[Grid], latent: Grid | None = None) -> tuple[Grid, ...]:
    """Return ``grids`` as a tuple, or raise RecipeError naming every problem."""
    problems = validate(grids, latent)
    if problems:
        raise RecipeError(problems)
    return tuple((int(h), int(w)) for h, w in grids)


def num_tokens(grids: Sequence[Grid]) -> int:
    """The number of positions of all scales together, ``sum(h * w)``."""
    return sum(h * w for h, w in grids)


def default(latent: int | Grid, num_scales: int | None = None) -> tuple[Grid, ...]:
    """A schedule ending at ``latent`` with ``num_scales`` steps.

    For the latents of VAR's releases (16 and 32, square, 10 scales) this is exactly
    the published schedule. Otherwise sizes follow VAR's shape: the first scales grow
    by one (the coarse scales carry the layout and are cheap), the rest grow
    geometrically to the latent, so that the token count stays near ``1.6 × h × w``.
    Non-square latents scale both axes by the same ratio.

    Args:
        latent: the final grid, an int for a square one.
        num_scales: how many scales; by default ``min(10, largest side)``.
    """
    h, w = (latent, latent) if isinstance(latent, int) else latent
    side = max(h, w)
    n = num_scales if num_scales is not None else min(10, side)
    if n < 1 or n > side:
        raise RecipeError(f"cannot make {n} strictly growing scales ending at {h}x{w}; use 1..{side} scales")
    if (h, w) == (16, 16) and n == 10:
        return tuple((s, s) for s in VAR_256)
    if (h, w) == (32, 32) and n == 10:
        return tuple((s, s) for s in VAR_512)
    sides = _growing_sides(side, n)
    grids = []
    for s in sides:
        gh = max(1, round(s * h / side))
        gw = max(1, round(s * w / side))
        grids.append((gh, gw))
    # rounding may repeat a grid for the short axis; the long axis always grows.
    return check(_dedupe(grids), (h, w))


def _growing_sides(side: int, n: int) -> list[int]:
    """``n`` strictly increasing ints from 1 to ``side``: linear head, geometric tail."""
    if n == 1:
        return [side]
    head = max(1, min(n - 1, math.ceil(0.6 * n)))  # VAR: 6 of 10 scales grow by one
    sides = list(range(1, head + 1))
    remaining = n - head
    start = sides[-1]
    for i in range(1, remaining + 1):
        target = start * (side / start) ** (i / remaining)
        nxt = max(sides[-1] + 1, round(target))
        sides.append(nxt)
    sides[-1] = side
    # enforce strict growth backwards if geometric rounding overshot
    for i in range(len(sides) - 2, -1, -1):
        if sides[i] >= sides[i + 1]:
            sides[i] = sides[i + 1] - 1
    return sides


def _dedupe(grids: list[Grid]) -> list[Grid]:
    out: list[Grid] = []
    for g in grids:
        if not out or g != out[-1]:
            out.append(g)
    return out
